"""The heads' frame weights (what search uses for a hit's best moment) agree with the heads' similarity, and
search scores with the head itself."""

import jax.numpy as jnp
import numpy as np
import pytest

from cma_jax.models.retrieval import head_scores, similarity
from cma_jax.search import scoring


def _data():
    rng = np.random.default_rng(0)
    text = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    frames = jnp.asarray(rng.normal(size=(4, 5, 8)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]], bool)
    return text, frames, mask


def _cos_of_weighted_mean(text, frames, w):
    v = np.einsum("tvj,vjd->tvd", w, frames)
    t = np.asarray(text)[:, None]
    return (t * v).sum(-1) / np.linalg.norm(t, axis=-1) / np.linalg.norm(v, axis=-1)


def test_text_conditioned_weights_are_the_heads_own():
    text, frames, mask = _data()
    w = np.asarray(head_scores("text_conditioned", text, frames, mask, tau=2.0)[1])
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    assert (w[:, ~np.asarray(mask)] == 0).all()
    np.testing.assert_allclose(_cos_of_weighted_mean(text, np.asarray(frames), w),
                               np.asarray(similarity("text_conditioned", text, frames, mask, tau=2.0)), rtol=1e-5)
    assert len({int(i) for i in w[:, 0].argmax(-1)}) > 1  # the best frame depends on the text


def test_meanp_weights_are_uniform_over_real_frames():
    text, frames, mask = _data()
    w = np.asarray(head_scores("meanp", text, frames, mask)[1])
    np.testing.assert_allclose(w[0, 1], [0.5, 0.5, 0, 0, 0])
    np.testing.assert_allclose(_cos_of_weighted_mean(text, np.asarray(frames), w),
                               np.asarray(similarity("meanp", text, frames, mask)), rtol=1e-5)
    assert (w.argmax(-1) == 0).all()  # the first frame is the best moment under mean pooling


@pytest.mark.parametrize("head", ["text_conditioned", "meanp"])
def test_search_scores_and_best_frames_are_the_heads(head):
    """Search's ranked hits (scoring.top_hits: held Gram matrices, one flat dot) carry the head's own cosines and
    the frame each text weighs most, for the same embeddings."""
    text, frames, mask = _data()
    cos, w = (np.asarray(x) for x in head_scores(head, text, frames, mask, tau=2.0))
    times = jnp.arange(20, dtype=jnp.float32).reshape(4, 5)
    scores, idx, best, when = (np.asarray(x) for x in scoring.top_hits(
        text, frames, mask, scoring.video_grams(frames), times, head=head, tau=2.0, k=4))
    np.testing.assert_array_equal(idx, np.argsort(-cos, axis=1, kind="stable"))
    np.testing.assert_allclose(scores, np.take_along_axis(cos, idx, axis=1), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(best, np.take_along_axis(w, idx[..., None], axis=1).argmax(-1))
    np.testing.assert_array_equal(when, np.asarray(times)[idx, best])
    one = scoring.top_hits(text[1:2], frames, mask, scoring.video_grams(frames), times, head=head, tau=2.0, k=4)
    np.testing.assert_allclose(np.asarray(one[0])[0], scores[1], rtol=1e-6, atol=1e-7)  # a single query: the same
