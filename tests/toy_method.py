"""A throwaway method declared in one file outside the package: what the contract "a method is one file" asks.

(IA)^3-style rescaling (Liu et al., 2022): learned per-channel vectors, ones at the start, multiply the
outputs of chosen named sub-layers of every block of both towers (`targets`, default the attention's k
and v and the MLP's c_proj), with dropout on the scaled output. Registered by the tests only
(`peft.register(ToyScale)`); nothing in cma_jax names it.
"""

import dataclasses

import jax.numpy as jnp
from flax import nnx

from cma_jax.models.params import MethodParam
from cma_jax.models.peft.base import SUBLAYERS, Demo, FieldError, Method, Site, declare


class ToyParam(MethodParam):
    """The toy method's own variable type: what trains."""


class Scale(nnx.Module):
    """y [N, S, W] -> dropout(y * scale), scale [W] starting at ones."""

    def __init__(self, width: int, dropout: float, *, rngs: nnx.Rngs):
        self.scale = ToyParam(jnp.ones((width,), jnp.float32))
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def __call__(self, y, site: Site):
        y = y * self.scale[...].astype(y.dtype)
        return y if self.dropout is None else self.dropout(y, rngs=site.key)


WIDTHS = {"q": 1, "k": 1, "v": 1, "out": 1, "mlp_in": 4, "mlp_out": 1, "ln_1": 1, "ln_2": 1}  # x the width


@declare("toy_scale", ToyParam, label="Toy (IA)^3 scaling", formula="sum over targets of (width of its output) L",
         identity=True, init_fields=("dropout",), demo=Demo({"targets": ("v", "mlp_out")}))
@dataclasses.dataclass(frozen=True)
class ToyScale(Method):
    targets: tuple[str, ...] = ("k", "v", "mlp_out")
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        unknown = sorted(set(self.targets) - set(SUBLAYERS))
        if unknown or not self.targets:
            raise FieldError("targets", f"toy_scale targets must be some of {SUBLAYERS}, got {self.targets}")

    def count(self, cfg) -> int:
        per_width = sum(WIDTHS[t] for t in self.targets)
        return per_width * (cfg.vision_layers * cfg.vision_width + cfg.text_layers * cfg.text_width)

    def block_modules(self, tower, layer, num_layers, width, dtype, rngs):
        return {t: Scale(WIDTHS[t] * width, self.dropout, rngs=rngs) for t in self.targets}
