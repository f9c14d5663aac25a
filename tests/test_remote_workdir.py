"""gs:// paths: a workdir (train, evaluate, resume, evaluate again) and a search index, every file in the bucket,
none local; a folder that must be renamed into place whole is refused there.

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


def test_search_index_and_query_on_a_gs_index(bucket, tmp_path, monkeypatch, capsys):  # noqa: F811
    """The same videos indexed into a local folder and into the bucket answer a query alike."""
    from flax import nnx

    import videofiles
    from cma_jax import checkpoint, search
    from cma_jax.models.peft.adapter import AdapterConfig, AdapterParam
    from cma_jax.models.clip import CLIPConfig
    from cma_jax.models.retrieval import RetrievalModel

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    clip = CLIPConfig(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=32, vision_patch_size=16,
                      context_length=8, vocab_size=16, text_width=32, text_heads=2, text_layers=1)
    model = RetrievalModel(clip, AdapterConfig(reduction_dim=4, share_dim=4), rngs=nnx.Rngs(0))
    backbone, adapters = str(tmp_path / "backbone"), str(tmp_path / "adapters")
    checkpoint.save_backbone(backbone, clip, nnx.to_pure_dict(
        nnx.state(model.clip, nnx.All(nnx.Param, nnx.Not(AdapterParam)))))
    checkpoint.save_adapters(adapters, model)
    videos = tmp_path / "videos"
    for i in range(3):
        videofiles.write_video(videos / f"v{i}.mp4", i, 2.0)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nred\ngreen\nblue\nvideo\n")

    def index_and_query(index_dir):
        assert search.main(["index", str(videos), index_dir, "--backbone", backbone, "--adapters", adapters,
                            "--tokenizer", str(vocab), "--num_frames", "2", "--max_words", "8", "--no_progress"]) == 0
        capsys.readouterr()
        assert search.main(["query", index_dir, "a red video", "-k", "3", "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    local = index_and_query(str(tmp_path / "index"))
    remote = index_and_query("gs://runs/index")
    assert [h["video"] for h in remote[0]["hits"]] == [h["video"] for h in local[0]["hits"]]
    assert [h["score"] for h in remote[0]["hits"]] == [h["score"] for h in local[0]["hits"]]
    assert "manifest.json" in _files(bucket / "runs" / "index") and not os.listdir(cwd)


def test_a_folder_for_a_bucket_is_refused_instead_of_landing_in_a_local_gs_folder(tmp_path, monkeypatch):
    """Backbone and adapter folders are renamed into place whole; gs:// cannot: refused, no local 'gs:' folder."""
    from cma_jax import files

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^gs://b/adapters: a folder is written to a local disk only"):
        files.write_dir_atomic("gs://b/adapters", lambda tmp: os.makedirs(tmp))
    assert not os.listdir(tmp_path)
