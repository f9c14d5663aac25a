"""Query latency of the served search at 1k, 10k and 100k videos, exact and two-stage, on this CPU.

    python benchmarks/bench_search.py [--sizes 1000,10000,100000] [--frames 12] [--dim 512] [--queries 100]

Each index is written in the real format (`cma_jax.search.store`: float16 shards of [n, T, D] frame
embeddings, masks and frame times, a manifest) from generated embeddings, loaded as `search serve`
loads it, and queried through `cma_jax.search.scoring.Searcher`, end to end: a ViT-B/32-sized text
tower (random init: timing only) encodes the query, the text-conditioned head scores the videos, the
top 10 hits get their best frame. Latency is p50 / p95 over `--queries` queries after a warm-up.

The generated embeddings have structure the head can use: each video has a main concept in every
frame and, in a quarter of its frames, a second concept ("an event"); a query names one concept.
Recall@10 of the two-stage search (HNSW candidates from mean-pooled embeddings, then the exact head)
is measured against the exact search over 200 query embeddings of that kind.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from cma_jax import api  # noqa: E402
from cma_jax.models import clip  # noqa: E402
from cma_jax.models.retrieval import RetrievalModel  # noqa: E402
from cma_jax.search import scoring, store  # noqa: E402

WORDS = ["a", "dog", "catches", "frisbee", "person", "is", "cooking", "in", "the", "kitchen", "car", "red"]


class _Fake:
    """What `store.new_manifest` reads of a Retriever, for an index of generated embeddings."""

    def __init__(self, num_frames: int):
        self.fingerprint = {"clip": {}, "method": "generated", "method_config": {}, "params_sha256": "0" * 64}
        self.backbone_sha256 = "0" * 64
        self.num_frames, self.fps, self.resolution = num_frames, 1.0, 224


def concepts(count: int, dim: int, rng) -> np.ndarray:
    u = rng.standard_normal((count, dim)).astype(np.float32)
    return u / np.linalg.norm(u, axis=-1, keepdims=True)


def write_index(path: str, n: int, frames: int, dim: int, concept: np.ndarray, rng, shard: int = 8192) -> None:
    """An index of n generated videos: frame = 10 * (main concept + 0.7 event in 1/4 of frames + 0.3 noise)."""
    os.makedirs(path)
    manifest = store.new_manifest(_Fake(frames), path, {})
    for start in range(0, n, shard):
        m = min(shard, n - start)
        main = concept[rng.integers(0, len(concept), m)]  # [m, D]
        event = concept[rng.integers(0, len(concept), m)]
        has_event = rng.random((m, frames)) < 0.25
        noise = rng.standard_normal((m, frames, dim), dtype=np.float32) / np.sqrt(dim)
        f = main[:, None] + 0.7 * has_event[..., None] * event[:, None] + 0.3 * noise
        times = np.broadcast_to(np.arange(frames, dtype=np.float32), (m, frames))
        store.write_shard(path, manifest, [f"v{start + i:07d}.mp4" for i in range(m)], 10 * f,
                          np.ones((m, frames), bool), times)
    store.save_manifest(path, manifest)


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def timed(fn, runs: int) -> list[float]:
    fn(0)  # warm-up: compiles
    out = []
    for i in range(runs):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--preset", default="vit_b32", help="the text tower's size (random init)")
    p.add_argument("--workdir", default=None, help="where the generated indexes are written (default: a temp dir)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    cfg = clip.preset(args.preset)
    vocab = os.path.join(tempfile.mkdtemp(), "words.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(WORDS) + "\n")
    r = api.Retriever(RetrievalModel(cfg, None, rngs=nnx.Rngs(0)), vocab, num_frames=args.frames, max_words=32,
                      batch_size=1)  # as `search serve` encodes queries: one by one
    if cfg.embed_dim != args.dim:
        raise SystemExit(f"--dim {args.dim} differs from the {args.preset} text tower's {cfg.embed_dim}")
    concept = concepts(4096, args.dim, rng)
    texts = [" ".join(rng.choice(WORDS, 8)) for _ in range(args.queries)]
    load = os.getloadavg()
    print(f"{jax.devices()[0].device_kind} x {os.cpu_count()} cores, load average {load[0]:.1f} at start; "
          f"T={args.frames}, D={args.dim}, text tower {args.preset}, k=10, {args.queries} queries")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            path = os.path.join(tmp, f"index_{n}")
            write_index(path, n, args.frames, args.dim, concept, rng)
            start = time.perf_counter()
            index = store.load_index(path)
            exact = scoring.Searcher(r, index)
            loaded = time.perf_counter() - start
            two = scoring.Searcher(r, index, candidates=args.candidates)
            graph = time.perf_counter() - start - loaded
            ex = percentiles(timed(lambda i: exact.search([texts[i]], 10), args.queries))
            tw = percentiles(timed(lambda i: two.search([texts[i]], 10), args.queries))
            enc = percentiles(timed(lambda i: r.encode_text([texts[i]]), args.queries))
            # Recall@10 of the two stages against exact, on queries that name a concept.
            q = 10 * (concept[rng.integers(0, len(concept), 200)] + 0.1 * concepts(200, args.dim, rng))
            got = [{h["video"] for h in hits} for hits in two.search_embeddings(q, 10)]
            want = [{h["video"] for h in hits} for hits in exact.search_embeddings(q, 10)]
            recall = np.mean([len(g & w) / 10 for g, w in zip(got, want)])
            rows.append((n, ex, tw, recall, enc, exact.nbytes(), two.nbytes() - exact.nbytes(), loaded, graph))
            print(f"  {n} videos: exact p50 {ex[0]:.1f} ms p95 {ex[1]:.1f} ms; two-stage p50 {tw[0]:.1f} ms "
                  f"p95 {tw[1]:.1f} ms, recall@10 {recall:.3f}; text encoding p50 {enc[0]:.1f} ms; loaded in "
                  f"{loaded:.1f} s, two-stage searcher (HNSW graph) built in {graph:.1f} s", flush=True)
            exact = two = index = None  # frees the index before the next one is written
            for name in os.listdir(path):
                os.remove(os.path.join(path, name))
    print(f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| videos | exact p50 | exact p95 | two-stage p50 | two-stage p95 | two-stage recall@10 | text encoding "
          "(p50) | index in memory | load | HNSW graph | its build |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, ex, tw, recall, enc, mem, graph_bytes, loaded, graph in rows:
        print(f"| {n:,} | {ex[0]:.0f} ms | {ex[1]:.0f} ms | {tw[0]:.0f} ms | {tw[1]:.0f} ms | {recall:.3f} | "
              f"{enc[0]:.0f} ms | {mem / 2**20:,.0f} MiB | {loaded:.1f} s | {graph_bytes / 2**20:,.0f} MiB | "
              f"{graph:.1f} s |")


if __name__ == "__main__":
    main()
