"""The one place every config field is defined, with its default, and checked (`validate`, once, at the entry
point): dataset configs start from `base_config()` and change values only; only the free-form `extra` section
takes fields not created here; the model's own dataclasses check their values, and messages name the config path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

import ml_collections
from ml_collections import config_dict

from cma_jax.models import clip as clip_lib
from cma_jax.models import peft
from cma_jax.models.retrieval import HEADS
from cma_jax.sharding import mesh_shape

MODES = ("train", "eval", "train_and_eval")
METHODS = tuple(peft.METHODS)
SCHEDULES = ("cosine", "constant")
# CLIPConfig fields that a config may override (compute settings are model.dtype / model.remat).
CLIP_FIELDS = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
               "context_length", "vocab_size", "text_width", "text_heads", "text_layers")
RENAMED = {"backbone_checkpoint": "backbone"}  # old field -> new field
# What a resumed run must share with the run that saved (the training objective and data); logging,
# saving and evaluation knobs may change between runs. The method and its fields are checked apart
# (they define the trained weights: cma_jax.checkpoint).
TRAINING_FIELDS = {
    "train": ("batch_size", "epochs", "num_steps", "lr", "backbone_lr", "b1", "b2", "eps", "weight_decay",
              "schedule", "warmup_fraction", "grad_clip", "grad_accum_steps"),
    "data": ("name", "builder_config", "train_split", "num_frames", "max_words", "fps"),
}
# Fields that say where things are or how a run reports, not what it computes: the same run moved to
# another folder, or logged more often, gives the same result (the demo's reuse key leaves them out).
PLACE_FIELDS = ("backbone", "adapter_checkpoint", "data.data_dir", "data.tokenizer", "data.workers",
                "data.frame_cache", "train.progress_bar", "train.log_every_steps", "train.save_every_steps",
                "train.keep_checkpoints")


def _schema() -> dict:
    """Every field as (default, meaning), sections as dicts: the one source of `base_config()` (the defaults) and
    `field_meanings()` (what `python -m cma_jax.main --print_config` prints). Built afresh at each call."""
    return {
        "mode": ("train_and_eval", "train | eval | train_and_eval"),
        "method": ("cma", "the fine-tuning method: a name of cma_jax.models.peft.METHODS (cma, unimodal, full, "
                          "zero_shot with mode=eval, ...; docs/methods.md)"),
        "seed": (0, "seeds the trained parameters' initialisation, the data order and dropout"),
        "backbone": ("", "the pre-trained CLIP: a name (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px: OpenAI's "
                         "weights, downloaded once and cached), a Hugging Face repo id (openai/clip-vit-base-patch32"
                         "[@revision]), a .pt URL or file, a Hugging Face folder, a converted folder, or 'random' "
                         "(tests/benchmarks only); '' is an error, so that adapters never train on a random CLIP by "
                         "accident (docs/backbones.md)"),
        "adapter_checkpoint": ("", "mode=eval: a run checkpoint (a workdir or its checkpoints/ folder) to take the "
                                   "trained parameters from; '' = the workdir's latest run checkpoint"),
        "model": {
            "preset": ("vit_b32", "the CLIP architecture: vit_b32 | vit_b16 | vit_l14 | vit_l14_336"),
            "clip": {f: (config_dict.placeholder(int), f"overrides the preset's CLIPConfig.{f}; unset = the "
                                                       "preset's") for f in CLIP_FIELDS},
            "dtype": ("float32", "compute dtype (float32 | bfloat16); parameters stay float32"),
            "remat": ("none", "rematerialisation of each transformer block in the backward pass: none | block "
                              "(recompute everything) | dots (keep matmul outputs)"),
            "head": ("text_conditioned", "the video-text similarity: text_conditioned (the paper's) | meanp"),
            "tau": (5.0, "temperature of the text-conditioned frame weights"),
            "train_logit_scale": (False, "train CLIP's logit scale (capped at log 100); frozen with the backbone "
                                         "by default, as in the original"),
        },
        # One section per method with hyper-parameters (config.adapter: r, d_s, ... of cma and unimodal;
        # config.vpt, ...), their defaults from the method's declaration in cma_jax/models/peft/.
        **{section: {f: (default, f"a hyper-parameter of method {' / '.join(_section_methods(section))} "
                                  f"(docs/methods.md)") for f, default in fields.items()}
           for section, fields in method_sections().items()},
        "data": {
            "name": ("msrvtt", "the dataset: a builder of cma_jax.data.builders (msrvtt, msvd, vatex, activitynet, "
                               "didemo, flickr30k, mscoco, synthetic)"),
            "builder_config": ("", "the builder's config (e.g. 9k | 7k for msrvtt, with -<N>px, -<F>fps, -q<Q> "
                                   "suffixes); '' = its first"),
            "data_dir": ("", "TFDS data dir holding the built datasets; '' = TFDS's default (~/tensorflow_datasets)"),
            "train_split": ("train", "the split training reads"),
            "eval_split": ("test", "the split evaluation reads"),
            "num_frames": (12, "T: frames sampled uniformly per video"),
            "max_words": (32, "L: tokens per caption, start and end included"),
            "fps": (1, "frames per second of the stored frames; recorded with the run, so that the API and "
                       "search decode new videos the same way"),
            "tokenizer": ("", "'' = the backbone's tokenizer; or a BPE file, a Hugging Face tokenizer folder or "
                              "a word list"),
            "workers": (0, "grain worker processes reading the data (0 = in-process)"),
            "frame_cache": ("", "decoded-frame cache read instead of decoding the JPEGs (same batches): '' = off, "
                                "'auto' = beside the TFDS data, or a local folder; built ahead by "
                                "python -m cma_jax.data.frame_cache (docs/data.md)"),
        },
        "train": {
            "batch_size": (128, "global batch (all processes), per optimizer update"),
            "epochs": (5, "passes over every (video, caption) pair of the train split"),
            "num_steps": (0, "> 0 overrides epochs"),
            "lr": (1e-5, "peak learning rate of the trained parameters (method=full: of the non-backbone ones)"),
            "backbone_lr": (1e-7, "method=full: learning rate of the pre-trained CLIP weights"),
            "b1": (0.9, "Adam's beta 1"),
            "b2": (0.98, "Adam's beta 2"),
            "eps": (1e-6, "Adam's epsilon"),
            "weight_decay": (0.2, "AdamW's; never on biases, LayerNorm or scalars (ndim < 2)"),
            "schedule": ("cosine", "learning rate after the warm-up: cosine | constant"),
            "warmup_fraction": (0.1, "share of the steps with a linear warm-up"),
            "grad_clip": (1.0, "global-norm gradient clip; 0 = off"),
            "grad_accum_steps": (1, "micro-batches per update (each of batch_size / grad_accum_steps), with the "
                                    "InfoNCE still over the whole batch"),
            "log_every_steps": (10, "steps between log lines and TensorBoard points"),
            "save_every_steps": (500, "steps between run checkpoints (one is also saved at the end)"),
            "keep_checkpoints": (3, "run checkpoints kept (the newest)"),
            "eval_every_steps": (0, "steps between evaluations; 0 = evaluate only at the end"),
            "progress_bar": (True, "show a progress bar"),
            "max_loss_ratio": (0.0, "divergence guard: a non-finite loss or gradient norm always stops the run "
                                    "before that state is saved; > 0 also stops when the loss exceeds this factor "
                                    "times the median of the last 100 losses"),
            "allow_config_change": (False, "resume a workdir whose checkpoints were saved with other training "
                                           "settings (lr, batch, ...)"),
        },
        "mesh": {
            "data": (-1, "devices of the pure data-parallel mesh axis; -1 = the devices left over"),
            "fsdp": (1, "devices of the data-parallel axis that also shards the parameters"),
            "model": (1, "devices of the tensor-parallel axis"),
        },
        "eval": {
            "batch_size": (64, "videos / captions per encode batch (global)"),
            "block_size": (1024, "texts x videos per block of the similarity matrix"),
            "dsl": (False, "also report dual-softmax re-scored metrics"),
            "qbnorm": ("", "also report QB-Norm re-scored metrics with this split's captions and videos as the query "
                           "banks (e.g. train: encoded at every evaluation); '' = off"),
            "qbnorm_k": (1, "QB-Norm: a bank query's top k items form the activation set (the paper's 1)"),
            "qbnorm_beta": (20.0, "QB-Norm: the inverted softmax's inverse temperature on cosines (the paper's 20)"),
            "max_videos": (0, "> 0: evaluate on the first N videos only (quick checks)"),
        },
        "extra": (ml_collections.ConfigDict(), "free-form, file-specific fields; not validated"),
    }


def _defaults(schema: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({k: _defaults(v) if isinstance(v, dict) else v[0] for k, v in schema.items()})


def _meanings(schema: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in schema.items():
        out.update(_meanings(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v[1]})
    return out


def training_settings(config) -> dict:
    """{"seed": .., "train.lr": .., ...}: the TRAINING_FIELDS a resumed run must share with the run that saved."""
    return {"seed": config.seed, **{f"{sec}.{k}": config[sec][k] for sec, keys in TRAINING_FIELDS.items() for k in keys}}


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default (MSR-VTT / ViT-B/32 values of the paper)."""
    return _defaults(_schema())


def field_meanings() -> dict[str, str]:
    """{dotted field: what it means} for every field of `base_config()` (`extra` as one field)."""
    return _meanings(_schema())


def describe(config) -> str:
    """Every field of `config` with its value and meaning, one per line, in `base_config()`'s order
    (`python -m cma_jax.main --print_config`)."""
    meanings = field_meanings()
    extra = [f"extra.{k}" for k in _field_names(config.extra)] or ["extra"]
    names = [n for name in meanings for n in (extra if name == "extra" else [name])]
    rows = [(n, repr(_value(config, n)), meanings.get(n, "free-form, set by the config file (not validated)")) for n in names]
    name_w = max(len(n) for n, _, _ in rows)
    value_w = min(max(len(v) for _, v, _ in rows), 24)
    return "\n".join(f"{n:<{name_w}}  {v:<{value_w}}  {m}" for n, v, m in rows)


def _value(config, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config


def _section_methods(section: str) -> list[str]:
    return [name for name, cls in peft.METHODS.items() if cls.section == section]


def config_fields(cls) -> tuple[str, ...]:
    """The fields a method class reads from its config section."""
    return cls.config_fields or tuple(f.name for f in dataclasses.fields(cls))


def method_sections() -> dict[str, dict]:
    """{section: {field: default}} over every method with hyper-parameters (methods may share a section)."""
    sections: dict[str, dict] = {}
    for cls in peft.METHODS.values():
        if cls.section:
            defaults = {f.name: f.default for f in dataclasses.fields(cls)}
            sections.setdefault(cls.section, {}).update({k: defaults[k] for k in config_fields(cls)})
    return sections


def dataset_config(name: str, preset: str | None, *, reduction_dim: int, share_dim: int, num_frames: int = 12,
                   max_words: int = 32, epochs: int = 5) -> ml_collections.ConfigDict:
    """A benchmark preset with the paper's settings: `base_config()` plus what differs per dataset.

    `preset` is the backbone (the config file's `:arg`, default vit_b32). Every baseline is
    `--config.method=NAME` (cma_jax.models.peft.METHODS; zero_shot with `--config.mode=eval`), its
    hyper-parameters in `config.<section>`; r and d_s here are the Cross-Modal Adapter's.

    On the smallest TPU slice of docs/accelerators.md, a v5e-8 (16 GiB per chip), with
    `--config.model.dtype=bfloat16` and 12 frames x 32 words (MSR-VTT, MSVD, VATEX; checked with
    `python -m cma_jax.compile --topology=v5e-8`): vit_b32 and vit_b16 fit as they are, vit_l14 and
    vit_l14_336 with `--config.model.remat=block` (6.6 and 12.8 GiB per chip). ActivityNet's and DiDeMo's
    64 frames x 64 words were not compiled: `--fit` finds their change.
    """
    config = base_config()
    config.model.preset = preset or "vit_b32"
    config.backbone = clip_lib.OPENAI_NAMES.get(config.model.preset, config.model.preset)  # its OpenAI checkpoint
    config.data.name = name
    config.data.num_frames = num_frames
    config.data.max_words = max_words
    config.train.epochs = epochs
    config.adapter.reduction_dim = reduction_dim
    config.adapter.share_dim = share_dim
    return config


def image_text_config(name: str, preset: str | None) -> ml_collections.ConfigDict:
    """A text-image benchmark (flickr30k, mscoco: an image is a one-frame video) with the settings chosen for it.

    The paper's repository gives none: r = 8, d_s = 16 (0.52 M adapter parameters, its table's 0.5 M), the
    MSR-VTT optimisation (lr, batch, schedule, 5 epochs); T = 1 and the meanP head (with one frame every head
    is CLIP's cosine); max_words = 77, CLIP's context, so no caption is cut (but by a prompt method's tokens).
    """
    config = dataset_config(name, preset, reduction_dim=8, share_dim=16, num_frames=1, max_words=77)
    config.model.head = "meanp"
    return config


def named_error(error: Exception, paths: dict[str, str], section: str) -> ValueError:
    """A model dataclass's own message, prefixed with the config path of the field it names."""
    msg = str(error)
    named = [getattr(error, "field")] if getattr(error, "field", None) in paths else [f for f in paths if f in msg]
    where = paths[max(named, key=len)] if named else section
    return ValueError(f"config.{where}: {msg}")


_NOT_A_SECTION = " (expected a section)"


def _unknown_fields(cfg, ref, prefix=""):
    bad = []
    for key in cfg.keys():
        name = prefix + key
        if key not in ref:
            bad.append(name)
        elif isinstance(ref[key], ml_collections.ConfigDict) and key != "extra":
            if not isinstance(cfg[key], (ml_collections.ConfigDict, dict)):
                bad.append(name + _NOT_A_SECTION)
            else:
                bad += _unknown_fields(cfg[key], ref[key], name + ".")
    return bad


def _abbreviates(short: str, name: str) -> bool:
    """'lr' for 'learning_rate' (or 'lerning_rate'), 'wd' for 'weight_decay': the initials of its words."""
    return len(short) > 1 and "_" in name and short == "".join(w[0] for w in name.split("_") if w)


def _field_names(node, prefix: str = "") -> list[str]:
    """Every dotted field name (not the sections) of a config."""
    out = []
    for key in node.keys():
        if hasattr(node[key], "keys") and key != "extra":
            out += _field_names(node[key], prefix + key + ".")
        else:
            out.append(prefix + key)
    return out


def unknown_prefix(path: list[str]) -> list[str] | None:
    """The shortest prefix of the dotted `path` that names no field or section (None: `path` is known)."""
    node = base_config()
    for i, key in enumerate(path):
        if path[0] == "extra":
            return None
        if not hasattr(node, "keys") or key not in node:
            return path[:i + 1]
        node = node[key]
    return None


def suggest_fields(path: list[str], base) -> list[str]:
    """Field names close to the unknown dotted `path` (['train', 'lerning_rate'] -> ['train.lr']).

    ml_collections suggests only on reading a close name of the same section (`trian` -> `train`; not
    `lerning_rate` -> `lr`, nor `data.fsp` -> `data.fps`); here, first the keys of the section where the
    lookup failed (difflib, a prefix, or an abbreviation either way: lr <-> learning_rate; a misspelt section
    keeps the rest of the path) and fields anywhere with the same name (train.num_frames -> data.num_frames);
    failing those, close dotted names.
    """
    node, depth = base, 0
    while depth < len(path) - 1 and hasattr(node, "keys") and path[depth] in node:
        node, depth = node[path[depth]], depth + 1
    key = path[depth]
    prefix, rest = "".join(p + "." for p in path[:depth]), "".join("." + p for p in path[depth + 1:])
    fields = _field_names(base)
    found = []
    if hasattr(node, "keys"):
        keys = list(node.keys())
        close = [k for k in keys
                 if _abbreviates(key, k) or _abbreviates(k, key) or (len(key) > 2 and k.startswith(key))]
        close += difflib.get_close_matches(key, keys, n=3, cutoff=0.7)
        found += [prefix + k + rest for k in close]
    found += [f for f in fields if f.rsplit(".", 1)[-1] == path[-1]]
    found = [f for f in dict.fromkeys(found) if f in fields]
    return (found or difflib.get_close_matches(".".join(path), fields, n=3, cutoff=0.75))[:3]


def field_hint(path: list[str]) -> str:
    """What to say about the unknown dotted field `path`: 'renamed to config.x', 'did you mean config.x?',
    'did you mean one of config.x, config.y?', or ''."""
    name = ".".join(path)
    if name in RENAMED:
        return f"renamed to config.{RENAMED[name]}"
    close = ["config." + c for c in suggest_fields(path, base_config())]
    if len(close) > 1:
        return f"did you mean one of {', '.join(close)}?"
    return f"did you mean {close[0]}?" if close else ""


def unknown_override(args) -> str | None:
    """The message for the first `--config.<field>=` command-line argument that names no field (None: all known)."""
    for arg in args:
        if arg.startswith("--config."):
            path = arg[len("--config."):].split("=", 1)[0].split(".")
            unknown = unknown_prefix(path)
            if unknown is not None:
                hint = field_hint(path)
                return (f"unknown config field config.{'.'.join(unknown)} in {arg!r}"
                        f"{'; ' + hint if hint else ''} (every field is in cma_jax/config.py)")
    return None


def unused_fields(config, overridden) -> list[str]:
    """The overridden dotted fields that belong to a method section `config.method` does not read."""
    cls = peft.get(config.method)
    mine = {f"{cls.section}.{f}" for f in config_fields(cls)} if cls.section else set()
    sections = method_sections()
    out = []
    for name in overridden:
        section = name.split(".", 1)[0]
        if section in sections and name not in mine:
            users = [m for m, c in peft.METHODS.items() if c.section == section and name.split(".", 1)[-1]
                     in config_fields(c)]
            out.append(f"config.{name} is set, but config.method={config.method} does not use it "
                       f"(a field of method {' / '.join(users)}): set config.method to match, or drop the field")
    return out


def check_architecture(config, method: peft.Method, clip: clip_lib.CLIPConfig) -> None:
    """The checks that need the backbone's architecture (ValueError naming the field): the method fits
    the towers, a caption fits the text context, and so do the method's prompt tokens with words left
    (captions longer than the context minus the prompts lose their last words, as in CoOp)."""
    paths = {f: f"{method.section}.{f}" for f in config_fields(type(method))}
    try:
        method.check(clip)
    except ValueError as e:
        raise named_error(e, paths, method.section or "method") from None
    if not 2 <= config.data.max_words <= clip.context_length:
        raise ValueError(f"config.data.max_words: must be in [2, context_length={clip.context_length}], "
                         f"got {config.data.max_words}")
    extra = method.extra_text_tokens()
    if extra > clip.context_length - 2:
        raise ValueError(f"config.{method.section}: {extra} prompt tokens leave no room for a caption in the text "
                         f"context of {clip.context_length}")


def validate(config, num_devices: int | None = None, overridden=()) -> None:
    """Raise ValueError naming the field for unknown fields or impossible values of the schema.

    `overridden`: the dotted fields set on the command line; a field of a method section that
    `config.method` does not read is an error (e.g. config.vpt.num_tokens with method=cma). The checks
    that build the method and the CLIP architecture are `cma_jax.run.check` (which calls this first).
    """
    bad = _unknown_fields(config, base_config())
    if bad:
        hints = {b: "" if b.endswith(_NOT_A_SECTION) else field_hint(b.split(".")) for b in bad}
        raise ValueError("unknown config field(s): " + ", ".join(f"config.{b} ({h})" if h else f"config.{b}"
                                                                for b, h in hints.items()))

    def check(ok, field, msg):
        if not ok:
            raise ValueError(f"config.{field}: {msg}")

    check(config.mode in MODES, "mode", f"expected one of {MODES}, got {config.mode!r}")
    check(config.method in peft.METHODS, "method", f"expected one of {tuple(peft.METHODS)}, got {config.method!r}")
    unused = unused_fields(config, overridden)
    if unused:
        raise ValueError(unused[0])
    check(config.model.head in HEADS, "model.head", f"expected one of {HEADS}, got {config.model.head!r}")
    check(config.model.tau > 0, "model.tau", f"must be > 0, got {config.model.tau}")
    for f in CLIP_FIELDS:
        v = config.model.clip[f]
        check(v is None or (isinstance(v, int) and v >= 1), f"model.clip.{f}", f"must be a positive int, got {v!r}")

    d = config.data
    check(d.num_frames >= 1, "data.num_frames", f"must be >= 1, got {d.num_frames}")
    check(d.max_words >= 2, "data.max_words", f"must be >= 2, got {d.max_words}")
    check(d.fps > 0, "data.fps", f"must be > 0, got {d.fps}")
    check(d.workers >= 0, "data.workers", f"must be >= 0, got {d.workers}")

    t = config.train
    check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    check(t.epochs > 0 or t.num_steps > 0, "train.epochs", "train.epochs or train.num_steps must be > 0")
    check(t.num_steps >= 0, "train.num_steps", f"must be >= 0, got {t.num_steps}")
    check(math.isfinite(t.lr) and t.lr > 0, "train.lr", f"must be finite and > 0, got {t.lr}")
    check(math.isfinite(t.backbone_lr) and t.backbone_lr >= 0, "train.backbone_lr",
          f"must be finite and >= 0, got {t.backbone_lr}")
    check(0 <= t.b1 < 1, "train.b1", f"must be in [0, 1), got {t.b1}")
    check(0 <= t.b2 < 1, "train.b2", f"must be in [0, 1), got {t.b2}")
    check(t.eps > 0, "train.eps", f"must be > 0, got {t.eps}")
    check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    check(t.schedule in SCHEDULES, "train.schedule", f"expected one of {SCHEDULES}, got {t.schedule!r}")
    check(0 <= t.warmup_fraction < 1, "train.warmup_fraction", f"must be in [0, 1), got {t.warmup_fraction}")
    check(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
    check(t.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}")
    check(t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
          f"{t.grad_accum_steps} does not divide train.batch_size={t.batch_size}")
    for f in ("log_every_steps", "save_every_steps", "keep_checkpoints"):
        check(t[f] >= 1, f"train.{f}", f"must be >= 1, got {t[f]}")
    check(t.eval_every_steps >= 0, "train.eval_every_steps", f"must be >= 0, got {t.eval_every_steps}")
    check(t.max_loss_ratio == 0 or t.max_loss_ratio > 1, "train.max_loss_ratio",
          f"must be 0 (off) or > 1, got {t.max_loss_ratio}")

    check(config.eval.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {config.eval.batch_size}")
    check(config.eval.block_size >= 1, "eval.block_size", f"must be >= 1, got {config.eval.block_size}")
    check(config.eval.qbnorm != config.data.eval_split, "eval.qbnorm",
          f"the query bank must be another split than the one evaluated ({config.data.eval_split!r})")
    check(config.eval.qbnorm_k >= 1, "eval.qbnorm_k", f"must be >= 1, got {config.eval.qbnorm_k}")
    check(config.eval.qbnorm_beta > 0, "eval.qbnorm_beta", f"must be > 0, got {config.eval.qbnorm_beta}")

    if num_devices is not None:
        dp, fsdp, mp = mesh_shape(config, num_devices)
        micro = t.batch_size // t.grad_accum_steps
        check(micro % (dp * fsdp) == 0, "train.batch_size",
              f"the micro-batch {micro} (batch_size/grad_accum_steps) is not divisible by the "
              f"data-parallel size mesh.data*mesh.fsdp = {dp * fsdp}")
        check(config.eval.batch_size % (dp * fsdp) == 0, "eval.batch_size",
              f"{config.eval.batch_size} is not divisible by the data-parallel size {dp * fsdp}")
