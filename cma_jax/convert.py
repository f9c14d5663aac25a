"""PyTorch CLIP / Cross-Modal-Adapter checkpoints <-> our NNX parameter trees.

Sources (the architecture is inferred from tensor shapes):
  * OpenAI CLIP: TorchScript `.pt` archives or plain state dicts (`visual.conv1.weight`, ...).
  * Hugging Face `CLIPModel` folders: `config.json` + `model.safetensors` / `pytorch_model.bin`.
    HF names are first renamed to OpenAI names (`HF_TOP`, `HF_BLOCK`), then share the OpenAI table.
  * The original Cross-Modal-Adapter repo: a CLIP4Clip state dict (`clip.` + OpenAI names) with the
    adapters stacked per tower, index 2i = attention adapter of layer i, 2i+1 = MLP adapter,
    PyTorch Linear layout [out, in] (`CMA_KEYS`); its training checkpoints (`ckpt_epoch<N>.pth`:
    the state dict under 'model', beside optimizer state and args) are unwrapped.

Our trees are nested "pure dicts" of numpy arrays keyed like `nnx.state(CLIP(...))` (list indices are
ints): `backbone` holds every `nnx.Param` that is not an `AdapterParam`, `adapters` the AdapterParams.
`apply_state(clip, tree)` puts either into a model. A converted backbone is saved once, read-only,
with `save_backbone` (Orbax + `clip_config.json` + `tokenizer/`) and read back with `load_backbone`.

CLI:
  python -m cma_jax.convert import SRC OUT_DIR [--adapters_out DIR] [--text_heads N] [--overwrite]
  python -m cma_jax.convert export ADAPTERS_DIR OUT.pth [--backbone DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from cma_jax.models.adapter import AdapterConfig, AdapterParam
from cma_jax.models.clip import CLIP, CLIPConfig

# ----------------------------------------------------------------------------- the tables
# Transpose rules from PyTorch layout to ours: "linear" [out, in] -> [in, out];
# "conv" [out, in, kh, kw] -> [kh, kw, in, out]; None = as is.
TRANSPOSES = {None: None, "linear": (1, 0), "conv": (2, 3, 1, 0)}

# OpenAI name -> our path (dot-separated), rule. Vision-only and text-only entries.
OPENAI_TOP = [
    ("visual.conv1.weight", "visual.conv1.kernel", "conv"),
    ("visual.class_embedding", "visual.class_embedding", None),
    ("visual.positional_embedding", "visual.positional_embedding", None),
    ("visual.ln_pre.weight", "visual.ln_pre.scale", None),
    ("visual.ln_pre.bias", "visual.ln_pre.bias", None),
    ("visual.ln_post.weight", "visual.ln_post.scale", None),
    ("visual.ln_post.bias", "visual.ln_post.bias", None),
    ("visual.proj", "visual.proj", None),  # OpenAI applies x @ proj: already [in, out]
    ("token_embedding.weight", "token_embedding.embedding", None),
    ("positional_embedding", "positional_embedding", None),
    ("ln_final.weight", "ln_final.scale", None),
    ("ln_final.bias", "ln_final.bias", None),
    ("text_projection", "text_projection", None),  # x @ text_projection: already [in, out]
    ("logit_scale", "logit_scale", None),
]
# Inside one residual block: OpenAI suffix -> our suffix, rule.
OPENAI_BLOCK = [
    ("attn.in_proj_weight", "attn.in_proj.kernel", "linear"),  # fused [q; k; v] rows, heads contiguous
    ("attn.in_proj_bias", "attn.in_proj.bias", None),
    ("attn.out_proj.weight", "attn.out_proj.kernel", "linear"),
    ("attn.out_proj.bias", "attn.out_proj.bias", None),
    ("ln_1.weight", "ln_1.scale", None),
    ("ln_1.bias", "ln_1.bias", None),
    ("mlp.c_fc.weight", "mlp.c_fc.kernel", "linear"),
    ("mlp.c_fc.bias", "mlp.c_fc.bias", None),
    ("mlp.c_proj.weight", "mlp.c_proj.kernel", "linear"),
    ("mlp.c_proj.bias", "mlp.c_proj.bias", None),
    ("ln_2.weight", "ln_2.scale", None),
    ("ln_2.bias", "ln_2.bias", None),
]
TOWER_PREFIX = {"visual": "visual.transformer.resblocks", "text": "transformer.resblocks"}

# Hugging Face name -> OpenAI name, rule (HF projections are nn.Linear, OpenAI's are x @ W).
HF_TOP = [
    ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight", None),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding", None),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding", None),
    ("vision_model.pre_layrnorm.weight", "visual.ln_pre.weight", None),  # sic: HF's spelling
    ("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias", None),
    ("vision_model.post_layernorm.weight", "visual.ln_post.weight", None),
    ("vision_model.post_layernorm.bias", "visual.ln_post.bias", None),
    ("visual_projection.weight", "visual.proj", "linear"),
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight", None),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding", None),
    ("text_model.final_layer_norm.weight", "ln_final.weight", None),
    ("text_model.final_layer_norm.bias", "ln_final.bias", None),
    ("text_projection.weight", "text_projection", "linear"),
    ("logit_scale", "logit_scale", None),
]
HF_BLOCK = [
    ("self_attn.out_proj.weight", "attn.out_proj.weight"),
    ("self_attn.out_proj.bias", "attn.out_proj.bias"),
    ("layer_norm1.weight", "ln_1.weight"),
    ("layer_norm1.bias", "ln_1.bias"),
    ("mlp.fc1.weight", "mlp.c_fc.weight"),
    ("mlp.fc1.bias", "mlp.c_fc.bias"),
    ("mlp.fc2.weight", "mlp.c_proj.weight"),
    ("mlp.fc2.bias", "mlp.c_proj.bias"),
    ("layer_norm2.weight", "ln_2.weight"),
    ("layer_norm2.bias", "ln_2.bias"),
]  # plus self_attn.{q,k,v}_proj.{weight,bias}, concatenated into attn.in_proj_{weight,bias}
HF_TOWER_PREFIX = {"visual": "vision_model.encoder.layers", "text": "text_model.encoder.layers"}

# Original Cross-Modal-Adapter repo: stacked adapter tensors (after the `clip.` prefix).
CMA_KEYS = {
    # key: (tower or "shared", our leaf, rule)
    "visual_adapter_down_weight": ("visual", "down_kernel", "linear"),
    "visual_adapter_down_bias": ("visual", "down_bias", None),
    "visual_adapter_up_unique_weight": ("visual", "up_kernel", "linear"),
    "visual_adapter_up_unique_bias": ("visual", "up_bias", None),
    "text_adapter_down_weight": ("text", "down_kernel", "linear"),
    "text_adapter_down_bias": ("text", "down_bias", None),
    "text_adapter_up_unique_weight": ("text", "up_kernel", "linear"),
    "text_adapter_up_unique_bias": ("text", "up_bias", None),
    "vt_adapter_up_share_weight": ("shared", "kernel", "linear"),
    "vt_adapter_up_share_bias": ("shared", "bias", None),
}
POSITIONS = ("attn", "mlp")  # stacked index 2i + 0 / 2i + 1
# Non-tensor entries of OpenAI's TorchScript archives, and HF buffers: not parameters.
IGNORED_KEYS = {"input_resolution", "context_length", "vocab_size"}
IGNORED_SUFFIXES = ("embeddings.position_ids",)
# CLIP4Clip similarity-head tensors outside `clip.`: our model has no such modules.
CLIP4CLIP_HEAD_PREFIXES = ("cross.", "similarity_dense.", "frame_position_embeddings.", "transformerClip.",
                           "lstm_visual.", "q_score_proj.", "xpool_transformer.")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "bpe_simple_vocab_16e6.txt.gz")


class CheckpointError(ValueError):
    """A checkpoint that is not one we understand, or misses tensors."""


def _listing(source: str, missing=(), unexpected=(), bad_shapes=()) -> CheckpointError:
    lines = [f"{source}: not a usable checkpoint."]
    if missing:
        lines.append(f"missing ({len(missing)}): " + ", ".join(sorted(missing)))
    if unexpected:
        lines.append(f"unexpected ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
    if bad_shapes:
        lines.append(f"wrong shapes ({len(bad_shapes)}): " + ", ".join(sorted(bad_shapes)))
    return CheckpointError("\n  ".join(lines))


def _to_torch_layout(x: np.ndarray, rule) -> np.ndarray:
    return x if rule is None else np.ascontiguousarray(np.transpose(x, np.argsort(TRANSPOSES[rule])))


def _from_torch_layout(x: np.ndarray, rule) -> np.ndarray:
    return x if rule is None else np.ascontiguousarray(np.transpose(x, TRANSPOSES[rule]))


def openai_table(cfg: CLIPConfig) -> list[tuple[str, str, str | None]]:
    """Every (OpenAI name, our dotted path, rule) of a CLIP with this architecture."""
    table = list(OPENAI_TOP)
    for tower, layers in (("visual", cfg.vision_layers), ("text", cfg.text_layers)):
        pre = TOWER_PREFIX[tower]
        for i in range(layers):
            table += [(f"{pre}.{i}.{a}", f"{pre}.{i}.{b}", r) for a, b, r in OPENAI_BLOCK]
    return table


# ----------------------------------------------------------------------------- tree helpers
def _key(part: str):
    return int(part) if part.isdigit() else part


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """{'a.0.b': x} -> {'a': {0: {'b': x}}} (digit parts become int keys, as nnx pure dicts have)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = [_key(p) for p in path.split(".")]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Inverse of `unflatten`."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, path + "."))
        else:
            out[path] = v
    return out


def _backbone_shapes(cfg: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of every backbone parameter of CLIP(cfg), built abstractly (no memory)."""
    model = nnx.eval_shape(lambda: CLIP(cfg, None, rngs=nnx.Rngs(0)))
    tree = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(AdapterParam))))
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def apply_state(clip, tree: dict) -> None:
    """Write a backbone or adapter pure dict into a CLIP module in place (or a RetrievalModel's `.clip`).

    Every leaf of the tree must exist in the model with the same shape; the model's other
    variables are left untouched. jax.Arrays (e.g. sharded by `load_backbone`) are used as they are.
    """
    clip = getattr(clip, "clip", clip)
    tree = tree["clip"] if set(tree) == {"clip"} else tree  # a RetrievalModel-level tree
    wanted = nnx.state(clip, nnx.Param)
    have = {k: tuple(np.shape(v)) for k, v in flatten(nnx.to_pure_dict(wanted)).items()}
    given = flatten(tree)
    unexpected = [k for k in given if k not in have]
    bad = [f"{k} {tuple(np.shape(v))} (model has {have[k]})" for k, v in given.items()
           if k in have and tuple(np.shape(v)) != have[k]]
    if unexpected or bad:
        raise _listing("parameter tree for this model", unexpected=unexpected, bad_shapes=bad)
    flat_state = nnx.to_flat_state(wanted)
    updates = []
    for path, var in flat_state:
        dotted = ".".join(str(p) for p in path)
        if dotted in given:
            value = given[dotted]
            if not isinstance(value, jax.Array):
                value = jnp.asarray(value, jnp.float32)
            updates.append((path, var.replace(value)))
    nnx.update(clip, nnx.from_flat_state(updates))


# ----------------------------------------------------------------------------- reading files
def _as_numpy(sd) -> dict[str, np.ndarray]:
    """torch tensors -> float32 numpy (OpenAI archives are float16); non-float buffers kept as is."""
    import torch

    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            v = v.float().numpy() if v.is_floating_point() else v.numpy()
        elif isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating):
            v = v.astype(np.float32)
        out[k] = v
    return out


def _read_torch_file(path: str) -> dict[str, np.ndarray]:
    """A TorchScript archive (OpenAI's `.pt`) or a `torch.save`d state dict."""
    import torch

    try:  # OpenAI's released checkpoints are TorchScript archives
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; these files still need it
            warnings.simplefilter("ignore", DeprecationWarning)
            return _as_numpy(torch.jit.load(path, map_location="cpu").state_dict())
    except RuntimeError:
        pass
    try:
        # The original repo's training checkpoints also pickle its argparse args (plain values).
        with torch.serialization.safe_globals([argparse.Namespace]):
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: cannot read it as a PyTorch checkpoint (TorchScript archive or "
                              f"torch.save'd state dict): {first_line}") from e
    for wrapper in ("model", "state_dict"):  # {'model': sd, 'optimizer': ..., 'epoch': ..., 'args': ...}
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise CheckpointError(f"{path}: expected a state dict (str -> tensor), got {type(sd).__name__}")
    return _as_numpy(sd)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return _as_numpy(load_file(path))


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict | None, list[str]]:
    """Read a file or HF folder -> (flat state dict of numpy arrays, HF config or None, tokenizer files)."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder (expected an OpenAI/CMA .pt/.pth file or a "
                              f"Hugging Face CLIPModel folder)")
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    tokenizer = [os.path.join(folder, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))]
    config_file = os.path.join(folder, "config.json")
    hf_config = None
    if os.path.isfile(config_file):
        with open(config_file) as f:
            hf_config = json.load(f)
    if not os.path.isdir(path):
        sd = _read_safetensors(path) if path.endswith(".safetensors") else _read_torch_file(path)
        return sd, hf_config, tokenizer
    if hf_config is None:
        raise CheckpointError(f"{path}: a checkpoint folder must be a Hugging Face CLIPModel folder with "
                              f"config.json; none found")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        sd = _read_safetensors(os.path.join(path, "model.safetensors"))
    elif os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for shard in shards:
            sd.update(_read_safetensors(os.path.join(path, shard)))
    elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        sd = _read_torch_file(os.path.join(path, "pytorch_model.bin"))
    else:
        raise CheckpointError(f"{path}: Hugging Face folder without weights (expected model.safetensors, "
                              f"model.safetensors.index.json or pytorch_model.bin)")
    return sd, hf_config, tokenizer


# ----------------------------------------------------------------------------- inference from shapes
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
        raise _listing(source, missing=missing)
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
            out[oa] = _from_torch_layout(sd[hf], rule)
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
    shapes = _backbone_shapes(cfg)
    names = {oa for oa, _, _ in table}
    missing = [oa for oa in names if oa not in sd]
    unexpected = [k for k in sd if k not in names] + list(extra_unexpected)
    flat, bad = {}, []
    for oa, ours, rule in table:
        if oa not in sd:
            continue
        x = _from_torch_layout(np.asarray(sd[oa], np.float32), rule)
        if x.shape != shapes[ours]:
            bad.append(f"{oa} {tuple(sd[oa].shape)}")
        flat[ours] = x
    if missing or unexpected or bad:
        raise _listing(source, missing, unexpected, bad)
    return unflatten(flat)


def cma_layout(cfg: CLIPConfig, r: int, d_s: int) -> dict[str, tuple[tuple[int, ...], list[str]]]:
    """For each stacked original-repo key: (its PyTorch shape, our dotted path of each stacked entry)."""
    n_shared = min(cfg.vision_layers, cfg.text_layers) if d_s else 0
    dims = {"visual": (cfg.vision_layers, cfg.vision_width), "text": (cfg.text_layers, cfg.text_width),
            "shared": (n_shared, d_s)}
    layout = {}
    for key, (tower, leaf, _) in CMA_KEYS.items():
        layers, width = dims[tower]
        out = width if tower == "shared" else width - d_s  # output dims of this part of `up`
        shape = {"down_kernel": (r, width), "down_bias": (r,), "up_kernel": (out, r), "up_bias": (out,),
                 "kernel": (out, r), "bias": (out,)}[leaf]
        if tower == "shared":
            paths = [f"shared_adapters.{i}.{pos}.{leaf}" for i in range(layers) for pos in POSITIONS]
        else:
            paths = [f"{TOWER_PREFIX[tower]}.{i}.{pos}_adapter.{leaf}" for i in range(layers) for pos in POSITIONS]
        layout[key] = ((2 * layers,) + shape, paths)
    return layout


def _cma_adapters(sd, cfg: CLIPConfig, source: str) -> tuple[AdapterConfig, dict]:
    """The stacked adapter tensors (without `clip.`) -> (AdapterConfig, our adapter pure dict)."""
    if "visual_adapter_down_weight" not in sd or sd["visual_adapter_down_weight"].ndim != 3:
        raise _listing(source, missing=["clip.visual_adapter_down_weight"])
    r = sd["visual_adapter_down_weight"].shape[1]
    d_s = sd["vt_adapter_up_share_weight"].shape[1] if "vt_adapter_up_share_weight" in sd else 0
    if d_s > min(cfg.vision_width, cfg.text_width):
        raise _listing(source, bad_shapes=[f"clip.vt_adapter_up_share_weight {sd['vt_adapter_up_share_weight'].shape}"
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
                flat[p] = _from_torch_layout(np.asarray(sd[key][j], np.float32), rule)
    if missing or bad:
        raise _listing(source, missing=missing, bad_shapes=bad)
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
    return {oa: _to_torch_layout(np.asarray(flat[ours]), rule) for oa, ours, rule in openai_table(cfg)}


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
            out["clip." + key] = np.stack([_to_torch_layout(np.asarray(flat[p], np.float32), rule) for p in paths])
        elif tower == "visual":
            out["clip." + key] = np.zeros(shape, np.float32)
    if backbone is not None:
        out.update({"clip." + k: v for k, v in to_openai(backbone, cfg).items()})
    return out


def export_adapters(path: str, adapters: dict, cfg: CLIPConfig, backbone: dict | None = None) -> None:
    """`to_cma` saved with `torch.save` as a dict of torch tensors (loadable by the original repo)."""
    import torch

    tensors = {k: torch.from_numpy(np.array(v)) for k, v in to_cma(adapters, cfg, backbone).items()}
    _atomic_write(path, lambda tmp: torch.save(tensors, tmp), overwrite=True)


# ----------------------------------------------------------------------------- Orbax storage
CONFIG_FILE = "clip_config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


def _atomic_write(path: str, write, overwrite: bool) -> None:
    """Run `write(tmp_path)` next to `path`, then rename into place; nothing half-written remains."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass --overwrite / overwrite=True)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    target = os.path.join(tmp, "out")
    try:
        write(target)
        if os.path.exists(path):
            old = os.path.join(tmp, "old")
            os.rename(path, old)  # kept inside tmp, removed below
        os.rename(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_tree_dir(path: str, meta: dict[str, dict], tree: dict, files=(), overwrite=False) -> None:
    def write(tmp: str):
        os.makedirs(tmp)
        for name, content in meta.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2, sort_keys=True)
        if files:
            os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
            for f in files:
                shutil.copy2(f, os.path.join(tmp, TOKENIZER_DIR, os.path.basename(f)))
        flat = {k: np.asarray(v, np.float32) for k, v in flatten(tree).items()}
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), flat)
        for root, _, names in os.walk(tmp):  # read-only: a run never writes a backbone
            for n in names:
                os.chmod(os.path.join(root, n), 0o444)

    _atomic_write(path, write, overwrite)


def _folder(path: str):
    """A checkpoint folder to read: local (made absolute) or a URL such as gs://bucket/ckpt, kept as is."""
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def _load_tree_dir(path: str, abstract: dict | None) -> dict:
    params = _folder(path) / PARAMS_DIR
    if not params.is_dir():
        raise CheckpointError(f"{path}: not a cma_jax checkpoint folder (no {PARAMS_DIR}/ inside)")
    with ocp.StandardCheckpointer() as ckptr:
        if abstract is None:
            meta = ckptr.metadata(params).item_metadata
            abstract_flat = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in meta.items()}
        else:
            abstract_flat = flatten(abstract)
        flat = ckptr.restore(params, abstract_flat)
    return unflatten(flat)


def _read_json(path: str, name: str) -> dict:
    file = _folder(path) / name
    if not file.is_file():
        raise CheckpointError(f"{path}: not a cma_jax checkpoint folder (no {name} inside)")
    return json.loads(file.read_text())


def save_backbone(path: str, clip_cfg: CLIPConfig, state: dict, tokenizer_files=(), overwrite: bool = False):
    """Save a backbone pure dict as a read-only Orbax checkpoint folder, atomically.

    Layout: `clip_config.json`, `params/` (Orbax), `tokenizer/` (when tokenizer files are given).
    Refuses to replace an existing `path` unless `overwrite`.
    """
    _save_tree_dir(path, {CONFIG_FILE: dataclasses.asdict(clip_cfg)}, state, tokenizer_files, overwrite)


def load_backbone(path: str, abstract_state: dict | None = None) -> tuple[CLIPConfig, dict]:
    """-> (CLIPConfig, backbone pure dict). Pass `abstract_state` (a pure dict of
    jax.ShapeDtypeStruct with shardings) to restore straight into sharded arrays."""
    cfg = CLIPConfig(**_read_json(path, CONFIG_FILE))
    return cfg, _load_tree_dir(path, abstract_state)


def tokenizer_dir(path: str) -> str | None:
    """The tokenizer files saved beside a backbone, or None when the source had none."""
    d = os.path.join(path, TOKENIZER_DIR)
    return d if os.path.isdir(d) else None


def save_adapters(path: str, clip_cfg: CLIPConfig, adapter_cfg: AdapterConfig, adapters: dict,
                  overwrite: bool = False) -> None:
    """Save an adapter pure dict (e.g. converted from the original repo) like a backbone."""
    meta = {CONFIG_FILE: dataclasses.asdict(clip_cfg), ADAPTER_CONFIG_FILE: dataclasses.asdict(adapter_cfg)}
    _save_tree_dir(path, meta, adapters.get("clip", adapters), (), overwrite)


def load_adapters(path: str) -> tuple[CLIPConfig, AdapterConfig, dict]:
    """-> (CLIPConfig, AdapterConfig, adapter pure dict) saved by `save_adapters`."""
    cfg = CLIPConfig(**_read_json(path, CONFIG_FILE))
    return cfg, AdapterConfig(**_read_json(path, ADAPTER_CONFIG_FILE)), _load_tree_dir(path, None)


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m cma_jax.convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="PyTorch checkpoint -> read-only Orbax backbone (+ adapters)")
    imp.add_argument("src", help="OpenAI .pt / state dict, Hugging Face CLIPModel folder, or CMA checkpoint")
    imp.add_argument("out", help="backbone checkpoint folder to create")
    imp.add_argument("--adapters_out", help="folder for the adapters of a Cross-Modal-Adapter checkpoint")
    imp.add_argument("--text_heads", type=int, help="text attention heads (default: width // 64, as OpenAI)")
    imp.add_argument("--activation", default="quick_gelu", help="adapter activation (not stored in CMA files)")
    imp.add_argument("--overwrite", action="store_true")
    exp = sub.add_parser("export", help="adapters folder -> the original repo's format (torch.save)")
    exp.add_argument("adapters", help="folder written by `import --adapters_out` or `save_adapters`")
    exp.add_argument("out", help="output .pth file")
    exp.add_argument("--backbone", help="also include this backbone's tensors (a full CLIP4Clip dict)")
    args = p.parse_args(argv)
    try:
        _run(args)
    except (CheckpointError, FileExistsError, FileNotFoundError) as e:
        p.exit(1, f"error: {e}\n")


def _run(args) -> None:
    if args.cmd == "import":
        overrides = {"text_heads": args.text_heads} if args.text_heads else {}
        conv = convert_checkpoint(args.src, **overrides)
        save_backbone(args.out, conv.clip_config, conv.backbone, conv.tokenizer_files, args.overwrite)
        print(f"backbone {conv.clip_config} -> {args.out}")
        if conv.tokenizer_files:
            print(f"tokenizer files -> {os.path.join(args.out, TOKENIZER_DIR)}")
        if conv.ignored:
            print(f"ignored {len(conv.ignored)} CLIP4Clip head tensors: {', '.join(conv.ignored)}")
        if conv.adapters is not None:
            acfg = dataclasses.replace(conv.adapter_config, activation=args.activation)
            if args.adapters_out:
                save_adapters(args.adapters_out, conv.clip_config, acfg, conv.adapters, args.overwrite)
                print(f"adapters {acfg} -> {args.adapters_out}")
            else:
                print("the checkpoint has adapters; pass --adapters_out DIR to keep them")
    else:
        cfg, _, adapters = load_adapters(args.adapters)
        backbone = None
        if args.backbone:
            bcfg, backbone = load_backbone(args.backbone)
            if dataclasses.replace(bcfg, dtype=cfg.dtype) != cfg:
                raise CheckpointError(f"{args.backbone}: its architecture {bcfg} differs from the adapters' {cfg}")
        export_adapters(args.out, adapters, cfg, backbone)
        print(f"adapters -> {args.out}")


if __name__ == "__main__":
    main()
