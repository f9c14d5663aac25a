"""MaPLe (Khattak et al., CVPR 2023): deep language prompts whose linear couplings produce the vision prompts.

As muzairkhattak/multimodal-prompt-learning (trainers/maple.py MultiModalPromptLearner, clip/model.py
ResidualAttentionBlock_MaPLe): `num_tokens` text prompts per layer for the first `depth` layers,
N(0, 0.02^2), after the start token and replacing it deeper down; the vision prompts of layer i are
`coupling_i(text prompts of layer i)`, a W_t -> W_v linear map, appended after the patches and
replacing them deeper down. The couplings have PyTorch's Linear init, and those of layers 1.. start
as identical copies (MaPLe's `_get_clones`). The paper's 4.8 M needs all 12 layers (depth 12; the
code's default 9 gives 3.6 M; depth 0 = every layer), with its default 2 tokens: 4,740,096.
"""

from __future__ import annotations

import dataclasses
import jax.numpy as jnp
from flax import nnx

from cma_jax.models.params import PromptParam
from cma_jax.models.peft import prompts
from cma_jax.models.peft.base import Demo, Method, declare, torch_linear, within_layers


class Couplings(nnx.Module):
    """Per layer, the linear map from its text prompts to its vision prompts: kernel [D, W_t, W_v], bias [D, W_v]."""

    def __init__(self, depth: int, din: int, dout: int, *, rngs: nnx.Rngs):
        first = torch_linear(rngs, din, dout, PromptParam)
        deeper = torch_linear(rngs, din, dout, PromptParam)  # one draw, cloned for every deeper layer
        kernels = [first[0][...]] + [deeper[0][...]] * (depth - 1)
        biases = [first[1][...]] + [deeper[1][...]] * (depth - 1)
        self.kernel = PromptParam(jnp.stack(kernels))
        self.bias = PromptParam(jnp.stack(biases))

    def __call__(self, text: jnp.ndarray) -> jnp.ndarray:  # text prompts [D, n, W_t] -> [D, n, W_v]
        return jnp.einsum("dnt,dtv->dnv", text, self.kernel[...]) + self.bias[...][:, None]


@declare("maple", PromptParam, label="MaPLe", formula="D (n W_t + W_t W_v + W_v)", paper=4.8e6,
         minimum={"num_tokens": 1, "depth": 0},
         note="MaPLe's couplings, init and placement; depth 12 (its code's default is 9) to reach the paper's 4.8 M",
         demo=Demo({"num_tokens": 2}, lr=3e-2, lr_grid=(3e-3, 1e-2, 3e-2, 1e-1)))
@dataclasses.dataclass(frozen=True)
class MaPLe(Method):
    num_tokens: int = 2  # n
    depth: int = 0  # D: layers with prompts (both towers), from the first; 0 = every layer (12 at ViT-B)

    def check(self, cfg) -> None:
        within_layers(self, "depth", cfg)

    def _depth(self, cfg) -> int:
        return self.depth or min(cfg.vision_layers, cfg.text_layers)

    def count(self, cfg) -> int:
        wt, wv = cfg.text_width, cfg.vision_width
        return self._depth(cfg) * (self.num_tokens * wt + wt * wv + wv)

    def extra_text_tokens(self) -> int:
        return self.num_tokens

    def clip_modules(self, cfg, rngs):
        depth = self._depth(cfg)
        text = prompts.normal(rngs, (depth, self.num_tokens, cfg.text_width))
        return {"prompts": prompts.Prompts(text=text),
                "couplings": Couplings(depth, cfg.text_width, cfg.vision_width, rngs=rngs)}

    def _vision(self, modules) -> jnp.ndarray:
        return modules["couplings"](modules["prompts"].text[...])  # [D, n, W_v]

    def embed(self, modules, ctx, x):
        if ctx.tower == "text":
            return prompts.embed_deep(modules, "text", x)
        return prompts.append_vision(x, self._vision(modules)[0])

    def layer_input(self, modules, ctx, layer, x):
        if layer == 0 or layer >= modules["couplings"].kernel.shape[0]:
            return x
        if ctx.tower == "text":
            return prompts.layer_deep(modules, "text", layer, x)
        return prompts.replace_vision(x, self._vision(modules)[layer])
