"""Input-pipeline throughput: where the time goes per frame, and frames/s per CPU core, on generated data.

Builds (once, into --data-dir) a split of --videos clips of --stored-frames JPEG (q90) frames at
--resolution, textured like natural images (smooth colour fields, moving blobs, sensor noise), with
base.py's builder machinery. It prints

* the stage breakdown: CPU microseconds per sampled frame of reading the records, decoding, the
  clip (decoding into [T,H,W,3]), tokenizing, the batch (stacking the clips) and putting it on
  jax's default device (a copy on CPU; a host-to-device transfer on an accelerator), each timed
  alone in this process, and the clip as it was decoded before issue 24 (PIL's decode + convert,
  np.stack, pad_clip) on the same frames, and the clip copied from the decoded-frame cache
  (cma_jax/data/frame_cache.py, built once into --data-dir);
* `pipeline.train_iterator` (T=--num-frames) end to end for each worker count in --workers. "Per
  core" divides by the CPU seconds the pipeline used (this process plus its worker processes), so
  it holds on a busy machine; wall-clock rates are printed too. Each worker count runs on the JPEGs and
  then on the frame cache (config.data.frame_cache), same frames, same run.

    python benchmarks/bench_pipeline.py                     # T=12 at 224x224, workers 0 and 2
    python benchmarks/bench_pipeline.py --resolution 336    # ViT-L/14@336's frames
    python benchmarks/bench_pipeline.py --workers 0,1,4 --batches 40
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from cma_jax.data import frame_cache, pipeline, sampling, video
from cma_jax.data.builders import REGISTRY
from cma_jax.data.builders.base import Entry, VideoTextBuilder, VideoTextConfig
from cma_jax.data.tokenizer import load_tokenizer

NAME = "bench_pipeline"
WORDS = ["a", "clip", "of", "moving", "blobs", "number"] + [str(i) for i in range(10)]
TOKENIZER = load_tokenizer(WORDS)


def natural_frames(src) -> list[bytes]:
    """(video index, frame count, resolution) -> JPEG frames with natural-image-like statistics."""
    index, count, res = src
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) / res
    base = np.stack([np.sin(6 * xx * rng.uniform(0.5, 2) + c) * np.cos(5 * yy * rng.uniform(0.5, 2) + c)
                     for c in rng.uniform(0, 6, 3)], -1) * 70 + rng.uniform(80, 170, 3)
    centres, velocity = rng.uniform(0.2, 0.8, (5, 2)), rng.uniform(-0.03, 0.03, (5, 2))
    colours, radii = rng.uniform(0, 255, (5, 3)), rng.uniform(0.05, 0.2, 5)
    frames = []
    for j in range(count):
        img = base.copy()
        for c, v, col, r in zip(centres, velocity, colours, radii):
            cx, cy = c + j * v
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = col
        img += rng.normal(0, 6, img.shape)
        frames.append(video.encode_jpeg(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), 90))
    return frames


def make_builder(videos: int, stored_frames: int, resolution: int):
    class BenchVideos(VideoTextBuilder, skip_registration=True):
        name = NAME
        BUILDER_CONFIGS = [VideoTextConfig(name=f"v{videos}f{stored_frames}r{resolution}",
                                           resolution=resolution)]

        def _split_entries(self, manual_dir):
            return {"train": [Entry(f"clip{i}", (f"a clip of moving blobs number {i % 10}",), (i, stored_frames,
                                                                                                resolution))
                              for i in range(videos)]}

        def _frame_loader(self):
            return natural_frames

    return BenchVideos


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def per_frame_us(fn, frames: int, repeats: int = 3) -> float:
    """Best-of-`repeats` CPU microseconds of `fn()` per frame (CPU time: robust to a shared machine)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best / frames * 1e6


def pil_clip(jpegs: list[bytes], num_frames: int) -> np.ndarray:
    """The clip as pipeline.load_clip decoded it before issue 24: the reference of the breakdown."""
    chosen = [np.asarray(Image.open(io.BytesIO(jpegs[i])).convert("RGB"))
              for i in sampling.sample_frame_indices(len(jpegs), num_frames)]
    return sampling.pad_clip(np.stack(chosen), num_frames)[0]


def stages(source, cache, args) -> dict[str, float]:
    """CPU microseconds per sampled frame of each stage, on the first --batch-size records."""
    t, b = args.num_frames, args.batch_size
    records = [source[i] for i in range(b)]
    chosen = [[r["frames"][j] for j in sampling.sample_frame_indices(len(r["frames"]), t)] for r in records]
    n = sum(len(c) for c in chosen)
    clips = [pipeline.load_clip(r["frames"], t)[0] for r in records]
    assert all(np.array_equal(c, pil_clip(r["frames"], t)) for c, r in zip(clips, records))
    assert all(np.array_equal(c, cache.clip(i, t)[0]) for i, c in enumerate(clips))
    batch = {"frames": np.stack(clips)}
    return {
        "read records": per_frame_us(lambda: [source[i] for i in range(b)], n),
        "decode": per_frame_us(lambda: [video.decode_jpeg(f) for c in chosen for f in c], n),
        "clip (decode into [T,H,W,3])": per_frame_us(lambda: [pipeline.load_clip(r["frames"], t) for r in records], n),
        "clip before issue 24 (PIL)": per_frame_us(lambda: [pil_clip(r["frames"], t) for r in records], n),
        "clip from the frame cache": per_frame_us(lambda: [cache.clip(i, t) for i in range(b)], n),
        "tokenize": per_frame_us(lambda: [TOKENIZER.tokenize(r["captions"][:1], 32) for r in records], n),
        "batch (stack the clips)": per_frame_us(lambda: np.stack(clips), n),
        "to device": per_frame_us(lambda: jax.block_until_ready(jax.device_put(batch)), n),
    }


def run(data_dir: str, args, workers: int, batches: int, cache: str) -> tuple[float, float, int]:
    """(CPU seconds of the whole run incl. workers, wall seconds of the timed batches, frames)."""
    cpu0 = cpu_seconds()
    it = pipeline.train_iterator(NAME, "train", data_dir, WORDS, num_frames=args.num_frames, max_words=32,
                                 batch_size_per_process=args.batch_size, seed=0, workers=workers,
                                 read_threads=args.read_threads, frame_cache=cache)
    for _ in range(args.warmup):  # worker start-up and first reads are not throughput
        next(it)
    wall0, frames = time.perf_counter(), 0
    for _ in range(batches):
        frames += int(next(it)["frame_mask"].sum())
    wall = time.perf_counter() - wall0
    it.close()  # reaps the workers, so their CPU time is counted in RUSAGE_CHILDREN
    return cpu_seconds() - cpu0, wall, frames


def bench(data_dir: str, args, workers: int, cache: str) -> None:
    # Worker CPU time is only visible once they exit: a run without timed batches measures the
    # start-up (spawn, imports, warm-up batches) to subtract.
    startup_cpu, _, _ = run(data_dir, args, workers, 0, cache)
    total_cpu, wall, frames = run(data_dir, args, workers, args.batches, cache)
    cpu = total_cpu - startup_cpu
    clips = args.batches * args.batch_size
    print(f"{'frame cache' if cache else 'JPEG':11s} workers={workers} read_threads={args.read_threads}: "
          f"{clips} clips in {wall:.2f}s wall, "
          f"{cpu:.2f} CPU-s | {clips / wall:7.1f} clips/s {frames / wall:8.1f} frames/s wall | "
          f"per core: {clips / cpu:6.1f} clips/s {frames / cpu:7.1f} frames/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "cma_jax_bench_pipeline"))
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--stored-frames", type=int, default=20, help="frames per video on disk (1 fps)")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--num-frames", type=int, default=12, help="T sampled per clip")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    parser.add_argument("--read-threads", type=int, default=1)
    args = parser.parse_args()

    builder_cls = make_builder(args.videos, args.stored_frames, args.resolution)
    REGISTRY[NAME] = builder_cls
    builder = builder_cls(data_dir=args.data_dir, num_workers=0)
    if not builder.is_prepared():
        t0 = time.perf_counter()
        builder.download_and_prepare()
        print(f"built {args.videos} videos in {time.perf_counter() - t0:.1f}s")
    source = pipeline.open_source(NAME, "train", args.data_dir)
    cache_dir = os.path.join(args.data_dir, "frame_cache")
    if not os.path.exists(frame_cache.cache_paths(NAME, "train", args.data_dir, None, cache_dir)[0]):
        t0 = time.perf_counter()
        frame_cache.build_frame_cache(NAME, "train", args.data_dir, where=cache_dir)
        print(f"built the frame cache in {time.perf_counter() - t0:.1f}s")
    cache = frame_cache.open_frame_cache(NAME, "train", args.data_dir, None, cache_dir, source)
    print(f"frame cache: {cache.frames.nbytes / cache.frames.shape[0] / 1024:.0f} KiB a frame")
    sizes = [len(f) for f in source[0]["frames"]]
    print(f"dataset: {args.videos} videos x {args.stored_frames} frames at {args.resolution}px, "
          f"mean JPEG {np.mean(sizes) / 1024:.1f} KiB; T={args.num_frames}, batch {args.batch_size}; "
          f"{os.cpu_count()} CPUs visible; jax device: {jax.devices()[0].device_kind}")
    print("CPU us per sampled frame:")
    for stage, us in stages(source, cache, args).items():
        print(f"  {stage:30s} {us:7.1f}")
    for workers in (int(w) for w in args.workers.split(",")):
        for where in ("", cache_dir):
            bench(args.data_dir, args, workers, where)


if __name__ == "__main__":
    main()
