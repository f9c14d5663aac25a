"""Search your own videos: index a folder once, then query it with text (a table, an HTML report or a page).

    python -m cma_jax.search index  VIDEO_DIR INDEX_DIR --backbone CKPT [--adapters RUN] [--tokenizer T]
    python -m cma_jax.search query  INDEX_DIR "a dog catches a frisbee" ["..."] [-k 5] [--json]
    python -m cma_jax.search report INDEX_DIR "query" ... [--queries_file F] --out report.html
    python -m cma_jax.search serve  INDEX_DIR [INDEX_DIR ...] [--port 8000] [--host 127.0.0.1]

One job per module: `store` (the index on disk), `build` (indexing a folder), `scoring` (the head over an
index, exact or two-stage with `ann`), `thumbs`, `report`, `serve` + `page` (the served page and its JSON
API), `cli`. docs/search.md has the index format, resuming, the model checks and serving several adapter
sets on one backbone.
"""

from cma_jax.search.build import build_index, list_videos
from cma_jax.search.cli import main
from cma_jax.search.report import render_report
from cma_jax.search.scoring import Searcher, search
from cma_jax.search.store import FORMAT, MANIFEST, IndexMismatchError, check_model, load_index, read_manifest

__all__ = ["FORMAT", "MANIFEST", "IndexMismatchError", "Searcher", "build_index", "check_model", "list_videos",
           "load_index", "main", "read_manifest", "render_report", "search"]
