"""The two ends of the comparison: zero-shot CLIP (nothing trains) and full fine-tuning (everything trains)."""

from __future__ import annotations

import dataclasses
from flax import nnx

from cma_jax.models.peft.base import Method, backbone_count, declare


@declare("zero_shot", label="Zero-shot CLIP", identity=True, note="the frozen CLIP, evaluated as it is (mode=eval)")
@dataclasses.dataclass(frozen=True)
class ZeroShot(Method):
    pass


@declare("full", nnx.Param, label="Full fine-tuning (CLIP4Clip)", formula="every CLIP weight but logit_scale",
         paper=123.5e6, identity=True,
         note="CLIP4Clip: the pre-trained weights at train.backbone_lr; the paper's 123.5 M counts fewer weights than "
              "CLIP has (it is not a formula we could reproduce)")
@dataclasses.dataclass(frozen=True)
class Full(Method):

    def count(self, cfg) -> int:
        return backbone_count(cfg) - 1  # logit_scale stays frozen unless model.train_logit_scale
