"""Projection tuning (from the VPT paper's baselines): train only the two towers' output projections.

`visual.proj` (W_v x E) and `text_projection` (W_t x E) become `TunedParam`; the paper's 0.7 M is
768 x 512 + 512 x 512 = 655,360 at ViT-B/32.
"""

from __future__ import annotations

import dataclasses
from cma_jax.models.params import TunedParam
from cma_jax.models.peft.base import Demo, Method, declare


@declare("projection", TunedParam, label="Projection", formula="W_v E + W_t E", paper=0.7e6, identity=True,
         note="the two output projections, nothing else",
         demo=Demo(lr=1e-2, lr_grid=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2)))
@dataclasses.dataclass(frozen=True)
class Projection(Method):

    def count(self, cfg) -> int:
        return (cfg.vision_width + cfg.text_width) * cfg.embed_dim

    def retype(self, clip) -> None:
        clip.visual.proj = TunedParam(clip.visual.proj[...])
        clip.text_projection = TunedParam(clip.text_projection[...])
