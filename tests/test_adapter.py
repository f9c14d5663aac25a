"""The Cross-Modal Adapter against plain numpy formulas, its sharing across towers, and its placement;
how the towers' backward pass compiles (remat settings, the residual boundary)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cma_jax.models.clip import CLIP, CLIPConfig, ResidualAttentionBlock
from cma_jax.models.peft.adapter import Adapter, AdapterConfig, AdapterParam, SharedBlock, SharedUp, shared_layer_index
from cma_jax.models.peft.base import Site

NP_ACT = {
    "quick_gelu": lambda x: x / (1 + np.exp(-1.702 * x)),
    "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
    "relu": lambda x: np.maximum(x, 0),
}


def randomize(module, seed, scale=0.3):
    """Replace every parameter of `module` by N(0, scale^2) draws (init values are too small to test with)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    nnx.update(module, nnx.map_state(
        lambda _, v: v.replace(jnp.asarray(scale * rng.normal(size=v.shape), jnp.float32)), state))


def params(module) -> dict:
    return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(module))}


def np_adapter(h, p, shared, activation, d_s):
    """A(h) = h + up(act(down(h))); up's last d_s output dims come from the shared weights."""
    z = NP_ACT[activation](h @ p["down_kernel"] + p["down_bias"])
    parts = []
    if "up_kernel" in p:
        parts.append(z @ p["up_kernel"] + p["up_bias"])
    if d_s:
        parts.append(z @ shared["kernel"] + shared["bias"])
    return h + np.concatenate(parts, axis=-1)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu", "relu"])
@pytest.mark.parametrize("width,d_s", [(24, 0), (24, 5), (16, 16)])  # d_s = width: no unique part
def test_adapter_matches_numpy(width, d_s, activation):
    cfg = AdapterConfig(reduction_dim=4, share_dim=d_s, activation=activation)
    adapter = Adapter(width, cfg, rngs=nnx.Rngs(0))
    shared = SharedUp(cfg, rngs=nnx.Rngs(1)) if d_s else None
    randomize(adapter, 0)
    if shared is not None:
        randomize(shared, 1)
    assert (adapter.up_kernel is None) == (d_s == width)
    h = np.random.default_rng(2).normal(size=(2, 3, width)).astype(np.float32)
    got = np.asarray(adapter(jnp.asarray(h), Site(shared=shared)))
    want = np_adapter(h, params(adapter), params(shared) if shared is not None else None, activation, d_s)
    assert got.shape == (2, 3, width)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(got - h).max() > 1e-2  # the adapter really changed h


def test_shared_slice_is_the_last_share_dim_outputs():
    cfg = AdapterConfig(reduction_dim=3, share_dim=4)
    adapter, shared = Adapter(10, cfg, rngs=nnx.Rngs(0)), SharedUp(cfg, rngs=nnx.Rngs(1))
    randomize(adapter, 0)
    h = jnp.asarray(np.random.default_rng(0).normal(size=(5, 10)), jnp.float32)
    before = np.asarray(adapter(h, Site(shared=shared)))
    shared.bias[...] = shared.bias[...] + 1.0
    diff = np.asarray(adapter(h, Site(shared=shared))) - before
    np.testing.assert_allclose(diff[:, :6], 0.0, atol=1e-6)
    np.testing.assert_allclose(diff[:, 6:], 1.0, atol=1e-5)


TINY = dict(embed_dim=8, image_resolution=16, vision_patch_size=8, context_length=6, vocab_size=20,
            text_heads=2)


def tiny_clip(vision_layers=2, text_layers=2, vision_width=32, text_width=16, d_s=8):
    cfg = CLIPConfig(vision_layers=vision_layers, text_layers=text_layers, vision_width=vision_width,
                     text_width=text_width, **TINY)
    model = CLIP(cfg, AdapterConfig(reduction_dim=4, share_dim=d_s), rngs=nnx.Rngs(0))
    randomize(model, 3, scale=0.2)
    return model


def tiny_inputs():
    rng = np.random.default_rng(4)
    images = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    ids = jnp.asarray([[18, 3, 5, 19, 0, 0], [18, 7, 19, 0, 0, 0]], jnp.int32)
    return images, ids


def _encode(model, images, ids):
    return model.encode_image(images), model.encode_text(ids)


_encode_jit = nnx.jit(_encode)  # one compile per architecture; weight edits between calls are inputs


def encode(model):
    img, txt = _encode_jit(model, *tiny_inputs())
    return np.asarray(img), np.asarray(txt)


def test_image_and_text_adapters_share_weights():
    model = tiny_clip()
    img0, txt0 = encode(model)
    model.shared_adapters[1].mlp.kernel[...] = model.shared_adapters[1].mlp.kernel[...] + 0.5
    img1, txt1 = encode(model)
    assert np.abs(img1 - img0).max() > 1e-3 and np.abs(txt1 - txt0).max() > 1e-3
    # a tower's own (unique) weights change only that tower
    block = model.visual.transformer.resblocks[0]
    block.attn_adapter.up_kernel[...] = block.attn_adapter.up_kernel[...] + 0.5
    img2, txt2 = encode(model)
    assert np.abs(img2 - img1).max() > 1e-3
    np.testing.assert_array_equal(txt2, txt1)


def test_unequal_depths_follow_documented_mapping(monkeypatch):
    """4 image layers, 2 text layers: image layers 2k and 2k+1 share with text layer k."""
    model = tiny_clip(vision_layers=4, text_layers=2)
    assert len(model.shared_adapters) == 2
    assert [shared_layer_index(i, 4, 2) for i in range(4)] == [0, 0, 1, 1]
    assert [shared_layer_index(i, 2, 2) for i in range(2)] == [0, 1]
    seen, traced = [], []
    original = Adapter.__call__

    def spy(self, h, site):
        seen.append(site.shared)
        return original(self, h, site)

    def run(model, images, ids):
        traced.append(model)  # the model object the spied calls belong to
        return _encode(model, images, ids)

    monkeypatch.setattr(Adapter, "__call__", spy)
    nnx.eval_shape(run, model, *tiny_inputs())  # trace only: cheap, and runs every adapter once
    bank = traced[0].shared_adapters
    image = [bank[k].attn if pos == 0 else bank[k].mlp for k in (0, 0, 1, 1) for pos in (0, 1)]
    text = [bank[k].attn if pos == 0 else bank[k].mlp for k in (0, 1) for pos in (0, 1)]
    assert len(seen) == len(image) + len(text)
    assert all(a is b for a, b in zip(seen, image + text))


def test_share_dim_equal_to_narrow_width_and_zero():
    model = tiny_clip(vision_width=32, text_width=16, d_s=16)  # text tower: no unique part
    assert model.transformer.resblocks[0].attn_adapter.up_kernel is None
    assert model.visual.transformer.resblocks[0].attn_adapter.up_kernel[...].shape == (4, 16)
    assert all(np.isfinite(x).all() for x in encode(model))
    model = tiny_clip(d_s=0)  # plain uni-modal adapters: no shared bank
    assert "shared_adapters" not in model.method_modules
    assert all(np.isfinite(x).all() for x in encode(model))


@pytest.mark.parametrize("kwargs,match", [
    (dict(share_dim=-1), "share_dim"),
    (dict(reduction_dim=0), "reduction_dim"),
    (dict(activation="swish"), "activation"),
])
def test_bad_adapter_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(**kwargs)


def test_share_dim_wider_than_narrow_tower_raises():
    with pytest.raises(ValueError, match=r"d_s=17.*narrower tower width 16"):
        tiny_clip(vision_width=32, text_width=16, d_s=17)
    with pytest.raises(ValueError, match="exceeds the tower width"):
        Adapter(8, AdapterConfig(share_dim=9), rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- placement in a block
def np_layernorm(x, p, name):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * p[f"{name}.scale"] + p[f"{name}.bias"]


def np_block(x, p, heads, mask, shared):
    """x = x + A_attn(attn(ln_1 x)); x = x + A_mlp(mlp(ln_2 x)), in numpy."""
    n, s, w = x.shape
    dh = w // heads
    qkv = np_layernorm(x, p, "ln_1") @ p["attn.in_proj.kernel"] + p["attn.in_proj.bias"]
    q, k, v = [qkv[..., i * w:(i + 1) * w].reshape(n, s, heads, dh).transpose(0, 2, 1, 3) for i in range(3)]
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh) + np.where(mask, 0.0, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    h = (probs @ v).transpose(0, 2, 1, 3).reshape(n, s, w) @ p["attn.out_proj.kernel"] + p["attn.out_proj.bias"]
    sub = lambda pre: {k[len(pre) + 1:]: val for k, val in p.items() if k.startswith(pre + ".")}  # noqa: E731
    x = x + np_adapter(h, sub("attn_adapter"), shared["attn"], "quick_gelu", 4)
    f = np_layernorm(x, p, "ln_2") @ p["mlp.c_fc.kernel"] + p["mlp.c_fc.bias"]
    h = NP_ACT["quick_gelu"](f) @ p["mlp.c_proj.kernel"] + p["mlp.c_proj.bias"]
    return x + np_adapter(h, sub("mlp_adapter"), shared["mlp"], "quick_gelu", 4)


def by_site(shared: SharedBlock) -> dict:
    """A depth's bank entry as the block takes it: {site: shared slice} (what CMA's `shared` hook returns)."""
    return {"attn_adapter": shared.attn, "mlp_adapter": shared.mlp}


def block_and_shared(seed=0):
    cfg = AdapterConfig(reduction_dim=4, share_dim=4)
    block = ResidualAttentionBlock(16, 2, jnp.float32, cfg, rngs=nnx.Rngs(seed))
    shared = SharedBlock(cfg, rngs=nnx.Rngs(seed + 1))
    randomize(block, seed)
    randomize(shared, seed + 1)
    return block, shared


def test_block_matches_numpy_with_causal_mask():
    block, shared = block_and_shared()
    x = np.random.default_rng(5).normal(size=(2, 5, 16)).astype(np.float32)
    mask = np.tril(np.ones((5, 5), bool))
    got = np.asarray(block(jnp.asarray(x), jnp.asarray(mask), by_site(shared)))
    p = params(block)
    sp = {pos: {k.split(".", 1)[1]: v for k, v in params(shared).items() if k.startswith(pos)}
          for pos in ("attn", "mlp")}
    np.testing.assert_allclose(got, np_block(x, p, 2, mask, sp), rtol=1e-4, atol=1e-4)


def test_zero_up_weights_give_plain_clip_block():
    block, shared = block_and_shared()
    plain = ResidualAttentionBlock(16, 2, jnp.float32, None, rngs=nnx.Rngs(9))
    backbone = nnx.state(block, nnx.All(nnx.Param, nnx.Not(AdapterParam)))
    assert set(nnx.to_pure_dict(backbone)) == set(nnx.to_pure_dict(nnx.state(plain, nnx.Param)))
    nnx.update(plain, backbone)
    for adapter in (block.attn_adapter, block.mlp_adapter):
        adapter.up_kernel[...] = jnp.zeros_like(adapter.up_kernel[...])
        adapter.up_bias[...] = jnp.zeros_like(adapter.up_bias[...])
    for up in (shared.attn, shared.mlp):
        up.kernel[...] = jnp.zeros_like(up.kernel[...])
        up.bias[...] = jnp.zeros_like(up.bias[...])
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 5, 16)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(block(x, None, by_site(shared))), np.asarray(plain(x, None, None)))


# ----------------------------------------------------------------------------- parameter counts
def adapter_count(width, layers, r, d_s):
    """Per tower: 2 adapters per layer, down W*r + r, own part of up r*(W - d_s) + (W - d_s)."""
    return 2 * layers * (width * r + r + (r + 1) * (width - d_s))


def test_count_params_matches_formula():
    from cma_jax.models.summary import count_params

    model = tiny_clip(vision_layers=3, text_layers=2, vision_width=32, text_width=16, d_s=8)
    counts = count_params(model)
    shared = 2 * 2 * (4 * 8 + 8)  # min(3, 2) depths x (attn, mlp) x (r*d_s + d_s)
    assert counts["adapter"] == adapter_count(32, 3, 4, 8) + adapter_count(16, 2, 4, 8) + shared
    plain = CLIP(model.config, None, rngs=nnx.Rngs(0))
    assert counts["total"] == count_params(plain)["total"] + counts["adapter"]
    assert count_params(plain)["adapter"] == 0
    assert counts["percent"] == pytest.approx(100 * counts["adapter"] / counts["total"])


def test_summary_cli_vit_b32(capsys):
    from cma_jax.models.summary import main

    main(["--preset", "vit_b32", "--reduction_dim", "8", "--share_dim", "16"])
    out = capsys.readouterr().out
    assert "519,168 trained params of 151,796,481 total (0.342 %)" in out
    assert adapter_count(768, 12, 8, 16) + adapter_count(512, 12, 8, 16) + 2 * 12 * (8 * 16 + 16) == 519_168


# ----------------------------------------------------------------------------- how the backward pass compiles
TOWER = CLIPConfig(embed_dim=16, image_resolution=32, vision_layers=4, vision_width=64, vision_patch_size=8,
                   context_length=8, vocab_size=64, text_width=32, text_heads=2, text_layers=2)


def compiled_image_grad(cfg: CLIPConfig, images: int = 8):
    """jit(grad w.r.t. the adapters) of the image tower, compiled for shapes only."""
    model = nnx.eval_shape(lambda: CLIP(cfg, AdapterConfig(reduction_dim=4, share_dim=8), rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, AdapterParam, ...)

    def loss(p, r, x):
        return jnp.sum(nnx.merge(graphdef, p, r).encode_image(x) ** 2)
    return jax.jit(jax.grad(loss)).lower(params, rest, jax.ShapeDtypeStruct((images, 32, 32, 3), jnp.float32)).compile()


def largest_fusion(compiled) -> int:
    """Instructions in the largest fused computation of a compiled program."""
    sizes, n = [], None
    for line in compiled.as_text().splitlines():
        if line.startswith("%fused"):
            n = 0
        elif n is not None and line.startswith("}"):
            sizes.append(n)
            n = None
        elif n is not None:
            n += 1
    return max(sizes)


def test_backward_fusions_do_not_grow_with_depth():
    """clip.residual_boundary: without it XLA:CPU fuses the residual cotangent chain of all layers above
    into each consumer (largest fusion 112 instructions at 2 layers, 524 at 8); with it, 50 at both."""
    two, eight = (largest_fusion(compiled_image_grad(dataclasses.replace(TOWER, vision_layers=n))) for n in (2, 8))
    assert eight <= 1.2 * two, (two, eight)


@pytest.mark.slow
def test_remat_changes_memory_not_results():
    """Same outputs, gradients (w.r.t. every weight) and dropout draws for each CLIPConfig.remat; less memory."""
    images = jnp.asarray(np.random.default_rng(7).normal(size=(2, 32, 32, 3)), jnp.float32)
    ids = jnp.asarray([[3, 4, 5, 63, 0, 0, 0, 0], [7, 63, 0, 0, 0, 0, 0, 0]], jnp.int32)
    results, temp = {}, {}
    for remat in ("none", "block", "dots"):
        cfg = dataclasses.replace(TOWER, remat=remat)
        model = CLIP(cfg, AdapterConfig(reduction_dim=4, share_dim=8, dropout=0.5, init_std=0.5), rngs=nnx.Rngs(0))
        graphdef, params, rngs, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)

        def loss(p, r):
            m = nnx.merge(graphdef, p, r, rest, copy=True)
            value = jnp.sum(m.encode_image(images) ** 2) + jnp.sum(m.encode_text(ids) ** 2)
            return value, nnx.state(m, nnx.RngState)
        (value, new_rngs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, rngs)
        results[remat] = (float(value), jax.tree.leaves(new_rngs), jax.tree.leaves(grads))
        temp[remat] = compiled_image_grad(cfg).memory_analysis().temp_size_in_bytes
    want_value, want_rngs, want_grads = results["none"]
    for remat in ("block", "dots"):
        value, new_rngs, grads = results[remat]
        assert value == want_value  # same dropout masks
        assert all(np.array_equal(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a,
                                  jax.random.key_data(b) if jnp.issubdtype(b.dtype, jax.dtypes.prng_key) else b)
                   for a, b in zip(new_rngs, want_rngs))
        for g, w in zip(grads, want_grads):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))
    # measured: none 2.58 MB, dots 1.83 MB, block 1.07 MB of temporaries
    assert temp["block"] < 0.6 * temp["none"] and temp["dots"] < 0.85 * temp["none"], temp


def test_bad_remat_raises():
    with pytest.raises(ValueError, match="clip remat must be one of .*'block'"):
        CLIPConfig(remat="everything")
