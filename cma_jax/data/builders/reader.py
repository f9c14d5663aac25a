"""Reading a built split (random access, captions from the metadata), or saying how to build it first."""

from __future__ import annotations

from typing import Any

import numpy as np
from absl import logging
from etils import epath

from cma_jax.data.builders.registry import get_builder


class VideoTextSource:
    """Random access to a built split: `src[i]` -> {'video_id', 'frames' (JPEG bytes, undecoded), 'num_frames',
    'captions'}; `video_ids`, `captions`, `num_captions` (int32 [N]) and `skipped` come from the metadata
    without reading a frame; `media` is 'video' or 'image' (one-frame records). It pickles (grain workers)."""

    def __init__(self, data_source, meta: dict[str, Any], name: str, media: str = "video"):
        self._source = data_source
        self.name = name
        self.media = media
        self.video_ids: list[str] = meta["video_ids"]
        self.captions: list[list[str]] = meta["captions"]
        self.num_captions = np.asarray(meta["num_captions"], np.int32)  # [N]
        self.skipped: list[dict[str, str]] = list(meta.get("skipped", []))
        if len(self.video_ids) != len(data_source):
            raise ValueError(
                f"{name}: metadata lists {len(self.video_ids)} {media}s but the split "
                f"holds {len(data_source)} records; rebuild the dataset"
            )

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self._source[int(i)]
        return {
            "video_id": _text(rec["video_id"]),
            "frames": [bytes(f) for f in rec["frames"]],
            "num_frames": int(rec["num_frames"]),
            "captions": [_text(c) for c in rec["captions"]],
        }

    def __repr__(self) -> str:
        return f"VideoTextSource({self.name}, {len(self)} {self.media}s)"


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def build_command(builder) -> str:
    """The command line that builds `builder`'s dataset."""
    cmd = (f"python -m cma_jax.data.builders {builder.name} --data_dir={builder.data_dir_root} "
           f"--config={builder.builder_config.name}")
    return cmd + " --manual_dir=DIR" if builder.needs_manual_dir() else cmd


def _not_built(builder) -> str:
    msg = (f"dataset {builder.name} (config {builder.builder_config.name}) is not built in "
           f"{builder.data_dir_root} (expected {builder.data_dir}); build it with: {build_command(builder)}")
    if builder.needs_manual_dir():
        msg += f"\nwhere DIR holds the files it needs, downloaded by hand:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
    return msg


def ensure_built(name: str, data_dir: epath.PathLike, builder_config=None, *, build: bool = True) -> None:
    """Builds the dataset if it is not built and needs no manual_dir (its files are public, or generated) and
    `build` allows it; else raises FileNotFoundError saying how to build it.

    Downloading and building show TFDS's progress bars; a later call finds the dataset built.
    """
    builder = get_builder(name, data_dir, builder_config)
    if builder.is_prepared():
        return
    if not build or builder.needs_manual_dir():
        raise FileNotFoundError(_not_built(builder))
    logging.info("%s (config %s) is not built in %s: building it once (downloading its public files, if any)",
                 name, builder.builder_config.name, builder.data_dir_root)
    builder.download_and_prepare()


def open_source(name: str, split: str, data_dir: epath.PathLike, builder_config=None) -> VideoTextSource:
    """Random-access source over a built split."""
    builder = get_builder(name, data_dir, builder_config)
    if not builder.is_prepared():
        raise FileNotFoundError(_not_built(builder))
    if split not in builder.info.splits:
        raise ValueError(f"{name} has no split {split!r}; built splits: {list(builder.info.splits)}")
    meta = builder.info.metadata.get(split) if builder.info.metadata else None
    if meta is None:
        raise ValueError(
            f"{name}/{split}: no caption index in {builder.data_dir}/metadata.json; rebuild the dataset"
        )
    return VideoTextSource(builder.as_data_source(split), meta, f"{name}/{split}", getattr(builder, "MEDIA", "video"))
