"""Search your own videos: build an embedding index of a folder once, then query it with text.

    python -m cma_jax.search index  VIDEO_DIR INDEX_DIR --backbone CKPT [--adapters RUN] [--tokenizer T]
    python -m cma_jax.search query  INDEX_DIR "a dog catches a frisbee" ["..."] [-k 5] [--json]
    python -m cma_jax.search report INDEX_DIR "query" ... [--queries_file F] --out report.html

Index folder: `manifest.json` (model fingerprint, frame settings, model source paths, shard list,
unreadable videos) and `shard_NNNNN.npz` files (`frame_emb [n, T, D]` float16, `frame_mask [n, T]`,
`videos [n]` paths relative to VIDEO_DIR). Per-frame embeddings are kept, not one vector per video,
because the text-conditioned head weighs each video's frames by the query.

* Resumable: each shard is written atomically and then recorded in the manifest; a rerun (same
  command) skips videos already indexed or already reported unreadable, so a killed run loses at most
  one shard of work, and new files added to the folder are picked up.
* Unreadable videos are reported, recorded in the manifest and skipped (`--retry_failed` retries).
* The model that builds the index is fingerprinted (CLIP config, method and its fields, sha256 of the
  weights); querying or extending an index with any other model is refused with a message.
* `query` / `report` default to the backbone, adapters, tokenizer and dtype the index was built with.
* Frames (T), fps and words per query default to what the adapters were trained with (recorded in
  their checkpoint; see `cma_jax.api.load`), else 12 / 1 / 32; a resumed index keeps its own.
* Encoding is data-parallel over all local devices when there are several.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import datetime
import html
import io
import json
import os
import sys

import numpy as np

from cma_jax import checkpoint, console
from cma_jax.files import write_atomic

MANIFEST = "manifest.json"
FORMAT = "cma_jax.search/1"


class IndexMismatchError(ValueError):
    """An index was built with another model or other frame settings."""


# ----------------------------------------------------------------------------- index files
def _save_manifest(index_dir: str, manifest: dict) -> None:
    write_atomic(os.path.join(index_dir, MANIFEST), json.dumps(manifest, indent=1))


def read_manifest(index_dir: str) -> dict | None:
    """The index's manifest, or None when `index_dir` holds no index."""
    path = os.path.join(index_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a cma_jax.search index manifest (format {manifest.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return manifest


def _describe_difference(saved: dict, current: dict) -> str:
    diffs = checkpoint.model_differences(saved, current, ("index", "model"))
    if not diffs and saved.get("params_sha256") != current.get("params_sha256"):
        diffs.append(f"weights: index {saved.get('params_sha256', '')[:12]}, "
                     f"model {current.get('params_sha256', '')[:12]} (sha256)")
    return "; ".join(diffs)


def check_model(manifest: dict, fingerprint: dict, index_dir: str) -> None:
    """Refuse an index built by another model (config or weights differ)."""
    saved = manifest["fingerprint"]
    if saved == fingerprint:
        return
    raise IndexMismatchError(
        f"index {index_dir} was built with a different model ({_describe_difference(saved, fingerprint)}). "
        f"Its embeddings are not comparable with this model's: use the backbone/adapters it was built with "
        f"(recorded in {MANIFEST}: {manifest.get('model_source')}), or build a new index "
        "(another folder, or `index --overwrite`).")


def load_index(index_dir: str) -> dict:
    """All shards -> {'videos' [N] (relative paths), 'frame_emb' [N, T, D] float32, 'frame_mask' [N, T]}."""
    manifest = read_manifest(index_dir)
    if manifest is None:
        raise FileNotFoundError(f"{index_dir}: no search index here ({MANIFEST} missing); "
                                "build one with `python -m cma_jax.search index VIDEO_DIR INDEX_DIR ...`")
    names, embs, masks = [], [], []
    for shard in manifest["shards"]:
        with np.load(os.path.join(index_dir, shard["file"])) as z:
            names += [str(v) for v in z["videos"]]
            embs.append(z["frame_emb"].astype(np.float32))
            masks.append(z["frame_mask"])
    if not names:
        raise ValueError(f"{index_dir}: the index holds no videos")
    return {"manifest": manifest, "videos": names, "frame_emb": np.concatenate(embs),
            "frame_mask": np.concatenate(masks)}


def _indexed_names(index_dir: str, manifest: dict) -> set[str]:
    done = set()
    for shard in manifest["shards"]:
        with np.load(os.path.join(index_dir, shard["file"])) as z:
            done.update(str(v) for v in z["videos"])
    return done


def list_videos(video_dir: str) -> list[str]:
    """Video files under `video_dir` (recursive), as sorted paths relative to it."""
    from cma_jax.data.video import VIDEO_EXTENSIONS
    if not os.path.isdir(video_dir):
        raise FileNotFoundError(f"video folder {video_dir} does not exist")
    found = []
    for root, dirs, files in os.walk(video_dir):
        dirs.sort()
        for name in files:
            if name.lower().endswith(VIDEO_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, name), video_dir))
    return sorted(found)


# ----------------------------------------------------------------------------- building
def build_index(retriever, video_dir: str, index_dir: str, *, shard_size: int = 256, workers: int = 4,
                overwrite: bool = False, retry_failed: bool = False, model_source: dict | None = None,
                progress: bool = True, log=print) -> dict:
    """Index every video under `video_dir` into `index_dir` (resuming an existing index); -> manifest."""
    from tqdm import tqdm

    from cma_jax.data.video import VideoDecodeError

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    videos = list_videos(video_dir)
    settings = {"num_frames": retriever.num_frames, "fps": retriever.fps, "resolution": retriever.resolution}
    if overwrite and os.path.isdir(index_dir):
        for name in os.listdir(index_dir):
            if name == MANIFEST or (name.startswith("shard_") and name.endswith(".npz")):
                os.remove(os.path.join(index_dir, name))
    os.makedirs(index_dir, exist_ok=True)
    manifest = read_manifest(index_dir)
    fp = retriever.fingerprint
    if manifest is None:
        manifest = {"format": FORMAT, "fingerprint": fp, "settings": settings,
                    "video_root": os.path.abspath(video_dir), "model_source": model_source or {},
                    "shards": [], "failed": {}}
    else:
        check_model(manifest, fp, index_dir)
        if manifest["settings"] != settings:
            raise IndexMismatchError(f"index {index_dir} was built with frame settings {manifest['settings']}, "
                                     f"not {settings}; use the same --num_frames/--fps or a new index")
        manifest["video_root"] = os.path.abspath(video_dir)
        if retry_failed:
            manifest["failed"] = {}
    done = _indexed_names(index_dir, manifest) | set(manifest["failed"])
    todo = [v for v in videos if v not in done]
    log(f"{len(videos)} videos in {video_dir}: {len(done & set(videos))} already in the index, "
        f"{len(todo)} to encode")

    def load(rel):
        try:
            return rel, retriever.load_video(os.path.join(video_dir, rel)), None
        except (VideoDecodeError, ValueError, OSError) as e:
            return rel, None, str(e)

    bar = tqdm(total=len(todo), unit="video", desc="indexing", disable=not progress)
    new_failed = 0
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(todo), shard_size):
            chunk = todo[start:start + shard_size]
            names, frames, masks = [], [], []
            for rel, clip, err in pool.map(load, chunk):  # decoding overlaps across threads
                bar.update(1)
                if err is not None:
                    manifest["failed"][rel] = err
                    new_failed += 1
                    bar.write(f"skipped unreadable video {rel}: {err}")
                    continue
                names.append(rel)
                frames.append(clip[0])
                masks.append(clip[1])
            bar.set_postfix(unreadable=len(manifest["failed"]))
            if names:
                emb = retriever.encode_clips(np.stack(frames), np.stack(masks))
                file = f"shard_{len(manifest['shards']):05d}.npz"
                write_atomic(os.path.join(index_dir, file), lambda f: np.savez(
                    f, frame_emb=emb.astype(np.float16), frame_mask=np.stack(masks), videos=np.array(names)))
                manifest["shards"].append({"file": file, "count": len(names)})
            _save_manifest(index_dir, manifest)  # the shard is only "done" once recorded here
    bar.close()
    if not todo:
        _save_manifest(index_dir, manifest)
    total = sum(s["count"] for s in manifest["shards"])
    log(f"index {index_dir}: {total} videos in {len(manifest['shards'])} shards; "
        f"{len(manifest['failed'])} unreadable skipped ({new_failed} new)")
    return manifest


# ----------------------------------------------------------------------------- querying
def search(retriever, index: dict, texts: list[str], k: int = 5, block_size: int = 1024) -> list[list[dict]]:
    """Top-k videos per text: [[{'rank', 'video', 'score'}, ...], ...], score = cosine of the model's head."""
    if not texts:
        raise ValueError("no query texts given")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sim = retriever.similarity(retriever.encode_text(texts), index["frame_emb"], index["frame_mask"], block_size)
    k = min(k, sim.shape[1])
    out = []
    for row in sim:
        top = np.argsort(-row, kind="stable")[:k]
        out.append([{"rank": r + 1, "video": index["videos"][i], "score": float(row[i])} for r, i in enumerate(top)])
    return out


# ----------------------------------------------------------------------------- HTML report
def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _thumbnails(path: str, count: int, fps: float, height: int) -> list[str]:
    """`count` frames spread over the video, as base64 JPEG strings (original aspect ratio)."""
    from cma_jax.data.pipeline import sample_frame_indices
    from cma_jax.data.video import iter_sampled_frames

    def small(im):
        return im.convert("RGB").resize((max(1, round(im.width * height / im.height)), height))

    # Shrunk as decoded: an hour of full-HD frames at 1 fps would not fit in memory.
    frames = [small(im) for im in iter_sampled_frames(path, fps)]
    out = []
    for i in sample_frame_indices(len(frames), count):
        im = frames[i]
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin-bottom:4px} .sub{color:#666;font-size:13px;margin-bottom:20px}
section{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px 16px;margin-bottom:18px}
h2{font-size:18px;margin:4px 0 10px} .hit{display:flex;align-items:center;gap:14px;padding:6px 0;
border-top:1px solid #eee} .rank{font-size:20px;font-weight:600;width:36px;text-align:right}
.meta{width:260px;font-size:13px;word-break:break-all} .score{font-family:monospace;font-size:15px}
.thumbs img{margin-right:4px;border-radius:3px;vertical-align:middle} .err{color:#b00;font-size:13px}
"""


def render_report(results: list[list[dict]], texts: list[str], index: dict, *, thumbs: int = 4,
                  thumb_height: int = 90, fps: float = 1.0) -> str:
    """A self-contained HTML page: for each query its hits (rank, score, path) with frame thumbnails."""
    manifest = index["manifest"]
    root = manifest["video_root"]
    fp = manifest["fingerprint"]
    method = ", ".join(f"{k}={v}" for k, v in fp["method_config"].items())
    model_line = (f"CLIP embed {fp['clip']['embed_dim']}, {fp['clip']['vision_layers']}+{fp['clip']['text_layers']} "
                  f"layers, patch {fp['clip']['vision_patch_size']}; method {fp['method']}"
                  + (f" ({method})" if method else "") + f"; weights {fp['params_sha256'][:12]}")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Video search report</title>"
             f"<style>{_CSS}</style></head><body><h1>Video search report</h1>",
             f"<div class='sub'>{len(index['videos'])} videos in {html.escape(root)} &middot; "
             f"{html.escape(model_line)} &middot; generated "
             f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</div>"]
    cache: dict[str, list[str] | str] = {}
    for text, hits in zip(texts, results):
        parts.append(f"<section><h2>&ldquo;{html.escape(text)}&rdquo;</h2>")
        for hit in hits:
            rel = hit["video"]
            if rel not in cache:
                try:
                    cache[rel] = _thumbnails(os.path.join(root, rel), thumbs, fps, thumb_height)
                except Exception as e:  # a video moved or deleted since indexing: say so in the page
                    cache[rel] = f"frames unavailable: {e}"
            imgs = cache[rel]
            body = (f"<span class='err'>{html.escape(imgs)}</span>" if isinstance(imgs, str) else
                    "".join(f"<img src='data:image/jpeg;base64,{b}' height='{thumb_height}'>" for b in imgs))
            parts.append(f"<div class='hit'><div class='rank'>{hit['rank']}</div><div class='meta'>"
                         f"<div class='score'>{hit['score']:.4f}</div>{html.escape(rel)}</div>"
                         f"<div class='thumbs'>{body}</div></div>")
        parts.append("</section>")
    failed = manifest["failed"]
    if failed:  # what the index does not hold, so no query can find it
        parts.append(f"<section><h2>{_count(len(failed), 'unreadable video', 'unreadable videos')}, "
                     "not in the index</h2>")
        parts += [f"<div class='meta'>{html.escape(rel)}: <span class='err'>{html.escape(err)}</span></div>"
                  for rel, err in sorted(failed.items())]
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- CLI
def _retriever(args, manifest: dict | None):
    from cma_jax import api

    source = (manifest or {}).get("model_source", {})
    backbone = args.backbone or source.get("backbone")
    if not backbone:
        raise SystemExit("--backbone is required (ViT-B/32, a Hugging Face repo id, a .pt file or URL, a converted "
                         "folder)")
    adapters = args.adapters if args.adapters is not None else source.get("adapters")
    tokenizer = args.tokenizer or source.get("tokenizer")
    # Explicit flags, else the index's own settings; None leaves them to api.load (the adapters' training).
    settings = (manifest or {}).get("settings", {})
    num_frames = getattr(args, "num_frames", None) or settings.get("num_frames")
    fps = getattr(args, "fps", None) or settings.get("fps")
    dtype = args.dtype or source.get("dtype")  # part of the fingerprint, so it defaults to the index's too
    r = api.load(backbone, adapters or None, tokenizer=tokenizer, head=args.head, tau=args.tau,
                 num_frames=num_frames, max_words=args.max_words, fps=fps, batch_size=args.batch_size,
                 dtype=dtype)
    src = {"backbone": os.path.abspath(backbone), "adapters": os.path.abspath(adapters) if adapters else None,
           "tokenizer": os.path.abspath(tokenizer) if isinstance(tokenizer, str) else None, "dtype": dtype}
    return r, src


def _queries(args) -> list[str]:
    texts = list(args.texts)
    if getattr(args, "queries_file", None):
        with open(args.queries_file) as f:
            texts += [line.strip() for line in f if line.strip()]
    if not texts:
        raise SystemExit("no queries: give texts on the command line or --queries_file")
    return texts


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none to show (None, a flag)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cma_jax.search", description=__doc__.split("\n")[0],
                                formatter_class=_Help)
    sub = p.add_subparsers(dest="cmd", required=True)
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--backbone", help="anything config.backbone takes: ViT-B/32, a Hugging Face repo id, a .pt "
                                          "file or URL, a converted folder (default for query/report: the index's)")
    model.add_argument("--adapters", help="run workdir / checkpoints folder or converted adapter folder; "
                                          "'' = none (default for query/report: the index's)")
    model.add_argument("--tokenizer", help="tokenizer (default: the backbone's tokenizer/ folder)")
    model.add_argument("--head", default="text_conditioned", choices=("text_conditioned", "meanp"),
                       help="how a query weighs a video's frames")
    model.add_argument("--tau", type=float, default=5.0, help="text-conditioned head temperature")
    model.add_argument("--max_words", type=int,
                       help="words per query (default: what the adapters were trained with, else 32)")
    model.add_argument("--batch_size", type=int, default=16, help="videos / texts per encode batch")
    model.add_argument("--dtype", choices=("float32", "bfloat16"),
                       help="compute dtype (default: the index's, else the backbone's)")

    ix = sub.add_parser("index", parents=[model], formatter_class=_Help,
                        help="encode a folder of videos into an index (resumable)")
    ix.add_argument("video_dir", help="folder of videos (searched recursively)")
    ix.add_argument("index_dir", help="index folder (created, or resumed when it holds an index)")
    ix.add_argument("--num_frames", type=int, help="frames per video, T (default: the index's when resuming, "
                                                   "else what the adapters were trained with, else 12)")
    ix.add_argument("--fps", type=float, help="frame sampling rate before taking T frames (default: the index's "
                                              "when resuming, else what the adapters were trained with, else 1)")
    ix.add_argument("--shard_size", type=int, default=256, help="videos per shard file (resume granularity)")
    ix.add_argument("--workers", type=int, default=4, help="decoding threads")
    ix.add_argument("--overwrite", action="store_true", help="delete an existing index in index_dir first")
    ix.add_argument("--retry_failed", action="store_true", help="try the videos reported unreadable again")
    ix.add_argument("--no_progress", action="store_true", help="no progress bar")

    q = sub.add_parser("query", parents=[model], formatter_class=_Help, help="top-k videos for text queries")
    q.add_argument("index_dir")
    q.add_argument("texts", nargs="*", help="query texts")
    q.add_argument("--queries_file", help="one query per line")
    q.add_argument("-k", type=int, default=5, help="hits per query")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")

    rp = sub.add_parser("report", parents=[model], formatter_class=_Help, help="HTML page with each hit's frames")
    rp.add_argument("index_dir")
    rp.add_argument("texts", nargs="*", help="query texts")
    rp.add_argument("--queries_file", help="one query per line")
    rp.add_argument("-k", type=int, default=5, help="hits per query")
    rp.add_argument("--out", default="search_report.html", help="the HTML file to write")
    rp.add_argument("--thumbs", type=int, default=4, help="thumbnails per hit")
    args = p.parse_args(argv)

    try:
        if args.cmd == "index":
            existing = None if args.overwrite else read_manifest(args.index_dir)
            retriever, src = _retriever(args, existing)  # resuming: the model defaults to the index's
            build_index(retriever, args.video_dir, args.index_dir, shard_size=args.shard_size, workers=args.workers,
                        overwrite=args.overwrite, retry_failed=args.retry_failed, model_source=src,
                        progress=not args.no_progress)
            return 0
        texts = _queries(args)
        index = load_index(args.index_dir)
        retriever, _ = _retriever(args, index["manifest"])
        check_model(index["manifest"], retriever.fingerprint, args.index_dir)
        results = search(retriever, index, texts, args.k)
        if args.cmd == "query":
            if args.json:
                print(json.dumps([{"query": t, "hits": h} for t, h in zip(texts, results)], indent=1))
            else:
                for t, hits in zip(texts, results):
                    print(f"query: {t}")
                    for h in hits:
                        print(f"  {h['rank']:>3}. {h['score']:+.4f}  {h['video']}")
            return 0
        page = render_report(results, texts, index, thumbs=args.thumbs, fps=index["manifest"]["settings"]["fps"])
        write_atomic(args.out, page)
        hits = len(results[0])  # every query gets min(k, videos in the index)
        line = f"report with {_count(len(texts), 'query', 'queries')} x {_count(hits, 'hit', 'hits')}"
        if hits < args.k:
            line += f" (k={args.k}, but the index holds {hits} videos)"
        unreadable = len(index["manifest"]["failed"])
        if unreadable:
            line += f", listing {_count(unreadable, 'unreadable video', 'unreadable videos')}"
        print(f"{line} -> {args.out}")
        return 0
    except Exception as e:  # bad input or a full disk: one line, exit 2; a bug keeps its traceback
        console.print_error_or_raise(e, args.index_dir)
        return 2


if __name__ == "__main__":
    console.setup()
    sys.exit(main())
