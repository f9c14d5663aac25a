"""ActivityNet Captions, paragraph-to-video: a video's sentences joined into one caption."""

from __future__ import annotations

from etils import epath

from cma_jax.data.builders import annotation_files, base, media

SPLITS = {"train": "train.json", "test": "val_1.json"}


def paragraph(sentences) -> str:
    """Sentences joined with single spaces, in annotation order."""
    return " ".join(s.strip() for s in sentences if s.strip())


class ActivityNet(base.VideoTextBuilder):
    """ActivityNet Captions paragraph-video retrieval: train on train.json, test on val_1.json."""

    name = "activitynet"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
manual_dir/
  train.json    ({'v_<id>': {'duration', 'timestamps', 'sentences': [...]}, ...})
  val_1.json    (the test split)
  any/sub/folder/v_<id>.mp4 (or .mkv / .webm; files without the v_ prefix are found too)
"""
    REQUIRED_FILES = tuple(SPLITS.values())

    def _split_entries(self, manual_dir: epath.Path):
        videos = media.index_videos(manual_dir)
        out = {}
        for split, name in SPLITS.items():
            data = annotation_files.read_json(manual_dir / name)
            if not isinstance(data, dict):
                raise ValueError(f"{manual_dir / name}: expected a dict video id -> annotation")
            out[split] = []
            for vid, ann in data.items():
                if "sentences" not in ann:
                    raise ValueError(f'{manual_dir / name}: video {vid} has no "sentences"')
                text = paragraph(ann["sentences"])
                alt = vid[2:] if vid.startswith("v_") else f"v_{vid}"
                out[split].append(base.Entry(vid, (text,) if text else (), media.find_video(videos, vid, alt)))
        return out
