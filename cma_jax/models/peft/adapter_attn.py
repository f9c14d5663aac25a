"""Adapter-ATTN: a bottleneck adapter after the attention of every block, in both towers (Houlsby et al., 2019).

As google-research/adapter-bert (`feedforward_adapter`): on the attention output, before the
residual add, `h + up(gelu(down(h)))`, both projections truncated-normal with a small std (1e-3:
near-identity), zero biases; the same module as the Cross-Modal Adapter's with nothing shared and no
adapter after the MLP. (VoP's table describes its Adapter-ATTN as parallel to attention, He et al.
2022; the count is the same, and the Cross-Modal Adapter authors' variant is not public: we follow
the issue's "after attention".) The paper's 2.0 M is r = 64 (0.5 M, r = 16, in its image table).
"""

from __future__ import annotations

import dataclasses
from cma_jax.models.params import AdapterParam
from cma_jax.models.peft.adapter import ACTIVATIONS, Adapter, AdapterConfig
from cma_jax.models.peft.base import Demo, FieldError, Method, bottleneck_count, declare

BOTH_TOWERS = "L_v (2 W_v r + r + W_v) + L_t (2 W_t r + r + W_t)"  # one bottleneck per block of both towers


@declare("adapter_attn", AdapterParam, label="Adapter-ATTN", formula=BOTH_TOWERS, paper=2.0e6,
         init_fields=("init_std",), minimum={"reduction_dim": 1},
         note="Houlsby's sequential adapter on the attention output, GELU, trunc-normal std 1e-3; r = 64 gives 1.98 M",
         demo=Demo({"reduction_dim": 16}, lr=1e-2, lr_grid=(3e-3, 1e-2, 3e-2)))
@dataclasses.dataclass(frozen=True)
class AdapterAttn(Method):
    reduction_dim: int = 64  # r
    activation: str = "gelu"
    init_std: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        if self.activation not in ACTIVATIONS:
            raise FieldError("activation", f"adapter_attn activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.activation!r}")

    def count(self, cfg) -> int:
        return both_towers_count(cfg, self.reduction_dim)

    def block_modules(self, tower, layer, num_layers, width, dtype, rngs):
        cfg = AdapterConfig(self.reduction_dim, 0, self.activation, 0.0, self.init_std)
        return {"attn_adapter": Adapter(width, cfg, dtype=dtype, rngs=rngs)}


def both_towers_count(cfg, r: int) -> int:
    """One width -> r -> width bottleneck with biases in every block of both towers."""
    return (cfg.vision_layers * bottleneck_count(cfg.vision_width, r)
            + cfg.text_layers * bottleneck_count(cfg.text_width, r))
