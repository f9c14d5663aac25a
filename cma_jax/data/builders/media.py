"""Finding a benchmark's video and image files below a folder, whatever sub-folders people unpack them into."""

from __future__ import annotations

import os

from etils import epath

from cma_jax.data import video
from cma_jax.data.builders import annotation_files
from cma_jax.data.builders.base import Entry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def index_videos(root: epath.PathLike) -> dict[str, str]:
    """Maps every video file under `root` by name and by name without its extension(s).

    Tolerates the layouts people use (flat, `videos/all/`, `YouTubeClips/`, ...) and ids
    given with or without an extension (DiDeMo ids carry `.mov`, files may be `.mov.mp4`).
    """
    index: dict[str, str] = {}
    for dirpath, _, files in os.walk(os.fspath(root)):
        for f in sorted(files):
            if not f.lower().endswith(video.VIDEO_EXTENSIONS):
                continue
            path = os.path.join(dirpath, f)
            name = f
            while True:
                index.setdefault(name, path)
                stem, ext = os.path.splitext(name)
                if not ext or ext.lower() not in video.VIDEO_EXTENSIONS:
                    break
                name = stem
    return index


def find_video(index: dict[str, str], video_id: str, *alternatives: str) -> str | None:
    """The file of `video_id` (or of one of its alternative spellings), None if absent."""
    for key in (video_id, *alternatives):
        if key in index:
            return index[key]
        stem, ext = os.path.splitext(key)
        if ext.lower() in video.VIDEO_EXTENSIONS and stem in index:
            return index[stem]
    return None


def index_images(*roots: epath.PathLike) -> dict[str, str]:
    """Maps every image file under the roots by its file name (the first one found, roots in order)."""
    index: dict[str, str] = {}
    for root in roots:
        for dirpath, dirs, files in os.walk(os.fspath(root)):
            dirs.sort()  # deterministic: the same file wins on every machine
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    index.setdefault(f, os.path.join(dirpath, f))
    return index


def entries_from_lists(manual_dir: epath.Path, split_lists: dict[str, str],
                       captions: dict[str, tuple[str, ...]], videos_dir: epath.Path | None = None
                       ) -> dict[str, list[Entry]]:
    """{split: [Entry]} for splits given as files of video ids (one a line) in `manual_dir`, captions by
    video id, videos found under `videos_dir` (default: `manual_dir`)."""
    videos = index_videos(videos_dir or manual_dir)
    out = {}
    for split, f in split_lists.items():
        ids = annotation_files.read_list(manual_dir / f)
        out[split] = [Entry(v, captions.get(v, ()), find_video(videos, v)) for v in ids]
    return out
