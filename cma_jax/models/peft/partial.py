"""Partial tuning (VPT paper's Partial-k): fine-tune the last k blocks of each tower, k = 1 by default.

The pre-trained weights of those blocks become `TunedParam` (they stay backbone weights, loaded from
the backbone folder, and the run checkpoint holds only them); everything else is frozen. The paper's
10.2 M is the last block of both ViT-B/32 towers: 7,087,872 + 3,152,384.
"""

from __future__ import annotations

import dataclasses
from cma_jax.models.params import TunedParam, retype
from cma_jax.models.peft.base import Demo, Method, block_count, declare, within_layers


@declare("partial", TunedParam, label="Partial", formula="k (12 W_v^2 + 13 W_v + 12 W_t^2 + 13 W_t)",
         paper=10.2e6, identity=True, minimum={"num_blocks": 1},
         note="VPT's Partial-1: the last block of both towers (attention, MLP, both LayerNorms)",
         demo=Demo(lr=3e-3, lr_grid=(3e-4, 1e-3, 3e-3, 1e-2)))
@dataclasses.dataclass(frozen=True)
class Partial(Method):
    num_blocks: int = 1  # k

    def check(self, cfg) -> None:
        within_layers(self, "num_blocks", cfg)

    def count(self, cfg) -> int:
        return self.num_blocks * (block_count(cfg.vision_width) + block_count(cfg.text_width))

    def retype(self, clip) -> None:
        for tower in (clip.visual.transformer, clip.transformer):
            for block in tower.resblocks[len(tower.resblocks) - self.num_blocks:]:
                retype(block, TunedParam)
