"""Flat PyTorch state dicts (numpy values) of any supported format <-> our backbone / adapter pure dicts.

Formats (the architecture is inferred from tensor shapes):
  * OpenAI CLIP (`visual.conv1.weight`, ...).
  * Hugging Face `CLIPModel`: names first renamed to OpenAI names (`HF_TOP`, `HF_BLOCK`).
  * The original Cross-Modal-Adapter repo: a CLIP4Clip state dict (`clip.` + OpenAI names) with the
    adapters stacked per tower (`CMA_KEYS`, `cma_layout`).
Our trees are nested pure dicts keyed like `nnx.state(CLIP(...))`: `backbone` holds every `nnx.Param`
that is not an `AdapterParam`, `adapters` the AdapterParams (`cma_jax.models.state.apply_state` puts
either into a model).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from cma_jax.convert.tables import (CLIP4CLIP_HEAD_PREFIXES, CMA_KEYS, HF_BLOCK, HF_TOP, HF_TOWER_PREFIX,
                                    IGNORED_KEYS, IGNORED_SUFFIXES, TOWER_PREFIX, cma_layout,
                                    from_torch_layout, openai_table, to_torch_layout)
from cma_jax.convert.torch_io import read_checkpoint, save_torch
from cma_jax.errors import CheckpointError, listing
from cma_jax.models.clip import CLIPConfig, backbone_shapes
from cma_jax.models.peft.adapter import AdapterConfig
from cma_jax.trees import flatten, unflatten


def _count_layers(sd, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in sd for m in [pattern.match(k)] if m}
    return max(found) + 1 if found else 0


def infer_config(sd: dict[str, np.ndarray], source: str = "checkpoint", **overrides) -> CLIPConfig:
    """CLIPConfig from an OpenAI-named state dict's shapes, as OpenAI's `build_model` does.

    Text heads cannot be seen in shapes: OpenAI's rule `width // 64` (at least 1) unless overridden.
    """
    if "visual.layer1.0.conv1.weight" in sd:
        raise CheckpointError(f"{source}: a ResNet CLIP image tower; only ViT CLIP models are supported")
    needed = ["visual.conv1.weight", "visual.positional_embedding", "text_projection", "positional_embedding",
              "token_embedding.weight", "ln_final.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise listing(source, missing=missing)
    conv = sd["visual.conv1.weight"].shape  # [Wv, 3, p, p]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    fields = dict(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=conv[-1] * grid,
        vision_layers=_count_layers(sd, TOWER_PREFIX["visual"]),
        vision_width=conv[0],
        vision_patch_size=conv[-1],
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        text_width=text_width,
        text_heads=max(text_width // 64, 1),
        text_layers=_count_layers(sd, TOWER_PREFIX["text"]),
    )
    fields.update(overrides)
    return CLIPConfig(**fields)


def hf_to_openai(sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Rename a HF CLIPModel state dict to OpenAI names (q/k/v fused) -> (renamed, leftover HF keys)."""
    out, used = {}, set()
    for hf, oa, rule in HF_TOP:
        if hf in sd:
            out[oa] = from_torch_layout(sd[hf], rule)
            used.add(hf)
    for tower in ("visual", "text"):
        pre, oa_pre = HF_TOWER_PREFIX[tower], TOWER_PREFIX[tower]
        for i in range(_count_layers(sd, pre)):
            for hf, oa in HF_BLOCK:
                if f"{pre}.{i}.{hf}" in sd:
                    out[f"{oa_pre}.{i}.{oa}"] = sd[f"{pre}.{i}.{hf}"]
                    used.add(f"{pre}.{i}.{hf}")
            for kind in ("weight", "bias"):
                qkv = [f"{pre}.{i}.self_attn.{p}_proj.{kind}" for p in "qkv"]
                if all(k in sd for k in qkv):  # else left over, so reported missing below
                    out[f"{oa_pre}.{i}.attn.in_proj_{kind}"] = np.concatenate([sd[k] for k in qkv], axis=0)
                    used.update(qkv)
    return out, [k for k in sd if k not in used]


def _hf_overrides(hf_config: dict | None, source: str) -> dict:
    """Check a HF CLIPConfig against what our towers implement; return the text heads."""
    if hf_config is None:
        return {}
    text, vision = hf_config.get("text_config", {}), hf_config.get("vision_config", {})
    problems = []
    for name, cfg in (("text_config", text), ("vision_config", vision)):
        if cfg.get("hidden_act", "quick_gelu") != "quick_gelu":
            problems.append(f"{name}.hidden_act={cfg['hidden_act']!r} (expected 'quick_gelu')")
        if abs(cfg.get("layer_norm_eps", 1e-5) - 1e-5) > 1e-12:
            problems.append(f"{name}.layer_norm_eps={cfg['layer_norm_eps']} (expected 1e-05)")
    width = vision.get("hidden_size", 768)
    heads = vision.get("num_attention_heads", 12)
    if heads != (width // 64 if width >= 64 else 1):
        problems.append(f"vision_config.num_attention_heads={heads} (this model uses OpenAI's width // 64 = "
                        f"{max(width // 64, 1)})")
    if problems:
        raise CheckpointError(f"{source}: unsupported Hugging Face CLIP config: " + "; ".join(problems))
    return {"text_heads": text.get("num_attention_heads", 8)}


# ----------------------------------------------------------------------------- conversion
@dataclasses.dataclass
class Converted:
    """The result of converting a PyTorch checkpoint."""

    clip_config: CLIPConfig
    backbone: dict  # nested pure dict: every non-adapter nnx.Param of CLIP(clip_config)
    adapter_config: AdapterConfig | None = None  # set for Cross-Modal-Adapter checkpoints
    adapters: dict | None = None  # nested pure dict of the AdapterParams
    ignored: list[str] = dataclasses.field(default_factory=list)  # CLIP4Clip head tensors we do not use
    tokenizer_files: list[str] = dataclasses.field(default_factory=list)


def detect_format(sd: dict, source: str = "checkpoint") -> str:
    """'cma' (CLIP4Clip / Cross-Modal-Adapter), 'openai' or 'hf'; CheckpointError otherwise."""
    if any(k.startswith("clip.") for k in sd):
        return "cma"
    if any(k.startswith("visual.") for k in sd):
        return "openai"
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        return "hf"
    sample = ", ".join(sorted(sd)[:8]) or "(no tensors)"
    raise CheckpointError(f"{source}: not a recognised CLIP checkpoint: expected OpenAI keys (visual.conv1.weight, ...), "
                          f"Hugging Face CLIPModel keys (vision_model.*, text_model.*) or Cross-Modal-Adapter "
                          f"keys (clip.*); got {sample}")


def _openai_to_backbone(sd, cfg: CLIPConfig, source: str, extra_unexpected=()) -> dict:
    """OpenAI-named flat dict -> our backbone pure dict, with the full missing/unexpected listing."""
    table = openai_table(cfg)
    shapes = backbone_shapes(cfg)
    names = {oa for oa, _, _ in table}
    missing = [oa for oa in names if oa not in sd]
    unexpected = [k for k in sd if k not in names] + list(extra_unexpected)
    flat, bad = {}, []
    for oa, ours, rule in table:
        if oa not in sd:
            continue
        x = from_torch_layout(np.asarray(sd[oa], np.float32), rule)
        if x.shape != shapes[ours]:
            bad.append(f"{oa} {tuple(sd[oa].shape)}")
        flat[ours] = x
    if missing or unexpected or bad:
        raise listing(source, missing, unexpected, bad)
    return unflatten(flat)



def _cma_adapters(sd, cfg: CLIPConfig, source: str) -> tuple[AdapterConfig, dict]:
    """The stacked adapter tensors (without `clip.`) -> (AdapterConfig, our adapter pure dict)."""
    if "visual_adapter_down_weight" not in sd or sd["visual_adapter_down_weight"].ndim != 3:
        raise listing(source, missing=["clip.visual_adapter_down_weight"])
    r = sd["visual_adapter_down_weight"].shape[1]
    d_s = sd["vt_adapter_up_share_weight"].shape[1] if "vt_adapter_up_share_weight" in sd else 0
    if d_s > min(cfg.vision_width, cfg.text_width):
        raise listing(source, bad_shapes=[f"clip.vt_adapter_up_share_weight {sd['vt_adapter_up_share_weight'].shape}"
                                           f" (d_s exceeds the narrower tower width)"])
    flat, missing, bad = {}, [], []
    for key, (shape, paths) in cma_layout(cfg, r, d_s).items():
        rule = CMA_KEYS[key][2]
        if key not in sd:
            # Zero-size parts (no unique part of a tower, or d_s = 0) may be absent.
            if np.prod(shape):
                missing.append("clip." + key)
        elif tuple(sd[key].shape) != shape:
            bad.append(f"clip.{key} {tuple(sd[key].shape)} (expected {shape})")
        elif np.prod(shape):
            for j, p in enumerate(paths):
                flat[p] = from_torch_layout(np.asarray(sd[key][j], np.float32), rule)
    if missing or bad:
        raise listing(source, missing=missing, bad_shapes=bad)
    return AdapterConfig(reduction_dim=r, share_dim=d_s), unflatten(flat)


def convert_state_dict(sd: dict[str, np.ndarray], hf_config: dict | None = None, source: str = "checkpoint",
                       **overrides) -> Converted:
    """Flat PyTorch state dict (numpy values) of any supported format -> Converted.

    `overrides` are CLIPConfig fields shapes cannot tell (e.g. `text_heads` for OpenAI layouts).
    """
    sd = {k: v for k, v in sd.items() if k not in IGNORED_KEYS and not k.endswith(IGNORED_SUFFIXES)}
    fmt = detect_format(sd, source)
    leftover, ignored, adapter_sd = [], [], {}
    if fmt == "hf":
        sd, leftover = hf_to_openai(sd)
        overrides = {**_hf_overrides(hf_config, source), **overrides}
    elif fmt == "cma":
        clip_sd = {}
        for k, v in sd.items():
            if k.startswith("clip."):
                name = k[len("clip."):]
                if name in CMA_KEYS:
                    adapter_sd[name] = v
                elif name not in IGNORED_KEYS:
                    clip_sd[name] = v
            elif k.startswith(CLIP4CLIP_HEAD_PREFIXES):
                ignored.append(k)
            else:
                leftover.append(k)
        sd = clip_sd
    cfg = infer_config(sd, source, **overrides)
    backbone = _openai_to_backbone(sd, cfg, source, extra_unexpected=leftover)
    out = Converted(cfg, backbone, ignored=ignored)
    if adapter_sd:
        out.adapter_config, out.adapters = _cma_adapters(adapter_sd, cfg, source)
    return out


def convert_checkpoint(path: str, **overrides) -> Converted:
    """Read and convert an OpenAI `.pt`/state dict, a HF CLIPModel folder or a CMA checkpoint."""
    sd, hf_config, tokenizer = read_checkpoint(path)
    out = convert_state_dict(sd, hf_config, source=path, **overrides)
    out.tokenizer_files = tokenizer
    return out


# ----------------------------------------------------------------------------- back to PyTorch
def to_openai(backbone: dict, cfg: CLIPConfig) -> dict[str, np.ndarray]:
    """Our backbone pure dict -> OpenAI-named flat dict (PyTorch layouts)."""
    flat = flatten(backbone)
    return {oa: to_torch_layout(np.asarray(flat[ours]), rule) for oa, ours, rule in openai_table(cfg)}


def to_cma(adapters: dict, cfg: CLIPConfig, backbone: dict | None = None) -> dict[str, np.ndarray]:
    """Our adapter pure dict (CLIP- or RetrievalModel-level) -> the original repo's `clip.*` tensors.

    As the original repo stores them: the image tower's unique `up` always (zero-sized when
    Wv = d_s), the text tower's only when Wt > d_s, the shared bank only when d_s > 0.
    With `backbone`, the OpenAI-named backbone tensors are included too (a full CLIP4Clip dict).
    """
    flat = flatten(adapters.get("clip", adapters))
    r = np.shape(flat[f"{TOWER_PREFIX['visual']}.0.attn_adapter.down_bias"])[0]
    d_s = np.shape(flat["shared_adapters.0.attn.bias"])[0] if "shared_adapters.0.attn.bias" in flat else 0
    out = {}
    for key, (shape, paths) in cma_layout(cfg, r, d_s).items():
        tower, _, rule = CMA_KEYS[key]
        if np.prod(shape):
            out["clip." + key] = np.stack([to_torch_layout(np.asarray(flat[p], np.float32), rule) for p in paths])
        elif tower == "visual":
            out["clip." + key] = np.zeros(shape, np.float32)
    if backbone is not None:
        out.update({"clip." + k: v for k, v in to_openai(backbone, cfg).items()})
    return out


def export_adapters(path: str, adapters: dict, cfg: CLIPConfig, backbone: dict | None = None) -> None:
    """`to_cma` saved with `torch.save` as a dict of torch tensors (loadable by the original repo)."""
    save_torch(path, to_cma(adapters, cfg, backbone))
