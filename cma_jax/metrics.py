"""Retrieval metrics: text-video with CLIP4Clip's definitions, text-image with the image-text papers' (TR / IR).

Given a score matrix ``sim [Nt, Nv]`` (higher = more similar) and ``text_video_index [Nt]`` (the
video each caption describes):

* text->video: each caption ranks all videos; its rank is the 0-based position of its own video
  in the descending order.
* video->text: each video ranks the *caption groups*: the score of group i for video v is the best
  score over video i's captions (``max_c sim[c, v]``), and the target is v's own group. With one
  caption per video this is exactly ranking ``sim.T``; with several (MSVD, VATEX) it is CLIP4Clip's
  ``tensor_video_to_text_sim`` + ``compute_metrics``.
* ``R@K = 100 * mean(rank < K)``, ``MdR = median(rank) + 1``, ``MnR = mean(rank) + 1``.

Ties: a rank is the number of items scoring strictly higher plus the number of *tied* items with a
lower column index, i.e. the position a stable descending argsort gives (CLIP4Clip's double
argsort). Each query contributes exactly one rank. (CLIP4Clip's ``compute_metrics`` finds the
target with ``np.where(sorted == target)`` and so counts a query once per tied position; with
continuous scores ties do not occur and both agree. With the stable rule a model that scores
everything equally gets R@1 = 100/N and MnR = (N+1)/2, the chance level, not a perfect score.)

Median: ``np.median`` (the middle two averaged), except text->video on multi-caption sets, where
CLIP4Clip's code path uses ``torch.median`` (the lower middle value); we follow it so that MSVD /
VATEX numbers are comparable. The two differ only for an even count whose middle ranks differ.

Text-image (``media='image'``, Flickr30K / MSCOCO: every image has ~5 captions), as VSE++, ALBEF and
CLIP's benchmarks define it: IR (image retrieval, text->image) ranks all images for each caption, exactly
text->video above; TR (text retrieval, image->text) ranks *all captions* for each image and takes the
position of its best-ranked own caption, so TR@K is the share of images with an own caption among the K
top-ranked captions. (CLIP4Clip's video->text ranks caption *groups* instead, which counts another image's
five captions above the own best one as one miss, not five.) Both use ``np.median``.

Dual softmax (DSL, CAMoE / CLIP2Video inference re-scoring): ``sim * softmax(temp * sim)`` with
the softmax over texts for text->video and over videos for video->text. CAMoE also multiplies by
the matrix length, a positive constant that changes no ranking, so it is left out.
"""

from __future__ import annotations

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

    scores [Q, C], target [Q] int -> ranks [Q] int64.
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
    """R@1/5/10 (percent), MdR and MnR (1-based) of 0-based ranks."""
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
    """DSL re-scoring ``sim * softmax(temp * sim, axis)``, computed in float64."""
    x = np.asarray(sim, np.float64)
    z = temp * x
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return x * (e / e.sum(axis=axis, keepdims=True))


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


def retrieval_metrics(sim, text_video_index, *, dsl_temp: float | None = None, media: str = "video") -> dict:
    """Both directions' metrics, each {R1, R5, R10, MdR, MnR}: ``{'t2v', 'v2t'}`` for videos (CLIP4Clip's
    definitions), ``{'tr', 'ir'}`` for images (the image-text papers'; see the module doc).

    sim [Nt, Nv] scores (logits or cosines), text_video_index [Nt] int in [0, Nv).
    ``dsl_temp``: when given, rank the dual-softmax re-scored matrices instead (see module doc).
    """
    if media not in DIRECTIONS:
        raise ValueError(f"media must be one of {sorted(DIRECTIONS)}, got {media!r}")
    sim, idx = _check(sim, text_video_index)
    nv = sim.shape[1]
    t2v_scores, v2t_scores = sim, sim
    if dsl_temp is not None:
        t2v_scores = dual_softmax(sim, dsl_temp, axis=0)  # prior over texts, per video
        v2t_scores = dual_softmax(sim, dsl_temp, axis=1)  # prior over videos, per text
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
