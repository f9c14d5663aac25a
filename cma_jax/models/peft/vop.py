"""VoP (Huang et al., CVPR 2023): text prompts and context-specific video prompts; its VoP^C variant.

VoP's code is unreleased; this follows its paper (arXiv 2211.12764). Text: deep prompts, `text_tokens`
per layer in every layer (its Eq. 3), placed after the start token (the paper says only "prepended").
Video: `vision_tokens` prompts per layer in every layer (its Eq. 4), of which `generated_tokens` are
made per frame from the video's context and the rest are learned per layer (VoP^C: "the generated
prompts replace 4 of the 8"); the context is the frames' CLS tokens at that layer's input, read by
a one-layer bidirectional LSTM over the video's frames (its default Context Modeling Module), and an
FC layer stretches each frame's context into its prompt tokens; the LSTM and the FC are shared by
every layer. The sizes are where we chose: the paper names neither, and LSTM hidden size = the vision
width with PyTorch's two LSTM biases and FC 2h -> 4 W reproduce its 14.3 M (VoP's Table 1) exactly:
14,257,152 at ViT-B/32. Init: prompts N(0, 0.02^2), the LSTM and FC as PyTorch's defaults. Padded
frames are skipped by the LSTM (it carries its state across them), so they never change a real frame.
"""

from __future__ import annotations

import dataclasses
import math
import jax
import jax.numpy as jnp
from flax import nnx

from cma_jax.models.params import PromptParam
from cma_jax.models.peft import prompts
from cma_jax.models.peft.base import Demo, FieldError, Method, declare, torch_linear


class LSTMDirection(nnx.Module):
    """One direction of PyTorch's nn.LSTM (gates i, f, g, o; biases b_ih and b_hh), U(-1/sqrt(h), 1/sqrt(h))."""

    def __init__(self, din: int, hidden: int, *, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(hidden)

        def u(shape):
            return PromptParam(jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound))
        self.w_ih, self.w_hh = u((din, 4 * hidden)), u((hidden, 4 * hidden))
        self.b_ih, self.b_hh = u((4 * hidden,)), u((4 * hidden,))

    def __call__(self, x: jax.Array, mask: jax.Array, reverse: bool) -> jax.Array:
        """x [B, T, D], mask [B, T] -> hidden states [B, T, h]; masked steps keep the state and output 0."""
        b, h = x.shape[0], self.w_hh.shape[0]
        inputs = x @ self.w_ih[...] + self.b_ih[...] + self.b_hh[...]  # [B, T, 4h], every step at once

        def step(carry, xs):
            hid, cell = carry
            z, m = xs
            i, f, g, o = jnp.split(z + hid @ self.w_hh[...], 4, axis=-1)
            new_cell = jax.nn.sigmoid(f) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
            new_hid = jax.nn.sigmoid(o) * jnp.tanh(new_cell)
            m = m[:, None]
            return (jnp.where(m, new_hid, hid), jnp.where(m, new_cell, cell)), jnp.where(m, new_hid, 0.0)

        zeros = jnp.zeros((b, h), jnp.float32)
        _, out = jax.lax.scan(step, (zeros, zeros), (inputs.swapaxes(0, 1), mask.swapaxes(0, 1)), reverse=reverse)
        return out.swapaxes(0, 1)


class ContextPrompts(nnx.Module):
    """VoP^C's Context Modeling Module (a BiLSTM over a video's frame CLS tokens) and its prompt FC."""

    def __init__(self, width: int, hidden: int, tokens: int, *, rngs: nnx.Rngs):
        self.forward = LSTMDirection(width, hidden, rngs=rngs)
        self.backward = LSTMDirection(width, hidden, rngs=rngs)
        self.fc_kernel, self.fc_bias = torch_linear(rngs, 2 * hidden, tokens * width, PromptParam)
        self.tokens = tokens

    def __call__(self, cls: jax.Array, mask: jax.Array) -> jax.Array:
        """cls [B, T, W] (float32), mask [B, T] -> per-frame prompt tokens [B, T, k, W]."""
        ctx = jnp.concatenate([self.forward(cls, mask, False), self.backward(cls, mask, True)], axis=-1)
        out = ctx @ self.fc_kernel[...] + self.fc_bias[...]
        return out.reshape(cls.shape[:2] + (self.tokens, cls.shape[-1]))


@declare("vop", PromptParam, label="VoP", paper=14.3e6,
         minimum={"text_tokens": 1, "vision_tokens": 1, "generated_tokens": 1, "hidden": 0},
         formula="L_t n_t W_t + L_v (n_v - k) W_v + 2 (4 h (W_v + h) + 8 h) + (2 h + 1) k W_v (h = LSTM width)",
         note="VoP^C from its paper (code unreleased): 8 + 8 deep prompts, 4 video prompts per frame from a shared "
              "BiLSTM + FC over the frames' CLS tokens; sizes chosen to give its 14.3 M",
         demo=Demo({"text_tokens": 2}, lr=1e-2, lr_grid=(3e-3, 1e-2, 3e-2)))
@dataclasses.dataclass(frozen=True)
class VoP(Method):
    text_tokens: int = 8  # n_t
    vision_tokens: int = 8  # n_v, per frame and layer
    generated_tokens: int = 4  # k of the n_v, made from the video's context
    hidden: int = 0  # h, the LSTM's width per direction; 0 = the vision width

    def __post_init__(self):
        super().__post_init__()
        if self.generated_tokens > self.vision_tokens:
            raise FieldError("generated_tokens", f"vop generated_tokens ({self.generated_tokens}) must be <= "
                             f"vision_tokens ({self.vision_tokens})")

    def _hidden(self, cfg) -> int:
        return self.hidden or cfg.vision_width

    def count(self, cfg) -> int:
        wv, h, k = cfg.vision_width, self._hidden(cfg), self.generated_tokens
        general = cfg.vision_layers * (self.vision_tokens - k) * wv
        lstm = 2 * (4 * h * (wv + h) + 8 * h)
        return cfg.text_layers * self.text_tokens * cfg.text_width + general + lstm + (2 * h + 1) * k * wv

    def extra_text_tokens(self) -> int:
        return self.text_tokens

    def clip_modules(self, cfg, rngs):
        general = self.vision_tokens - self.generated_tokens
        vision = prompts.normal(rngs, (cfg.vision_layers, general, cfg.vision_width)) if general else None
        text = prompts.normal(rngs, (cfg.text_layers, self.text_tokens, cfg.text_width))
        return {"prompts": prompts.Prompts(vision=vision, text=text),
                "context": ContextPrompts(cfg.vision_width, self._hidden(cfg), self.generated_tokens, rngs=rngs)}

    def _video_prompts(self, modules, ctx, layer: int, x: jax.Array) -> jax.Array:
        """[B*T, n_v, W]: the layer's learned prompts, then those made from this video's frames at this layer."""
        cls = x[:, 0].astype(jnp.float32).reshape(ctx.batch, ctx.frames, -1)
        made = modules["context"](cls, ctx.frame_mask).reshape((x.shape[0], self.generated_tokens, -1))
        general = modules["prompts"].vision
        if general is None:
            return made
        general = jnp.broadcast_to(general[layer], (x.shape[0],) + general.shape[1:])
        return jnp.concatenate([general, made], axis=1)

    def embed(self, modules, ctx, x):
        if ctx.tower == "text":
            return prompts.embed_deep(modules, "text", x)
        return prompts.append_vision(x, self._video_prompts(modules, ctx, 0, x))

    def layer_input(self, modules, ctx, layer, x):
        if ctx.tower == "text":
            return prompts.layer_deep(modules, "text", layer, x)
        if layer == 0:
            return x
        return prompts.replace_vision(x, self._video_prompts(modules, ctx, layer, x))
