"""The served search: one backbone in memory with every index's trained parameters beside it, a page and
a JSON API over Starlette (on uvicorn); videos are served with range requests, and only those the
loaded indexes record."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import urllib.parse

import jax
import uvicorn
from flax import nnx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from cma_jax import api
from cma_jax.console import plural
from cma_jax.search import ann, page, scoring, store, thumbs

MAX_QUERY_CHARS = 1000  # longer is refused before tokenizing
THUMB_HEIGHT = 120
PAGE_K = 12  # hits the page asks for


class BadRequest(ValueError):
    """A request the server refuses with a message (HTTP `status`)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Served:
    """One loaded index: its searcher (model + embeddings) and the videos it may serve."""

    name: str
    index_dir: str
    searcher: scoring.Searcher
    video_root: str
    videos: frozenset

    @property
    def retriever(self):
        return self.searcher.retriever

    def describe(self) -> dict:
        fp = self.searcher.manifest["fingerprint"]
        source = self.searcher.manifest.get("model_source") or {}
        return {"name": self.name, "videos": len(self.searcher), "method": fp["method"],
                "method_config": fp["method_config"], "adapters": source.get("adapters"),
                "head": self.searcher.head, "unreadable": len(self.searcher.manifest["failed"]),
                "search": f"two-stage ({self.searcher.candidates} candidates)" if self.searcher.ann else "exact"}

    def file(self, rel: str) -> str:
        """The local file of a video this index records (404 for anything else, or one outside its folder)."""
        if rel not in self.videos:
            raise BadRequest(f"no video {rel!r} in index {self.name}", 404)
        root = os.path.realpath(self.video_root)
        path = os.path.realpath(os.path.join(root, rel))
        if os.path.commonpath([root, path]) != root:  # a symlink out of the video folder
            raise BadRequest(f"video {rel!r} of index {self.name} lies outside its video folder", 404)
        if not os.path.isfile(path):
            raise BadRequest(f"video {rel!r} was deleted or moved since index {self.name} was built", 404)
        return path

    def unavailable(self, rel: str) -> str | None:
        """Why `file(rel)` would refuse the video, or None when it can be served."""
        try:
            self.file(rel)
        except BadRequest as e:
            return str(e)
        return None


# ----------------------------------------------------------------------------- loading
def _distinct_bytes(arrays) -> int:
    seen = {}
    for a in arrays:
        seen[id(a)] = a.nbytes
    return sum(seen.values())


def _model_arrays(retriever) -> list:
    return [x for x in jax.tree.leaves(nnx.state(retriever.model)) if isinstance(x, jax.Array)]


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def memory(backbone: api.SharedBackbone, served: list[Served]) -> dict:
    """Bytes of the loaded parameters, over their distinct arrays: {'backbone', 'own' (per index), 'total',
    'separate' (what as many separate models would hold)}."""
    shared = {id(a) for a in jax.tree.leaves(backbone.tree)}
    own = [_distinct_bytes(a for a in _model_arrays(s.retriever) if id(a) not in shared) for s in served]
    return {"backbone": _distinct_bytes(jax.tree.leaves(backbone.tree)), "own": own,
            "total": _distinct_bytes(a for s in served for a in _model_arrays(s.retriever)),
            "separate": sum(sum(a.nbytes for a in _model_arrays(s.retriever)) for s in served)}


def memory_lines(backbone: api.SharedBackbone, served: list[Served]) -> list[str]:
    """What `serve` prints at start: the backbone once, each adapter set's own parameters, the total."""
    m = memory(backbone, served)
    lines = [f"backbone {backbone.backbone.folder}: {_size(m['backbone'])} of parameters, loaded once"]
    for s, own in zip(served, m["own"]):
        lines.append(f"  index '{s.name}': method {s.searcher.manifest['fingerprint']['method']}, its own parameters "
                     f"{_size(own)}; {len(s.searcher)} videos' embeddings {_size(s.searcher.nbytes())}")
    lines.append(f"parameters in memory: {_size(m['total'])} for {plural(len(served), 'adapter set', 'adapter sets')} "
                 "on one backbone" + (f" (as {len(served)} separate models: {_size(m['separate'])})"
                                      if len(served) > 1 else ""))
    return lines


def _unique_names(index_dirs: list[str]) -> list[str]:
    names = []
    for d in index_dirs:
        base = os.path.basename(os.path.normpath(d)) or "index"
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def _graph(index_dir: str, manifest: dict, index: dict, log) -> ann.MeanPooledIndex:
    """The two-stage search's candidate graph: the one saved beside the shards, else built and saved there."""
    key = f"{store.content_key(manifest)}-{ann.MeanPooledIndex.KIND}"
    data = store.read_graph(index_dir, key)
    if data is not None:
        return ann.MeanPooledIndex.from_bytes(data)
    start = time.perf_counter()
    graph = ann.MeanPooledIndex.build(index["frame_emb"], index["frame_mask"])
    try:
        store.write_graph(index_dir, key, graph.to_bytes())
        saved = "saved beside its shards for the next start"
    except OSError as e:  # a read-only index: built at each start
        saved = f"not saved ({e})"
    log(f"candidate graph of {index_dir} built in {time.perf_counter() - start:.1f} s, {saved}")
    return graph


def load_indexes(index_dirs: list[str], *, backbone: str | None = None, tokenizer: str | None = None,
                 batch_size: int = 1, exact_up_to: int = 20000, candidates: int = 1000,
                 log=print) -> tuple[api.SharedBackbone, list[Served]]:
    """Load the backbone once (`backbone`, else the one the first index was built on) and each index's model
    on it; an index built on another backbone or with a model that no longer matches is refused."""
    if not index_dirs:
        raise ValueError("no index folders given")
    manifests = []
    for d in index_dirs:
        m = store.read_manifest(d)
        if m is None:
            raise FileNotFoundError(f"{d}: no search index here ({store.MANIFEST} missing)")
        manifests.append(m)
    spec = backbone or (manifests[0].get("model_source") or {}).get("backbone")
    if not spec:
        raise ValueError(f"index {index_dirs[0]} records no backbone; pass --backbone")
    start = time.perf_counter()
    shared = api.shared_backbone(spec)
    log(f"loaded backbone {spec} in {time.perf_counter() - start:.1f} s")
    served = []
    for d, m, name in zip(index_dirs, manifests, _unique_names(index_dirs)):
        store.check_backbone(m, shared.sha256, spec, d)
        source, settings = m.get("model_source") or {}, m["settings"]
        r = api.load(shared, source.get("adapters") or None, tokenizer=tokenizer or source.get("tokenizer"),
                     head=source.get("head", "text_conditioned"), tau=source.get("tau", 5.0),
                     num_frames=settings["num_frames"], fps=settings["fps"], max_words=source.get("max_words"),
                     batch_size=batch_size, dtype=source.get("dtype"))
        store.check_model(m, r.fingerprint, d)
        index = store.load_index(d)
        n = len(index["videos"])
        two_stage = n > exact_up_to and candidates > 0
        graph = _graph(d, m, index, log) if two_stage else None
        searcher = scoring.Searcher(r, index, candidates=candidates if two_stage else 0, graph=graph)
        searcher.search(["warm up"], min(PAGE_K, n))  # compiles the query path now, not on the first query
        served.append(Served(name, d, searcher, m["video_root"], frozenset(index["videos"])))
        log(f"index '{name}' ({d}): {plural(n, 'video', 'videos')}, method {m['fingerprint']['method']}, "
            f"{served[-1].describe()['search']} search")
    return shared, served


# ----------------------------------------------------------------------------- requests
def _query_params(request: Request) -> dict[str, str]:
    """The query string decoded as UTF-8, strictly (Starlette would replace bad bytes silently)."""
    try:
        return dict(urllib.parse.parse_qsl(request.scope["query_string"].decode("latin-1"), keep_blank_values=True,
                                           encoding="utf-8", errors="strict"))
    except UnicodeDecodeError:
        raise BadRequest("the query string is not UTF-8 text") from None


def _check_query(q: str | None, retriever) -> str:
    if q is None or not q.strip():
        raise BadRequest("empty query: type a few words describing the video")
    q = q.strip()
    if len(q) > MAX_QUERY_CHARS:
        raise BadRequest(f"query too long: {len(q)} characters, at most {MAX_QUERY_CHARS}")
    tokens, limit = len(retriever.tokenizer.encode(q)), retriever.max_words - 2
    if tokens > limit:
        raise BadRequest(f"query too long: {tokens} tokens, this model reads at most {limit}; shorten it")
    return q


def _int(params: dict, key: str, default: int, low: int, high: int) -> int:
    raw = params.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{key} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{key} must be between {low} and {high}, got {value}")
    return value


def _video_url(kind: str, index: str, rel: str) -> str:
    return f"/{kind}/{urllib.parse.quote(index)}/{urllib.parse.quote(rel)}"


def make_app(served: list[Served], *, title: str = "cma_jax video search") -> Starlette:
    """The web app over loaded indexes: `/` (the page), `/api/indexes`, `/api/search`, `/video/...`, `/thumb/...`."""
    by_name = {s.name: s for s in served}

    def index_of(name: str | None) -> Served:
        if name is None or name == "":
            return served[0]
        if name not in by_name:
            raise BadRequest(f"no index named {name!r}; loaded: {', '.join(by_name)}", 404)
        return by_name[name]

    @functools.lru_cache(maxsize=4096)
    def cached_frame(path: str, mtime: float, fps: float, t: float) -> bytes:
        return thumbs.frame_jpeg(path, fps, t, THUMB_HEIGHT)

    def errors(handler):
        @functools.wraps(handler)
        def wrapped(request: Request):
            try:
                return handler(request)
            except BadRequest as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
        return wrapped

    def home(request: Request):
        return HTMLResponse(page.render(title))

    @errors
    def indexes(request: Request):
        return JSONResponse({"indexes": [s.describe() for s in served]})

    @errors
    def search(request: Request):
        params = _query_params(request)
        s = index_of(params.get("index"))
        q = _check_query(params.get("q"), s.retriever)
        k = _int(params, "k", PAGE_K, 1, scoring.MAX_K)
        start = time.perf_counter()
        hits = s.searcher.search([q], k)[0]
        took = (time.perf_counter() - start) * 1000
        for h in hits:
            h["url"] = _video_url("video", s.name, h["video"])
            h["thumb"] = _video_url("thumb", s.name, h["video"]) + f"?t={h['time']:g}"
            h["unavailable"] = s.unavailable(h["video"])  # why the page cannot play it, or None
            h["available"] = h["unavailable"] is None
        return JSONResponse({"query": q, "index": s.name, "videos": len(s.searcher), "took_ms": round(took, 1),
                             "hits": hits})

    @errors
    def video(request: Request):
        s = index_of(request.path_params["index"])
        return FileResponse(s.file(request.path_params["path"]))  # answers Range requests (seeking)

    @errors
    def thumb(request: Request):
        s = index_of(request.path_params["index"])
        path = s.file(request.path_params["path"])
        try:
            t = float(_query_params(request).get("t", 0))
        except ValueError:
            raise BadRequest("t must be a time in seconds") from None
        fps = s.searcher.manifest["settings"]["fps"]
        try:
            data = cached_frame(path, os.path.getmtime(path), fps, max(0.0, t))
        except Exception as e:  # noqa: BLE001  a file that no longer decodes: no picture, said so
            raise BadRequest(f"cannot read a frame of {request.path_params['path']!r}: {e}", 404) from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return Starlette(routes=[
        Route("/", home),
        Route("/api/indexes", indexes),
        Route("/api/search", search),
        Route("/video/{index}/{path:path}", video),
        Route("/thumb/{index}/{path:path}", thumb),
    ])


def serve(served: list[Served], *, host: str = "127.0.0.1", port: int = 8000, log=print) -> None:
    """Run the app with uvicorn until interrupted."""
    where = "this machine only" if host in ("127.0.0.1", "localhost", "::1") else "other machines too"
    log(f"serving {plural(len(served), 'index', 'indexes')} on http://{host}:{port}/ (bound to {host}: reachable from {where}; "
        "--host changes it)")
    uvicorn.run(make_app(served), host=host, port=port, log_level="warning")
