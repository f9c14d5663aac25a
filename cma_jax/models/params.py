"""The variable types that say what trains: every "which parameters train" decision filters on these.

`MethodParam` is a parameter a fine-tuning method adds to CLIP (adapters, prompts, couplings); it is
never part of the backbone. `TunedParam` is a pre-trained backbone weight that a method trains
(the last blocks for `partial`, the output projections for `projection`): it stays in the backbone,
loaded from it like every other weight, but the optimizer updates it.
"""

from __future__ import annotations

from flax import nnx


class MethodParam(nnx.Param):
    """A parameter added by a fine-tuning method (not in the pre-trained backbone)."""


class AdapterParam(MethodParam):
    """A bottleneck adapter's parameter (Cross-Modal Adapter, uni-modal and the other adapter baselines)."""


class PromptParam(MethodParam):
    """A prompt method's parameter: prompt tokens and what generates them (MaPLe's couplings, VoP's generators)."""


class TunedParam(nnx.Param):
    """A pre-trained backbone weight that the method trains."""


BACKBONE = nnx.All(nnx.Param, nnx.Not(MethodParam))  # the pre-trained CLIP weights (TunedParam included)


def retype(module: nnx.Module, to: type[nnx.Param]) -> None:
    """Re-type, in place, every plain `nnx.Param` of `module` and its submodules as `to` (values kept)."""
    for _, sub in nnx.iter_modules(module):
        for name, value in list(vars(sub).items()):
            if type(value) is nnx.Param:  # noqa: E721 - exactly the plain type, not a subclass
                setattr(sub, name, to(value[...]))
