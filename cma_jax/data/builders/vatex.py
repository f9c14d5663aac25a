"""VATEX (English): the official caption JSONs with the retrieval split lists."""

from __future__ import annotations

from etils import epath

from cma_jax.data.builders import annotation_files, base, media

SPLITS = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}
CAPTION_FILES = ("vatex_training_v1.0.json", "vatex_validation_v1.0.json")


class Vatex(base.VideoTextBuilder):
    """VATEX text-video retrieval: 25,991 / 1,500 / 1,500 videos, 10 English captions each."""

    name = "vatex"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
manual_dir/
  vatex_training_v1.0.json     (official: [{'videoID', 'enCap': [10 captions], ...}, ...])
  vatex_validation_v1.0.json   (official; the retrieval val and test halves come from it)
  train_list.txt               (one videoID per line: 25,991)
  val_list.txt                 (1,500)
  test_list.txt                (1,500)
  any/sub/folder/<videoID>.mp4
"""
    REQUIRED_FILES = (*CAPTION_FILES, *SPLITS.values())

    def _split_entries(self, manual_dir: epath.Path):
        captions = {}
        for name in CAPTION_FILES:
            for item in annotation_files.read_json(manual_dir / name):
                if "videoID" not in item or "enCap" not in item:
                    raise ValueError(
                        f'{manual_dir / name}: expected items with "videoID" and "enCap", '
                        f"got keys {sorted(item)}"
                    )
                captions[item["videoID"]] = tuple(c.strip() for c in item["enCap"])
        return media.entries_from_lists(manual_dir, SPLITS, captions)
