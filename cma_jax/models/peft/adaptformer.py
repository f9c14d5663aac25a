"""AdaptFormer (Chen et al., NeurIPS 2022): a scaled bottleneck in parallel with the MLP, in both towers.

As ShoufaChen/AdaptFormer (models/peft/adapter.py Adapter, its Block with ffn_option="parallel"): the
adapter reads the residual stream after attention (not through ln_2), `s * up(relu(down(x)))` is
added to the MLP's output, s = 0.1 fixed; "lora" init: down as PyTorch's Linear, up and both biases
zero, so the model starts as the frozen CLIP; no LayerNorm; dropout after the ReLU (0 by default: the
video models' setting). The paper's 2.0 M is r = 64 (the code's default) in every block of both towers.
"""

from __future__ import annotations

import dataclasses
import math
import jax
import jax.numpy as jnp
from flax import nnx

from cma_jax.models.params import AdapterParam
from cma_jax.models.peft.adapter_attn import BOTH_TOWERS, both_towers_count
from cma_jax.models.peft.base import Demo, FieldError, Method, Site, declare


class ParallelAdapter(nnx.Module):
    """x [N, S, W] -> s * up(dropout(relu(down(x)))) [N, S, W]."""

    def __init__(self, width: int, r: int, scale: float, dropout: float, *, dtype, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(width)
        self.down_kernel = AdapterParam(jax.random.uniform(rngs.params(), (width, r), jnp.float32, -bound, bound))
        self.down_bias = AdapterParam(jnp.zeros((r,), jnp.float32))
        self.up_kernel = AdapterParam(jnp.zeros((r, width), jnp.float32))
        self.up_bias = AdapterParam(jnp.zeros((width,), jnp.float32))
        self.scale = scale
        self.dtype = dtype
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def __call__(self, x, site: Site):
        dt = self.dtype
        z = jax.nn.relu(x.astype(dt) @ self.down_kernel[...].astype(dt) + self.down_bias[...].astype(dt))
        if self.dropout is not None:
            z = self.dropout(z, rngs=site.key)
        up = z @ self.up_kernel[...].astype(dt) + self.up_bias[...].astype(dt)
        return (self.scale * up).astype(x.dtype)


@declare("adaptformer", AdapterParam, label="AdaptFormer", formula=BOTH_TOWERS, paper=2.0e6, identity=True,
         init_fields=("dropout",), minimum={"reduction_dim": 1},
         note="AdaptFormer's parallel adapter, s = 0.1, its LoRA-style init; r = 64 gives 1.98 M",
         demo=Demo({"reduction_dim": 16}, lr=1e-1, lr_grid=(3e-3, 1e-2, 3e-2, 1e-1, 3e-1)))
@dataclasses.dataclass(frozen=True)
class AdaptFormer(Method):
    reduction_dim: int = 64  # r
    scale: float = 0.1  # s
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise FieldError("dropout", f"adaptformer dropout must be in [0, 1), got {self.dropout}")

    def count(self, cfg) -> int:
        return both_towers_count(cfg, self.reduction_dim)

    def block_modules(self, tower, layer, num_layers, width, dtype, rngs):
        return {"parallel_adapter": ParallelAdapter(width, self.reduction_dim, self.scale, self.dropout, dtype=dtype,
                                                    rngs=rngs)}
