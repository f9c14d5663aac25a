"""From names, folders and configs to models: the one place a model is assembled from files.

`config.backbone` is resolved once, at the entry point, into a plain `Backbone` value (its folder, its
tokenizer, its architecture), which is passed down to training, evaluation, the data pipeline and the
API. `build_model` reads a backbone folder and a run's trained parameters; `from_config` does so for
a config. Training, evaluation, the API, search and the demo all build their models here.
"""

from __future__ import annotations

import dataclasses
import logging

from flax import nnx

from cma_jax import backbones, checkpoint
from cma_jax import config as config_lib
from cma_jax.errors import CheckpointError
from cma_jax.models import state
from cma_jax.models.clip import CLIPConfig
from cma_jax.models.retrieval import RetrievalModel

log = logging.getLogger(__name__)

EMPTY_BACKBONE = ("config.backbone is empty: set it to a CLIP name (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px; "
                  "downloaded once and cached), a Hugging Face repo id (openai/clip-vit-base-patch32), a .pt file or "
                  "URL, a converted folder, or 'random' (an untrained CLIP: tests and benchmarks only)")


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A resolved backbone: its converted folder (None: randomly initialised), its tokenizer, its architecture."""

    folder: str | None
    tokenizer: str | None
    clip: CLIPConfig

    @classmethod
    def random(cls, clip: CLIPConfig, tokenizer: str | None = None) -> "Backbone":
        """An untrained CLIP of architecture `clip`, asked for on purpose (pre-training, tests): no warning."""
        return cls(None, tokenizer, clip)


def resolve(spec: str, random_clip: CLIPConfig | None = None) -> Backbone:
    """A backbone name / file / URL / folder (anything `config.backbone` takes) -> Backbone.

    'random' needs `random_clip`, the architecture to initialise (logged loudly: a forgotten backbone
    must not go unnoticed). Downloads and conversions happen here (cma_jax.backbones).
    """
    if not spec:
        raise ValueError(EMPTY_BACKBONE)
    if spec == "random":
        if random_clip is None:
            raise ValueError("backbone 'random' needs an architecture (config.model.preset / model.clip.*)")
        log.warning("config.backbone=random: the CLIP backbone is RANDOMLY INITIALISED, not pre-trained "
                    "(fine for tests and benchmarks; retrieval results will be meaningless)")
        return Backbone.random(random_clip)
    folder = backbones.resolve(spec)
    return Backbone(folder, checkpoint.tokenizer_dir(folder), checkpoint.load_backbone_config(folder))


def backbone_from_config(config) -> Backbone:
    """config.backbone resolved, its architecture with config.model's compute settings (dtype, remat).

    The architecture comes from the backbone folder; `config.model.clip.*` overrides must agree with it
    (ValueError naming the field otherwise); `config.model.preset` matters only for 'random'.
    """
    wanted = config_lib.clip_config(config)
    b = resolve(config.backbone, random_clip=wanted)
    if b.folder is None:
        return b
    for field in config_lib.CLIP_FIELDS:
        value = config.model.clip[field]
        if value is not None and value != getattr(b.clip, field):
            raise ValueError(f"config.model.clip.{field}={value}, but backbone {config.backbone} has "
                             f"{field}={getattr(b.clip, field)}: drop the override (the architecture comes from "
                             "the backbone)")
    compute = {f: getattr(wanted, f) for f in CLIPConfig.COMPUTE_FIELDS}
    return dataclasses.replace(b, clip=dataclasses.replace(b.clip, **compute))


def tokenizer(config, backbone) -> str:
    """The tokenizer to use: config.data.tokenizer when set, else the backbone's (ValueError when neither)."""
    if config.data.tokenizer not in ("", "clip"):
        return config.data.tokenizer
    found = backbone.tokenizer if isinstance(backbone, Backbone) else None
    if found is None:
        raise ValueError(f"config.data.tokenizer='' takes the tokenizer/ folder of config.backbone "
                         f"({config.backbone!r}), which has none; set config.data.tokenizer to a Hugging Face CLIP "
                         "tokenizer folder or to OpenAI's bpe_simple_vocab_16e6.txt.gz")
    return found


def build_model(clip_cfg: CLIPConfig | None = None, method=None, *, head: str = "text_conditioned",
                tau: float = 5.0, backbone=None, adapters: str | None = None, dtype: str | None = None,
                seed: int = 0) -> tuple[RetrievalModel, int | None]:
    """(model, step of the loaded trained parameters or None).

    backbone: a Backbone, a backbone folder (`cma_jax.checkpoint.save_backbone`), a RetrievalModel / CLIP
      or a backbone pure dict whose weights are used (shared, not copied), or None for a random init.
      With a folder or module, `clip_cfg` may be None (taken from it); given with a folder, it must
      describe the same architecture.
    method: a peft Method (or AdapterConfig); None with `adapters` = the method they were trained with.
    adapters: a run workdir / checkpoints folder or adapter folder whose trained parameters are loaded.
      Without it, the method's parameters are freshly initialised from `seed`.
    dtype: overrides the compute dtype.
    """
    if isinstance(backbone, Backbone):
        clip_cfg = clip_cfg or backbone.clip
        backbone = backbone.folder
    tree = backbone
    if isinstance(backbone, str):
        saved_cfg = checkpoint.load_backbone_config(backbone)
        if clip_cfg is not None and not saved_cfg.same_architecture(clip_cfg):
            raise CheckpointError(f"backbone {backbone} holds {saved_cfg}, but the model asked for is {clip_cfg}; "
                                  "use the backbone's architecture")
        clip_cfg = clip_cfg or saved_cfg
        tree = checkpoint.load_backbone(backbone)[1]
    elif isinstance(backbone, nnx.Module):
        clip_cfg = clip_cfg or getattr(backbone, "clip", backbone).config
        tree = state.backbone_state(backbone)
    if clip_cfg is None:
        raise ValueError("build_model needs a backbone folder or a clip_cfg")
    if adapters is not None and method is None:
        method = checkpoint.saved_method(adapters)
    model = state.new_model(clip_cfg, method, head=head, tau=tau, backbone=tree, dtype=dtype, seed=seed)
    step = checkpoint.load_adapters(adapters, model) if adapters is not None else None
    return model, step


def from_config(config, backbone=None, adapters: str | None = None) -> tuple[RetrievalModel, int | None]:
    """The model `config` describes: its method (config.method + section), head and seed, on `backbone`
    (a Backbone, or a module / pure dict of config's architecture; None resolves config.backbone),
    with the trained parameters of `adapters` when given."""
    if backbone is None:
        backbone = backbone_from_config(config)
    clip_cfg = backbone.clip if isinstance(backbone, Backbone) else config_lib.clip_config(config)
    return build_model(clip_cfg, config_lib.method(config), head=config.model.head, tau=config.model.tau,
                       backbone=backbone, adapters=adapters, seed=config.seed)
