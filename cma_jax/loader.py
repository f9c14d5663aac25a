"""From names, folders and configs to models: the one place a model is assembled from files.

The model factories of a config (`method`, `clip_config`) and `config.backbone` resolved into a plain
`Backbone` value (its folder, its tokenizer, its architecture): what `cma_jax.run.resolve` calls once at an
entry point. `build_model` reads a backbone folder and a run's trained parameters; `from_run` does so for a
run. Training, evaluation, the API, search and the demo all build their models here.
"""

from __future__ import annotations

import dataclasses
import logging

from flax import nnx

from cma_jax import backbones, checkpoint
from cma_jax import config as config_lib
from cma_jax.errors import CheckpointError
from cma_jax.models import clip as clip_lib
from cma_jax.models import peft, state
from cma_jax.models.clip import CLIPConfig
from cma_jax.models.retrieval import RetrievalModel

log = logging.getLogger(__name__)

EMPTY_BACKBONE = ("config.backbone is empty: set it to a CLIP name (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px; "
                  "downloaded once and cached), a Hugging Face repo id (openai/clip-vit-base-patch32), a .pt file or "
                  "URL, a converted folder, or 'random' (an untrained CLIP: tests and benchmarks only)")


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A resolved backbone: its converted folder (None: randomly initialised), its tokenizer, its architecture;
    `weights`: its pure dict when loaded once for several models to share (`with_weights`), else read from the
    folder by each model built on it."""

    folder: str | None
    tokenizer: str | None
    clip: CLIPConfig
    weights: dict | None = dataclasses.field(default=None, repr=False, compare=False)

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


def with_weights(backbone: Backbone) -> Backbone:
    """The backbone with its weights loaded once, shared (not copied) by every model built on it (the demo's runs)."""
    return dataclasses.replace(backbone, weights=checkpoint.load_backbone_params(backbone.folder))


def method(config) -> peft.Method:
    """The fine-tuning method `config.method` with its hyper-parameters from `config.<section>`."""
    if config.method not in peft.METHODS:
        raise ValueError(f"config.method: expected one of {tuple(peft.METHODS)}, got {config.method!r}")
    cls = peft.get(config.method)
    fields = {f: config[cls.section][f] for f in config_lib.config_fields(cls)} if cls.section else {}
    try:
        return cls(**fields)
    except (ValueError, TypeError) as e:
        raise config_lib.named_error(e, {f: f"{cls.section}.{f}" for f in fields}, cls.section or "method") from None


def clip_config(config) -> CLIPConfig:
    """The CLIPConfig the config describes (preset + overrides + compute settings)."""
    overrides = {f: config.model.clip[f] for f in config_lib.CLIP_FIELDS if config.model.clip[f] is not None}
    compute = {f: config.model[f] for f in CLIPConfig.COMPUTE_FIELDS if f in config.model}
    try:
        return clip_lib.preset(config.model.preset, **compute, **overrides)
    except (ValueError, TypeError) as e:
        paths = {**{f: f"model.{f}" for f in compute}, **{f: f"model.clip.{f}" for f in overrides}}
        raise config_lib.named_error(e, paths, "model") from None


def backbone_from_config(config, wanted: CLIPConfig) -> Backbone:
    """config.backbone resolved, its architecture with the compute settings (dtype, remat) of `wanted`
    (`clip_config(config)`, the architecture of 'random').

    The architecture comes from the backbone folder; `config.model.clip.*` overrides must agree with it
    (ValueError naming the field otherwise); `config.model.preset` matters only for 'random'.
    """
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


def tokenizer(config, backbone: Backbone) -> str | None:
    """The tokenizer to use: config.data.tokenizer when set ('' and 'clip' mean the backbone's), else the
    backbone's tokenizer/ folder; None when neither has one (`require_tokenizer` says so where one is needed)."""
    if config.data.tokenizer not in ("", "clip"):
        return config.data.tokenizer
    return backbone.tokenizer


def require_tokenizer(run) -> str:
    """The run's tokenizer, for a step that tokenizes captions (ValueError naming the field when it has none)."""
    if run.tokenizer is None:
        raise ValueError(f"config.data.tokenizer='' takes the tokenizer/ folder of config.backbone "
                         f"({run.config.backbone!r}), which has none; set config.data.tokenizer to a Hugging Face CLIP "
                         "tokenizer folder or to OpenAI's bpe_simple_vocab_16e6.txt.gz")
    return run.tokenizer


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
    tree = backbone
    if isinstance(backbone, Backbone):  # resolved once: its architecture is known, only weights are read
        clip_cfg = clip_cfg or backbone.clip
        tree = backbone.weights
        if tree is None and backbone.folder is not None:
            tree = checkpoint.load_backbone_params(backbone.folder)
    elif isinstance(backbone, str):
        saved_cfg = checkpoint.load_backbone_config(backbone)
        if clip_cfg is not None and not saved_cfg.same_architecture(clip_cfg):
            raise CheckpointError(f"backbone {backbone} holds {saved_cfg}, but the model asked for is {clip_cfg}; "
                                  "use the backbone's architecture")
        clip_cfg = clip_cfg or saved_cfg
        tree = checkpoint.load_backbone_params(backbone)
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


def from_run(run, adapters: str | None = None) -> tuple[RetrievalModel, int | None]:
    """The model a run describes (`cma_jax.run.Run`): its method, head and seed on its backbone, with the
    trained parameters of `adapters` when given."""
    c = run.config
    return build_model(run.backbone.clip, run.method, head=c.model.head, tau=c.model.tau, backbone=run.backbone,
                       adapters=adapters, seed=c.seed)
