"""grain input pipeline over a built video-text split: training pairs and evaluation batches.

The trainer and the evaluator call `train_iterator` and `eval_batches` (or their `*_from_config` forms) once
per process: each process reads only its own contiguous shard of the split, decodes only the sampled JPEGs
(in this process or in grain worker processes, with the same batches either way; or copies them from the split's
decoded-frame cache, cma_jax/data/frame_cache.py), and the training
iterator's position is saved with every run checkpoint. docs/data.md ("The input pipeline") describes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from absl import flags

from cma_jax.data import video
from cma_jax.data.frame_cache import open_frame_cache
from cma_jax.data.sampling import sample_frame_indices
from cma_jax.data.builders.base import ensure_built, open_source
from cma_jax.data.tokenizer import load_tokenizer


def load_clip(jpegs: list[bytes], num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Decodes only the sampled JPEGs -> (frames [T,H,W,3] uint8 zero-padded, frame_mask [T] bool).

    Each frame is decoded straight into its row of the clip: no copies for stacking and padding.
    """
    if not jpegs:
        raise ValueError("a record holds no frames (builders store at least one); rebuild the dataset")
    chosen = sample_frame_indices(len(jpegs), num_frames)
    first = video.decode_jpeg(jpegs[chosen[0]])
    frames = np.empty((num_frames, *first.shape), np.uint8)
    frames[0] = first
    for row, i in enumerate(chosen[1:], start=1):
        video.decode_jpeg(jpegs[i], out=frames[row])
    frames[len(chosen):] = 0
    return frames, np.arange(num_frames) < len(chosen)


@dataclasses.dataclass(frozen=True)
class _JpegClips:
    """Clips decoded from the stored JPEGs; `FrameCache` (frame_cache.py) gives the same from decoded frames."""
    source: Any

    def clip(self, i: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
        return load_clip(self.source[i]["frames"], num_frames)


def _clips(name: str, split: str, data_dir, builder_config, frame_cache: str, source):
    """frame_cache: '' = decode the JPEGs; 'auto' or a folder = the decoded-frame cache there."""
    if not frame_cache:
        return _JpegClips(source)
    return open_frame_cache(name, split, data_dir, builder_config, frame_cache, source)


def train_pairs(num_captions: np.ndarray) -> np.ndarray:
    """Every (record index, caption index) pair in record order -> int32 [P, 2]."""
    num_captions = np.asarray(num_captions, np.int64)
    record = np.repeat(np.arange(len(num_captions)), num_captions)
    starts = np.cumsum(num_captions) - num_captions  # first pair of each record
    caption = np.arange(len(record)) - np.repeat(starts, num_captions)
    return np.stack([record, caption], axis=1).astype(np.int32)


def shard_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Contiguous slice [start, stop) of n items for one process; sizes differ by at most one."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    return n * process_index // process_count, n * (process_index + 1) // process_count


def count_pairs(name: str, split: str, data_dir, builder_config=None) -> int:
    """Number of (video, caption) training pairs of a split, over all processes."""
    return int(open_source(name, split, data_dir, builder_config).num_captions.sum())


@dataclasses.dataclass(frozen=True)
class _TrainExample:
    """(record, caption) pair -> one training example; picklable for grain's worker processes."""
    captions: list[list[str]]  # per record, from the split's metadata
    clips: Any  # _JpegClips or frame_cache.FrameCache
    tokenizer: Any
    num_frames: int
    max_words: int

    def __call__(self, pair: np.ndarray) -> dict[str, np.ndarray]:
        frames, frame_mask = self.clips.clip(int(pair[0]), self.num_frames)
        ids, mask = self.tokenizer.tokenize([self.captions[int(pair[0])][int(pair[1])]], self.max_words)
        return {"frames": frames, "frame_mask": frame_mask, "text_ids": ids[0], "text_mask": mask[0]}


def _to_iter(ds: grain.MapDataset, workers: int, read_threads: int) -> grain.IterDataset:
    # Elements are whole batches (tens of MB): keep the read-ahead buffer to a few of them.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=max(1, read_threads)))
    if workers > 0:
        if not flags.FLAGS.is_parsed():
            # grain's worker start-up reads its absl flags; outside an absl app, take their defaults.
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
    return it


def _check(batch_size: int, num_frames: int, max_words: int, workers: int):
    for key, value, low in (("batch_size_per_process", batch_size, 1), ("num_frames", num_frames, 1),
                            ("max_words", max_words, 2), ("workers", workers, 0)):
        if int(value) != value or value < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")


class TrainIterator(grain.DatasetIterator):
    """Iterator over a random-access dataset of batches; its state is the index of the next batch.

    Resuming rebuilds the pipeline from that batch on (`batches[k:]`), so a state restores the same
    continuation for any `workers` / `read_threads` (grain's own multiprocess state is per worker).
    """

    def __init__(self, batches: grain.MapDataset, workers: int, read_threads: int, steps_per_epoch: int):
        super().__init__()
        self._batches, self._workers, self._read_threads = batches, workers, read_threads
        self.steps_per_epoch = steps_per_epoch  # all pairs once, over all processes
        self._next_batch = 0
        self._it = None  # started lazily, so set_state before the first batch starts no workers twice

    def _start(self):
        if self._it is None:
            self._it = iter(_to_iter(self._batches[self._next_batch:], self._workers, self._read_threads))

    def _stop(self):
        if getattr(self, "_it", None) is not None:
            self._it.close()
            self._it = None

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        self._start()
        batch = next(self._it)
        self._next_batch += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_batch": self._next_batch}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "next_batch" not in state:
            raise ValueError(f"train iterator state must be {{'next_batch': int}}, got {state!r}")
        self._stop()
        self._next_batch = int(state["next_batch"])

    def start_prefetch(self) -> None:
        self._start()
        self._it.start_prefetch()

    def close(self) -> None:
        self._stop()
        super().close()


def train_iterator(name: str, split: str, data_dir, tokenizer, *, num_frames: int, max_words: int,
                   batch_size_per_process: int, seed: int, process_index: int = 0, process_count: int = 1,
                   workers: int = 0, builder_config=None, num_epochs: int | None = None,
                   read_threads: int = 2, frame_cache: str = "") -> TrainIterator:
    """Checkpointable iterator of this process's training batches; infinite when num_epochs is None.

    Batches: frames [B,T,H,W,3] uint8, frame_mask [B,T] bool, text_ids [B,L] int32, text_mask [B,L] int32
    (B = batch_size_per_process, T = num_frames, L = max_words). Every (video, caption) pair of the split
    is one example; this process reads its contiguous shard of the pairs, shuffled with `seed` (a new
    order each epoch), incomplete batches dropped. `get_state()` -> {'next_batch': k} and `set_state`
    resume it exactly, whatever `workers` (cma_jax/checkpoint.py saves that state with every run
    checkpoint, one JSON file per process); `close()` stops the worker processes; `steps_per_epoch` is
    the number of batches of all pairs over all processes.

    `tokenizer`: anything `load_tokenizer` accepts (a spec or a built tokenizer). `workers` > 0 decodes
    in that many spawned worker processes (grain `mp_prefetch`), 0 in this process with `read_threads`
    threads; the batches are identical for any `workers` / `read_threads`. `frame_cache` ('auto' or a
    folder; '' = off) copies the sampled frames from the split's decoded-frame cache (cma_jax/data/frame_cache.py)
    instead of decoding them: the same batches.
    """
    _check(batch_size_per_process, num_frames, max_words, workers)
    source = open_source(name, split, data_dir, builder_config)
    pairs = train_pairs(source.num_captions)
    start, stop = shard_bounds(len(pairs), process_index, process_count)
    if stop - start < batch_size_per_process:
        raise ValueError(f"{name}/{split}: process {process_index} of {process_count} holds {stop - start} "
                         f"pairs, fewer than batch_size_per_process={batch_size_per_process}")
    ds = grain.MapDataset.source(pairs[start:stop]).seed(seed).shuffle().repeat(num_epochs)
    clips = _clips(name, split, data_dir, builder_config, frame_cache, source)
    ds = ds.map(_TrainExample(source.captions, clips, load_tokenizer(tokenizer), num_frames, max_words))
    return TrainIterator(ds.batch(batch_size_per_process, drop_remainder=True), workers, read_threads,
                         steps_per_epoch=len(pairs) // (batch_size_per_process * process_count))


# --- evaluation ------------------------------------------------------------------------------------


def _padded_slice(n: int, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """This process's contiguous indices of n items, padded with -1 to a common number of full batches."""
    start, stop = shard_bounds(n, process_index, process_count)
    per_process = -(-n // process_count)  # the largest slice
    num_batches = max(1, -(-per_process // batch_size))
    out = np.full((num_batches * batch_size,), -1, np.int32)
    out[: stop - start] = np.arange(start, stop)
    return out


@dataclasses.dataclass(frozen=True)
class _EvalVideo:
    clips: Any  # _JpegClips or frame_cache.FrameCache
    num_frames: int
    frame_shape: tuple[int, int, int]  # (H, W, 3) of padding rows

    def __call__(self, index: np.ndarray) -> dict[str, np.ndarray]:
        i = int(index)
        if i < 0:
            frames = np.zeros((self.num_frames, *self.frame_shape), np.uint8)
            mask = np.zeros((self.num_frames,), bool)
        else:
            frames, mask = self.clips.clip(i, self.num_frames)
        return {"frames": frames, "frame_mask": mask, "video_index": np.int32(i),
                "valid": np.bool_(i >= 0)}


@dataclasses.dataclass(frozen=True)
class _EvalTexts:
    captions: tuple[str, ...]   # every caption of the split, in (video, caption) order
    video_of: np.ndarray        # [num_texts] int32 video index of each caption
    tokenizer: Any
    max_words: int

    def __call__(self, text_index: np.ndarray) -> dict[str, np.ndarray]:
        text_index = np.asarray(text_index, np.int32)  # [B], -1 on padding
        valid = text_index >= 0
        ids, mask = self.tokenizer.tokenize([self.captions[i] if i >= 0 else "" for i in text_index],
                                            self.max_words)
        ids[~valid] = 0
        mask[~valid] = 0
        return {"text_ids": ids, "text_mask": mask,
                "video_index": np.where(valid, self.video_of[np.maximum(text_index, 0)], -1).astype(np.int32),
                "text_index": text_index, "valid": valid}


@dataclasses.dataclass(frozen=True)
class EvalBatches:
    """This process's evaluation batches; `videos` and `texts` can be iterated several times."""
    videos: grain.IterDataset
    texts: grain.IterDataset
    num_videos: int            # over all processes
    num_texts: int
    num_video_batches: int     # per process, equal on every process
    num_text_batches: int
    video_ids: tuple[str, ...]
    text_video_index: np.ndarray  # [num_texts] int32: video index of every caption
    media: str = "video"  # 'image': one-frame image-text records (evaluate reports TR / IR)


def eval_batches(name: str, split: str, data_dir, tokenizer, *, num_frames: int, max_words: int,
                 batch_size_per_process: int, process_index: int = 0, process_count: int = 1,
                 workers: int = 0, builder_config=None, read_threads: int = 2, max_videos: int = 0,
                 frame_cache: str = "") -> EvalBatches:
    """Every video once and every caption once over all processes, each process a contiguous slice.

    `.videos`: batches of frames, frame_mask, video_index [B] int32, valid [B] bool; `.texts`: text_ids,
    text_mask, video_index (the caption's video: several captions per video on multi-caption sets),
    text_index [B] int32, valid. Each slice is padded with valid=False rows (zeros: frame_mask all
    False, text_mask all 0, video_index / text_index -1) so that every process yields the same number
    of batches (`.num_video_batches`, `.num_text_batches`): multi-host jit needs equal steps.
    `.num_videos`, `.num_texts`, `.video_ids` and `.text_video_index` are global; `.media` is 'video',
    or 'image' for the image-text sets (one-frame records, T = 1: Flickr30K, MSCOCO), which report
    TR / IR. `tokenizer`, `workers`, `read_threads`, `frame_cache`: as for `train_iterator`.

    max_videos > 0 keeps only the first max_videos videos (and their captions), for quick checks.
    """
    _check(batch_size_per_process, num_frames, max_words, workers)
    source = open_source(name, split, data_dir, builder_config)
    num_videos = min(len(source), max_videos) if max_videos > 0 else len(source)
    pairs = train_pairs(source.num_captions[:num_videos])  # text t: caption pairs[t, 1] of video pairs[t, 0]
    captions = tuple(source.captions[v][c] for v, c in pairs)
    first = video.decode_jpeg(source[0]["frames"][0])  # padding rows take the split's frame shape

    video_idx = _padded_slice(num_videos, batch_size_per_process, process_index, process_count)
    clips = _clips(name, split, data_dir, builder_config, frame_cache, source)
    videos = grain.MapDataset.source(video_idx).map(_EvalVideo(clips, num_frames, first.shape))
    videos = _to_iter(videos.batch(batch_size_per_process), workers, read_threads)

    text_idx = _padded_slice(len(pairs), batch_size_per_process, process_index, process_count)
    texts = grain.MapDataset.source(text_idx.reshape(-1, batch_size_per_process))
    texts = texts.map(_EvalTexts(captions, pairs[:, 0].copy(), load_tokenizer(tokenizer), max_words))
    texts = _to_iter(texts, workers=0, read_threads=0)  # tokenizing is cheap: no threads, no workers
    return EvalBatches(videos=videos, texts=texts, num_videos=num_videos, num_texts=len(pairs),
                       num_video_batches=len(video_idx) // batch_size_per_process,
                       num_text_batches=len(text_idx) // batch_size_per_process,
                       video_ids=tuple(source.video_ids[:num_videos]), text_video_index=pairs[:, 0].copy(),
                       media=source.media)


# --- from a run config (cma_jax/config.py) ----------------------------------------------------------


def _from_config(config, global_batch: int, field: str, tokenizer, process_index, process_count) -> dict[str, Any]:
    tokenizer = tokenizer or (config.data.tokenizer if config.data.tokenizer not in ("", "clip") else None)
    if tokenizer is None:
        raise ValueError("config.data.tokenizer is empty and no tokenizer was given: pass the backbone's "
                         "(cma_jax.loader.tokenizer) or set config.data.tokenizer")
    if process_index is None or process_count is None:
        import jax  # pylint: disable=import-outside-toplevel

        process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch % process_count:
        raise ValueError(f"{field}={global_batch} must be divisible by the number of processes ({process_count})")
    d = config.data
    if not d.data_dir:
        from tensorflow_datasets.core import constants  # pylint: disable=import-outside-toplevel
    data_dir = d.data_dir or constants.DATA_DIR
    # Several processes would each download and build: only a single process builds on its own.
    ensure_built(d.name, data_dir, d.builder_config or None, build=process_count == 1)
    return dict(name=d.name, data_dir=data_dir, tokenizer=tokenizer,
                num_frames=d.num_frames, max_words=d.max_words, batch_size_per_process=global_batch // process_count,
                process_index=process_index, process_count=process_count, workers=d.workers,
                builder_config=d.builder_config or None, frame_cache=d.frame_cache)


def train_iterator_from_config(config, tokenizer=None, process_index=None, process_count=None) -> TrainIterator:
    """train_iterator for config.data / config.train.batch_size (global) / config.seed; processes from jax.

    The global batch is split over the processes (jax's unless given). `tokenizer`: the backbone's (a
    folder or file: what config.backbone resolves to, cma_jax.loader.tokenizer); None =
    config.data.tokenizer, which must then be set. A dataset that is not built yet is built first when
    its files are public (MSR-VTT, MSVD, MSCOCO) or generated and this is the only process; otherwise
    the error names the command that builds it.
    """
    args = _from_config(config, config.train.batch_size, "config.train.batch_size", tokenizer, process_index,
                        process_count)
    return train_iterator(split=config.data.train_split, seed=config.seed, **args)


def eval_batches_from_config(config, tokenizer=None, process_index=None, process_count=None, *,
                             split: str | None = None) -> EvalBatches:
    """eval_batches for `split` (default config.data.eval_split) / config.eval.batch_size (global) /
    config.eval.max_videos.

    Processes, `tokenizer` and building an unbuilt dataset: as for `train_iterator_from_config`.
    """
    args = _from_config(config, config.eval.batch_size, "config.eval.batch_size", tokenizer, process_index,
                        process_count)
    return eval_batches(split=split or config.data.eval_split, max_videos=config.eval.max_videos, **args)
