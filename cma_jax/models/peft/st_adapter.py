"""ST-Adapter (Pan et al., NeurIPS 2022): a spatio-temporal adapter in the image tower, across a video's frames.

As linziyi96/st-adapter (models_adapter.py Adapter): on the patch tokens of every frame (CLS passes
unchanged), `x + fc2(conv(fc1(x)))` with a depthwise 3-D convolution over (frames, height, width),
kernel (k, 1, 1): temporal only, zero-padded; no activation; conv and both biases zero-initialised
(fc1 and fc2 weights as PyTorch's Linear), so the model starts as the frozen CLIP. The adapter sits on
the residual stream before attention (`position="attn"`, the paper's placement and this issue's) or
before the MLP (`"mlp"`, the code's Kinetics preset). Padded frames are zeroed before the convolution,
so they act as its zero padding and never change a real frame. The paper's 7.2 M is r = 384 in all
12 blocks of ViT-B/32: 7,110,144 with the (3, 1, 1) kernel.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
from flax import nnx

from cma_jax.models.params import AdapterParam
from cma_jax.models.peft.base import Demo, FieldError, Method, Site, declare, torch_linear


class STAdapter(nnx.Module):
    """x [B*T, 1 + g*g (+ more), W] -> x with its patch tokens adapted across the T frames of each video."""

    def __init__(self, width: int, r: int, kernel: int, *, dtype, rngs: nnx.Rngs):
        self.fc1_kernel, _ = torch_linear(rngs, width, r, AdapterParam, bias=False)
        self.fc1_bias = AdapterParam(jnp.zeros((r,), jnp.float32))
        self.conv_kernel = AdapterParam(jnp.zeros((kernel, r), jnp.float32))  # depthwise, temporal taps
        self.conv_bias = AdapterParam(jnp.zeros((r,), jnp.float32))
        self.fc2_kernel, _ = torch_linear(rngs, r, width, AdapterParam, bias=False)
        self.fc2_bias = AdapterParam(jnp.zeros((width,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array, site: Site) -> jax.Array:
        ctx = site.ctx
        dt, b, t, g2 = self.dtype, ctx.batch, ctx.frames, ctx.grid ** 2
        patches = x[:, 1:1 + g2]
        z = patches.astype(dt) @ self.fc1_kernel[...].astype(dt) + self.fc1_bias[...].astype(dt)
        z = z.reshape(b, t, g2, -1) * ctx.frame_mask.astype(dt)[:, :, None, None]  # padded frames: zeros
        k = self.conv_kernel.shape[0]
        padded = jnp.pad(z, ((0, 0), (k // 2, k - 1 - k // 2), (0, 0), (0, 0)))
        w = self.conv_kernel[...].astype(dt)
        z = sum(padded[:, j:j + t] * w[j] for j in range(k)) + self.conv_bias[...].astype(dt)
        out = z.reshape(b * t, g2, -1) @ self.fc2_kernel[...].astype(dt) + self.fc2_bias[...].astype(dt)
        return jnp.concatenate([x[:, :1], patches + out.astype(x.dtype), x[:, 1 + g2:]], axis=1)


@declare("st_adapter", AdapterParam, label="ST-Adapter", formula="L_v (2 W_v r + (k + 2) r + W_v)", paper=7.2e6,
         identity=True, minimum={"reduction_dim": 1},
         note="ST-Adapter's module and init, before attention in every image block, kernel (3, 1, 1); "
                             "r = 384 gives 7.11 M (the paper's 7.2 M may use a larger kernel)",
         demo=Demo({"reduction_dim": 32}, lr=3e-2, lr_grid=(3e-3, 1e-2, 3e-2, 1e-1)))
@dataclasses.dataclass(frozen=True)
class STAdapterMethod(Method):
    reduction_dim: int = 384  # r, the adapter's channels
    kernel_size: int = 3  # k, temporal taps
    position: str = "attn"  # "attn": before attention; "mlp": before the MLP

    def __post_init__(self):
        super().__post_init__()
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise FieldError("kernel_size", f"st_adapter kernel_size must be odd and >= 1, got {self.kernel_size}")
        if self.position not in ("attn", "mlp"):
            raise FieldError("position", f"st_adapter position must be 'attn' or 'mlp', got {self.position!r}")

    def count(self, cfg) -> int:
        r, w = self.reduction_dim, cfg.vision_width
        return cfg.vision_layers * (2 * w * r + (self.kernel_size + 2) * r + w)

    def block_modules(self, tower, layer, num_layers, width, dtype, rngs):
        if tower != "vision":
            return {}
        slot = "pre_adapter" if self.position == "attn" else "mid_adapter"
        return {slot: STAdapter(width, self.reduction_dim, self.kernel_size, dtype=dtype, rngs=rngs)}
