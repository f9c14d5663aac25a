"""End to end through cma_jax.main.run: grain pipeline -> train -> checkpoint -> evaluate; then mode=eval."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cma_jax import config as config_lib
from cma_jax import main as main_lib
from cma_jax.data import video
from cma_jax.data.builders import REGISTRY
from cma_jax.data.builders.base import Entry, VideoTextBuilder, VideoTextConfig
from tiny import tiny_config

NAME = "h4_tiny_videos"
WORDS = ["a", "red", "green", "blue", "clip", "of"] + [f"w{i}" for i in range(8)]


def _frames(src):
    i, n = src
    return [video.encode_jpeg(Image.fromarray(np.full((32, 32, 3), (40 * (i % 6), 20 * j, 9 * i), np.uint8)))
            for j in range(n)]


class TinyVideos(VideoTextBuilder, skip_registration=True):
    name = NAME
    BUILDER_CONFIGS = [VideoTextConfig(name="default", resolution=32)]

    def _split_entries(self, manual_dir):
        def entries(n, offset):
            return [Entry(f"v{i}", (f"a clip of w{i % 8} {WORDS[1 + i % 3]}",), (i + offset, 2 + i % 3))
                    for i in range(n)]
        return {"train": entries(16, 0), "test": entries(8, 100)}

    def _frame_loader(self):
        return _frames


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("h4_data")
    TinyVideos(data_dir=str(root), num_workers=0).download_and_prepare()
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(WORDS))
    REGISTRY[NAME] = TinyVideos
    yield str(root), str(vocab)
    del REGISTRY[NAME]


def test_train_and_eval_then_eval_only_from_the_checkpoint(data, tmp_path):
    data_dir, vocab = data
    config = tiny_config(num_steps=3, save_every_steps=10)
    config.mode = "train_and_eval"
    config.data.name, config.data.data_dir, config.data.tokenizer = NAME, data_dir, vocab
    config.eval.batch_size = 4
    workdir = str(tmp_path / "run")
    results = main_lib.run(config, workdir)
    assert results["num_videos"] == 8 and results["num_texts"] == 8
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tb")))

    config.mode = "eval"  # reloads the backbone (random init, same seed) + the run's adapters
    again = main_lib.run(config, workdir)
    assert again["metrics"] == results["metrics"]

    config.method = "zero_shot"  # no adapters: other numbers from the same program
    zero = main_lib.run(config, str(tmp_path / "zero"))
    assert zero["num_texts"] == 8 and zero["metrics"] != results["metrics"]


@pytest.mark.parametrize("override, unknown, hint", [
    ("train.lerning_rate", "train.lerning_rate", "did you mean config.train.lr?"),
    ("train.learning_rate", "train.learning_rate", "did you mean config.train.lr?"),
    ("train.wd", "train.wd", "did you mean config.train.weight_decay?"),
    ("trian.lr", "trian", "did you mean config.train.lr?"),
    ("num_frames", "num_frames", "did you mean config.data.num_frames?"),
    ("data.fsp", "data.fsp", "did you mean config.data.fps?"),
    ("mesh.dp", "mesh.dp", "did you mean one of config.mesh.fsdp, config.mesh.data?"),
])
def test_an_unknown_override_names_the_closest_fields(override, unknown, hint):
    arg = f"--config.{override}=1"
    with pytest.raises(SystemExit) as e:
        main_lib.check_overrides(["main.py", "--workdir=/tmp/x", arg])
    assert e.value.code == (f"error: unknown config field config.{unknown} in {arg!r}; {hint} "
                            "(every field is in cma_jax/config.py)")


def test_known_overrides_pass():
    main_lib.check_overrides(["main.py", "--config.train.lr=1e-4", "--config.extra.anything=1", "--workdir=x"])


FULL_DISK_RUN = """
import atexit, errno, logging, sys, threading
import jax
from absl import app
from cma_jax import main

def flush_events():  # what TensorBoard's writer hits at exit, on the same full disk
    raise OSError(errno.ENOSPC, "No space left on device")

def fail():
    raise OSError("handle is closed")

def late_thread():  # and a writer thread whose queue is gone by then
    t = threading.Thread(target=fail)
    t.start()
    t.join()

def run(config, workdir, overridden=()):
    jax.devices()  # JAX logs "Unable to initialize backend 'tpu'" at INFO where there is no TPU
    logging.getLogger("somelib").warning("a real warning")
    atexit.register(flush_events)
    atexit.register(late_thread)
    raise OSError(errno.ENOSPC, "No space left on device", workdir + "/checkpoints/20/params/d/ab12")

main.run = run
sys.argv = ["main.py", "--config=configs/msrvtt.py", "--workdir=" + sys.argv[1]]
app.run(main.main)
"""


def test_a_full_disk_ends_in_one_error_line(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", FULL_DISK_RUN, str(tmp_path)], capture_output=True, text=True,
                       cwd=root, timeout=300)
    assert p.returncode == 1
    lines = p.stderr.splitlines()
    assert lines[-1] == (f"error: the disk is full (no space left on device) writing {tmp_path}/checkpoints/20/"
                         "params/d/ab12; free some space or write to another disk, then run the same command again")
    assert "Traceback" not in p.stderr and "Unable to initialize backend" not in p.stderr
    assert len(lines) == 2 and lines[0].endswith("a real warning")


def _main(*args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "cma_jax.main", *args], capture_output=True, text=True, cwd=root,
                          timeout=300)


def test_help_exits_0():
    p = _main("--help")
    assert p.returncode == 0, p.stderr
    assert "--workdir: Run folder" in p.stdout


def test_print_config_lists_every_field_with_its_value_and_meaning_and_does_nothing_else(tmp_path):
    p = _main("--config=configs/msrvtt.py:vit_b16", "--config.adapter.share_dim=32", "--print_config",
              f"--workdir={tmp_path / 'run'}")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    meanings = config_lib.field_meanings()
    assert [line.split()[0] for line in lines] == list(meanings)  # every field once, in base_config()'s order
    row = {line.split()[0]: line for line in lines}
    assert row["adapter.share_dim"].split()[1] == "32"  # the override
    assert row["backbone"].split()[1] == "'ViT-B/16'"  # the file's preset argument
    assert row["model.preset"].split()[1] == "'vit_b16'"
    assert row["train.lr"].split(None, 2)[1:] == ["1e-05", meanings["train.lr"]]
    assert row["model.clip.text_width"].split(None, 2)[1:] == ["None", meanings["model.clip.text_width"]]
    assert not (tmp_path / "run").exists()
