"""Decoded-frame cache of a built split: every record's frames, decoded once, in one memory-mapped uint8 file.

    python -m cma_jax.data.frame_cache NAME --split S --data_dir D [--config C] [--folder F]

writes `<stem>.frames.npy` ([total_frames, H, W, 3] uint8) and `<stem>.offsets.npy` (int64 [N + 1]: record i's
frames are rows offsets[i]:offsets[i + 1]), stem = name-config-version-split, into F or (default) the TFDS folder of
the build. The frames are decoded with the pipeline's decoder (`video.decode_jpeg`), so a cached clip is the JPEG
path's clip bit for bit. Both files are written under temporary names and renamed when complete. It is built ahead
by that command (only reading happens in the pipelines, so any number of processes may share it); local paths only
(np.memmap cannot map gs://). docs/data.md ("Feeding the accelerator") gives the disk cost.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from cma_jax.data import video
from cma_jax.data.builders.reader import open_source
from cma_jax.data.builders.registry import get_builder
from cma_jax.data.sampling import sample_frame_indices


def cache_paths(name: str, split: str, data_dir, builder_config, where: str) -> tuple[str, str]:
    """(frames file, offsets file) of a split; `where`: 'auto' (beside the TFDS data) or a local folder."""
    builder = get_builder(name, data_dir, builder_config)
    folder = os.fspath(builder.data_dir) if where == "auto" else os.fspath(where)
    if "://" in folder:
        raise ValueError(f"frame cache folder {folder}: must be a local path (a memory map cannot read {folder})")
    stem = os.path.join(folder, f"{builder.name}-{builder.builder_config.name}-{builder.version}-{split}")
    return stem + ".frames.npy", stem + ".offsets.npy"


def _build_command(name: str, split: str, data_dir, builder_config, where: str) -> str:
    cmd = f"python -m cma_jax.data.frame_cache {name} --split {split} --data_dir {data_dir}"
    cmd += f" --config {builder_config}" if builder_config else ""
    return cmd + (f" --folder {where}" if where != "auto" else "")


class FrameCache:
    """Clips from the cache: `clip(i, T)` -> (frames [T,H,W,3] uint8 zero-padded, frame_mask [T] bool), the
    frames `sample_frame_indices` picks. Pickles as its paths (grain workers map the file themselves)."""

    def __init__(self, frames_path: str, offsets: np.ndarray):
        self.frames_path, self.offsets = frames_path, offsets
        self._frames = None

    @property
    def frames(self) -> np.ndarray:
        if self._frames is None:
            self._frames = np.load(self.frames_path, mmap_mode="r")
        return self._frames

    def __getstate__(self):
        return {"frames_path": self.frames_path, "offsets": self.offsets, "_frames": None}

    def clip(self, i: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        chosen = sample_frame_indices(stop - start, num_frames)
        frames = np.empty((num_frames, *self.frames.shape[1:]), np.uint8)
        frames[: len(chosen)] = self.frames[start + chosen]
        frames[len(chosen):] = 0
        return frames, np.arange(num_frames) < len(chosen)


def open_frame_cache(name: str, split: str, data_dir, builder_config, where: str, source) -> FrameCache:
    """The cache of a split, checked against `source` (its records, record 0's frames); ValueError in one line
    naming the command that builds it when it is missing or does not match."""
    frames_path, offsets_path = cache_paths(name, split, data_dir, builder_config, where)
    build = _build_command(name, split, data_dir, builder_config, where)
    if not (os.path.isfile(frames_path) and os.path.isfile(offsets_path)):
        raise FileNotFoundError(f"no frame cache {frames_path} (config.data.frame_cache={where!r}); build it with: "
                                f"{build}")
    try:
        offsets = np.load(offsets_path)
        frames = np.load(frames_path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise ValueError(f"frame cache {frames_path} is unreadable ({e}); rebuild it with: {build}") from None
    record0 = source[0]["frames"]
    first = video.decode_jpeg(record0[0])
    problem = None
    if offsets.ndim != 1 or len(offsets) != len(source) + 1:
        problem = f"{len(offsets) - 1} records where the split holds {len(source)}"
    elif offsets[0] != 0 or np.any(np.diff(offsets) < 1) or offsets[-1] != len(frames):
        problem = f"its offsets do not cover its {len(frames)} frames"
    elif frames.dtype != np.uint8 or frames.shape[1:] != first.shape:
        problem = f"frames {frames.dtype}{list(frames.shape[1:])} where the split holds uint8{list(first.shape)}"
    elif offsets[1] != len(record0) or not np.array_equal(frames[0], first):
        problem = "record 0's frames differ from the split's"
    if problem:
        raise ValueError(f"frame cache {frames_path} does not match {name}/{split}: {problem}; rebuild it with: "
                         f"{build}")
    return FrameCache(frames_path, offsets)


def build_frame_cache(name: str, split: str, data_dir, builder_config=None, where: str = "auto") -> str:
    """Decodes every stored frame of the split into the cache files (replacing old ones) -> the frames path.

    Nothing is left under the final names unless the build completed (temporary files removed on any error)."""
    source = open_source(name, split, data_dir, builder_config)
    frames_path, offsets_path = cache_paths(name, split, data_dir, builder_config, where)
    os.makedirs(os.path.dirname(frames_path), exist_ok=True)
    counts = np.array([source[i]["num_frames"] for i in range(len(source))], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    shape = video.decode_jpeg(source[0]["frames"][0]).shape
    tmp_frames, tmp_offsets = f"{frames_path}.tmp{os.getpid()}", f"{offsets_path}.tmp{os.getpid()}"
    try:
        out = np.lib.format.open_memmap(tmp_frames, mode="w+", dtype=np.uint8, shape=(int(offsets[-1]), *shape))
        for i in range(len(source)):
            jpegs = source[i]["frames"]
            if len(jpegs) != counts[i]:
                raise ValueError(f"{name}/{split} record {i}: {len(jpegs)} frames where num_frames says {counts[i]}")
            for row, jpeg in enumerate(jpegs, start=int(offsets[i])):
                video.decode_jpeg(jpeg, out=out[row])
        out.flush()
        del out
        with open(tmp_offsets, "wb") as f:
            np.save(f, offsets)
        for path in (frames_path, offsets_path):  # a stale pair must not survive half-replaced
            if os.path.exists(path):
                os.remove(path)
        os.replace(tmp_offsets, offsets_path)
        os.replace(tmp_frames, frames_path)
    finally:
        for tmp in (tmp_frames, tmp_offsets):
            if os.path.exists(tmp):
                os.remove(tmp)
    return frames_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cma_jax.data.frame_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--split", required=True)
    parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    parser.add_argument("--config", default=None)
    parser.add_argument("--folder", default="auto", help="where the cache goes (default: beside the TFDS data)")
    args = parser.parse_args(argv)
    try:
        path = build_frame_cache(args.name, args.split, args.data_dir, args.config, args.folder)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from e
    frames = np.load(path, mmap_mode="r")
    print(f"{path}: {frames.shape[0]} frames of {list(frames.shape[1:])}, {frames.nbytes / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
