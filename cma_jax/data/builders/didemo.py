"""DiDeMo, paragraph-to-video: the descriptions of a video's moments joined into one caption."""

from __future__ import annotations

from etils import epath

from cma_jax.data.builders import annotation_files, base, media
from cma_jax.data.builders.activitynet import paragraph

SPLITS = {"train": "train_data.json", "val": "val_data.json", "test": "test_data.json"}


class DiDeMo(base.VideoTextBuilder):
    """DiDeMo paragraph-video retrieval (~8.4k / 1.1k / 1k videos)."""

    name = "didemo"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
manual_dir/
  train_data.json   ([{'video', 'times', 'description', ...}, ...], several per video)
  val_data.json
  test_data.json
  any/sub/folder/<video>  (the 'video' field, e.g. <id>.mov, or <id>.mp4 / <id>.mov.mp4)
"""
    REQUIRED_FILES = tuple(SPLITS.values())

    def _split_entries(self, manual_dir: epath.Path):
        videos = media.index_videos(manual_dir)
        out = {}
        for split, name in SPLITS.items():
            descriptions: dict[str, list[str]] = {}  # insertion order = first appearance
            for item in annotation_files.read_json(manual_dir / name):
                if "video" not in item or "description" not in item:
                    raise ValueError(
                        f'{manual_dir / name}: expected items with "video" and '
                        f'"description", got keys {sorted(item)}'
                    )
                descriptions.setdefault(item["video"], []).append(item["description"])
            out[split] = []
            for vid, descs in descriptions.items():
                text = paragraph(descs)
                out[split].append(base.Entry(vid, (text,) if text else (), media.find_video(videos, vid)))
        return out
