"""MV-Adapter: frames mix through its temporal block without padded frames ever reaching a real one; the
cross-modality factors are one variable per tied depth, read by both towers; its position tables bound T and L."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cma_jax.models import peft
from cma_jax.models.clip import CLIPConfig
from cma_jax.models.params import AdapterParam
from cma_jax.models.retrieval import RetrievalModel
from test_methods import batch
from tiny import TINY_CLIP

CFG = CLIPConfig(**TINY_CLIP)
FIELDS = {"bottleneck": 8, "heads": 2, "frames": 3, "text_positions": 8, "calibration_dim": 4, "factor_dim": 4,
          "tied_layers": 1}
encode = nnx.jit(lambda m, f, k: m.encode_frames(f, k))


def trained(seed=0):
    """The model with every zero-initialised weight (up, calibration, factors) moved, as after training."""
    model = RetrievalModel(CFG, peft.make("mv_adapter", FIELDS), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    state = nnx.state(model, AdapterParam)
    nnx.update(model, jax.tree.map(lambda v: v + jnp.asarray(rng.normal(0, 0.3, v.shape), jnp.float32), state))
    return model


@pytest.mark.slow
def test_frames_mix_but_padded_frames_never_reach_real_ones():
    model = trained()
    b = batch(5, frame_mask=[[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    base = np.asarray(encode(model, b["frames"], b["frame_mask"]))
    noisy = b["frames"].at[0, 2].set(255 - b["frames"][0, 2])  # a padded frame's pixels
    np.testing.assert_allclose(np.asarray(encode(model, noisy, b["frame_mask"]))[0, :2], base[0, :2],
                               rtol=1e-5, atol=1e-6)
    other = b["frames"].at[1, 2].set(255 - b["frames"][1, 2])  # a real frame of video 1
    moved = np.asarray(encode(model, other, b["frame_mask"]))
    assert np.abs(moved[1, 0] - base[1, 0]).max() > 1e-4  # frame 0 of that video sees frame 2
    np.testing.assert_allclose(moved[[0, 2, 3]], base[[0, 2, 3]], rtol=1e-5, atol=1e-6)  # other videos do not


def test_the_tied_factor_is_one_variable_read_by_both_towers_last_blocks():
    model = trained()
    factors = model.clip.tying_factors
    assert len(factors) == 1 and factors[0].shape == (4,)
    tied = [t.resblocks[-1].mlp_adapter.tying for t in (model.clip.visual.transformer, model.clip.transformer)]
    assert all(t is not None for t in tied) and model.clip.transformer.resblocks[0].mlp_adapter.tying is None
    b = batch(6)
    before = (np.asarray(encode(model, b["frames"], b["frame_mask"])), np.asarray(model.encode_text(b["text_ids"])))
    factors[0][...] = factors[0][...] + 1.0  # moves both towers' output
    after = (np.asarray(encode(model, b["frames"], b["frame_mask"])), np.asarray(model.encode_text(b["text_ids"])))
    assert all(np.abs(x1 - x0).max() > 1e-4 for x0, x1 in zip(before, after))


def test_its_position_tables_bound_frames_and_caption_length():
    model = RetrievalModel(CFG, peft.make("mv_adapter", {**FIELDS, "frames": 2, "text_positions": 4}),
                           rngs=nnx.Rngs(0))
    b = batch(0)  # 3 frames, 5 tokens
    with pytest.raises(ValueError, match=r"mv_adapter frames=2: got videos of 3 frames"):
        model.encode_frames(b["frames"], b["frame_mask"])
    with pytest.raises(ValueError, match=r"mv_adapter text_positions=4: got captions of 5 tokens"):
        model.encode_text(b["text_ids"])
    with pytest.raises(ValueError, match=r"mv_adapter bottleneck 8 is not divisible by heads 3"):
        peft.make("mv_adapter", {**FIELDS, "heads": 3})
