"""MV-Adapter (Jin, Zhang et al., CVPR 2024): bottleneck adapters after every MLP whose bottleneck runs a small
transformer, across a video's frames in the image tower and along the caption in the text tower.

As zhangbw17/MV-Adapter (modules/adapter/mv_adapter.py VideoAdapter / TextTransfAdapter, its MSR-VTT config):
after each block's MLP ('seq'), `h + s * up(...)` with s = 0.1, m = 64 bottleneck channels, a 2-head
pre-LN transformer block of width m in the bottleneck, up-projections and biases zero (the frozen CLIP at
step 0). Image tower: down + QuickGELU per token; a temporal sequence [global token, the T frames' CLS,
the T frames' mean patch] (+ its own positions, 2 T + 1 of them), ln, the block (padded frames masked as
keys), QuickGELU; the CLS tokens go up scaled by a calibration from the global token and the frames (the
Temporal Adaptation module's 'c' path: g, a, b with b zero so the calibration starts at 1), every patch goes
up from its own down-projection. Text tower: down, + positions, ln, the causal block, QuickGELU, up.
Cross Modality Tying in the last `tied_layers` blocks: a factor of `factor_dim` shared by the two towers'
adapters at that depth (zeros at the start), mapped by each adapter's own linear map to scale the rows of its
down-projection. Inits as its code: down kaiming-uniform (image) / N(0, (2 W)^-1) (text), the block's
weights N(0, W^-1) (in_proj) and N(0, (2 W)^-1) (the others), W the tower width; the rest PyTorch's
defaults. `frames` and `text_positions` are its position tables (12 frames, 32 words: longer inputs are
refused). 3.33 M trained parameters at ViT-B/32; the paper says 2.4 % of CLIP's (about 3.6 M).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from cma_jax.models.activations import quick_gelu
from cma_jax.models.params import AdapterParam
from cma_jax.models.peft.base import Demo, FieldError, Method, Site, declare, torch_linear


def _layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale[...] + bias[...]


def _normal(rngs, shape, std):
    return AdapterParam(std * jax.random.normal(rngs.params(), shape, jnp.float32))


def _ones(n):
    return AdapterParam(jnp.ones((n,), jnp.float32))


def _zeros(*shape):
    return AdapterParam(jnp.zeros(shape, jnp.float32))


class Block(nnx.Module):
    """A pre-LN transformer block of the bottleneck width: x [N, S, m] -> x + attn(ln_1(x)) -> + mlp(ln_2(x)); `mask` [N, S, S] or [S, S] bool, True = attend."""

    def __init__(self, m: int, heads: int, width: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.ln_1_scale, self.ln_1_bias, self.ln_2_scale, self.ln_2_bias = _ones(m), _zeros(m), _ones(m), _zeros(m)
        self.in_kernel, self.in_bias = _normal(rngs, (m, 3 * m), width ** -0.5), _zeros(3 * m)
        self.out_kernel, self.out_bias = _normal(rngs, (m, m), (2 * width) ** -0.5), _zeros(m)
        self.fc_kernel = _normal(rngs, (m, 4 * m), (2 * width) ** -0.5)
        self.fc_bias = torch_linear(rngs, m, 4 * m, AdapterParam)[1]
        self.proj_kernel = _normal(rngs, (4 * m, m), (2 * width) ** -0.5)
        self.proj_bias = torch_linear(rngs, 4 * m, m, AdapterParam)[1]

    def __call__(self, x, mask):
        n, s, m = x.shape
        h = _layer_norm(x, self.ln_1_scale, self.ln_1_bias) @ self.in_kernel[...] + self.in_bias[...]
        q, k, v = (t.reshape(n, s, self.heads, m // self.heads) for t in jnp.split(h, 3, axis=-1))
        logits = jnp.einsum("nqhd,nkhd->nhqk", q * (m // self.heads) ** -0.5, k)
        mask = mask[:, None] if mask.ndim == 3 else mask
        probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
        x = x + jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, s, m) @ self.out_kernel[...] + self.out_bias[...]
        h = _layer_norm(x, self.ln_2_scale, self.ln_2_bias) @ self.fc_kernel[...] + self.fc_bias[...]
        return x + quick_gelu(h) @ self.proj_kernel[...] + self.proj_bias[...]


class Tying(nnx.Module):
    """An adapter's own map of the shared factor to the scales of its down-projection's m outputs."""

    def __init__(self, factor_dim: int, m: int, *, rngs: nnx.Rngs):
        self.kernel, self.bias = torch_linear(rngs, factor_dim, m, AdapterParam)

    def __call__(self, factor):
        return factor[...] @ self.kernel[...] + self.bias[...]


class Bottleneck(nnx.Module):
    """What both towers' adapters share in form: down (its rows scaled by the tying), ln, the block, up."""

    def __init__(self, method: "MVAdapter", width: int, positions: int, tied: bool, vision: bool, *,
                 rngs: nnx.Rngs):
        m = method.bottleneck
        if vision:  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(W), 1/sqrt(W)), zero bias
            self.down_kernel = torch_linear(rngs, width, m, AdapterParam, bias=False)[0]
        else:
            self.down_kernel = _normal(rngs, (width, m), (2 * width) ** -0.5)
        self.down_bias = _zeros(m)
        self.up_kernel, self.up_bias = _zeros(m, width), _zeros(width)
        self.ln_scale, self.ln_bias = _ones(m), _zeros(m)
        self.block = Block(m, method.heads, width, rngs=rngs)
        self.positions = _normal(rngs, (positions, m), 0.01)
        self.tying = Tying(method.factor_dim, m, rngs=rngs) if tied else None
        self.scale = method.scale

    def down(self, x, site: Site):
        z = x @ self.down_kernel[...]
        if self.tying is not None:
            z = z * self.tying(site.shared)
        return z + self.down_bias[...]


class VideoAdapter(Bottleneck):
    """h [B*T, 1 + g*g, W] (a block's MLP output) -> h + s * delta, across each video's T frames."""

    def __init__(self, method: "MVAdapter", width: int, tied: bool, *, rngs: nnx.Rngs):
        super().__init__(method, width, 2 * method.frames + 1, tied, True, rngs=rngs)
        m, c = method.bottleneck, method.calibration_dim
        self.global_token = _normal(rngs, (m,), m ** -0.5)
        self.g_kernel, self.g_bias = torch_linear(rngs, m, m, AdapterParam)
        self.a_kernel, self.a_bias = torch_linear(rngs, 2 * m, c, AdapterParam)
        self.b_kernel = _zeros(c, m)

    def calibration(self, glob, frames, mask):
        """Temporal Adaptation's weight calibration [B, T, m] (1 at the start: b is zero)."""
        g = glob @ self.g_kernel[...] + self.g_bias[...]
        x = jnp.concatenate([frames, jnp.broadcast_to(g[:, None], frames.shape)], -1) * mask[..., None]
        return jax.nn.relu(x @ self.a_kernel[...] + self.a_bias[...]) @ self.b_kernel[...] + 1.0

    def __call__(self, h, site: Site):
        ctx = site.ctx
        b, t, g2 = ctx.batch, ctx.frames, ctx.grid ** 2
        if t > self.positions.shape[0] // 2:
            raise ValueError(f"mv_adapter frames={self.positions.shape[0] // 2}: got videos of {t} frames")
        x = h.astype(jnp.float32)
        z = quick_gelu(self.down(x[:, :1 + g2], site)).reshape(b, t, 1 + g2, -1)
        cls, patches = z[:, :, 0], z[:, :, 1:]  # [B, T, m], [B, T, P, m]
        glob = jnp.broadcast_to(self.global_token[...], (b, 1, cls.shape[-1]))
        seq = jnp.concatenate([glob, cls, patches.mean(2)], 1) + self.positions[:2 * t + 1]
        fm = ctx.frame_mask.astype(bool)
        keys = jnp.concatenate([jnp.ones((b, 1), bool), fm, fm], 1)  # padded frames are no keys
        seq = quick_gelu(self.block(_layer_norm(seq, self.ln_scale, self.ln_bias), keys[:, None, :]))
        glob, cls_t, patch_t = seq[:, 0], seq[:, 1:t + 1], seq[:, t + 1:]
        alpha = self.calibration(glob, cls_t + patch_t, fm.astype(jnp.float32))
        up, bias = self.up_kernel[...], self.up_bias[...]
        delta = jnp.concatenate([((alpha * cls_t) @ up + bias)[:, :, None], patches @ up + bias], 2)
        delta = self.scale * delta.reshape(b * t, 1 + g2, -1)
        delta = jnp.pad(delta, ((0, 0), (0, h.shape[1] - 1 - g2), (0, 0)))  # tokens past the patches: none
        return h + delta.astype(h.dtype)


class TextAdapter(Bottleneck):
    """h [N, L, W] (a block's MLP output) -> h + s * up(gelu(block(ln(down(h) + positions)))), causal."""

    def __init__(self, method: "MVAdapter", width: int, tied: bool, *, rngs: nnx.Rngs):
        super().__init__(method, width, method.text_positions, tied, False, rngs=rngs)

    def __call__(self, h, site: Site):
        n = h.shape[1]
        if n > self.positions.shape[0]:
            raise ValueError(f"mv_adapter text_positions={self.positions.shape[0]}: got captions of {n} tokens")
        z = self.down(h.astype(jnp.float32), site) + self.positions[:n]
        z = quick_gelu(self.block(_layer_norm(z, self.ln_scale, self.ln_bias), jnp.tril(jnp.ones((n, n), bool))))
        return h + (self.scale * (z @ self.up_kernel[...] + self.up_bias[...])).astype(h.dtype)


def tying_factors(layers: int, dim: int) -> nnx.List:
    """Cross Modality Tying's shared factors, one [factor_dim] per tied depth, zeros at the start."""
    return nnx.List([_zeros(dim) for _ in range(layers)])


@declare("mv_adapter", AdapterParam, label="MV-Adapter", paper=3.6e6, identity=True,
         minimum={"bottleneck": 1, "heads": 1, "frames": 1, "text_positions": 1, "calibration_dim": 1,
                  "factor_dim": 1, "tied_layers": 0},
         formula="L_v (2 W_v m + W_v + (2 F + 19) m + 13 m^2 + 3 m c + c) + L_t (2 W_t m + W_t + (P + 16) m "
                 "+ 12 m^2) + 2 k (f m + m) + k f",
         note="MV-Adapter's code and MSR-VTT config (m = 64, 2 heads, s = 0.1, CLS calibration, tying in the last 2 "
              "blocks); 3.33 M against the paper's 2.4 % of CLIP (~3.6 M)",
         demo=Demo({"bottleneck": 16}, lr=3e-2, lr_grid=(3e-3, 1e-2, 3e-2, 1e-1)))
@dataclasses.dataclass(frozen=True)
class MVAdapter(Method):
    bottleneck: int = 64  # m
    heads: int = 2
    scale: float = 0.1  # s
    frames: int = 12  # F: the image adapters' position table covers 2 F + 1 tokens
    text_positions: int = 32  # P: the longest caption (tokens) the text adapters' positions cover
    calibration_dim: int = 16  # c
    factor_dim: int = 32  # f
    tied_layers: int = 2  # k: the last k blocks of each tower share a factor

    def __post_init__(self):
        super().__post_init__()
        if self.bottleneck % self.heads:
            raise FieldError("heads", f"mv_adapter bottleneck {self.bottleneck} is not divisible by heads {self.heads}")

    def check(self, cfg) -> None:
        if self.tied_layers > min(cfg.vision_layers, cfg.text_layers):
            raise FieldError("tied_layers", f"mv_adapter tied_layers {self.tied_layers} exceeds the shallower "
                             f"tower's {min(cfg.vision_layers, cfg.text_layers)} layers")

    def count(self, cfg) -> int:
        m, c, f, k = self.bottleneck, self.calibration_dim, self.factor_dim, self.tied_layers
        block = 12 * m * m + 13 * m
        common = lambda w: 2 * w * m + m + w + 2 * m + block  # noqa: E731 - down, up, ln, block
        vision = common(cfg.vision_width) + (2 * self.frames + 1) * m + m + (m * m + m) + (2 * m * c + c) + c * m
        text = common(cfg.text_width) + self.text_positions * m
        return cfg.vision_layers * vision + cfg.text_layers * text + 2 * k * (f * m + m) + k * f

    def _tied(self, layer: int, num_layers: int) -> bool:
        return layer >= num_layers - self.tied_layers

    def block_modules(self, tower, layer, num_layers, width, dtype, rngs):
        adapter = VideoAdapter if tower == "vision" else TextAdapter
        return {"mlp_adapter": adapter(self, width, self._tied(layer, num_layers), rngs=rngs)}

    def clip_modules(self, cfg, rngs):
        return {"tying_factors": tying_factors(self.tied_layers, self.factor_dim)} if self.tied_layers else {}

    def shared(self, modules, ctx, layer):
        if not self._tied(layer, ctx.num_layers):
            return None
        return {"mlp_adapter": modules["tying_factors"][layer - (ctx.num_layers - self.tied_layers)]}
