"""What trains and how: the trainable/frozen split of the model and the optax optimizer.

The split is a filter on variable *types*: `AdapterParam` for the Cross-Modal Adapter (method=cma),
every `nnx.Param` for full fine-tuning (method=full). `logit_scale` stays frozen unless
`config.model.train_logit_scale` (then clipped at log(100) after each update, see
`cma_jax.train`); it is the one parameter picked by its path, as it has no type of its own.
Random-number state (adapter dropout) is split out separately so it can be carried through the
jitted step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cma_jax.models.adapter import AdapterParam

LOGIT_SCALE = nnx.PathContains("logit_scale")


def trainable_filter(config):
    """The nnx filter selecting the variables that train under config.method."""
    if config.method == "cma":
        base = AdapterParam
    elif config.method == "full":
        base = nnx.Param
    else:
        raise ValueError(f"config.method={config.method!r} has no trainable parameters")
    if config.model.train_logit_scale:
        return nnx.Any(base, nnx.All(nnx.Param, LOGIT_SCALE))
    return nnx.All(base, nnx.Not(LOGIT_SCALE))


def split(model: nnx.Module, config):
    """model -> (graphdef, trainable, rngs, frozen) states; `nnx.merge(graphdef, trainable, rngs, frozen)`."""
    return nnx.split(model, trainable_filter(config), nnx.RngState, ...)


def _labels(trainable: nnx.State):
    """'head' (peak lr: adapters, logit_scale) or 'backbone' (backbone_lr) per leaf, by variable type."""
    def label(path, v):
        head = isinstance(v, AdapterParam) or "logit_scale" in [getattr(p, "key", None) for p in path]
        return v.replace("head" if head else "backbone")  # same pytree structure as the params
    return jax.tree_util.tree_map_with_path(label, trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))


def decay_mask(params):
    """Weight decay on matrices only: biases, LayerNorm scales and scalars are never decayed."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def schedule(peak: float, num_steps: int, config) -> optax.Schedule:
    """Linear warmup over the first warmup_fraction of the steps, then cosine to 0 (or constant)."""
    warmup = int(round(config.train.warmup_fraction * num_steps))
    if config.train.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1), 0.0)
    ramp = optax.linear_schedule(0.0, peak, max(warmup, 1))
    return optax.join_schedules([ramp, optax.constant_schedule(peak)], [warmup])


def make_optimizer(config, trainable: nnx.State, num_steps: int):
    """(optax transformation, lr schedule of the adapters) for the trainable state.

    AdamW (b1, b2, eps of the config) with decoupled weight decay masked to matrices; global-norm
    clipping first; for method=full the pre-trained weights use train.backbone_lr.
    """
    t = config.train

    def adamw(peak):
        return optax.adamw(schedule(peak, num_steps, config), b1=t.b1, b2=t.b2, eps=t.eps,
                           weight_decay=t.weight_decay, mask=decay_mask)

    parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
    labels = _labels(trainable)
    used = set(jax.tree.leaves(labels))  # {"head"}, {"backbone"} or both
    if used == {"head"}:
        parts.append(adamw(t.lr))
    else:
        parts.append(optax.multi_transform({"head": adamw(t.lr), "backbone": adamw(t.backbone_lr)},
                                           labels))
    return optax.chain(*parts), schedule(t.backbone_lr if used == {"backbone"} else t.lr, num_steps, config)


def count(state) -> int:
    """Number of scalars in a state / pytree."""
    return int(sum(jnp.size(x) for x in jax.tree.leaves(state)))
