"""Scoring an index for text queries with the model's head: exactly over every video, or over candidates
from mean-pooled embeddings (`cma_jax.search.ann`); each hit's best-matching frame and its time.

Scores and frame weights are the model's head, `cma_jax.models.retrieval.head_scores`. Held for many queries,
an index keeps each video's Gram matrix G = F F^T (`gram`: |v|^2 = w^T G w costs T^2 per video instead of
T^2 D) and asks for t . f_j as one flat [N*T, D] product (`flat`: XLA's CPU dot is about ten times slower
on the batched [N, T, D] einsum for one query).
With a query bank (`query_bank`: captions scored against the index once), hits are ranked by QB-Norm's
dynamic inverted softmax (`cma_jax.metrics.querybank_norm`) and keep their cosine as the score.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cma_jax.models import retrieval
from cma_jax.search import ann

MAX_K = 1000  # hits per query at most (each k compiles once)


video_grams = jax.jit(retrieval.video_grams)


@functools.partial(jax.jit, static_argnames=("head", "tau", "k"))
def top_hits(text, frames, frame_mask, gram, frame_time, bank=None, *, head: str, tau: float, k: int):
    """Top-k videos per text -> (scores [Nt, k], video indices [Nt, k], best frame [Nt, k], its time [Nt, k]).

    Ties go to the lower index (as a stable sort). The best frame is the one the head weighs most
    (the first valid frame under meanP, whose weights are uniform). `bank` (active [N] bool, log_norm [N],
    beta): ranked by QB-Norm, scores still the cosines.
    """
    cos, w = retrieval.head_scores(head, text, frames, frame_mask, tau, gram=gram, flat=True)
    ranked = cos
    if bank is not None:
        active, log_norm, beta = bank
        rescore = active[jnp.argmax(cos, axis=1)][:, None]
        ranked = jnp.where(rescore, beta * cos - log_norm[None], cos)
    _, idx = jax.lax.top_k(ranked, k)
    scores = jnp.take_along_axis(cos, idx, axis=1)
    best = jnp.argmax(jnp.take_along_axis(w, idx[..., None], axis=1), axis=-1)
    return scores, idx, best, frame_time[idx, best]


@functools.partial(jax.jit, static_argnames=("head", "tau", "k"))
def rerank(text, candidates, frames, frame_mask, gram, frame_time, bank=None, *, head: str, tau: float, k: int):
    """`top_hits` over the candidate videos only (candidates [C] indices into the index, text [1, D])."""
    take = lambda x: jnp.take(x, candidates, axis=0)  # noqa: E731
    bank = None if bank is None else (take(bank[0]), take(bank[1]), bank[2])
    scores, idx, best, times = top_hits(text, take(frames), take(frame_mask), take(gram), take(frame_time), bank,
                                        head=head, tau=tau, k=k)
    return scores, candidates[idx], best, times


def query_bank(bank_emb: np.ndarray, frames, frame_mask, gram, *, head: str, tau: float, k: int = 1,
               beta: float = 20.0) -> tuple:
    """QB-Norm's bank against an index: bank caption embeddings [B, D] -> (active [N] bool: a video in the top k
    of some bank caption, log_norm [N] = log sum_b exp(beta cos_bv), beta), as `top_hits` takes it."""
    n = frames.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"qbnorm k must be in [1, {n}] (videos in the index), got {k}")
    active, norms = np.zeros(n, bool), []
    for i in range(0, len(bank_emb), 8):  # [8, N, T] weights at most, as for queries
        text = jnp.asarray(bank_emb[i:i + 8], jnp.float32)
        cos = np.asarray(retrieval.head_scores(head, text, frames, frame_mask, tau, gram=gram, flat=True)[0], np.float64)
        active[np.argsort(-cos, axis=1, kind="stable")[:, :k].ravel()] = True
        norms.append(beta * cos)
    z = np.concatenate(norms)
    m = z.max(axis=0)
    log_norm = m + np.log(np.exp(z - m).sum(axis=0))
    return jnp.asarray(active), jnp.asarray(log_norm, jnp.float32), float(beta)


class Searcher:
    """An index held in memory for many queries with one Retriever (its text encoder and head).

    `candidates`: 0 scores every video exactly; C > 0 takes C candidates from mean-pooled embeddings
    (an HNSW graph, `ann.MeanPooledIndex`: `graph`, else built here) and scores those exactly.
    `bank`: captions ranking every query by QB-Norm (k, beta: `query_bank`), None: by cosine.
    """

    def __init__(self, retriever, index: dict, *, candidates: int = 0, graph: ann.MeanPooledIndex | None = None,
                 bank: list[str] | None = None, qbnorm_k: int = 1, qbnorm_beta: float = 20.0):
        self.retriever = retriever
        self.videos = index["videos"]
        self.manifest = index["manifest"]
        self.head, self.tau = retriever.model.head, float(retriever.model.tau)
        self.frames = jnp.asarray(index["frame_emb"], jnp.float32)  # [N, T, D]
        self.frame_mask = jnp.asarray(index["frame_mask"], bool)
        self.frame_time = jnp.asarray(index["frame_time"], jnp.float32)
        self.gram = video_grams(self.frames)
        self.candidates = min(int(candidates), len(self.videos))
        self.bank = None
        if bank:
            self.bank = query_bank(retriever.encode_text(bank), self.frames, self.frame_mask, self.gram,
                                   head=self.head, tau=self.tau, k=qbnorm_k, beta=qbnorm_beta)
        self.ann = None
        if self.candidates:
            self.ann = graph or ann.MeanPooledIndex.build(index["frame_emb"], index["frame_mask"])

    def __len__(self) -> int:
        return len(self.videos)

    def nbytes(self) -> int:
        """Bytes of what this searcher holds for the index (embeddings, masks, times, Gram matrices, graph)."""
        held = sum(x.nbytes for x in (self.frames, self.frame_mask, self.frame_time, self.gram))
        return held + (self.ann.nbytes() if self.ann is not None else 0)

    def search_embeddings(self, text_emb: np.ndarray, k: int) -> list[list[dict]]:
        """Text embeddings [Nt, D] -> per text, the top-k hits {'rank', 'video', 'score', 'frame', 'time'}."""
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
        k = min(k, len(self.videos))
        text = jnp.asarray(text_emb, jnp.float32)
        args = (self.frames, self.frame_mask, self.gram, self.frame_time, self.bank)
        if self.ann is None:
            rows = [top_hits(text[i:i + 8], *args, head=self.head, tau=self.tau, k=k)
                    for i in range(0, len(text), 8)]  # texts in blocks: [8, N, T] weights at most
        else:
            cand = self.ann.candidates(np.asarray(text_emb, np.float32), max(self.candidates, k))
            rows = [rerank(text[i:i + 1], jnp.asarray(c), *args, head=self.head, tau=self.tau, k=k)
                    for i, c in enumerate(cand)]
        scores, idx, best, times = (np.concatenate([np.asarray(r[j]) for r in rows]) for j in range(4))
        return [[{"rank": r + 1, "video": self.videos[i], "score": float(s), "frame": int(b), "time": float(t)}
                 for r, (s, i, b, t) in enumerate(zip(*row))] for row in zip(scores, idx, best, times)]

    def search(self, texts: list[str], k: int = 5) -> list[list[dict]]:
        """Top-k hits per query text (score = cosine of the model's head)."""
        if not texts:
            raise ValueError("no query texts given")
        return self.search_embeddings(self.retriever.encode_text(texts), k)


def search(retriever, index: dict, texts: list[str], k: int = 5, bank: list[str] | None = None,
           **qbnorm) -> list[list[dict]]:
    """Top-k videos per text, scored exactly: [[{'rank', 'video', 'score', 'frame', 'time'}, ...], ...];
    ranked by QB-Norm with the captions `bank` (qbnorm_k, qbnorm_beta) when given."""
    if not texts:
        raise ValueError("no query texts given")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return Searcher(retriever, index, bank=bank, **qbnorm).search(texts, min(k, MAX_K))
