"""VL-Prompt: independent deep prompts in both towers (IVLP, the baseline of MaPLe's code).

As muzairkhattak/multimodal-prompt-learning (trainers/independentVL.py, clip/model.py
ResidualAttentionBlock_IVLP): text prompts after the start token, vision prompts after the patches,
each N(0, 0.02^2), deeper layers replacing them, no coupling between the towers. The paper's 0.08 M
is 5 tokens per tower in all 12 layers: 76,800 (IVLP's own default, 2 tokens in 9 layers, is 0.023 M).
"""

from __future__ import annotations

import dataclasses
from cma_jax.models.params import PromptParam
from cma_jax.models.peft import prompts
from cma_jax.models.peft.base import Demo, Method, declare


@declare("vl_prompt", PromptParam, label="VL-Prompt", formula="n_v W_v D + n_t W_t D", paper=0.08e6,
         minimum={"vision_tokens": 1, "text_tokens": 1, "depth": 0},
         note="IVLP's placement and init; 5 + 5 tokens in all 12 layers give 0.077 M",
         demo=Demo({"text_tokens": 2}, lr=3e-2, lr_grid=(3e-3, 1e-2, 3e-2, 1e-1)))
@dataclasses.dataclass(frozen=True)
class VLPrompt(Method):
    vision_tokens: int = 5
    text_tokens: int = 5
    depth: int = 0  # layers with prompts, from the first; 0 = every layer

    def _depths(self, cfg) -> tuple[int, int]:
        return (min(self.depth or cfg.vision_layers, cfg.vision_layers),
                min(self.depth or cfg.text_layers, cfg.text_layers))

    def count(self, cfg) -> int:
        dv, dt = self._depths(cfg)
        return (prompts.deep_count(cfg.vision_width, self.vision_tokens, dv)
                + prompts.deep_count(cfg.text_width, self.text_tokens, dt))

    def extra_text_tokens(self) -> int:
        return self.text_tokens

    def clip_modules(self, cfg, rngs):
        dv, dt = self._depths(cfg)
        return {"prompts": prompts.Prompts(vision=prompts.normal(rngs, (dv, self.vision_tokens, cfg.vision_width)),
                                           text=prompts.normal(rngs, (dt, self.text_tokens, cfg.text_width)))}

    def embed(self, modules, ctx, x):
        return prompts.embed_deep(modules, ctx.tower, x)

    def layer_input(self, modules, ctx, layer, x):
        return prompts.layer_deep(modules, ctx.tower, layer, x)
