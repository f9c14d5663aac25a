"""VPT (Jia et al., ECCV 2022): learned prompt tokens in the image tower; deep by default.

As its code (KMnP/vpt, src/models/vit_prompt/vit.py PromptedTransformer): `num_tokens` prompts per
layer, U(-v, v) with v = sqrt(6 / (3 p^2 + W)) (p the patch size), entering after the positional
embedding; deep prompting gives every layer its own prompts, replacing the previous layer's outputs
at those positions (VPT-deep); `deep=False` is VPT-shallow (the first layer only). The paper's
0.05 M is 5 tokens (VPT's default) in all 12 layers of ViT-B/32: 46,080.
"""

from __future__ import annotations

import dataclasses
import math
from cma_jax.models.params import PromptParam
from cma_jax.models.peft import prompts
from cma_jax.models.peft.base import Demo, Method, declare


@declare("vpt", PromptParam, label="VPT", formula="n W_v L_v (deep) or n W_v (shallow)", paper=0.05e6,
         minimum={"num_tokens": 1},
         note="VPT-deep (its code's init and replacement), appended after the patches (the same function as after "
              "CLS); n = 5 in all layers gives 0.046 M",
         demo=Demo(lr=3e-2, lr_grid=(3e-3, 1e-2, 3e-2, 1e-1)))
@dataclasses.dataclass(frozen=True)
class VPT(Method):
    num_tokens: int = 5  # n
    deep: bool = True

    def _depth(self, cfg) -> int:
        return cfg.vision_layers if self.deep else 1

    def count(self, cfg) -> int:
        return prompts.deep_count(cfg.vision_width, self.num_tokens, self._depth(cfg))

    def clip_modules(self, cfg, rngs):
        bound = math.sqrt(6.0 / (3 * cfg.vision_patch_size ** 2 + cfg.vision_width))
        shape = (self._depth(cfg), self.num_tokens, cfg.vision_width)
        return {"prompts": prompts.Prompts(vision=prompts.uniform(rngs, shape, bound))}

    def embed(self, modules, ctx, x):
        return prompts.embed_deep(modules, ctx.tower, x)

    def layer_input(self, modules, ctx, layer, x):
        return prompts.layer_deep(modules, ctx.tower, layer, x)
