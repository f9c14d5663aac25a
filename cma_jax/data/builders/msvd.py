"""MSVD: train / val / test video lists, every caption of every video (multi-caption test)."""

from __future__ import annotations

import pickle

from etils import epath

from cma_jax.data.builders import base

SPLITS = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}


class Msvd(base.VideoTextBuilder):
    """MSVD text-video retrieval (1,200 / 100 / 670 videos, ~40 captions each)."""

    name = "msvd"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
manual_dir/
  raw-captions.pkl   (pickle: video id -> list of captions, each a list of tokens)
  train_list.txt     (one video id per line)
  val_list.txt
  test_list.txt
  any/sub/folder/<video id>.avi   (YouTubeClips)
"""
    REQUIRED_FILES = ("raw-captions.pkl", *SPLITS.values())

    def _split_entries(self, manual_dir: epath.Path):
        with open(manual_dir / "raw-captions.pkl", "rb") as f:
            try:
                raw = pickle.load(f)
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
                raise ValueError(f"{manual_dir / 'raw-captions.pkl'}: cannot read the pickle "
                                 f"({type(e).__name__}: {e}); expected CLIP4Clip's MSVD raw-captions.pkl") from None
        if not isinstance(raw, dict):
            raise ValueError(
                f"{manual_dir / 'raw-captions.pkl'}: expected a dict video id -> list "
                f"of token lists, got {type(raw).__name__}"
            )
        captions = {
            v: tuple(" ".join(t) if isinstance(t, (list, tuple)) else str(t).strip() for t in caps)
            for v, caps in raw.items()
        }
        return base.entries_from_lists(manual_dir, SPLITS, captions)
