"""The method layer: every method of the paper's comparison trains, saves and restores through one
declaration; counts equal their formulas and the paper's; prompts keep pooling right; frame-aware
methods use the [B, T] structure and ignore padded frames; mismatched configs stop at start-up."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from cma_jax import checkpoint as ckpt_lib
from cma_jax import loader, optim
from cma_jax import run as run_lib
from cma_jax import train as train_lib
from cma_jax.models import peft
from cma_jax.models.clip import PRESETS, CLIPConfig
from cma_jax.models.params import PromptParam
from cma_jax.models.retrieval import RetrievalModel
from cma_jax.models.state import apply_state, backbone_state
from cma_jax.models.summary import count
from cma_jax.trees import flatten
from tiny import TINY_CLIP, TINY_METHOD_FIELDS, SyntheticBatches, tiny_method_config

TRAINED = [m for m in peft.METHODS if m != "zero_shot"]
CFG = CLIPConfig(**TINY_CLIP)


def _flat(state) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def tiny(method: str) -> peft.Method:
    return peft.make(method, TINY_METHOD_FIELDS.get(method))


def batch(seed=0, frames=3, frame_mask=None):
    rng = np.random.default_rng(seed)
    b, L = 4, 5
    ids = np.concatenate([rng.integers(1, 60, (b, L - 1)), np.full((b, 1), 63)], 1)
    mask = np.ones((b, frames), bool) if frame_mask is None else np.asarray(frame_mask, bool)
    return {"frames": jnp.asarray(rng.integers(0, 256, (b, frames, 32, 32, 3)), jnp.uint8),
            "frame_mask": jnp.asarray(mask), "text_ids": jnp.asarray(ids, jnp.int32)}


def embeddings(model, b):
    return (np.asarray(model.encode_frames(b["frames"], b["frame_mask"])), np.asarray(model.encode_text(b["text_ids"])))


# ----------------------------------------------------------------------------- counts
@pytest.mark.parametrize("method", list(peft.METHODS))
def test_count_equals_its_formula_at_vit_b32_and_b16_and_the_papers(method):
    """Abstract init (shapes only, no memory) of the real architectures; defaults within 10 % of the paper."""
    m = peft.make(method)
    for preset in ("vit_b32", "vit_b16"):
        model = nnx.eval_shape(lambda: RetrievalModel(PRESETS[preset], m, rngs=nnx.Rngs(0)))
        trained = count(nnx.state(model, optim.trainable_filter(m))) if m.trains else 0
        assert trained == m.count(PRESETS[preset]), preset
    if m.paper_count and method != "full":  # the paper's full-tuning 123.5 M is fewer weights than CLIP has
        assert abs(m.count(PRESETS["vit_b32"]) / m.paper_count - 1) <= 0.10


def test_the_paper_counts_at_vit_b32():
    want = {"partial": 10_240_256, "projection": 655_360, "coop": 2_048, "vpt": 46_080, "vl_prompt": 76_800,
            "maple": 4_740_096, "vop": 14_257_152, "adapter_attn": 1_982_976, "adaptformer": 1_982_976,
            "st_adapter": 7_110_144, "cma": 519_168, "unimodal": 522_624, "full": 151_277_312, "zero_shot": 0}
    assert {m: peft.make(m).count(PRESETS["vit_b32"]) for m in want} == want  # the paper's fourteen, pinned


# ----------------------------------------------------------------------------- train, save, restore
@pytest.mark.slow
@pytest.mark.parametrize("method", TRAINED)
def test_one_step_trains_only_the_method_and_its_checkpoint_restores(method, tmp_path):
    """After a step only the method's variables moved (frozen ones bit-identical); the run checkpoint holds
    exactly that tree and, loaded into a fresh model on the same backbone, gives identical outputs."""
    config = tiny_method_config(method, num_steps=1, save_every_steps=1)
    init = loader.from_run(run_lib.resolve(config))[0]
    model, history = train_lib.train(run_lib.resolve(config, str(tmp_path)), train_iter=SyntheticBatches(config))
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    m = model.clip.method
    train_filter = optim.trainable_filter(m)
    frozen = nnx.All(nnx.Param, nnx.Not(train_filter))
    before, after = _flat(nnx.state(init, frozen)), _flat(nnx.state(model, frozen))
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    t0, t1 = _flat(nnx.state(init, train_filter)), _flat(nnx.state(model, train_filter))
    assert len(t0) and any(not np.array_equal(t0[k], t1[k]) for k in t0)

    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.metadata(tmp_path / "checkpoints" / "1" / "params").item_metadata
    trained = nnx.to_pure_dict(nnx.state(model, train_filter))
    saved_names = {k.removesuffix(".value") for k in flatten(dict(saved))}
    assert saved_names == set(flatten(trained))  # the trainable tree, nothing of the backbone
    assert count(trained) == m.count(CFG)
    assert ckpt_lib.saved_method(str(tmp_path)) == m

    fresh, step = loader.build_model(backbone=init, adapters=str(tmp_path), seed=123)
    assert step == 1 and fresh.clip.method == m
    b = batch()
    for got, want in zip(embeddings(fresh, b), embeddings(model, b)):
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- step 0
@pytest.mark.parametrize("method", [m for m in peft.METHODS if peft.get(m).identity_at_init])
def test_identity_methods_start_as_the_frozen_clip(method):
    model = RetrievalModel(CFG, tiny(method), rngs=nnx.Rngs(0))
    plain = RetrievalModel(CFG, None, rngs=nnx.Rngs(1))
    apply_state(plain, backbone_state(model))
    b = batch(1, frame_mask=[[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    for got, want in zip(embeddings(model, b), embeddings(plain, b)):
        np.testing.assert_array_equal(got, want)


PROMPTED = {"coop": ("text",), "vpt": ("vision",), "vl_prompt": ("vision", "text"), "maple": ("vision", "text"),
            "vop": ("vision", "text")}


@pytest.mark.parametrize("method", sorted(PROMPTED))
def test_prompts_reach_the_pooled_embeddings_of_their_towers(method):
    """Prompt methods do not start as the frozen CLIP; moving their prompts moves exactly their towers' output."""
    model = RetrievalModel(CFG, tiny(method), rngs=nnx.Rngs(0))
    assert not model.clip.method.identity_at_init
    b = batch(2)
    before = embeddings(model, b)
    prompts = nnx.state(model, nnx.All(PromptParam, nnx.PathContains("prompts")))
    rng = np.random.default_rng(7)  # not a constant shift: LayerNorm would remove it
    nnx.update(model, jax.tree.map(lambda v: v + jnp.asarray(rng.normal(size=v.shape), jnp.float32), prompts))
    after = embeddings(model, b)
    for tower, x0, x1 in zip(("vision", "text"), before, after):
        assert (np.abs(x1 - x0).max() > 1e-4) == (tower in PROMPTED[method]), tower


# ----------------------------------------------------------------------------- where prompts enter
def test_coop_context_is_the_same_as_words_after_the_start_token():
    """CoOp's vectors sit right after the start token, get text positions, are seen by every word (causal mask),
    and the end-of-text token is pooled where it moved: equal to plain CLIP reading [SOT, w1, w2, caption, EOT]."""
    model = RetrievalModel(CFG, tiny("coop"), rngs=nnx.Rngs(0))
    plain = RetrievalModel(CFG, None, rngs=nnx.Rngs(1))
    apply_state(plain, backbone_state(model))
    words = jnp.asarray([7, 9])
    model.clip.prompts.text[...] = model.clip.token_embedding.embedding[...][words][None]
    ids = np.asarray([[62, 3, 4, 5, 63, 0], [62, 8, 63, 0, 0, 0]], np.int32)  # SOT=62, EOT=63 (the largest id)
    spliced = np.zeros((2, 8), np.int32)
    for i, row in enumerate(ids):
        spliced[i] = np.concatenate([row[:1], np.asarray(words), row[1:]])
    np.testing.assert_allclose(np.asarray(model.encode_text(jnp.asarray(ids))),
                               np.asarray(plain.encode_text(jnp.asarray(spliced))), rtol=1e-5, atol=1e-6)
    # A caption of the whole context (8 tokens) loses its last 2 words to the 2 prompts and keeps its EOT.
    full = np.asarray([[62, 1, 2, 3, 4, 5, 6, 63]], np.int32)
    cut = np.asarray([[62, 7, 9, 1, 2, 3, 4, 63]], np.int32)
    np.testing.assert_allclose(np.asarray(model.encode_text(jnp.asarray(full))),
                               np.asarray(plain.encode_text(jnp.asarray(cut))), rtol=1e-5, atol=1e-6)


def test_deep_vision_prompts_are_appended_then_replaced_and_cls_is_pooled():
    """VPT-deep by hand: layer 0's prompts after the patches before ln_pre, each deeper layer's replacing them."""
    model = RetrievalModel(CFG, tiny("vpt"), rngs=nnx.Rngs(0))
    v, p = model.clip.visual, model.clip.prompts.vision[...]
    images = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 32, 3)), jnp.float32)
    x = v.conv1(images).reshape(2, -1, CFG.vision_width)
    x = jnp.concatenate([jnp.broadcast_to(v.class_embedding[...], (2, 1, CFG.vision_width)), x], 1)
    x = x + v.positional_embedding[...]
    x = v.ln_pre(jnp.concatenate([x, jnp.broadcast_to(p[0], (2,) + p[0].shape)], 1))
    for i, block in enumerate(v.transformer.resblocks):
        if i:
            x = jnp.concatenate([x[:, :-p.shape[1]], jnp.broadcast_to(p[i], (2,) + p[i].shape)], 1)
        x = block(x, None)
    want = v.ln_post(x[:, 0]) @ v.proj[...]
    np.testing.assert_allclose(np.asarray(model.clip.encode_image(images)), np.asarray(want), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- across frames
def _perturb_conv(model):
    for block in model.clip.visual.transformer.resblocks:
        a = block.pre_adapter
        a.conv_kernel[...] = jnp.asarray(np.random.default_rng(4).normal(size=a.conv_kernel.shape), jnp.float32)
        a.fc2_kernel[...] = a.fc2_kernel[...] * 5


@pytest.mark.parametrize("method", ["st_adapter", "vop"])
def test_frame_aware_methods_mix_frames_but_ignore_padding(method):
    """A real frame's embedding depends on the video's other real frames, never on a padded frame's pixels."""
    model = RetrievalModel(CFG, tiny(method), rngs=nnx.Rngs(0))
    if method == "st_adapter":
        _perturb_conv(model)  # zero-initialised: make the temporal convolution do something
    mask = [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]
    b = batch(5, frame_mask=mask)
    base = np.asarray(model.encode_frames(b["frames"], b["frame_mask"]))
    noisy = b["frames"].at[0, 2].set(255 - b["frames"][0, 2])  # a padded frame's pixels
    np.testing.assert_allclose(np.asarray(model.encode_frames(noisy, b["frame_mask"]))[0, :2], base[0, :2],
                               rtol=1e-5, atol=1e-6)
    other = b["frames"].at[1, 2].set(255 - b["frames"][1, 2])  # a real frame of video 1
    moved = np.asarray(model.encode_frames(other, b["frame_mask"]))
    assert np.abs(moved[1, 0] - base[1, 0]).max() > 1e-4  # frame 0 of that video sees frame 2
    np.testing.assert_array_equal(moved[[0, 2, 3]], base[[0, 2, 3]])  # other videos do not
    single = np.asarray(model.clip.encode_image(jnp.ones((2, 32, 32, 3))))
    assert single.shape == (2, CFG.embed_dim) and np.isfinite(single).all()  # images: T = 1


# ----------------------------------------------------------------------------- config
def test_a_method_field_without_its_method_stops_at_start_up():
    config = tiny_method_config("cma")
    with pytest.raises(ValueError, match=r"config.vpt.num_tokens is set, but config.method=cma does not use it"):
        run_lib.check(config, overridden=["vpt.num_tokens"])
    config.method = "unimodal"
    with pytest.raises(ValueError, match=r"config.adapter.share_dim is set, but config.method=unimodal"):
        run_lib.check(config, overridden=["adapter.share_dim"])
    run_lib.check(config, overridden=["adapter.reduction_dim", "train.lr"])
    config.method = "no_such_method"
    with pytest.raises(ValueError, match=r"config.method: expected one of \('zero_shot', 'full', 'partial'"):
        run_lib.check(config)
    config = tiny_method_config("vpt")
    config.vpt.num_tokens = 0
    with pytest.raises(ValueError, match=r"config.vpt.num_tokens: vpt num_tokens must be >= 1, got 0"):
        run_lib.check(config)
    config = tiny_method_config("coop")
    config.coop.num_tokens = 7  # the tiny context is 8: no word would be left
    with pytest.raises(ValueError, match=r"config.coop: 7 prompt tokens leave no room for a caption"):
        run_lib.check(config)


def test_a_checkpoint_of_another_method_is_refused(tmp_path):
    config = tiny_method_config("vpt", num_steps=1)
    train_lib.train(run_lib.resolve(config, str(tmp_path / "vpt")), train_iter=SyntheticBatches(config))
    other = loader.from_run(run_lib.resolve(tiny_method_config("coop")))[0]
    with pytest.raises(ckpt_lib.CheckpointMismatch, match=r"method: checkpoint 'vpt', config 'coop'"):
        ckpt_lib.load_adapters(str(tmp_path / "vpt"), other)
    longer = dataclasses.replace(tiny("vpt"), num_tokens=3)
    with pytest.raises(ckpt_lib.CheckpointMismatch, match=r"vpt.num_tokens: checkpoint 2, config 3"):
        loader.build_model(CFG, longer, backbone=other, adapters=str(tmp_path / "vpt"))
