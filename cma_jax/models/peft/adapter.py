"""The Cross-Modal Adapter: a bottleneck whose up-projection is partly shared across towers.

On a sub-layer output h (attention or MLP, before the residual add) of a tower of width W, the adapter is
`A(h) = h + up(act(down(h)))` (down: W -> r, up: r -> W). The last `share_dim` (d_s) output dimensions of `up`
come from a `SharedUp` owned by the CLIP model and passed in at call time, so the image and text adapters at
the same depth and position (attention with attention, MLP with MLP) use the very same weights. d_s = 0 gives
plain uni-modal adapters; d_s = W leaves the tower no unique part of `up`. docs/method.md has the method and
how towers of different depth share.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cma_jax.models.activations import ACTIVATIONS
from cma_jax.models.params import AdapterParam
from cma_jax.models.peft.base import Site



@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    reduction_dim: int = 8  # r
    share_dim: int = 16  # d_s
    activation: str = "quick_gelu"
    dropout: float = 0.0
    init_std: float = 0.01

    def __post_init__(self):
        if self.reduction_dim < 1:
            raise ValueError(f"adapter reduction_dim (r) must be >= 1, got {self.reduction_dim}")
        if self.share_dim < 0:
            raise ValueError(f"adapter share_dim (d_s) must be >= 0, got {self.share_dim}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"adapter activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        if self.init_std < 0:
            raise ValueError(f"adapter init_std must be >= 0, got {self.init_std}")


def shared_layer_index(layer: int, num_layers: int, num_shared: int) -> int:
    """Which entry of the shared bank layer `layer` of a `num_layers`-deep tower uses: `layer * num_shared //
    num_layers`, the bank having min(L_image, L_text) entries (ViT-L/14: image layers 2k, 2k+1 share text layer k)."""
    return layer * num_shared // num_layers


def truncated_normal(rngs: nnx.Rngs, shape, std: float) -> jax.Array:
    """std * N(0, 1) truncated at 2 std (the original code's `trunc_normal_`), float32."""
    return std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)


class SharedUp(nnx.Module):
    """The shared slice of `up` for one (depth, position): r -> d_s."""

    def __init__(self, cfg: AdapterConfig, *, rngs: nnx.Rngs):
        self.kernel = AdapterParam(truncated_normal(rngs, (cfg.reduction_dim, cfg.share_dim), cfg.init_std))
        self.bias = AdapterParam(jnp.zeros((cfg.share_dim,), jnp.float32))


class SharedBlock(nnx.Module):
    """The two shared slices of one depth: after attention and after the MLP."""

    def __init__(self, cfg: AdapterConfig, *, rngs: nnx.Rngs):
        self.attn = SharedUp(cfg, rngs=rngs)
        self.mlp = SharedUp(cfg, rngs=rngs)


class Adapter(nnx.Module):
    """One tower's adapter at one (depth, position); `shared` is given at call time."""

    def __init__(self, width: int, cfg: AdapterConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.share_dim > width:
            raise ValueError(f"adapter share_dim (d_s={cfg.share_dim}) exceeds the tower width {width}")
        r, unique = cfg.reduction_dim, width - cfg.share_dim
        self.dtype = dtype
        self.share_dim = cfg.share_dim
        self.activation = cfg.activation
        self.down_kernel = AdapterParam(truncated_normal(rngs, (width, r), cfg.init_std))
        self.down_bias = AdapterParam(jnp.zeros((r,), jnp.float32))
        if unique > 0:
            self.up_kernel = AdapterParam(truncated_normal(rngs, (r, unique), cfg.init_std))
            self.up_bias = AdapterParam(jnp.zeros((unique,), jnp.float32))
        else:
            self.up_kernel = self.up_bias = None
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout > 0 else None

    def __call__(self, h: jax.Array, site: Site) -> jax.Array:
        """A(h); `site.shared`: this position's SharedUp (d_s > 0); dropout draws from the adapter's own RNG
        stream unless `site.key` is given."""
        dt = self.dtype
        z = h.astype(dt) @ self.down_kernel[...].astype(dt) + self.down_bias[...].astype(dt)
        z = ACTIVATIONS[self.activation](z)
        if self.dropout is not None:
            z = self.dropout(z, rngs=site.key)
        parts = []
        if self.up_kernel is not None:
            parts.append(z @ self.up_kernel[...].astype(dt) + self.up_bias[...].astype(dt))
        if self.share_dim > 0:
            shared = site.shared
            parts.append(z @ shared.kernel[...].astype(dt) + shared.bias[...].astype(dt))
        up = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
        return h + up.astype(h.dtype)
