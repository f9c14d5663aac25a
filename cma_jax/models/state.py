"""Weights into models: a new RetrievalModel, backbone trees copied in or out, trained trees written in.

Pure model code (no files): reading backbone folders and run checkpoints is `cma_jax.loader`'s job.
The backbone is the filter `cma_jax.models.params.BACKBONE`: every `nnx.Param` that is not a
method's own parameter (`MethodParam`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cma_jax.errors import listing
from cma_jax.models.clip import CLIPConfig
from cma_jax.models.params import BACKBONE
from cma_jax.models.retrieval import RetrievalModel
from cma_jax.trees import flatten


def backbone_state(model) -> dict:
    """The backbone weights of a RetrievalModel or CLIP as a CLIP-level pure dict."""
    return nnx.to_pure_dict(nnx.state(getattr(model, "clip", model), BACKBONE))


def apply_state(model, tree: dict) -> None:
    """Write a backbone or trained pure dict into a CLIP module in place (or a RetrievalModel's `.clip`).

    Every leaf of the tree must exist in the model with the same shape; the model's other
    variables are left untouched. jax.Arrays (e.g. restored sharded) are used as they are, so
    models built from one tree share its arrays.
    """
    clip = getattr(model, "clip", model)
    tree = tree["clip"] if set(tree) == {"clip"} else tree  # a RetrievalModel-level tree
    wanted = nnx.state(clip, nnx.Param)
    have = {k: tuple(np.shape(v)) for k, v in flatten(nnx.to_pure_dict(wanted)).items()}
    given = flatten(tree)
    unexpected = [k for k in given if k not in have]
    bad = [f"{k} {tuple(np.shape(v))} (model has {have[k]})" for k, v in given.items()
           if k in have and tuple(np.shape(v)) != have[k]]
    if unexpected or bad:
        raise listing("parameter tree for this model", unexpected=unexpected, bad_shapes=bad)
    updates = []
    for path, var in nnx.to_flat_state(wanted):
        dotted = ".".join(str(p) for p in path)
        if dotted in given:
            value = given[dotted]
            if not isinstance(value, jax.Array):
                value = jnp.asarray(value, jnp.float32)
            updates.append((path, var.replace(value)))
    nnx.update(clip, nnx.from_flat_state(updates))


def new_model(clip_cfg: CLIPConfig, method=None, *, head: str = "text_conditioned", tau: float = 5.0,
              backbone=None, dtype: str | None = None, seed: int = 0) -> RetrievalModel:
    """A RetrievalModel of `clip_cfg` with `method`'s modules freshly initialised from `seed`.

    backbone: None (random init: tests, pre-training), a RetrievalModel / CLIP or a backbone pure
    dict whose weights are copied in (the arrays are shared, not duplicated). dtype overrides the
    compute dtype.
    """
    if dtype is not None:
        clip_cfg = dataclasses.replace(clip_cfg, dtype=dtype)
    model = RetrievalModel(clip_cfg, method, head=head, tau=tau, rngs=nnx.Rngs(seed))
    if isinstance(backbone, nnx.Module):
        backbone = backbone_state(backbone)
    if backbone is not None:
        apply_state(model, backbone)
    return model
