"""The one place a retrieval model is built: an architecture, its backbone weights, optional adapters.

Training, evaluation, the API, search and the demo all call `build_model` (or `from_config`, which
reads the config and resolves `config.backbone`). The frozen backbone is the filter
`cma_jax.models.clip.BACKBONE`: every `nnx.Param` that is not an `AdapterParam`.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cma_jax import backbones, checkpoint
from cma_jax import config as config_lib
from cma_jax.errors import CheckpointError, listing
from cma_jax.models.adapter import AdapterConfig
from cma_jax.models.clip import BACKBONE, CLIPConfig
from cma_jax.models.retrieval import RetrievalModel
from cma_jax.trees import flatten

log = logging.getLogger(__name__)


def backbone_state(model) -> dict:
    """The backbone weights of a RetrievalModel or CLIP as a CLIP-level pure dict."""
    return nnx.to_pure_dict(nnx.state(getattr(model, "clip", model), BACKBONE))


def apply_state(model, tree: dict) -> None:
    """Write a backbone or adapter pure dict into a CLIP module in place (or a RetrievalModel's `.clip`).

    Every leaf of the tree must exist in the model with the same shape; the model's other
    variables are left untouched. jax.Arrays (e.g. restored sharded) are used as they are.
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


def build_model(clip_cfg: CLIPConfig | None = None, adapter_cfg: AdapterConfig | None = None, *,
                head: str = "text_conditioned", tau: float = 5.0, backbone=None, adapters: str | None = None,
                dtype: str | None = None, seed: int = 0) -> tuple[RetrievalModel, int | None]:
    """(model, step of the loaded adapters or None).

    backbone: a backbone folder (`cma_jax.checkpoint.save_backbone`), a RetrievalModel / CLIP or a
      backbone pure dict whose weights are copied, or None for a random init (tests, pre-training).
      With a folder, `clip_cfg` may be None (taken from the folder); given, it must describe the same
      architecture.
    adapters: a run workdir / checkpoints folder or adapter folder whose trained parameters are loaded;
      `adapter_cfg` may then be None (read from its metadata). Without it, adapters are freshly
      initialised from `seed`.
    dtype: overrides the compute dtype of `clip_cfg`.
    """
    tree = None
    if isinstance(backbone, str):
        saved_cfg = checkpoint.load_backbone_config(backbone)
        if clip_cfg is not None and not saved_cfg.same_architecture(clip_cfg):
            raise CheckpointError(f"backbone {backbone} holds {saved_cfg}, but the model asked for is {clip_cfg}; "
                                  "set config.model.preset / model.clip.* to match it")
        clip_cfg = clip_cfg or saved_cfg
        tree = checkpoint.load_backbone(backbone)[1]
    elif isinstance(backbone, nnx.Module):
        tree = backbone_state(backbone)
    elif backbone is not None:
        tree = backbone
    if clip_cfg is None:
        raise ValueError("build_model needs a backbone folder or a clip_cfg")
    if dtype is not None:
        clip_cfg = dataclasses.replace(clip_cfg, dtype=dtype)
    if adapters is not None and adapter_cfg is None:
        adapter_cfg = checkpoint.saved_adapter_config(adapters)
    model = RetrievalModel(clip_cfg, adapter_cfg, head=head, tau=tau, rngs=nnx.Rngs(seed))
    if tree is not None:
        apply_state(model, tree)
    step = checkpoint.load_adapters(adapters, model) if adapters is not None else None
    return model, step


# ----------------------------------------------------------------------------- from a config
def resolve_backbone(spec: str) -> str | None:
    """`config.backbone` -> a backbone folder, or None for the explicit `random` (loudly logged)."""
    if not spec:
        raise ValueError("config.backbone is empty: set it to a CLIP name (ViT-B/32, ViT-B/16, ViT-L/14, "
                         "ViT-L/14@336px; downloaded once and cached), a Hugging Face repo id "
                         "(openai/clip-vit-base-patch32), a .pt file or URL, a converted folder, or 'random' "
                         "(an untrained CLIP: tests and benchmarks only)")
    if spec == "random":
        log.warning("config.backbone=random: the CLIP backbone is RANDOMLY INITIALISED, not pre-trained "
                    "(fine for tests, benchmarks and pre-training; retrieval results will be meaningless)")
        return None
    return backbones.resolve(spec)


def from_config(config, *, backbone=None, adapters: str | None = None) -> tuple[RetrievalModel, int | None]:
    """The model `config` describes: `build_model` with config.model / config.adapter, the backbone of
    `config.backbone` (unless `backbone` is given: a folder, module or pure dict), and `adapters`."""
    if backbone is None:
        backbone = resolve_backbone(config.backbone)
    return build_model(config_lib.clip_config(config), config_lib.adapter_config(config), head=config.model.head,
                       tau=config.model.tau, backbone=backbone, adapters=adapters, seed=config.seed)
