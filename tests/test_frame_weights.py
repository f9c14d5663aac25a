"""The heads' frame weights (what search uses for a hit's best moment) agree with the heads' similarity."""

import jax.numpy as jnp
import numpy as np

from cma_jax.models.retrieval import frame_weights, meanp_similarity, text_conditioned_similarity


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
    w = np.asarray(frame_weights("text_conditioned", text, frames, mask, tau=2.0))
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    assert (w[:, ~np.asarray(mask)] == 0).all()
    np.testing.assert_allclose(_cos_of_weighted_mean(text, np.asarray(frames), w),
                               np.asarray(text_conditioned_similarity(text, frames, mask, tau=2.0)), rtol=1e-5)
    assert len({int(i) for i in w[:, 0].argmax(-1)}) > 1  # the best frame depends on the text


def test_meanp_weights_are_uniform_over_real_frames():
    text, frames, mask = _data()
    w = np.asarray(frame_weights("meanp", text, frames, mask))
    np.testing.assert_allclose(w[0, 1], [0.5, 0.5, 0, 0, 0])
    np.testing.assert_allclose(_cos_of_weighted_mean(text, np.asarray(frames), w),
                               np.asarray(meanp_similarity(text, frames, mask)), rtol=1e-5)
    assert (w.argmax(-1) == 0).all()  # the first frame is the best moment under mean pooling
