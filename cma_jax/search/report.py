"""The static HTML report: one self-contained page with each query's hits and thumbnails of their frames."""

from __future__ import annotations

import datetime
import html
import os

from cma_jax.console import plural
from cma_jax.search.thumbs import thumbnails


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
                    cache[rel] = thumbnails(os.path.join(root, rel), thumbs, fps, thumb_height)
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
        parts.append(f"<section><h2>{plural(len(failed), 'unreadable video', 'unreadable videos')}, "
                     "not in the index</h2>")
        parts += [f"<div class='meta'>{html.escape(rel)}: <span class='err'>{html.escape(err)}</span></div>"
                  for rel, err in sorted(failed.items())]
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
