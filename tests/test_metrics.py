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


# ----------------------------------------------------------------------------- QB-Norm (dynamic inverted softmax)
HUB_BANK = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])  # every bank caption's best video is video 0: a hub
LSE = np.log(1 + np.exp(-2.0) + np.exp(-4.0))  # log sum_b exp(20 s_bg) - 20 max_b s_bg, alike in both columns


def test_qbnorm_hand_computed_a_hub_loses_its_queries():
    """k = 1, beta = 20: activation set {video 0}; queries whose best video is 0 are re-scored by the
    inverted softmax over the bank (log sum_b exp(20 s_bg) = 18 + LSE for video 0, 6 + LSE for video 1)."""
    sim = np.array([[0.5, 0.45], [0.95, 0.2], [0.2, 0.6]])
    got = metrics.querybank_norm(sim, HUB_BANK, k=1, beta=20.0)
    want = np.array([[10.0 - 18 - LSE, 9.0 - 6 - LSE], [19.0 - 18 - LSE, 4.0 - 6 - LSE], [0.2, 0.6]])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0].argmax() == 1 and sim[0].argmax() == 0  # the ranking of query 0 changed
    plain = metrics.retrieval_metrics(sim[:2], np.array([1, 0]))
    qb = metrics.retrieval_metrics(sim[:2], np.array([1, 0]), qbnorm=metrics.QueryBanks(text=HUB_BANK))
    assert (plain["t2v"]["R1"], qb["t2v"]["R1"]) == (50.0, 100.0)
    assert qb["v2t"] == plain["v2t"]  # no video bank: v2t as it was


def test_qbnorm_with_a_bank_without_hubs_changes_no_ranking():
    """A bank that activates every item evenly (each column the same scores) shifts every score of a re-scored
    row by the same constant (for the captions: a Latin square of bank videos)."""
    bank = np.array([[0.9, 0.1], [0.1, 0.9]])
    sim = np.array([[0.5, 0.45], [0.3, 0.7], [0.4, 0.41]])
    got = metrics.querybank_norm(sim, bank, k=1, beta=20.0)
    np.testing.assert_allclose(got, 20 * sim - (18 + np.log1p(np.exp(-16.0))), rtol=1e-12)
    idx = np.array([0, 1, 1])
    assert metrics.retrieval_metrics(sim, idx) == metrics.retrieval_metrics(
        sim, idx, qbnorm=metrics.QueryBanks(text=bank, video=np.array([[0.9, 0.1, 0.5], [0.1, 0.5, 0.9],
                                                                      [0.5, 0.9, 0.1]])))


def test_qbnorm_video_bank_rescoring_v2t_and_bad_banks():
    """v2t: video queries over the captions, the video bank's scores [B_v, Nt]; k = 2 activates every caption."""
    sim = np.array([[0.5, 0.1], [0.45, 0.2]])  # caption 0 is video 0's best; caption 1 is video 1's
    video_bank = np.array([[0.9, 0.2], [0.8, 0.3], [0.7, 0.1]])  # caption 0 a hub among the bank videos
    plain = metrics.retrieval_metrics(sim, np.array([0, 1]))
    qb = metrics.retrieval_metrics(sim, np.array([0, 1]), qbnorm=metrics.QueryBanks(video=video_bank))
    # video 1's row [0.1, 0.2] has best caption 1, outside the activation set {caption 0}: kept (rank 0);
    # video 0's row [0.5, 0.45] -> [10 - 18 - LSE', 9 - 6 - log(e^0 + e^-2 + e^-4)] favours caption 1
    assert (plain["v2t"]["R1"], qb["v2t"]["R1"]) == (100.0, 50.0)
    with pytest.raises(ValueError, match=r"query bank scores must be \[num_bank_queries, 2\], got \(3,\)"):
        metrics.querybank_norm(sim, np.zeros(3))
    with pytest.raises(ValueError, match=r"qbnorm k must be in \[1, 2\]"):
        metrics.querybank_norm(sim, video_bank, k=3)



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


# --- text-image: TR (image -> all captions, best own caption) and IR (caption -> images) ---------------


def _brute_force_image_text(scores_ir, scores_tr, idx):
    """The image-text papers' loops: each caption sorts all images; each image sorts all captions (stable,
    by index on ties) and takes the position of its first own caption."""
    ir = [int(np.where(np.argsort(-row, kind="stable") == idx[c])[0][0]) for c, row in enumerate(scores_ir)]
    tr = []
    for v in range(scores_tr.shape[1]):
        order = np.argsort(-scores_tr[:, v], kind="stable")
        tr.append(int(np.min(np.where(idx[order] == v)[0])))
    return np.array(tr), np.array(ir)


def test_image_text_hand_computed_with_several_captions_per_image():
    sim = np.array([[0.5, 0.1, 0.0],   # caption 0 of image 0
                    [0.2, 0.3, 0.1],   # caption 1 of image 0
                    [0.9, 0.4, 0.0],   # caption 0 of image 1
                    [0.8, 0.6, 0.2],   # caption 1 of image 1
                    [0.7, 0.2, 0.3],   # caption 2 of image 1
                    [0.1, 0.7, 0.6]])  # caption 0 of image 2
    idx = np.array([0, 0, 1, 1, 1, 2])
    res = metrics.retrieval_metrics(sim, idx, media="image")
    assert list(res) == ["tr", "ir"]
    # IR: caption ranks [0, 1, 1, 1, 2, 1] (caption 4: images 0 and 2 score 0.7, 0.3 > 0.2).
    _approx(res["ir"], R1=100 / 6, R5=100.0, R10=100.0, MdR=2.0, MnR=2.0)
    # TR: image 0 sorts captions 2 (.9), 3 (.8), 4 (.7), 0 (.5), ...: its best own caption is 4th -> rank 3;
    # image 1: 5 (.7), 3 (.6) -> rank 1; image 2: caption 5 (.6) first -> rank 0.
    _approx(res["tr"], R1=100 / 3, R5=100.0, MdR=2.0, MnR=1 + 4 / 3)
    # CLIP4Clip's video->text ranks caption groups: image 0 is then 2nd (one group above), not 4th.
    assert metrics.retrieval_metrics(sim, idx)["v2t"]["MnR"] == pytest.approx(1 + 2 / 3)


def test_tr_counts_every_caption_of_another_image_above_the_own_best_one():
    # Image 0 has one caption; image 1's five captions all score higher with image 0.
    sim = np.array([[0.3, 0.0], [0.4, 0.9], [0.5, 0.8], [0.6, 0.7], [0.7, 0.95], [0.8, 0.85]])
    idx = np.array([0, 1, 1, 1, 1, 1])
    res = metrics.retrieval_metrics(sim, idx, media="image")
    # TR ranks [5, 0]: image 0's caption is 6th -> outside the top 5, inside the top 10.
    _approx(res["tr"], R1=50.0, R5=50.0, R10=100.0, MdR=3.5, MnR=3.5)
    _approx(res["ir"], R1=100.0, MdR=1.0, MnR=1.0)
    # Ranking groups instead (video->text) would put image 0's caption 2nd and count it inside the top 5.
    _approx(metrics.retrieval_metrics(sim, idx)["v2t"], R1=50.0, R5=100.0)


def test_tr_ties_take_the_first_caption_by_index():
    # Every score equal: image 0's first own caption is caption 0, image 1's is caption 2 (two before it).
    res = metrics.retrieval_metrics(np.ones((4, 2)), np.array([0, 0, 1, 1]), media="image")
    _approx(res["tr"], R1=50.0, MdR=2.0, MnR=2.0)
    _approx(res["ir"], R1=50.0, MnR=1.5)
    scores = np.array([[0.5, 0.0], [0.5, 0.0], [0.5, 0.0]])  # caption 0 (image 1) ties with image 0's two
    np.testing.assert_array_equal(metrics.best_own_caption(scores, np.array([1, 0, 0]), 2), [1, 0])


def test_image_text_dsl_hand_computed():
    # Caption 1 (image 1) is a hub: it outscores image 0's own caption with image 0. DSL at temperature 10
    # re-scores each caption by a softmax over the images: the hub's 0.9 * softmax([9, 10])[0] = 0.24 falls
    # below caption 0's 0.5 * softmax([5, 0])[0] = 0.50, and image 0 finds its own caption first.
    sim = np.array([[0.5, 0.0], [0.9, 1.0], [0.0, 0.2]])
    idx = np.array([0, 1, 1])
    plain = metrics.retrieval_metrics(sim, idx, media="image")
    dsl = metrics.retrieval_metrics(sim, idx, media="image", dsl_temp=10.0)
    _approx(plain["tr"], R1=50.0, MnR=1.5)
    _approx(dsl["tr"], R1=100.0, MnR=1.0)
    _approx(plain["ir"], R1=100.0)
    _approx(dsl["ir"], R1=100.0)
    hub = 0.9 / (1 + np.exp(10 * (1.0 - 0.9)))
    own = 0.5 / (1 + np.exp(-10 * 0.5))
    assert metrics.dual_softmax(sim, 10.0, axis=1)[1, 0] == pytest.approx(hub)
    assert metrics.dual_softmax(sim, 10.0, axis=1)[0, 0] == pytest.approx(own) and own > hub


@pytest.mark.parametrize("dsl_temp", [None, 3.0])
def test_image_text_matches_brute_force_loops(dsl_temp):
    rng = np.random.default_rng(3)
    counts = [5, 5, 6, 5, 7, 5, 5, 4]  # COCO gives some images more than five captions
    idx = np.repeat(np.arange(len(counts)), counts)
    perm = rng.permutation(len(idx))
    sim = np.round(rng.normal(size=(len(idx), len(counts))), 1)  # rounded: ties occur
    sim, idx = sim[perm], idx[perm]
    ir_scores = sim if dsl_temp is None else metrics.dual_softmax(sim, dsl_temp, axis=0)
    tr_scores = sim if dsl_temp is None else metrics.dual_softmax(sim, dsl_temp, axis=1)
    tr, ir = _brute_force_image_text(ir_scores, tr_scores, idx)
    res = metrics.retrieval_metrics(sim, idx, media="image", dsl_temp=dsl_temp)
    for key, ranks in (("tr", tr), ("ir", ir)):
        _approx(res[key], R1=100 * np.mean(ranks < 1), R5=100 * np.mean(ranks < 5), R10=100 * np.mean(ranks < 10),
                MdR=np.median(ranks) + 1, MnR=ranks.mean() + 1)


def test_image_text_markdown_table_and_bad_media():
    res = metrics.retrieval_metrics(np.eye(2)[[0, 0, 1]], np.array([0, 0, 1]), media="image")
    table = metrics.markdown_table({"test": res})
    assert table.splitlines()[0].startswith("| | TR R1 | TR R5 | TR R10 | TR MdR | TR MnR | IR R1")
    with pytest.raises(ValueError, match="media must be one of"):
        metrics.retrieval_metrics(np.eye(2), np.arange(2), media="audio")
