"""A gs:// workdir: train, evaluate, resume and evaluate again, every file of the run in the bucket, none local.

The bucket is a local folder behind fsspec and TensorStore (tests/fake_bucket.py); the program runs its
gs:// code: no lock (said in the log), Orbax's commit files, reports, history and TensorBoard through epath.
"""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from cma_jax import main as main_lib
from cma_jax import paths, train
from cma_jax.data import video
from cma_jax.data.builders import REGISTRY
from cma_jax.data.builders.base import Entry, VideoTextBuilder, VideoTextConfig
from fake_bucket import bucket  # noqa: F401 - the fixture
from tiny import tiny_config

NAME = "remote_tiny_videos"
COLOURS = ("red", "green", "blue", "white")


class Videos(VideoTextBuilder, skip_registration=True):
    """Videos of one colour each, two frames, captioned with the colour and a number."""

    name = NAME
    BUILDER_CONFIGS = [VideoTextConfig(name="default", resolution=32)]

    def _split_entries(self, manual_dir):
        return {split: [Entry(f"{split}{i}", (f"{COLOURS[i % 4]} w{i}",), i) for i in range(n)]
                for split, n in (("train", 8), ("test", 4))}

    def _frame_loader(self):
        def frames(i):
            rgb = np.array([(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 200)][i % 4], np.uint8)
            return [video.encode_jpeg(Image.fromarray(np.broadcast_to(rgb, (32, 32, 3)).copy()))] * 2
        return frames


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_data")
    Videos(data_dir=str(root), num_workers=0).download_and_prepare()
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(COLOURS + tuple(f"w{i}" for i in range(8))))
    REGISTRY[NAME] = Videos
    yield str(root), str(vocab)
    del REGISTRY[NAME]


def _files(root):
    return sorted(os.path.relpath(os.path.join(r, f), root) for r, _, fs in os.walk(root) for f in fs)


@pytest.mark.slow
def test_train_eval_resume_on_a_gs_workdir(bucket, data, tmp_path, monkeypatch, caplog):  # noqa: F811
    cwd = tmp_path / "cwd"  # a local folder named 'gs:' would show up here
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    data_dir, vocab = data
    config = tiny_config(num_steps=2, save_every_steps=1)
    config.mode = "train_and_eval"
    config.data.name, config.data.data_dir, config.data.tokenizer = NAME, data_dir, vocab
    config.eval.batch_size = 4
    workdir = "gs://runs/tiny"
    with caplog.at_level(logging.WARNING, logger="cma_jax.lock"):
        results = main_lib.run(config, workdir)
    assert "workdir gs://runs/tiny is remote: it cannot be locked" in caplog.text
    assert results["num_videos"] == 4 and results["num_texts"] == 4

    run = bucket / "runs" / "tiny"
    files = _files(run)
    assert "eval_test_step2.json" in files and "eval_test_step2.md" in files
    assert json.loads((run / "eval_test_step2.json").read_text())["metrics"] == results["metrics"]
    assert "checkpoints/2/commit_success.txt" in files and "checkpoints/1/commit_success.txt" in files
    events = [f for f in files if f.startswith("tb/events")]
    assert len(events) == 1  # training and evaluation share one writer
    assert b"train/loss" in (run / events[0]).read_bytes() and b"test/t2v_R1" in (run / events[0]).read_bytes()
    assert [h["step"] for h in train.read_history(workdir)] == [1, 2]
    assert not os.listdir(cwd)
    assert paths.LOCK not in files and paths.HOLDER not in files

    config.train.num_steps = 3  # resumes from the bucket's step 2
    config.train.allow_config_change = True
    resumed = main_lib.run(config, workdir)
    assert [h["step"] for h in train.read_history(workdir)] == [1, 2, 3]
    assert "eval_test_step3.json" in _files(run)

    config.mode = "eval"  # the adapters of the bucket's latest checkpoint
    again = main_lib.run(config, workdir)
    assert again["metrics"] == resumed["metrics"] and again["step"] == 3
