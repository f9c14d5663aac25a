"""Image-text end to end on generated images (`synthetic_images`, T = 1, two captions per image): the pipeline
samples (image, caption) pairs, one training step runs, evaluation encodes every image and caption once and
reports TR / IR."""

import json

import numpy as np
import pytest

from cma_jax import evaluate as ev
from cma_jax import metrics
from cma_jax import run as run_lib
from cma_jax import train as train_lib
from cma_jax.data import pipeline
from cma_jax.data.builders import get_builder, synthetic
from cma_jax.models import retrieval
from tiny import tiny_config

CONFIG = "adapt_mini"  # 256 / 64 / 128 images, two captions each


@pytest.fixture(scope="module")
def image_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    get_builder("synthetic_images", root / "data", CONFIG).download_and_prepare()
    config = tiny_config(num_steps=1, save_every_steps=1)
    config.model.clip.vocab_size = len(synthetic.VOCABULARY) + 3  # words + unk, start, end
    config.model.clip.context_length = 16
    config.data.name, config.data.builder_config, config.data.data_dir = "synthetic_images", CONFIG, str(root / "data")
    config.data.tokenizer = synthetic.write_vocabulary(str(root / "vocab.txt"))
    config.data.num_frames, config.data.max_words = 1, 16
    config.eval.batch_size = 48  # 128 images -> 3 batches, the last one padded
    return config


def test_training_samples_image_caption_pairs(image_config):
    it = pipeline.train_iterator_from_config(image_config, process_index=0, process_count=1)
    try:
        batch = next(it)
    finally:
        it.close()
    assert pipeline.count_pairs("synthetic_images", "train", image_config.data.data_dir, CONFIG) == 512
    assert batch["frames"].shape == (8, 1, 32, 32, 3) and batch["frame_mask"].all()
    assert batch["text_ids"].shape == (8, 16)


def test_evaluation_encodes_every_image_and_caption_once(image_config):
    batches = pipeline.eval_batches_from_config(image_config, process_index=0, process_count=1)
    assert (batches.media, batches.num_videos, batches.num_texts) == ("image", 128, 256)
    images = np.concatenate([b["video_index"][b["valid"]] for b in batches.videos])
    texts = [(b["text_index"][b["valid"]], b["video_index"][b["valid"]]) for b in batches.texts]
    np.testing.assert_array_equal(images, np.arange(128))
    np.testing.assert_array_equal(np.concatenate([t for t, _ in texts]), np.arange(256))
    np.testing.assert_array_equal(np.concatenate([v for _, v in texts]), np.arange(256) // 2)  # caption -> image
    assert all(b["frames"].shape[1:] == (1, 32, 32, 3) for b in batches.videos)


@pytest.mark.slow  # ~13 s: compiles the tiny train step and both encoders
def test_one_step_then_tr_and_ir_with_and_without_dsl(image_config, tmp_path):
    model, history = train_lib.train(run_lib.resolve(image_config, str(tmp_path / "run")))
    assert [h["step"] for h in history] == [1] and np.isfinite(history[0]["loss"])
    batches = pipeline.eval_batches_from_config(image_config, process_index=0, process_count=1)
    res = ev.evaluate(model, batches.texts, batches.videos, block_size=100, dsl=True, workdir=str(tmp_path),
                      name="test", media=batches.media)
    assert list(res["metrics"]) == list(res["dsl"]) == ["tr", "ir"]
    assert (res["num_texts"], res["num_videos"], res["media"]) == (256, 128, "image")

    # The same numbers from the whole similarity matrix at once (no tiles) and the metrics alone.
    text_emb, text_idx, frame_emb, frame_mask = ev.encode_eval_set(model, batches.texts, batches.videos)
    np.testing.assert_array_equal(text_idx, np.arange(256) // 2)
    sim = np.asarray(model.similarity(text_emb, frame_emb, frame_mask))
    for key, dsl_temp in (("metrics", None), ("dsl", 1.0)):
        expected = metrics.retrieval_metrics(sim, text_idx, media="image", dsl_temp=dsl_temp)
        for direction in ("tr", "ir"):
            assert res[key][direction] == pytest.approx(expected[direction]), (key, direction)
    assert 0.0 <= res["metrics"]["tr"]["R1"] <= 100.0 and res["metrics"]["ir"]["MnR"] >= 1.0
    # With one frame both heads are CLIP's cosine: the configs' meanp head loses nothing.
    tc = retrieval.similarity("text_conditioned", text_emb[:20], frame_emb, frame_mask, model.tau)
    np.testing.assert_allclose(np.asarray(tc), np.asarray(retrieval.similarity("meanp", text_emb[:20], frame_emb,
                                                                               frame_mask)), atol=1e-5)

    report = (tmp_path / "eval_test.md").read_text()
    assert "256 captions x 128 images" in report and "| | TR R1 | TR R5 | TR R10 | TR MdR | TR MnR | IR R1" in report
    assert "| test + DSL |" in report
    assert json.loads((tmp_path / "eval_test.json").read_text())["metrics"]["tr"] == res["metrics"]["tr"]
    line = ev._summary_line("test", None, res["metrics"])  # pylint: disable=protected-access
    assert line.startswith("eval test: TR R@1 ") and " | IR R@1 " in line

    class Writer:  # what TensorBoard gets
        def __init__(self):
            self.tags = []

        def add_scalar(self, tag, value, step):
            self.tags.append(tag)

        def flush(self):
            pass

    writer = Writer()
    ev._write_scalars(writer, res, "test", 1)  # pylint: disable=protected-access
    assert writer.tags[:2] == ["test/tr_R1", "test/tr_R5"] and "test_dsl/ir_MnR" in writer.tags
