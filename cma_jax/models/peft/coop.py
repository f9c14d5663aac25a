"""CoOp (Zhou et al., IJCV 2022): learned context vectors before the caption's tokens, text tower only.

Placement and init as its code (KaiyangZhou/CoOp, trainers/coop.py PromptLearner): one generic
context of `num_tokens` vectors (not class-specific), N(0, 0.02^2), right after the start token and
before the positional embedding is added, so they get text positions and every word attends to them.
The paper's 0.002 M is 4 context vectors (CoOp's own default is 16).
"""

from __future__ import annotations

import dataclasses
from cma_jax.models.params import PromptParam
from cma_jax.models.peft import prompts
from cma_jax.models.peft.base import Demo, Method, declare


@declare("coop", PromptParam, label="CoOp", formula="n W_t", paper=0.002e6, minimum={"num_tokens": 1},
         note="generic context after the start token, N(0, 0.02^2), text positions (CoOp's PromptLearner); n = 4 "
              "gives the paper's 0.002 M",
         demo=Demo({"num_tokens": 2}, lr=3e-1, lr_grid=(3e-3, 1e-2, 3e-2, 1e-1, 3e-1)))
@dataclasses.dataclass(frozen=True)
class CoOp(Method):
    num_tokens: int = 4  # n

    def count(self, cfg) -> int:
        return self.num_tokens * cfg.text_width

    def extra_text_tokens(self) -> int:
        return self.num_tokens

    def clip_modules(self, cfg, rngs):
        return {"prompts": prompts.Prompts(text=prompts.normal(rngs, (1, self.num_tokens, cfg.text_width)))}

    def embed(self, modules, ctx, x):
        return prompts.embed_deep(modules, ctx.tower, x)
