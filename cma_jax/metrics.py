"""Retrieval metrics: text-video with CLIP4Clip's definitions, text-image with the image-text papers' (TR / IR).

`retrieval_metrics(sim, text_video_index)` ranks a score matrix in both directions (R@1/5/10, MdR, MnR),
optionally after dual-softmax or querybank (QB-Norm) re-scoring, with ties broken by index; `markdown_table`
prints the results.
docs/evaluation_and_search.md ("The metrics, exactly") gives the definitions and where they follow
CLIP4Clip's code; docs/image_text.md the text-image ones.
"""

from __future__ import annotations

import dataclasses

import numpy as np

RECALL_KS = (1, 5, 10)
METRIC_NAMES = ("R1", "R5", "R10", "MdR", "MnR")
# The two directions of each kind of benchmark, in the order reports list them, and their labels.
DIRECTIONS = {"video": ("t2v", "v2t"), "image": ("tr", "ir")}
LABELS = {"t2v": "t2v", "v2t": "v2t", "tr": "TR", "ir": "IR"}
# Rows per chunk when ranking, so a [chunk, C] boolean temporary stays ~16M entries.
_CHUNK_ENTRIES = 1 << 24


def target_ranks(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of ``scores[q, target[q]]`` in row q's descending order, ties by column index.

    scores [Q, C], target [Q] int -> ranks [Q] int64: the items scoring strictly higher plus the tied
    items of lower column index (the position a stable descending argsort gives), one rank per query.
    """
    scores = np.asarray(scores)
    target = np.asarray(target, np.int64)
    q, c = scores.shape
    cols = np.arange(c)
    ranks = np.empty(q, np.int64)
    step = max(1, _CHUNK_ENTRIES // max(c, 1))
    for s in range(0, q, step):
        rows, tgt = scores[s:s + step], target[s:s + step]
        true = rows[np.arange(len(rows)), tgt][:, None]
        higher = (rows > true).sum(1)
        tied_before = ((rows == true) & (cols[None] < tgt[:, None])).sum(1)
        ranks[s:s + step] = higher + tied_before
    return ranks


def summarize_ranks(ranks: np.ndarray, lower_median: bool = False) -> dict[str, float]:
    """R@1/5/10 (percent), MdR and MnR (1-based) of 0-based ranks: ``R@K = 100 * mean(rank < K)``,
    ``MdR = median(rank) + 1``, ``MnR = mean(rank) + 1``; `lower_median`: torch.median's lower middle value."""
    ranks = np.asarray(ranks)
    out = {f"R{k}": float(100.0 * np.mean(ranks < k)) for k in RECALL_KS}
    if lower_median:  # torch.median: the lower of the two middle values
        median = float(np.sort(ranks)[(len(ranks) - 1) // 2])
    else:
        median = float(np.median(ranks))
    out["MdR"] = median + 1.0
    out["MnR"] = float(np.mean(ranks)) + 1.0
    return out


def group_max(sim: np.ndarray, text_video_index: np.ndarray, num_videos: int) -> np.ndarray:
    """[Nt, Nv] -> [Nv_groups=num_videos, Nv]: row i = max over video i's captions of sim[c, :]."""
    order = np.argsort(text_video_index, kind="stable")
    sorted_idx = text_video_index[order]
    starts = np.searchsorted(sorted_idx, np.arange(num_videos))
    return np.maximum.reduceat(sim[order], starts, axis=0)


def best_own_caption(scores: np.ndarray, text_video_index: np.ndarray, num_videos: int) -> np.ndarray:
    """[Nt, Nv] -> [Nv]: the caption of each image that scores highest with it (the first of equals).

    It is the image's best-ranked own caption in `target_ranks`' order (score, then index).
    """
    own = scores[np.arange(len(text_video_index)), text_video_index]
    order = np.lexsort((np.arange(len(own)), -own, text_video_index))  # by image, best first, then index
    starts = np.searchsorted(text_video_index[order], np.arange(num_videos))
    return order[starts]


def dual_softmax(sim: np.ndarray, temp: float = 1.0, axis: int = 0) -> np.ndarray:
    """DSL re-scoring ``sim * softmax(temp * sim, axis)``, computed in float64 (CAMoE's extra factor, the
    matrix length, is a positive constant that changes no ranking: left out)."""
    x = np.asarray(sim, np.float64)
    z = temp * x
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return x * (e / e.sum(axis=axis, keepdims=True))


@dataclasses.dataclass(frozen=True)
class QueryBanks:
    """Query-bank scores for QB-Norm against an evaluation set: `text` [B_t, Nv] (bank captions vs its videos:
    t2v / IR), `video` [B_v, Nt] (bank videos vs its captions: v2t / TR); None leaves that direction as it is."""

    text: np.ndarray | None = None
    video: np.ndarray | None = None
    k: int = 1
    beta: float = 20.0


def querybank_norm(scores, bank, k: int = 1, beta: float = 20.0) -> np.ndarray:
    """QB-Norm with the dynamic inverted softmax (Bogolin et al., CVPR 2022), per query row of scores [Q, G].

    bank [B, G]: the scores of a query bank (queries of the same kind, e.g. training captions) against the
    same gallery. The activation set is every gallery item in the top `k` of some bank query; a query whose
    best item is in it is re-scored by the inverted softmax over the bank, ``exp(beta s_qg) / sum_b exp(beta
    s_bg)`` per gallery item g, the other queries keep their scores (the paper's k = 1, beta = 20, on
    cosines). The re-scored rows hold its logarithm (the same ranking, no overflow), in float64.
    """
    scores, bank = np.asarray(scores, np.float64), np.asarray(bank, np.float64)
    if bank.ndim != 2 or bank.shape[1] != scores.shape[1]:
        raise ValueError(f"query bank scores must be [num_bank_queries, {scores.shape[1]}], got {bank.shape}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"qbnorm k must be in [1, {scores.shape[1]}] (gallery items), got {k}")
    top = np.argsort(-bank, axis=1, kind="stable")[:, :k]
    active = np.zeros(scores.shape[1], bool)
    active[top.ravel()] = True
    z = beta * bank
    m = z.max(axis=0)
    log_norm = m + np.log(np.exp(z - m).sum(axis=0))  # log sum_b exp(beta s_bg), per gallery item
    out = scores.copy()
    rows = active[np.argmax(scores, axis=1)]
    out[rows] = beta * scores[rows] - log_norm
    return out


def _check(sim, text_video_index):
    sim = np.asarray(sim)
    idx = np.asarray(text_video_index)
    if sim.ndim != 2:
        raise ValueError(f"similarity matrix must be 2-D [num_texts, num_videos], got shape {sim.shape}")
    nt, nv = sim.shape
    if idx.shape != (nt,):
        raise ValueError(f"text_video_index must have shape [num_texts]=({nt},), got {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"text_video_index must be integers, got dtype {idx.dtype}")
    if nt and (idx.min() < 0 or idx.max() >= nv):
        raise ValueError(f"text_video_index values must be in [0, {nv}), got range [{idx.min()}, {idx.max()}]")
    if np.isnan(sim).any():
        raise ValueError(f"similarity matrix has {int(np.isnan(sim).sum())} NaN entries (a diverged model?)")
    missing = np.setdiff1d(np.arange(nv), idx)
    if missing.size:
        raise ValueError(f"{missing.size} video(s) have no caption (first: {missing[:5].tolist()}); every "
                         "video needs at least one caption for video->text retrieval")
    return sim, idx.astype(np.int64)


def retrieval_metrics(sim, text_video_index, *, dsl_temp: float | None = None, qbnorm: QueryBanks | None = None,
                      media: str = "video") -> dict:
    """Both directions' metrics, each {R1, R5, R10, MdR, MnR}: ``{'t2v', 'v2t'}`` for videos (CLIP4Clip's
    definitions), ``{'tr', 'ir'}`` for images (the image-text papers'; docs/image_text.md).

    sim [Nt, Nv] scores (higher = more similar: logits or cosines), text_video_index [Nt] int in [0, Nv)
    (the video each caption describes). ``dsl_temp``: when given, rank the dual-softmax re-scored
    matrices instead (softmax over texts for t2v / IR, over videos for v2t / TR). ``qbnorm``: rank the
    QB-Norm re-scored matrices instead (`querybank_norm`; its banks' own directions).
    """
    if media not in DIRECTIONS:
        raise ValueError(f"media must be one of {sorted(DIRECTIONS)}, got {media!r}")
    sim, idx = _check(sim, text_video_index)
    nv = sim.shape[1]
    t2v_scores, v2t_scores = sim, sim
    if dsl_temp is not None:
        t2v_scores = dual_softmax(sim, dsl_temp, axis=0)  # prior over texts, per video
        v2t_scores = dual_softmax(sim, dsl_temp, axis=1)  # prior over videos, per text
    if qbnorm is not None:
        if qbnorm.text is not None:  # text queries over the videos
            t2v_scores = querybank_norm(sim, qbnorm.text, qbnorm.k, qbnorm.beta)
        if qbnorm.video is not None:  # video queries over the captions
            v2t_scores = querybank_norm(sim.T, qbnorm.video, qbnorm.k, qbnorm.beta).T
    if media == "image":
        ir = summarize_ranks(target_ranks(t2v_scores, idx))
        tr = summarize_ranks(target_ranks(v2t_scores.T, best_own_caption(v2t_scores, idx, nv)))
        return {"tr": tr, "ir": ir}
    multi_caption = len(idx) > nv
    t2v = summarize_ranks(target_ranks(t2v_scores, idx), lower_median=multi_caption)
    groups = group_max(v2t_scores, idx, nv)  # [Nv groups, Nv videos]
    v2t = summarize_ranks(target_ranks(groups.T, np.arange(nv)))
    return {"t2v": t2v, "v2t": v2t}


def markdown_table(results: dict[str, dict]) -> str:
    """``{row name: retrieval_metrics(...)}`` -> a markdown table, one row per name (columns from the first row)."""
    directions = tuple(next(iter(results.values())))
    cols = [f"{LABELS[d]} {m}" for d in directions for m in METRIC_NAMES]
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, res in results.items():
        vals = [f"{res[d][m]:.1f}" for d in directions for m in METRIC_NAMES]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"
