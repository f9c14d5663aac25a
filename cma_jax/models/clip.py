"""OpenAI's CLIP (ViT image tower + causal text tower) in Flax NNX, with a fine-tuning method's modules.

Module and parameter names mirror OpenAI's state dict (`visual.transformer.resblocks.3.attn...`)
so that conversion is a readable table (see `cma_jax/convert/tables.py`). Parameters are float32;
`CLIPConfig.dtype` sets the compute dtype of matmuls and attention, while LayerNorm and softmax
always run in float32. A fine-tuning method (`cma_jax.models.peft`: the Cross-Modal Adapter, prompts,
other adapters) enters through the block slots and tower hooks of `cma_jax.models.peft.base`; the
image tower takes videos as [B, T] frames, so methods that work across frames see that structure.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cma_jax.models import peft
from cma_jax.models.activations import quick_gelu
from cma_jax.models.params import BACKBONE  # noqa: F401 - the pre-trained CLIP weights, named here for callers
from cma_jax.models.peft.base import SITES, SLOTS, SUBLAYERS, Site, TowerContext, TowerHooks

# What the backward pass keeps of each residual block's forward (CLIPConfig.remat): everything
# (none); nothing, recomputing the block (block); the matmul outputs, recomputing only the cheap
# elementwise work and attention (dots).
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 512
    image_resolution: int = 224
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 32
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"
    remat: str = "none"  # per-block rematerialisation: a key of REMAT_POLICIES

    # Fields that say how to compute, not what the weights are: ignored by `same_architecture`.
    COMPUTE_FIELDS = ("dtype", "remat")

    def same_architecture(self, other: "CLIPConfig") -> bool:
        """True when `other` describes the same weights (compute settings such as dtype may differ)."""
        keep = {f.name for f in dataclasses.fields(self)} - set(self.COMPUTE_FIELDS)
        return all(getattr(self, f) == getattr(other, f) for f in keep)

    @property
    def vision_heads(self) -> int:
        return self.vision_width // 64 if self.vision_width >= 64 else 1

    @property
    def grid(self) -> int:
        return self.image_resolution // self.vision_patch_size

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"clip dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"clip remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
        if self.image_resolution % self.vision_patch_size:
            raise ValueError(
                f"clip image_resolution {self.image_resolution} is not a multiple of the patch size "
                f"{self.vision_patch_size}")
        if self.text_width % self.text_heads:
            raise ValueError(f"clip text_width {self.text_width} is not divisible by text_heads {self.text_heads}")


PRESETS = {
    "vit_b32": CLIPConfig(),
    "vit_b16": CLIPConfig(vision_patch_size=16),
    "vit_l14": CLIPConfig(embed_dim=768, vision_layers=24, vision_width=1024, vision_patch_size=14,
                          text_width=768, text_heads=12),
    "vit_l14_336": CLIPConfig(embed_dim=768, image_resolution=336, vision_layers=24, vision_width=1024,
                              vision_patch_size=14, text_width=768, text_heads=12),
}
# OpenAI's name of each preset (its published checkpoint); accepted as a preset name too.
OPENAI_NAMES = {"vit_b32": "ViT-B/32", "vit_b16": "ViT-B/16", "vit_l14": "ViT-L/14", "vit_l14_336": "ViT-L/14@336px"}
PRESETS.update({openai: PRESETS[ours] for ours, openai in OPENAI_NAMES.items()})


def preset(name: str, **overrides) -> CLIPConfig:
    """A named architecture (`vit_b32`, `vit_b16`, `vit_l14`, `vit_l14_336`), optionally modified."""
    if name not in PRESETS:
        raise ValueError(f"unknown CLIP preset {name!r}; expected one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def backbone_shapes(cfg: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of every backbone parameter of CLIP(cfg), built abstractly (no memory)."""
    model = nnx.eval_shape(lambda: CLIP(cfg, None, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(model, BACKBONE))
    return {".".join(str(p) for p in path): tuple(v.shape) for path, v in flat}


def _through_conditional(g, tree):
    """`tree` unchanged, passed through a conditional on an element of the array `g`.

    XLA neither fuses across a conditional nor starts what consumes its output before `g` exists.
    Both branches are the identity (x * 1 == x, NaN included); two different branches keep XLA
    from rewriting the conditional into a (fusible) select.
    """
    def times_one(t):
        return jax.tree.map(lambda a: a * 1 if jnp.issubdtype(a.dtype, jnp.inexact) else a, t)
    return jax.lax.cond(jnp.isnan(g.ravel()[0]), times_one, lambda t: t, tree)


@jax.custom_vjp
def residual_boundary(x):
    """Identity whose cotangent is materialised once (on CPU): placed on the residual stream.

    Why: XLA:CPU fuses the residual stream's cotangent (a chain of cheap adds and multiplies
    through every LayerNorm backward) into each of its consumers, so layer i recomputes the whole
    chain of layers above it: a backward quadratic in depth (about 70,000 fused instructions; the
    ViT-B/32 adapter step took 1.8x as long). A conditional is a fusion boundary, so passing the
    cotangent through one cuts the chain at every sub-layer. Other platforms skip it: their fusion
    passes weigh such duplication by cost, and a conditional can cost a host round trip on GPU.
    """
    return x


def _boundary_fwd(x):
    return x, None


def _boundary_bwd(_, g):
    return (jax.lax.platform_dependent(g, cpu=lambda g: _through_conditional(g, g), default=lambda g: g),)


residual_boundary.defvjp(_boundary_fwd, _boundary_bwd)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 whatever the input dtype (as OpenAI's fp16-safe subclass)."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.scale = nnx.Param(jnp.ones((width,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((width,), jnp.float32))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


def _linear(din, dout, dtype, rngs, use_bias=True):
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=nnx.initializers.normal(din ** -0.5), rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (OpenAI's in_proj / out_proj)."""

    def __init__(self, width: int, heads: int, dtype, *, rngs: nnx.Rngs):
        self.heads = heads
        self.dtype = dtype
        self.in_proj = _linear(width, 3 * width, dtype, rngs)
        self.out_proj = _linear(width, width, dtype, rngs)

    def __call__(self, x, mask=None, at=None):
        """x: [N, S, W]; mask: [S, S] bool, True = attend. `at(name, x, y) -> y'`: a method's update of the
        sub-layer q, k, v (the thirds of in_proj) or out (out_proj) that read x and gave y; None: none."""
        n, s, w = x.shape
        qkv = self.in_proj(x)
        if at is None:
            qkv = qkv.reshape(n, s, 3, self.heads, w // self.heads)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, S, H, Dh]
        else:
            q, k, v = (at(name, x, y).reshape(n, s, self.heads, w // self.heads)
                       for name, y in zip(("q", "k", "v"), jnp.split(qkv, 3, axis=-1)))
        logits = jnp.einsum("nqhd,nkhd->nhqk", q * (w // self.heads) ** -0.5, k).astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, s, w)
        y = self.out_proj(out)
        return y if at is None else at("out", out, y)


class MLP(nnx.Module):
    def __init__(self, width: int, dtype, *, rngs: nnx.Rngs):
        self.c_fc = _linear(width, 4 * width, dtype, rngs)
        self.c_proj = _linear(4 * width, width, dtype, rngs)

    def __call__(self, x, at=None):
        """`at(name, x, y) -> y'`: a method's update of the sub-layer mlp_in (c_fc) or mlp_out (c_proj)."""
        if at is None:
            return self.c_proj(quick_gelu(self.c_fc(x)))
        h = quick_gelu(at("mlp_in", x, self.c_fc(x)))
        return at("mlp_out", h, self.c_proj(h))


class ResidualAttentionBlock(nnx.Module):
    """Pre-LN block with the method's modules at its sites (cma_jax.models.peft.base.SITES):

        x = pre_adapter(x)                                   (on the residual stream; ST-Adapter)
        x = x + attn_adapter(attn(ln_1(x)))                  (on the attention output; CMA, Adapter-ATTN)
        x = mid_adapter(x)                                   (on the residual stream; ST-Adapter before the MLP)
        x = x + mlp_adapter(mlp(ln_2(x)) + parallel_adapter(x))   (AdaptFormer beside, CMA after the MLP)

    and on the named sub-layers (`on_q`, `on_k`, `on_v`: the thirds of attn.in_proj; `on_out`: attn.out_proj;
    `on_mlp_in`, `on_mlp_out`: mlp.c_fc, mlp.c_proj; `on_ln_1`, `on_ln_2`), each updating that sub-layer's
    output (LoRA). An empty site is the identity. Every module is called `module(h, site)` (peft.base.Site).
    `method` is a peft Method (or an AdapterConfig, read as the Cross-Modal Adapter, or None); its modules are
    created after the block's own weights.
    """

    def __init__(self, width: int, heads: int, dtype, method=None, *, rngs: nnx.Rngs, tower: str = "vision",
                 layer: int = 0, num_layers: int = 1):
        self.ln_1 = LayerNorm(width, rngs=rngs)
        self.attn = Attention(width, heads, dtype, rngs=rngs)
        self.ln_2 = LayerNorm(width, rngs=rngs)
        self.mlp = MLP(width, dtype, rngs=rngs)
        modules = peft.as_method(method).block_modules(tower, layer, num_layers, width, dtype, rngs)
        unknown = set(modules) - set(SITES)
        if unknown:
            raise ValueError(f"unknown block site(s) {sorted(unknown)}; expected some of {SITES}")
        for name in SLOTS:
            setattr(self, name, modules.get(name))
        for name in SUBLAYERS:
            setattr(self, "on_" + name, modules.get(name))
        self.sites = tuple(name for name in SITES if name in modules)  # static: which sites hold a module

    def _module(self, name: str):
        return getattr(self, name if name in SLOTS else "on_" + name)

    def __call__(self, x, mask, shared=None, ctx: TowerContext | None = None, dropout_keys=None):
        """x [N, S, W]; `shared`: the method's {site: shared module} of this depth (the Cross-Modal Adapter's
        bank entry); `ctx`: the call's frame structure; `dropout_keys`: {site: key} drawn outside (remat)."""
        shared, keys = shared or {}, dropout_keys or {}

        def site(name, inp=None):
            return Site(ctx, shared.get(name), keys.get(name), inp)

        def at(name, inp, y):  # a named sub-layer's output, updated by the module at its site if there is one
            m = self._module(name)
            return y if m is None else m(y, site(name, inp))

        attn_at = at if {"q", "k", "v", "out"} & set(self.sites) else None
        mlp_at = at if {"mlp_in", "mlp_out"} & set(self.sites) else None
        if self.pre_adapter is not None:
            x = self.pre_adapter(x, site("pre_adapter"))
        x = residual_boundary(x)
        h = self.attn(at("ln_1", x, self.ln_1(x)), mask, attn_at)
        if self.attn_adapter is not None:
            h = self.attn_adapter(h, site("attn_adapter"))
        x = residual_boundary(x + h)
        if self.mid_adapter is not None:
            x = self.mid_adapter(x, site("mid_adapter"))
        h = self.mlp(at("ln_2", x, self.ln_2(x)), mlp_at)
        if self.parallel_adapter is not None:
            h = h + self.parallel_adapter(x, site("parallel_adapter"))
        if self.mlp_adapter is not None:
            h = self.mlp_adapter(h, site("mlp_adapter"))
        return x + h

    def dropout_keys(self) -> dict:
        """{site: its module's next dropout key}, drawn now from the module's own stream, for every module
        with dropout (a rematerialised block gets them from outside: its replay must draw the same masks)."""
        modules = {name: self._module(name) for name in self.sites}
        return {name: m.dropout.rngs() for name, m in modules.items() if getattr(m, "dropout", None) is not None}


def _rematerialised(block, x, mask, shared, ctx, dropout_keys, policy):
    """`block(x, mask, shared, ctx, dropout_keys)` whose backward pass recomputes what `policy` did not save.

    jax.checkpoint alone saves no memory on CPU: XLA:CPU drops the optimization barriers that keep
    a replay next to its use, and its scheduler runs every block's replay early, so all recomputed
    activations are alive at once. Here the saved residuals pass through a conditional on the
    block's output cotangent (an optimization barrier elsewhere), so a block is replayed only when
    the backward pass reaches it.
    """
    graphdef, state = nnx.split((block, shared))

    def fn(state, x, mask, ctx, dropout_keys):
        block, shared = nnx.merge(graphdef, state)
        return block(x, mask, shared, ctx, dropout_keys)

    @jax.custom_vjp
    def run(*args):
        return fn(*args)

    def fwd(*args):
        return jax.vjp(jax.checkpoint(fn, policy=policy), *args)

    def bwd(pullback, g):
        tied = jax.lax.platform_dependent(g, pullback, cpu=_through_conditional,
                                          default=lambda g, t: jax.lax.optimization_barrier((g, t))[1])
        return tied(g)

    run.defvjp(fwd, bwd)
    return run(state, x, mask, ctx, dropout_keys)


class Transformer(nnx.Module):
    def __init__(self, width, layers, heads, dtype, method=None, remat: str = "none", *, rngs: nnx.Rngs,
                 tower: str = "vision"):
        self.resblocks = nnx.List(
            [ResidualAttentionBlock(width, heads, dtype, method, rngs=rngs, tower=tower, layer=i, num_layers=layers)
             for i in range(layers)])
        self.remat = remat

    def __call__(self, x, mask=None, hooks: TowerHooks | None = None):
        for i, block in enumerate(self.resblocks):
            shared, ctx = None, None
            if hooks is not None:
                x = hooks.layer_input(i, x)  # deep prompts enter here, outside the rematerialised block
                shared, ctx = hooks.shared(i), hooks.ctx
            if self.remat == "none":
                x = block(x, mask, shared, ctx)
            else:
                # The dropout keys are drawn outside: nothing inside a rematerialised block may advance
                # an RNG stream, and the replay in the backward pass must draw the same masks.
                x = _rematerialised(block, x, mask, shared, ctx, block.dropout_keys(), REMAT_POLICIES[self.remat])
        return x


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: CLIPConfig, method=None, *, rngs: nnx.Rngs):
        w, p, dtype = cfg.vision_width, cfg.vision_patch_size, jnp.dtype(cfg.dtype)
        scale = w ** -0.5
        self.dtype = dtype
        self.grid = cfg.grid
        self.conv1 = nnx.Conv(3, w, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=False,
                              dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.class_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (w,)))
        self.positional_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (cfg.grid ** 2 + 1, w)))
        self.ln_pre = LayerNorm(w, rngs=rngs)
        self.transformer = Transformer(w, cfg.vision_layers, cfg.vision_heads, dtype, method, cfg.remat, rngs=rngs,
                                       tower="vision")
        self.ln_post = LayerNorm(w, rngs=rngs)
        self.proj = nnx.Param(scale * jax.random.normal(rngs.params(), (w, cfg.embed_dim)))

    def __call__(self, frames, hooks: TowerHooks):
        """frames [B, T, H, W, 3] normalised float -> per-frame embeddings [B, T, embed_dim] float32.

        The frames of a video are encoded as B * T images, each on its own, unless the method's
        modules work across them (they get the [B, T] structure and the frame mask from `hooks.ctx`).
        """
        b, t = frames.shape[:2]
        x = self.conv1(frames.reshape((b * t,) + frames.shape[2:]).astype(self.dtype))  # [B*T, g, g, W]
        n, width = x.shape[0], x.shape[-1]
        x = x.reshape(n, -1, width)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (n, 1, width))
        x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(x.dtype)
        x = hooks.embed(x)  # prompt methods append their tokens after the patches (CLS stays at 0)
        x = self.ln_pre(x)
        x = self.transformer(x, None, hooks)
        x = self.ln_post(x[:, 0])
        return (x @ self.proj[...].astype(x.dtype)).astype(jnp.float32).reshape(b, t, -1)


def _cut_caption(ids: jax.Array, length: int) -> jax.Array:
    """[N, L] token ids -> [N, length]: longer captions keep their first words and end with their end-of-text."""
    eot = jnp.argmax(ids, axis=-1)  # end-of-text has the largest id
    cut = ids[:, :length]
    last = jnp.where(eot >= length, ids[jnp.arange(ids.shape[0]), eot], cut[:, length - 1])
    return cut.at[:, length - 1].set(last)


class CLIP(nnx.Module):
    """Both towers, `logit_scale`, and the fine-tuning method's modules (`method`, see cma_jax.models.peft).

    `method`: a peft Method, an AdapterConfig (the Cross-Modal Adapter with those fields) or None
    (plain CLIP, no method).
    """

    def __init__(self, cfg: CLIPConfig, method=None, *, rngs: nnx.Rngs):
        method = peft.as_method(method)
        method.check(cfg)
        self.config = cfg
        self.method = method
        dtype = jnp.dtype(cfg.dtype)
        self.dtype = dtype
        self.visual = VisionTransformer(cfg, method, rngs=rngs)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.text_width, dtype=dtype, param_dtype=jnp.float32,
                                         embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.positional_embedding = nnx.Param(0.01 * jax.random.normal(rngs.params(),
                                                                        (cfg.context_length, cfg.text_width)))
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, dtype, method, cfg.remat,
                                       rngs=rngs, tower="text")
        self.ln_final = LayerNorm(cfg.text_width, rngs=rngs)
        self.text_projection = nnx.Param(cfg.text_width ** -0.5 * jax.random.normal(
            rngs.params(), (cfg.text_width, cfg.embed_dim)))
        self.logit_scale = nnx.Param(jnp.asarray(jnp.log(1 / 0.07), jnp.float32))
        modules = method.clip_modules(cfg, rngs)
        for name, module in modules.items():
            setattr(self, name, module)
        self.method_modules = tuple(modules)  # their attribute names, handed to the method's hooks
        method.retype(self)

    def _hooks(self, ctx: TowerContext) -> TowerHooks:
        return TowerHooks(self.method, {name: getattr(self, name) for name in self.method_modules}, ctx)

    def encode_video(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        """[B, T, H, W, 3] CLIP-normalised frames (+ frame_mask [B, T]) -> [B, T, embed_dim] float32."""
        b, t = frames.shape[:2]
        mask = jnp.ones((b, t), bool) if frame_mask is None else frame_mask.astype(bool)
        ctx = TowerContext("vision", self.config.vision_layers, b, t, self.config.grid, mask)
        return self.visual(frames, self._hooks(ctx))

    def encode_image(self, images: jax.Array) -> jax.Array:
        """[N, H, W, 3] CLIP-normalised images -> [N, embed_dim] float32 (not L2-normalised)."""
        return self.encode_video(images[:, None])[:, 0]

    def encode_text(self, ids: jax.Array) -> jax.Array:
        """[N, L] token ids (L <= context_length, zero-padded after end-of-text) -> [N, embed_dim].

        A method's prompt tokens share the context with the words: a caption longer than what is left
        loses its last words, keeping its end-of-text token (as CoOp's placeholders take those slots).
        """
        room = self.config.context_length - self.method.extra_text_tokens()
        if ids.shape[1] > room:
            ids = _cut_caption(ids, room)
        n, length = ids.shape
        hooks = self._hooks(TowerContext("text", self.config.text_layers, n))
        x = hooks.embed(self.token_embedding(ids))  # prompt methods insert their tokens after the start token
        inserted = x.shape[1] - length
        x = x + self.positional_embedding[:x.shape[1]].astype(self.dtype)
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        x = self.transformer(x, causal, hooks)
        x = self.ln_final(x)
        eot = x[jnp.arange(n), jnp.argmax(ids, axis=-1) + inserted]  # end-of-text has the largest id
        return (eot @ self.text_projection[...].astype(x.dtype)).astype(jnp.float32)
