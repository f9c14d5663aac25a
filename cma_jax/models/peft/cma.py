"""The Cross-Modal Adapter (the paper's method) and its uni-modal ablation (d_s = 0), as method declarations.

Both put a bottleneck adapter on the attention output and on the MLP output of every block of both
towers (`cma_jax.models.peft.adapter.Adapter`); the Cross-Modal Adapter's up-projections end in `d_s`
dimensions shared by the two towers at each depth (the bank `shared_adapters` on the CLIP module).
"""

from __future__ import annotations

import dataclasses
from flax import nnx

from cma_jax.models.params import AdapterParam
from cma_jax.models.peft.adapter import Adapter, AdapterConfig, SharedBlock, shared_layer_index
from cma_jax.models.peft.base import FieldError, Method, declare


@declare("cma", AdapterParam, label="Cross-Modal Adapter", section="adapter", paper=0.5e6,
         formula="per tower 2 L (W r + r + (r + 1)(W - d_s)) + min(L_v, L_t) * 2 (r d_s + d_s) (shared bank)",
         init_fields=("dropout", "init_std"),
         note="as the original code: truncated-normal init (std init_std) of both projections, zero biases, shared "
              "last d_s dims of every up-projection")
@dataclasses.dataclass(frozen=True)
class CMA(AdapterConfig, Method):

    def check(self, cfg) -> None:
        narrow = min(cfg.vision_width, cfg.text_width)
        if self.share_dim > narrow:
            raise FieldError("share_dim", f"d_s must be in [0, {narrow}]: d_s={self.share_dim} exceeds the "
                             f"narrower tower width {narrow}")

    def count(self, cfg) -> int:
        r, d_s = self.reduction_dim, self.share_dim
        own = sum(2 * layers * (w * r + r + (r + 1) * (w - d_s))
                  for w, layers in ((cfg.vision_width, cfg.vision_layers), (cfg.text_width, cfg.text_layers)))
        shared = min(cfg.vision_layers, cfg.text_layers) * 2 * (r * d_s + d_s) if d_s else 0
        return own + shared

    def block_modules(self, tower, layer, num_layers, width, dtype, rngs):
        return {"attn_adapter": Adapter(width, self, dtype=dtype, rngs=rngs),
                "mlp_adapter": Adapter(width, self, dtype=dtype, rngs=rngs)}

    def clip_modules(self, cfg, rngs):
        if self.share_dim == 0:
            return {}
        n_shared = min(cfg.vision_layers, cfg.text_layers)
        return {"shared_adapters": nnx.List([SharedBlock(self, rngs=rngs) for _ in range(n_shared)])}

    def shared(self, modules, ctx, layer):
        bank = modules.get("shared_adapters")
        if bank is None:
            return None
        entry = bank[shared_layer_index(layer, ctx.num_layers, len(bank))]
        return {"attn_adapter": entry.attn, "mlp_adapter": entry.mlp}


@declare("unimodal", AdapterParam, label="Uni-modal adapters (d_s = 0)", section="adapter",
         formula="per tower 2 L (2 W r + r + W)", init_fields=("dropout", "init_std"),
         config_fields=("reduction_dim", "activation", "dropout", "init_std"),
         note="the Cross-Modal Adapter with d_s = 0: the paper's ablation of sharing")
@dataclasses.dataclass(frozen=True)
class Unimodal(CMA):
    """The paper's ablation: the same adapters with nothing shared (d_s = 0)."""

    share_dim: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.share_dim != 0:
            raise ValueError(f"uni-modal adapters share nothing (d_s = 0), got share_dim={self.share_dim}; "
                             "use method=cma to share")
