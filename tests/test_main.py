"""End to end through cma_jax.main.run: grain pipeline -> train -> checkpoint -> evaluate; then mode=eval."""

import os

import numpy as np
import pytest
from PIL import Image

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
