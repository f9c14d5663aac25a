"""The method layer: every fine-tuning method of the paper's comparison, one module each, by name.

`METHODS[name]` is a method's declaration class (`cma_jax.models.peft.base.Method`); an instance
holds its hyper-parameters. `config.method=NAME` selects one; the model, the optimizer's mask,
checkpoints, counts, evaluation, search, the demo and the tests all follow from the declaration.
A new method is its own file and one line here (or `register(cls)` from elsewhere: a test's method).
"""

from __future__ import annotations

import dataclasses

from cma_jax.models.peft.adapter import AdapterConfig
from cma_jax.models.peft.adapter_attn import AdapterAttn
from cma_jax.models.peft.adaptformer import AdaptFormer
from cma_jax.models.peft.base import Method
from cma_jax.models.peft.cma import CMA, Unimodal
from cma_jax.models.peft.coop import CoOp
from cma_jax.models.peft.full import Full, ZeroShot
from cma_jax.models.peft.lora import LoRAMethod
from cma_jax.models.peft.maple import MaPLe
from cma_jax.models.peft.mv_adapter import MVAdapter
from cma_jax.models.peft.partial import Partial
from cma_jax.models.peft.projection import Projection
from cma_jax.models.peft.st_adapter import STAdapterMethod
from cma_jax.models.peft.vl_prompt import VLPrompt
from cma_jax.models.peft.vop import VoP
from cma_jax.models.peft.vpt import VPT

# The paper's table order: the two ends, partial tuning, prompts, adapters, then the ablation and the method;
# then the methods added since.
METHODS: dict[str, type[Method]] = {m.name: m for m in (
    ZeroShot, Full, Partial, Projection, CoOp, VPT, VLPrompt, MaPLe, VoP, AdapterAttn, AdaptFormer, STAdapterMethod,
    Unimodal, CMA,
    LoRAMethod, MVAdapter)}


def register(cls: type[Method]) -> type[Method]:
    """Add a declared method to METHODS (after those there); its name must be new."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or taken; taken: {tuple(METHODS)}")
    METHODS[cls.name] = cls
    return cls


def get(name: str) -> type[Method]:
    """The declaration class of method `name` (ValueError naming the methods there are)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {tuple(METHODS)}")
    return METHODS[name]


def make(name: str, fields: dict | None = None) -> Method:
    """Method `name` with the hyper-parameters `fields` (missing ones take the method's defaults)."""
    cls = get(name)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields or {}) - set(known))
    if unknown:
        raise ValueError(f"method {name} has no field(s) {unknown}; its fields: {known or 'none'}")
    return cls(**(fields or {}))


def as_method(method) -> Method:
    """A Method as it is; None as zero-shot (plain CLIP); an AdapterConfig as the Cross-Modal Adapter."""
    if method is None:
        return ZeroShot()
    if isinstance(method, Method):
        return method
    if isinstance(method, AdapterConfig):
        return CMA(**dataclasses.asdict(method))
    raise TypeError(f"not a fine-tuning method: {method!r}")
