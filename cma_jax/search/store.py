"""The index on disk: a manifest (format, model, settings, shards, unreadable videos) and shards of
per-frame embeddings with each frame's time; read, written and checked here only."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
from etils import epath

from cma_jax import checkpoint, paths
from cma_jax.files import write_atomic

MANIFEST = "manifest.json"
FORMAT = "cma_jax.search/2"  # 2: shards hold frame_time, the manifest the backbone's sha256


class IndexMismatchError(ValueError):
    """An index was built with another model, another backbone or other frame settings."""


def index_path(index_dir) -> epath.Path:
    return paths.path(index_dir)


def save_manifest(index_dir, manifest: dict) -> None:
    write_atomic(index_path(index_dir) / MANIFEST, json.dumps(manifest, indent=1))


def read_manifest(index_dir) -> dict | None:
    """The index's manifest, or None when `index_dir` holds no index; an older format is refused."""
    path = index_path(index_dir) / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    found = manifest.get("format")
    if found != FORMAT:
        if isinstance(found, str) and found.startswith("cma_jax.search/"):
            raise ValueError(f"{index_dir} is an index of an older format ({found}; this version reads {FORMAT}, "
                             "whose shards record each frame's time); rebuild it: python -m cma_jax.search index "
                             f"VIDEO_DIR {index_dir} --overwrite")
        raise ValueError(f"{path}: not a cma_jax.search index manifest (format {found!r}, expected {FORMAT!r})")
    return manifest


def new_manifest(retriever, video_dir: str, model_source: dict) -> dict:
    """The manifest of an empty index built by `retriever` over `video_dir`."""
    return {"format": FORMAT, "fingerprint": retriever.fingerprint, "backbone_sha256": retriever.backbone_sha256,
            "settings": settings_of(retriever), "video_root": os.path.abspath(video_dir),
            "model_source": model_source, "shards": [], "failed": {}}


def settings_of(retriever) -> dict:
    """The frame settings that decide what an index holds (a resumed index must keep them)."""
    return {"num_frames": retriever.num_frames, "fps": retriever.fps, "resolution": retriever.resolution}


def write_shard(index_dir, manifest: dict, videos: list[str], frame_emb: np.ndarray, frame_mask: np.ndarray,
                frame_time: np.ndarray) -> None:
    """Write the next shard (frame_emb [n, T, D] as float16, frame_mask [n, T], frame_time [n, T] seconds,
    videos [n] relative paths) and record it in `manifest` (saved by the caller: only then is it done)."""
    file = f"shard_{len(manifest['shards']):05d}.npz"
    buf = io.BytesIO()
    np.savez(buf, frame_emb=frame_emb.astype(np.float16), frame_mask=frame_mask.astype(bool),
             frame_time=frame_time.astype(np.float32), videos=np.array(videos))
    write_atomic(index_path(index_dir) / file, buf.getvalue())
    manifest["shards"].append({"file": file, "count": len(videos)})


def _is_graph(name: str) -> bool:
    return name.startswith("graph_") and name.endswith(".faiss")


def remove_index(index_dir) -> None:
    """Delete the index files in `index_dir` (manifest, shards, saved graphs; nothing else)."""
    root = index_path(index_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name == MANIFEST or (p.name.startswith("shard_") and p.name.endswith(".npz")) or _is_graph(p.name):
            p.unlink()


def content_key(manifest: dict) -> str:
    """A short hash of what the index holds (model and shards): what a derived file must have been made from."""
    held = {"fingerprint": manifest["fingerprint"], "settings": manifest["settings"], "shards": manifest["shards"]}
    return hashlib.sha256(json.dumps(held, sort_keys=True).encode()).hexdigest()[:16]


def read_graph(index_dir, key: str) -> bytes | None:
    """A candidate graph saved beside the shards under `key` (`write_graph`), or None."""
    path = index_path(index_dir) / f"graph_{key}.faiss"
    return path.read_bytes() if path.is_file() else None


def write_graph(index_dir, key: str, data: bytes) -> None:
    """Save a candidate graph beside the shards (replacing those of other keys: made from older contents)."""
    root = index_path(index_dir)
    for p in root.iterdir():
        if _is_graph(p.name):
            p.unlink()
    write_atomic(root / f"graph_{key}.faiss", data)


def _shards(index_dir, manifest: dict, keys: tuple[str, ...]):
    for shard in manifest["shards"]:
        with (index_path(index_dir) / shard["file"]).open("rb") as f, np.load(f) as z:
            yield {k: z[k] for k in keys}


def indexed_names(index_dir, manifest: dict) -> set[str]:
    """The videos (relative paths) the index's shards hold."""
    return {str(v) for s in _shards(index_dir, manifest, ("videos",)) for v in s["videos"]}


def load_index(index_dir) -> dict:
    """All shards -> {'manifest', 'videos' [N] (relative paths), 'frame_emb' [N, T, D] float32,
    'frame_mask' [N, T] bool, 'frame_time' [N, T] float32 seconds}."""
    manifest = read_manifest(index_dir)
    if manifest is None:
        raise FileNotFoundError(f"{index_dir}: no search index here ({MANIFEST} missing); "
                                "build one with `python -m cma_jax.search index VIDEO_DIR INDEX_DIR ...`")
    names, embs, masks, times = [], [], [], []
    for s in _shards(index_dir, manifest, ("videos", "frame_emb", "frame_mask", "frame_time")):
        names += [str(v) for v in s["videos"]]
        embs.append(s["frame_emb"].astype(np.float32))
        masks.append(s["frame_mask"])
        times.append(s["frame_time"])
    if not names:
        raise ValueError(f"{index_dir}: the index holds no videos")
    return {"manifest": manifest, "videos": names, "frame_emb": np.concatenate(embs),
            "frame_mask": np.concatenate(masks).astype(bool), "frame_time": np.concatenate(times)}


# ----------------------------------------------------------------------------- model checks
def _describe_difference(saved: dict, current: dict) -> str:
    diffs = checkpoint.model_differences(saved, current, ("index", "model"))
    if not diffs and saved.get("params_sha256") != current.get("params_sha256"):
        diffs.append(f"weights: index {saved.get('params_sha256', '')[:12]}, "
                     f"model {current.get('params_sha256', '')[:12]} (sha256)")
    return "; ".join(diffs)


def check_model(manifest: dict, fingerprint: dict, index_dir) -> None:
    """Refuse an index built by another model (config or weights differ)."""
    saved = manifest["fingerprint"]
    if saved == fingerprint:
        return
    raise IndexMismatchError(
        f"index {index_dir} was built with a different model ({_describe_difference(saved, fingerprint)}). "
        f"Its embeddings are not comparable with this model's: use the backbone/adapters it was built with "
        f"(recorded in {MANIFEST}: {manifest.get('model_source')}), or build a new index "
        "(another folder, or `index --overwrite`).")


def check_backbone(manifest: dict, sha256: str, backbone: str, index_dir) -> None:
    """Refuse an index built on another backbone than the one loaded (`backbone`, weights `sha256`)."""
    if manifest["backbone_sha256"] == sha256:
        return
    theirs = (manifest.get("model_source") or {}).get("backbone")
    raise IndexMismatchError(
        f"index {index_dir} was built on backbone {theirs} (weights {manifest['backbone_sha256'][:12]}), not on "
        f"the loaded backbone {backbone} (weights {sha256[:12]}): serve indexes of one backbone together, or "
        "start another server for it")
