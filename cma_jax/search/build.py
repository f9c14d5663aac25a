"""Building an index: decode every video of a folder, encode its frames, write shards; resumable."""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np

from cma_jax.console import plural
from cma_jax.search import store


def list_videos(video_dir: str) -> list[str]:
    """Video files under `video_dir` (recursive), as sorted paths relative to it."""
    from cma_jax.data.video import VIDEO_EXTENSIONS  # PyAV, a heavy import: only when indexing
    if not os.path.isdir(video_dir):
        raise FileNotFoundError(f"video folder {video_dir} does not exist")
    found = []
    for root, dirs, files in os.walk(video_dir):
        dirs.sort()
        for name in files:
            if name.lower().endswith(VIDEO_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, name), video_dir))
    return sorted(found)


def build_index(retriever, video_dir: str, index_dir, *, shard_size: int = 256, workers: int = 4,
                overwrite: bool = False, retry_failed: bool = False, model_source: dict | None = None,
                progress: bool = True, log=print) -> dict:
    """Index every video under `video_dir` into `index_dir` (resuming an existing index); -> manifest.

    Each shard is written, then recorded in the manifest: a killed run loses at most one shard of work.
    Unreadable videos are recorded in the manifest and skipped (`retry_failed` tries them again).
    """
    from tqdm import tqdm

    from cma_jax.data.video import VideoDecodeError

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    videos = list_videos(video_dir)
    if overwrite:
        store.remove_index(index_dir)
    store.index_path(index_dir).mkdir(parents=True, exist_ok=True)
    manifest = store.read_manifest(index_dir)
    if manifest is None:
        manifest = store.new_manifest(retriever, video_dir, model_source or {})
    else:
        store.check_model(manifest, retriever.fingerprint, index_dir)
        settings = store.settings_of(retriever)
        if manifest["settings"] != settings:
            raise store.IndexMismatchError(f"index {index_dir} was built with frame settings {manifest['settings']}, "
                                           f"not {settings}; use the same --num_frames/--fps or a new index")
        manifest["video_root"] = os.path.abspath(video_dir)
        if retry_failed:
            manifest["failed"] = {}
    done = store.indexed_names(index_dir, manifest) | set(manifest["failed"])
    todo = [v for v in videos if v not in done]
    log(f"{len(videos)} videos in {video_dir}: {len(done & set(videos))} already in the index, "
        f"{len(todo)} to encode")

    def load(rel):
        try:
            return rel, retriever.load_video(os.path.join(video_dir, rel), with_times=True), None
        except (VideoDecodeError, ValueError, OSError) as e:
            return rel, None, str(e)

    bar = tqdm(total=len(todo), unit="video", desc="indexing", disable=not progress)
    new_failed = 0
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(todo), shard_size):
            names, clips = [], []
            for rel, clip, err in pool.map(load, todo[start:start + shard_size]):  # decoding overlaps
                bar.update(1)
                if err is not None:
                    manifest["failed"][rel] = err
                    new_failed += 1
                    bar.write(f"skipped unreadable video {rel}: {err}")
                    continue
                names.append(rel)
                clips.append(clip)
            bar.set_postfix(unreadable=len(manifest["failed"]))
            if names:
                frames, masks, times = (np.stack(x) for x in zip(*clips))
                store.write_shard(index_dir, manifest, names, retriever.encode_clips(frames, masks), masks, times)
            store.save_manifest(index_dir, manifest)  # the shard is only "done" once recorded here
    bar.close()
    if not todo:
        store.save_manifest(index_dir, manifest)
    total = sum(s["count"] for s in manifest["shards"])
    failed = len(manifest["failed"])
    log(f"index {index_dir}: {len(todo) - new_failed} encoded now; {plural(total, 'video', 'videos')} in all, in "
        f"{plural(len(manifest['shards']), 'shard', 'shards')}"
        + (f"; {plural(failed, 'unreadable video', 'unreadable videos')} skipped ({new_failed} new)" if failed else ""))
    return manifest
