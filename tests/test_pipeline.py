"""grain pipeline on a tiny dataset built with base.py's builder machinery.

Frame j of video i is a solid colour (R, G) = (15 j, 10 i), and caption c of video i is
"clip v<i> c<c>", so every batch row tells which video, which frames and which caption it holds.
"""

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from cma_jax.data import frame_cache, pipeline, sampling, video
from cma_jax.data.builders import REGISTRY
from cma_jax.data.builders.base import Entry, VideoTextBuilder, VideoTextConfig

TRAIN_FRAMES = [1, 3, 4, 5, 8, 12, 13, 16, 2, 7]          # stored frames per train video
TRAIN_CAPTIONS = [1 + i % 3 for i in range(len(TRAIN_FRAMES))]  # 19 pairs
TEST_FRAMES = [4, 9, 2, 6, 3]
TEST_CAPTIONS = [1, 3, 2, 1, 4]                            # multi-caption: 11 texts
WORDS = ["clip"] + [f"v{i}" for i in range(10)] + [f"c{c}" for c in range(4)]
NAME = "tiny_pipeline"


def _frames(src):
    i, n = src
    return [video.encode_jpeg(Image.fromarray(np.full((16, 16, 3), (15 * j, 10 * i, 128), np.uint8)))
            for j in range(n)]


def _entries(frames, captions):
    return [Entry(f"v{i}", tuple(f"clip v{i} c{c}" for c in range(k)), (i, n))
            for i, (n, k) in enumerate(zip(frames, captions))]


class TinyVideos(VideoTextBuilder, skip_registration=True):
    name = NAME
    BUILDER_CONFIGS = [VideoTextConfig(name="default", resolution=16)]

    def _split_entries(self, manual_dir):
        return {"train": _entries(TRAIN_FRAMES, TRAIN_CAPTIONS), "test": _entries(TEST_FRAMES, TEST_CAPTIONS)}

    def _frame_loader(self):
        return _frames


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny_data"))
    TinyVideos(data_dir=root, num_workers=0).download_and_prepare()
    REGISTRY[NAME] = TinyVideos
    yield root
    del REGISTRY[NAME]


def _train(data_dir, **kw):
    args = dict(num_frames=6, max_words=8, batch_size_per_process=4, seed=0, workers=0)
    args.update(kw)
    return pipeline.train_iterator(NAME, "train", data_dir, WORDS, **args)


def _decode_rows(batch):
    """Per row: (video from frames, frame indices, (video, caption) from the text)."""
    rows = []
    for frames, mask, ids in zip(batch["frames"], batch["frame_mask"], batch["text_ids"]):
        pix = frames[:, 0, 0, :2].astype(float)  # [T, (R, G)]
        assert not frames[~mask].any(), "padding frames must be zeros"
        frame_video = int(round(pix[0, 1] / 10))
        indices = [int(round(r / 15)) for r in pix[mask, 0]]
        assert ids[1] == 0, "caption must start with 'clip'"
        rows.append((frame_video, indices, (int(ids[2]) - 1, int(ids[3]) - 11)))
    return rows


def _take(it, n):
    return [next(it) for _ in range(n)]


def _pairs(batches):
    return [text for b in batches for _, _, text in _decode_rows(b)]


def test_sample_frame_indices():
    np.testing.assert_array_equal(sampling.sample_frame_indices(20, 12), [0, 1, 3, 5, 6, 8, 10, 12, 13, 15, 17, 19])
    np.testing.assert_array_equal(sampling.sample_frame_indices(5, 12), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(sampling.sample_frame_indices(12, 12), np.arange(12))


def _pil_clip(jpegs, num_frames):
    """The decoding before issue 24 (PIL, np.stack, zero padding): the reference load_clip must match."""
    chosen = [np.asarray(Image.open(io.BytesIO(jpegs[i])).convert("RGB"))
              for i in sampling.sample_frame_indices(len(jpegs), num_frames)]
    return sampling.pad_clip(np.stack(chosen), num_frames)


@pytest.mark.parametrize("quality,subsampling", [(90, -1), (95, 0)])  # the builders' and the synthetic set's
def test_load_clip_gives_the_pixels_of_pil_decoding(quality, subsampling):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40]
    jpegs = []
    for j in range(9):  # gradients + noise: every DCT coefficient and the chroma upsampling matter
        img = np.stack([xx * 5 + j, yy * 6, (xx + yy) * 3], -1) + rng.normal(0, 20, (40, 40, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality,
                                                                       subsampling=subsampling)
        jpegs.append(buf.getvalue())
    for stored, t in ((9, 4), (3, 5), (1, 2), (9, 9)):  # sampled, padded, one frame, all
        frames, mask = pipeline.load_clip(jpegs[:stored], t)
        want_frames, want_mask = _pil_clip(jpegs[:stored], t)
        assert frames.dtype == np.uint8 and frames.shape == (t, 40, 40, 3)
        np.testing.assert_array_equal(frames, want_frames)
        np.testing.assert_array_equal(mask, want_mask)
    with pytest.raises(ValueError, match=r"shape \(40, 40, 3\) where the clip holds \(48, 48, 3\)"):
        video.decode_jpeg(jpegs[0], out=np.zeros((48, 48, 3), np.uint8))
    with pytest.raises(ValueError):
        video.decode_jpeg(jpegs[0], out=np.zeros((32, 32, 3), np.uint8))


def test_train_pairs_and_shard_bounds():
    np.testing.assert_array_equal(pipeline.train_pairs([2, 1, 3]), [[0, 0], [0, 1], [1, 0], [2, 0], [2, 1], [2, 2]])
    assert [pipeline.shard_bounds(10, p, 3) for p in range(3)] == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(ValueError, match="process_index"):
        pipeline.shard_bounds(10, 2, 2)


def test_train_batches_follow_the_contract(data_dir):
    for batch in _take(_train(data_dir), 6):
        assert batch["frames"].shape == (4, 6, 16, 16, 3) and batch["frames"].dtype == np.uint8
        assert batch["frame_mask"].shape == (4, 6) and batch["frame_mask"].dtype == bool
        assert batch["text_ids"].shape == (4, 8) and batch["text_ids"].dtype == np.int32
        assert batch["text_mask"].dtype == np.int32
        np.testing.assert_array_equal(batch["text_mask"].sum(1), 5)  # start, 3 words, end
        np.testing.assert_array_equal(batch["text_ids"].argmax(1), 4)  # end token is the largest id
        for (frame_video, indices, (text_video, caption)), mask in zip(_decode_rows(batch), batch["frame_mask"]):
            assert frame_video == text_video, "caption paired with another video's frames"
            assert 0 <= caption < TRAIN_CAPTIONS[text_video]
            n = TRAIN_FRAMES[frame_video]
            assert indices == list(sampling.sample_frame_indices(n, 6))
            assert mask.sum() == min(n, 6) and mask[: min(n, 6)].all()


def test_one_epoch_enumerates_every_pair_and_shards_are_disjoint(data_dir):
    every = {(v, c) for v, k in enumerate(TRAIN_CAPTIONS) for c in range(k)}
    assert len(every) == 19
    single = _pairs(list(_train(data_dir, batch_size_per_process=1, num_epochs=1)))
    assert len(single) == 19 and set(single) == every
    shards = [_pairs(list(_train(data_dir, batch_size_per_process=1, num_epochs=1,
                                 process_index=p, process_count=2))) for p in range(2)]
    assert [len(s) for s in shards] == [9, 10]
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == every


def test_deterministic_for_a_seed_and_reshuffled_each_epoch(data_dir):
    a = _pairs(_take(_train(data_dir, batch_size_per_process=1, seed=3), 38))
    b = _pairs(_take(_train(data_dir, batch_size_per_process=1, seed=3), 38))
    c = _pairs(_take(_train(data_dir, batch_size_per_process=1, seed=4), 38))
    assert a == b
    assert a[:19] != c[:19]
    assert sorted(a[:19]) == sorted(a[19:]) and a[:19] != a[19:]  # epoch 2: same pairs, new order


def test_resume_from_state_gives_identical_batches(data_dir):
    it = _train(data_dir, seed=7)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = _take(it, 4)
    resumed = _train(data_dir, seed=7)
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, 4)):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume_across_worker_counts(data_dir):
    expected = _take(_train(data_dir, seed=5), 6)
    it = _train(data_dir, seed=5, workers=2)
    got = _take(it, 2)
    state = it.get_state()
    it.close()
    assert state == {"next_batch": 2}
    resumed = _train(data_dir, seed=5, workers=2)
    resumed.set_state(state)
    got += _take(resumed, 2)
    in_process = _train(data_dir, seed=5, workers=0)
    in_process.set_state(resumed.get_state())
    resumed.close()
    got += _take(in_process, 2)
    for want, have in zip(expected, got, strict=True):
        for key in want:
            np.testing.assert_array_equal(have[key], want[key])


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_every_video_once_and_every_caption_with_its_video(data_dir, process_count):
    parts = [pipeline.eval_batches(NAME, "test", data_dir, WORDS, num_frames=4, max_words=6,
                                   batch_size_per_process=2, process_index=p, process_count=process_count)
             for p in range(process_count)]
    np.testing.assert_array_equal(parts[0].text_video_index, [0, 1, 1, 1, 2, 2, 3, 4, 4, 4, 4])
    assert parts[0].video_ids == ("v0", "v1", "v2", "v3", "v4")
    assert (parts[0].num_videos, parts[0].num_texts) == (5, 11)
    seen_videos, seen_texts = [], []
    for part in parts:
        videos, texts = list(part.videos), list(part.texts)
        # Every process yields the same number of full batches (3/5 videos -> 2 batches of 2 at 2 processes).
        assert len(videos) == part.num_video_batches == {1: 3, 2: 2}[process_count]
        assert len(texts) == part.num_text_batches == {1: 6, 2: 3}[process_count]
        for b in videos:
            assert b["frames"].shape == (2, 4, 16, 16, 3) and b["video_index"].dtype == np.int32
            for row in range(2):
                if not b["valid"][row]:
                    assert b["video_index"][row] == -1 and not b["frame_mask"][row].any()
                    assert not b["frames"][row].any()
                    continue
                v = int(b["video_index"][row])
                seen_videos.append(v)
                assert int(round(b["frames"][row, 0, 0, 0, 1] / 10)) == v
                assert b["frame_mask"][row].sum() == min(TEST_FRAMES[v], 4)
        for b in texts:
            assert b["text_ids"].shape == (2, 6) and b["text_ids"].dtype == np.int32
            for row in range(2):
                if not b["valid"][row]:
                    assert b["video_index"][row] == -1 and not b["text_mask"][row].any()
                    continue
                ids = b["text_ids"][row]
                assert int(ids[2]) - 1 == b["video_index"][row], "caption indexed to the wrong video"
                seen_texts.append((int(ids[2]) - 1, int(ids[3]) - 11, int(b["text_index"][row])))
    assert sorted(seen_videos) == [0, 1, 2, 3, 4]
    expected = [(v, c) for v, k in enumerate(TEST_CAPTIONS) for c in range(k)]
    assert sorted(seen_texts) == [(v, c, t) for t, (v, c) in enumerate(expected)]


def test_bad_arguments_name_the_problem(data_dir):
    with pytest.raises(ValueError, match="batch_size_per_process"):
        _train(data_dir, batch_size_per_process=0)
    with pytest.raises(ValueError, match="fewer than batch_size_per_process"):
        _train(data_dir, batch_size_per_process=12, process_count=2)
    with pytest.raises(ValueError, match="no split"):
        pipeline.train_iterator(NAME, "validation", data_dir, WORDS, num_frames=4, max_words=6,
                                batch_size_per_process=1, seed=0)
    with pytest.raises(FileNotFoundError, match="not built"):
        pipeline.eval_batches(NAME, "test", data_dir + "/nowhere", WORDS, num_frames=4, max_words=6,
                              batch_size_per_process=1)


def test_steps_per_epoch_and_max_videos(data_dir):
    assert _train(data_dir, batch_size_per_process=4).steps_per_epoch == 19 // 4
    assert _train(data_dir, batch_size_per_process=2, process_count=2).steps_per_epoch == 19 // 4
    few = pipeline.eval_batches(NAME, "test", data_dir, WORDS, num_frames=4, max_words=6,
                                batch_size_per_process=8, max_videos=2)
    assert (few.num_videos, few.num_texts, few.video_ids) == (2, 4, ("v0", "v1"))
    (videos,), (texts,) = list(few.videos), list(few.texts)
    np.testing.assert_array_equal(videos["video_index"], [0, 1, -1, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(texts["video_index"], [0, 1, 1, 1, -1, -1, -1, -1])


def test_from_config_splits_the_global_batch(data_dir, tmp_path):
    from cma_jax import config as config_lib

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(WORDS))
    config = config_lib.base_config()
    config.data.name, config.data.data_dir, config.data.tokenizer = NAME, data_dir, str(vocab)
    config.data.num_frames, config.data.max_words, config.data.eval_split = 3, 6, "test"
    config.train.batch_size, config.eval.batch_size, config.seed = 4, 6, 5
    it = pipeline.train_iterator_from_config(config, process_index=1, process_count=2)
    direct = pipeline.train_iterator(NAME, "train", data_dir, WORDS, num_frames=3, max_words=6,
                                     batch_size_per_process=2, seed=5, process_index=1, process_count=2)
    for want, got in zip(_take(direct, 3), _take(it, 3)):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    ev = pipeline.eval_batches_from_config(config, process_index=0, process_count=2)
    assert ev.num_video_batches == 1 and next(iter(ev.videos))["frames"].shape == (3, 3, 16, 16, 3)
    config.train.batch_size = 5
    with pytest.raises(ValueError, match="config.train.batch_size=5 must be divisible"):
        pipeline.train_iterator_from_config(config, process_index=0, process_count=2)
    config.data.tokenizer = "clip"  # = the backbone's, which the caller passes (cma_jax.loader.tokenizer)
    with pytest.raises(ValueError, match="config.data.tokenizer is empty and no tokenizer was given"):
        pipeline.train_iterator_from_config(config, process_index=0, process_count=1)
    assert next(pipeline.train_iterator_from_config(config, str(vocab), 0, 1))["text_ids"].shape == (5, 6)


# --- the decoded-frame cache (cma_jax/data/frame_cache.py) -------------------------------------------


def _assert_same_batches(want, got):
    for a, b in zip(want, got, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_frame_cache_gives_the_jpeg_batches_and_resumes(data_dir, tmp_path):
    folder = str(tmp_path / "cache")
    for split in ("train", "test"):
        path = frame_cache.build_frame_cache(NAME, split, data_dir, where=folder)
        assert path.startswith(folder) and f"{NAME}-default-" in path and path.endswith(f"-{split}.frames.npy")
    assert sorted(os.listdir(folder)) == sorted(f"{NAME}-default-1.0.0-{s}.{k}.npy"
                                                for s in ("train", "test") for k in ("frames", "offsets"))
    frames = np.load(frame_cache.cache_paths(NAME, "train", data_dir, None, folder)[0], mmap_mode="r")
    assert frames.shape == (sum(TRAIN_FRAMES), 16, 16, 3)
    _assert_same_batches(_take(_train(data_dir, seed=3), 6), _take(_train(data_dir, seed=3, frame_cache=folder), 6))

    cached = _train(data_dir, seed=3, frame_cache=folder)
    _take(cached, 2)
    state = cached.get_state()
    want = _take(cached, 3)
    resumed = _train(data_dir, seed=3, frame_cache=folder)
    resumed.set_state(state)
    _assert_same_batches(want, _take(resumed, 3))

    def videos(**kw):
        return list(pipeline.eval_batches(NAME, "test", data_dir, WORDS, num_frames=4, max_words=6,
                                          batch_size_per_process=2, workers=0, **kw).videos)
    _assert_same_batches(videos(), videos(frame_cache=folder))


def test_frame_cache_refuses_a_missing_mismatched_or_truncated_cache(data_dir, tmp_path):
    folder = str(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"no frame cache .*python -m cma_jax.data.frame_cache {NAME} "
                                                "--split train"):
        _train(data_dir, frame_cache=folder)
    with pytest.raises(ValueError, match="must be a local path"):
        _train(data_dir, frame_cache="gs://bucket/cache")
    frame_cache.build_frame_cache(NAME, "test", data_dir, where=folder)
    test_files = frame_cache.cache_paths(NAME, "test", data_dir, None, folder)
    for src, dst in zip(test_files, frame_cache.cache_paths(NAME, "train", data_dir, None, folder)):
        shutil.copy(src, dst)  # another split's cache under the train split's names
    with pytest.raises(ValueError, match=r"does not match tiny_pipeline/train: 5 records where the split holds 10"):
        _train(data_dir, frame_cache=folder)
    with open(test_files[0], "r+b") as f:
        f.truncate(os.path.getsize(test_files[0]) - 100)
    with pytest.raises(ValueError, match=r"frame cache .*test.frames.npy is unreadable .*rebuild it with"):
        pipeline.eval_batches(NAME, "test", data_dir, WORDS, num_frames=4, max_words=6, batch_size_per_process=2,
                              frame_cache=folder)


def test_an_interrupted_frame_cache_build_leaves_no_file(data_dir, tmp_path, monkeypatch):
    folder = str(tmp_path / "cache")
    calls, decode = [], video.decode_jpeg

    def interrupted(jpeg, out=None):  # Ctrl-C in the middle of the split's frames
        calls.append(1)
        if len(calls) > 20:
            raise KeyboardInterrupt
        return decode(jpeg, out=out)

    monkeypatch.setattr(frame_cache.video, "decode_jpeg", interrupted)
    with pytest.raises(KeyboardInterrupt):
        frame_cache.build_frame_cache(NAME, "train", data_dir, where=folder)
    assert len(calls) == 21 and os.listdir(folder) == []
