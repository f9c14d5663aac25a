"""MSVD: train / val / test video lists, every caption of every video (multi-caption test).

Without a manual_dir the public files are downloaded (URLS; the sources CLIP4Clip's README gives):
CLIP4Clip's release `msvd_data.zip` (raw-captions.pkl and the split lists) and UT Austin's
`YouTubeClips.tar` (the 1,970 .avi clips). TFDS checks them against checksums.tsv beside this file
once it lists them; their sizes and SHA256 are not recorded in this repository yet (they could not
be read offline): record them with `python -m cma_jax.data.builders msvd --register_checksums`.
"""

from __future__ import annotations

import pickle

from etils import epath

from cma_jax.data.builders import base, media

SPLITS = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}
# Point these elsewhere (a mirror, a test server) before building; same archives, same layout.
URLS = {
    "annotations": "https://github.com/ArrowLuo/CLIP4Clip/releases/download/v0.0/msvd_data.zip",
    "videos": "https://www.cs.utexas.edu/users/ml/clamp/videoDescription/YouTubeClips.tar",
}


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
(The first four are in CLIP4Clip's msvd_data.zip, the clips in UT Austin's YouTubeClips.tar;
without a manual_dir the builder downloads both.)
"""
    REQUIRED_FILES = ("raw-captions.pkl", *SPLITS.values())

    def download_urls(self):
        return dict(URLS)

    def _split_entries(self, manual_dir: epath.Path, videos_dir: epath.Path | None = None):
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
        return media.entries_from_lists(manual_dir, SPLITS, captions, videos_dir)
