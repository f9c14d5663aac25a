"""Retrieval metrics: hand-computed cases, ties, multi-caption, DSL, and CLIP4Clip-style references."""

import numpy as np
import pytest

from cma_jax import metrics


def _approx(d, **expected):
    for k, v in expected.items():
        assert d[k] == pytest.approx(v, abs=1e-9), (k, d[k], v)


def test_single_caption_hand_computed():
    sim = np.array([[0.9, 0.1, 0.5],
                    [0.2, 0.3, 0.8],
                    [0.4, 0.6, 0.7]])
    res = metrics.retrieval_metrics(sim, np.array([0, 1, 2]))
    # t2v ranks: [0, 1, 0]; v2t (columns): video0 -> 0, video1 (0.3 < 0.6) -> 1, video2 (0.7 < 0.8) -> 1.
    _approx(res["t2v"], R1=200 / 3, R5=100.0, R10=100.0, MdR=1.0, MnR=1 + 1 / 3)
    _approx(res["v2t"], R1=100 / 3, R5=100.0, R10=100.0, MdR=2.0, MnR=1 + 2 / 3)


def test_recall_at_5_and_10_boundaries():
    # 12 videos; text q's true video is placed at rank q (scores descending by column position).
    n = 12
    sim = np.tile(-np.arange(n, dtype=float), (n, 1))  # every row ranks columns 0, 1, 2, ...
    res = metrics.retrieval_metrics(sim, np.arange(n))
    # ranks 0..11: rank < 5 for 5 of 12, rank < 10 for 10 of 12; median rank 5.5 -> MdR 6.5.
    _approx(res["t2v"], R1=100 / 12, R5=500 / 12, R10=1000 / 12, MdR=6.5, MnR=6.5)


def test_ties_are_broken_by_column_index():
    assert metrics.target_ranks(np.array([[0.5, 0.5, 0.2]]), np.array([0]))[0] == 0
    assert metrics.target_ranks(np.array([[0.5, 0.5, 0.2]]), np.array([1]))[0] == 1
    assert metrics.target_ranks(np.array([[0.7, 0.5, 0.5, 0.5]]), np.array([3]))[0] == 3
    # A constant model scores at chance, not perfectly: ranks 0..N-1.
    res = metrics.retrieval_metrics(np.ones((4, 4)), np.arange(4))
    _approx(res["t2v"], R1=25.0, R5=100.0, MdR=2.5, MnR=2.5)
    _approx(res["v2t"], R1=25.0, MdR=2.5, MnR=2.5)


def test_ties_match_stable_double_argsort():
    rng = np.random.default_rng(0)
    sim = rng.integers(0, 3, size=(20, 15)).astype(float)  # many ties
    target = rng.integers(0, 15, size=20)
    order = np.argsort(-sim, axis=1, kind="stable")
    pos = np.argsort(order, axis=1, kind="stable")
    np.testing.assert_array_equal(metrics.target_ranks(sim, target), pos[np.arange(20), target])


def test_matches_clip4clip_compute_metrics_without_ties():
    rng = np.random.default_rng(1)
    sim = rng.normal(size=(30, 30))

    def where_rank(x):  # CLIP4Clip's definition: position of the diagonal in the sorted row
        sx = np.sort(-x, axis=1)
        return np.where(sx - np.diag(-x)[:, None] == 0)[1]

    res = metrics.retrieval_metrics(sim, np.arange(30))
    for key, x in (("t2v", sim), ("v2t", sim.T)):
        r = where_rank(x)
        _approx(res[key], R1=100 * np.mean(r == 0), R5=100 * np.mean(r < 5), R10=100 * np.mean(r < 10),
                MdR=np.median(r) + 1, MnR=np.mean(r) + 1)


def test_multi_caption_hand_computed():
    sim = np.array([[0.1, 0.9],   # caption 0 of video 0 -> rank 1
                    [0.8, 0.3],   # caption 1 of video 0 -> rank 0
                    [0.2, 0.7]])  # caption 0 of video 1 -> rank 0
    res = metrics.retrieval_metrics(sim, np.array([0, 0, 1]))
    _approx(res["t2v"], R1=200 / 3, MdR=1.0, MnR=1 + 1 / 3)
    # groups: video 0's best captions = [0.8, 0.9], video 1's = [0.2, 0.7].
    # video 0 ranks groups by [0.8, 0.2] -> 0; video 1 by [0.9, 0.7] -> its own group is 2nd -> 1.
    _approx(res["v2t"], R1=50.0, R5=100.0, MdR=1.5, MnR=1.5)


def test_multi_caption_uses_lower_median_for_t2v():
    sim = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    res = metrics.retrieval_metrics(sim, np.array([0, 0, 1, 1]))
    # t2v ranks [0, 1, 0, 1]: torch.median's lower middle value 0 -> MdR 1 (np.median would give 1.5).
    _approx(res["t2v"], R1=50.0, MdR=1.0, MnR=1.5)


def test_multi_caption_matches_clip4clip_padded_tensor_path():
    rng = np.random.default_rng(2)
    counts = [3, 1, 4, 2, 5]
    idx = np.repeat(np.arange(5), counts)
    perm = rng.permutation(len(idx))  # caption order must not matter
    sim = rng.normal(size=(len(idx), 5))
    # CLIP4Clip: [videos, max captions, videos], padded with -inf.
    padded = np.full((5, max(counts), 5), -np.inf)
    start = 0
    for v, c in enumerate(counts):
        padded[v, :c] = sim[start:start + c]
        start += c
    ranks = []
    for v, c in enumerate(counts):
        for j in range(c):
            row = padded[v, j]
            ranks.append(int(np.sum(row > row[v])))
    ranks = np.array(ranks)
    group = padded.max(axis=1)  # [video groups, videos]
    v2t = np.array([np.sum(group[:, v] > group[v, v]) for v in range(5)])
    res = metrics.retrieval_metrics(sim[perm], idx[perm])
    _approx(res["t2v"], R1=100 * np.mean(ranks == 0), R5=100 * np.mean(ranks < 5),
            MdR=np.sort(ranks)[(len(ranks) - 1) // 2] + 1, MnR=ranks.mean() + 1)
    _approx(res["v2t"], R1=100 * np.mean(v2t == 0), MdR=np.median(v2t) + 1, MnR=v2t.mean() + 1)


def test_dual_softmax_values_and_effect():
    sim = np.array([[5.0, 1.0],
                    [5.0, 4.9]])  # video 0 is a "hub" that outscores video 1 for text 1
    s = metrics.dual_softmax(sim, 1.0, axis=0)
    e1 = np.exp([1.0, 4.9])
    np.testing.assert_allclose(s, [[2.5, 1.0 * e1[0] / e1.sum()], [2.5, 4.9 * e1[1] / e1.sum()]])
    plain = metrics.retrieval_metrics(sim, np.array([0, 1]))
    dsl = metrics.retrieval_metrics(sim, np.array([0, 1]), dsl_temp=1.0)
    _approx(plain["t2v"], R1=50.0)
    _approx(dsl["t2v"], R1=100.0, MnR=1.0)
    # v2t: softmax over videos per text: row 0 -> [4.91, 0.018], row 1 -> [2.62, 2.33].
    v = metrics.dual_softmax(sim, 1.0, axis=1)
    p0 = 1 / (1 + np.exp(-4.0))
    p1 = 1 / (1 + np.exp(-0.1))
    np.testing.assert_allclose(v, [[5 * p0, 1 * (1 - p0)], [5 * p1, 4.9 * (1 - p1)]])
    _approx(dsl["v2t"], R1=100.0, MnR=1.0)


@pytest.mark.parametrize("sim, idx, match", [
    (np.zeros((2, 2, 2)), np.array([0, 1]), "2-D"),
    (np.zeros((2, 2)), np.array([0, 1, 1]), "shape"),
    (np.zeros((2, 2)), np.array([0, 2]), r"\[0, 2\)"),
    (np.zeros((2, 2)), np.array([0.0, 1.0]), "integers"),
    (np.array([[np.nan, 0.0], [0.0, 1.0]]), np.array([0, 1]), "NaN"),
    (np.zeros((2, 3)), np.array([0, 1]), "no caption"),
])
def test_bad_input_is_rejected(sim, idx, match):
    with pytest.raises(ValueError, match=match):
        metrics.retrieval_metrics(sim, idx)


def test_markdown_table():
    res = metrics.retrieval_metrics(np.eye(3), np.arange(3))
    table = metrics.markdown_table({"test": res})
    assert table.splitlines()[0].startswith("| | t2v R1 | t2v R5")
    assert "| test | 100.0 | 100.0 | 100.0 | 1.0 | 1.0 | 100.0 |" in table
