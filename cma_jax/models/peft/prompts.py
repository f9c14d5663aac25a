"""What the prompt methods share: prompt tensors, and where their tokens enter the two towers.

Text: the first layer's prompts are inserted right after the start token, before the positional
embedding is added (CoOp, MaPLe); deeper layers' prompts replace the outputs at those positions at
the layer's input (deep prompting). Vision: the first layer's prompts are appended after the patches,
after the positional embedding and before ln_pre (MaPLe and IVLP's CLIP code; VPT puts them right
after CLS, which is the same function: attention is permutation-equivariant and prompts get no
positional embedding), and deeper layers' prompts replace the last tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cma_jax.models.params import PromptParam


def normal(rngs: nnx.Rngs, shape, std: float = 0.02) -> PromptParam:
    """Prompts drawn from N(0, std^2) (CoOp, IVLP, MaPLe: std 0.02)."""
    return PromptParam(std * jax.random.normal(rngs.params(), shape, jnp.float32))


def uniform(rngs: nnx.Rngs, shape, bound: float) -> PromptParam:
    """Prompts drawn from U(-bound, bound) (VPT's Xavier-style init)."""
    return PromptParam(jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound))


def _batched(p: jax.Array, n: int, dtype) -> jax.Array:
    """Prompts [k, W] shared by the n sequences, or already per sequence [n, k, W]."""
    p = p.astype(dtype)
    return jnp.broadcast_to(p, (n,) + p.shape) if p.ndim == 2 else p


def insert_text(x: jax.Array, p: jax.Array) -> jax.Array:
    """x [N, L, W] -> [N, L + k, W] with the prompts p [k, W] right after the start token."""
    return jnp.concatenate([x[:, :1], _batched(p, x.shape[0], x.dtype), x[:, 1:]], axis=1)


def replace_text(x: jax.Array, p: jax.Array) -> jax.Array:
    """The k positions after the start token replaced by p [k, W] (deeper layers)."""
    k = p.shape[-2]
    return jnp.concatenate([x[:, :1], _batched(p, x.shape[0], x.dtype), x[:, 1 + k:]], axis=1)


def append_vision(x: jax.Array, p: jax.Array) -> jax.Array:
    """x [N, 1 + g*g, W] -> [N, 1 + g*g + k, W] with the prompts p [k, W] (or [N, k, W]) after the patches."""
    return jnp.concatenate([x, _batched(p, x.shape[0], x.dtype)], axis=1)


def replace_vision(x: jax.Array, p: jax.Array) -> jax.Array:
    """The last k tokens replaced by p [k, W] or [N, k, W] (deeper layers)."""
    k = p.shape[-2]
    return jnp.concatenate([x[:, :-k], _batched(p, x.shape[0], x.dtype)], axis=1)


class Prompts(nnx.Module):
    """Prompt tensors per tower, [depth, k, W] each (None for a tower without prompts)."""

    def __init__(self, vision: PromptParam | None = None, text: PromptParam | None = None):
        self.vision = vision
        self.text = text


def tower_prompts(modules: dict, tower: str):
    return getattr(modules["prompts"], tower)


def embed_deep(modules: dict, tower: str, x: jax.Array) -> jax.Array:
    """The first layer's prompts of `tower` (if it has any) enter the sequence."""
    p = tower_prompts(modules, tower)
    if p is None:
        return x
    return insert_text(x, p[0]) if tower == "text" else append_vision(x, p[0])


def layer_deep(modules: dict, tower: str, layer: int, x: jax.Array) -> jax.Array:
    """Deep prompting: block `layer` >= 1 gets that layer's prompts (while the prompt depth lasts)."""
    p = tower_prompts(modules, tower)
    if p is None or layer == 0 or layer >= p.shape[0]:
        return x
    return replace_text(x, p[layer]) if tower == "text" else replace_vision(x, p[layer])


def deep_count(width: int, tokens: int, depth: int) -> int:
    return width * tokens * depth
