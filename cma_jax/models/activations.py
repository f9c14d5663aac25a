"""The activation functions of CLIP's MLPs and of the methods' modules, by name (one definition each)."""

from __future__ import annotations

import jax


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}
