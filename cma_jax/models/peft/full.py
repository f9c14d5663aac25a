"""The two ends of the comparison: zero-shot CLIP (nothing trains) and full fine-tuning (everything trains)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from flax import nnx

from cma_jax.models.peft.base import Method, backbone_count


@dataclasses.dataclass(frozen=True)
class ZeroShot(Method):
    name: ClassVar[str] = "zero_shot"
    label: ClassVar[str] = "Zero-shot CLIP"
    identity_at_init: ClassVar[bool] = True
    paper_note: ClassVar[str] = "the frozen CLIP, evaluated as it is (mode=eval)"


@dataclasses.dataclass(frozen=True)
class Full(Method):
    name: ClassVar[str] = "full"
    trainable: ClassVar = nnx.Param
    identity_at_init: ClassVar[bool] = True
    paper_count: ClassVar[float] = 123.5e6
    label: ClassVar[str] = "Full fine-tuning (CLIP4Clip)"
    formula: ClassVar[str] = "every CLIP weight but logit_scale"
    paper_note: ClassVar[str] = ("CLIP4Clip: the pre-trained weights at train.backbone_lr; the paper's 123.5 M "
                                 "counts fewer weights than CLIP has (it is not a formula we could reproduce)")

    def count(self, cfg) -> int:
        return backbone_count(cfg) - 1  # logit_scale stays frozen unless model.train_logit_scale
