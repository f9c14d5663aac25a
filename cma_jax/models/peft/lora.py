"""LoRA (Hu et al., ICLR 2022): a low-rank update of chosen projections, foldable into the weights afterwards.

As microsoft/LoRA (loralib) and HF PEFT (tuners/lora): on a projection y = x W + b, LoRA adds
`(alpha / r) * dropout(x) A B` with A [d_in, r] drawn as PyTorch's kaiming_uniform(a=sqrt(5)) (U(-1/sqrt(d_in),
1/sqrt(d_in))) and B [r, d_out] zero, so the model starts as the frozen CLIP. The targets are CLIP's named
sub-layers: `q`, `k`, `v` (the thirds of the fused attn.in_proj: LoRA on each part, as loralib's
MergedLinear with enable_lora), `out` (out_proj), `mlp_in`, `mlp_out` (c_fc, c_proj); by default q and v, as
the LoRA paper. `merge` folds every update into its weight (W + (alpha / r) A B, the same columns of in_proj),
giving a plain backbone: `python -m cma_jax.convert merge`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cma_jax.models.params import MethodParam
from cma_jax.models.peft.base import Demo, FieldError, Method, Site, declare, torch_linear

TARGETS = ("q", "k", "v", "out", "mlp_in", "mlp_out")
# (d_in, d_out) of each target in units of the tower width W.
SHAPES = {"q": (1, 1), "k": (1, 1), "v": (1, 1), "out": (1, 1), "mlp_in": (1, 4), "mlp_out": (4, 1)}
TOWER_CHOICES = ("both", "vision", "text")


class LoRAParam(MethodParam):
    """A LoRA factor (A or B)."""


class LoRA(nnx.Module):
    """At a sub-layer y = x W + b (x = site.input): y + scaling * dropout(x) A B."""

    def __init__(self, din: int, dout: int, rank: int, scaling: float, dropout: float, *, dtype, rngs: nnx.Rngs):
        self.a, _ = torch_linear(rngs, din, rank, LoRAParam, bias=False)
        self.b = LoRAParam(jnp.zeros((rank, dout), jnp.float32))
        self.scaling = scaling
        self.dtype = dtype
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def __call__(self, y: jax.Array, site: Site) -> jax.Array:
        dt, x = self.dtype, site.input
        if self.dropout is not None:
            x = self.dropout(x, rngs=site.key)
        update = (x.astype(dt) @ self.a[...].astype(dt)) @ self.b[...].astype(dt)
        return y + (self.scaling * update).astype(y.dtype)

    def delta(self) -> jax.Array:
        """The update of the weight, [d_in, d_out] float32: scaling * A B."""
        return self.scaling * (self.a[...] @ self.b[...])


@declare("lora", LoRAParam, label="LoRA", identity=True, init_fields=("dropout",),
         minimum={"rank": 1},
         formula="r (d_in + d_out) per target and block of the chosen towers (q, k, v, out: 2 W; mlp_in, mlp_out: 5 W)",
         note="loralib / HF PEFT's init (A kaiming-uniform, B zero), scaling alpha / r; q and v of both towers, "
              "r = 8 gives 0.49 M; foldable into the weights (python -m cma_jax.convert merge)",
         demo=Demo(lr=3e-2, lr_grid=(3e-3, 1e-2, 3e-2, 1e-1)))
@dataclasses.dataclass(frozen=True)
class LoRAMethod(Method):
    rank: int = 8  # r
    alpha: float = 8.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the sub-layer's input, LoRA branch only
    targets: tuple[str, ...] = ("q", "v")
    towers: str = "both"  # "both", "vision" or "text"

    def __post_init__(self):
        super().__post_init__()
        bad = sorted(set(self.targets) - set(TARGETS))
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise FieldError("targets", f"lora targets must be distinct names among {TARGETS}, got {self.targets}")
        if self.towers not in TOWER_CHOICES:
            raise FieldError("towers", f"lora towers must be one of {TOWER_CHOICES}, got {self.towers!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise FieldError("dropout", f"lora dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def _towers(self) -> tuple[str, ...]:
        return ("vision", "text") if self.towers == "both" else (self.towers,)

    def count(self, cfg) -> int:
        per_width = sum(sum(SHAPES[t]) for t in self.targets)  # (d_in + d_out) / W
        sizes = {"vision": cfg.vision_layers * cfg.vision_width, "text": cfg.text_layers * cfg.text_width}
        return self.rank * per_width * sum(sizes[t] for t in self._towers())

    def block_modules(self, tower, layer, num_layers, width, dtype, rngs):
        if tower not in self._towers():
            return {}
        return {t: LoRA(SHAPES[t][0] * width, SHAPES[t][1] * width, self.rank, self.scaling, self.dropout,
                        dtype=dtype, rngs=rngs) for t in self.targets}

    def merge(self, clip) -> None:
        """Fold every update into the weight it updates (in place); the LoRA modules stay (use the backbone)."""
        for transformer in (clip.visual.transformer, clip.transformer):
            for block in transformer.resblocks:
                for t in self.targets:
                    lora = getattr(block, "on_" + t)
                    if lora is None:
                        continue
                    if t in ("q", "k", "v"):
                        kernel = block.attn.in_proj.kernel
                        w = kernel.shape[0]
                        i = "qkv".index(t) * w
                        kernel[...] = kernel[...].at[:, i:i + w].add(lora.delta())
                    else:
                        linear = {"out": block.attn.out_proj, "mlp_in": block.mlp.c_fc, "mlp_out": block.mlp.c_proj}[t]
                        linear.kernel[...] = linear.kernel[...] + lora.delta()
