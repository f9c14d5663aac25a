"""What trains and how: the trainable/frozen split of the model, the train state, the optax optimizer.

The split is a filter on variable *types*, the one the method declares (`Method.trainable`,
cma_jax.models.peft): `AdapterParam` for the adapter methods, `PromptParam` for prompts, `TunedParam`
for the pre-trained weights partial tuning trains, every `nnx.Param` for full fine-tuning.
`logit_scale` stays frozen unless
`train_logit_scale` (then clipped at log(100) after each update, `clamp_logit_scale`); it is the one
parameter picked by its path (`is_logit_scale`), as it has no type of its own. Random-number state
(adapter dropout) is split out separately so it can be carried through the jitted step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from cma_jax.models import peft
from cma_jax.models.params import MethodParam, TunedParam

LOGIT_SCALE = "logit_scale"
MAX_LOGIT_SCALE = float(np.log(100.0))


@struct.dataclass
class TrainState:
    """Everything that changes during training; the frozen weights are passed beside it."""

    params: Any  # nnx.State of the trainable variables
    opt_state: Any
    rngs: Any  # nnx.State of the RNG streams (adapter dropout)
    step: Any  # int32 scalar: updates done

    def checkpointed(self) -> dict:
        """The parts a run checkpoint stores (the step is the checkpoint's own number)."""
        return {"params": self.params, "opt_state": self.opt_state, "rngs": self.rngs}


def is_logit_scale(path) -> bool:
    """True for the path of CLIP's `logit_scale` (jax key paths or nnx paths)."""
    return any(getattr(p, "key", p) == LOGIT_SCALE for p in path)


def trainable_filter(method, train_logit_scale: bool = False):
    """The nnx filter selecting the variables that train under `method` (a peft Method or its name)."""
    method = peft.get(method)() if isinstance(method, str) else method
    if not method.trains:
        raise ValueError(f"method={method.name!r} has no trainable parameters (it is evaluated, not trained)")
    base = method.trainable
    named = nnx.PathContains(LOGIT_SCALE)
    if train_logit_scale:
        return nnx.Any(base, nnx.All(nnx.Param, named))
    return nnx.All(base, nnx.Not(named))


def split(model: nnx.Module, method, train_logit_scale: bool = False):
    """model -> (graphdef, trainable, rngs, frozen) states; `nnx.merge(graphdef, trainable, rngs, frozen)`."""
    return nnx.split(model, trainable_filter(method, train_logit_scale), nnx.RngState, ...)


def clamp_logit_scale(params):
    """A trained logit_scale is clipped at log(100) after every update, as CLIP and the original do."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.minimum(x, MAX_LOGIT_SCALE) if is_logit_scale(path) else x, params)


def _labels(trainable: nnx.State):
    """'head' (peak lr: what a method adds or tunes, logit_scale) or 'backbone' (backbone_lr: full
    fine-tuning's pre-trained weights) per leaf, by variable type."""
    def label(path, v):
        head = isinstance(v, (MethodParam, TunedParam)) or is_logit_scale(path)
        return v.replace("head" if head else "backbone")  # same pytree structure as the params
    return jax.tree_util.tree_map_with_path(label, trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))


def decay_mask(params):
    """Weight decay on matrices only: biases, LayerNorm scales and scalars are never decayed."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def schedule(peak: float, num_steps: int, train) -> optax.Schedule:
    """Linear warmup over the first `train.warmup_fraction` of the steps, then cosine to 0 (or constant)."""
    warmup = int(round(train.warmup_fraction * num_steps))
    if train.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1), 0.0)
    ramp = optax.linear_schedule(0.0, peak, max(warmup, 1))
    return optax.join_schedules([ramp, optax.constant_schedule(peak)], [warmup])


def make_optimizer(train, trainable: nnx.State, num_steps: int):
    """(optax transformation, lr schedule of the adapters) for the trainable state; `train` is config.train.

    AdamW (b1, b2, eps) with decoupled weight decay masked to matrices; global-norm clipping first;
    for method=full the pre-trained weights use `train.backbone_lr`.
    """
    def adamw(peak):
        return optax.adamw(schedule(peak, num_steps, train), b1=train.b1, b2=train.b2, eps=train.eps,
                           weight_decay=train.weight_decay, mask=decay_mask)

    parts = [optax.clip_by_global_norm(train.grad_clip)] if train.grad_clip > 0 else []
    labels = _labels(trainable)
    used = set(jax.tree.leaves(labels))  # {"head"}, {"backbone"} or both
    if used == {"head"}:
        parts.append(adamw(train.lr))
    else:
        parts.append(optax.multi_transform({"head": adamw(train.lr), "backbone": adamw(train.backbone_lr)},
                                           labels))
    return optax.chain(*parts), schedule(train.backbone_lr if used == {"backbone"} else train.lr, num_steps, train)
