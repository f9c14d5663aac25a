"""The conversion as data: PyTorch (OpenAI, Hugging Face, original Cross-Modal-Adapter) names and
layouts of every CLIP tensor, against our parameter paths.
"""

from __future__ import annotations

import numpy as np

from cma_jax.models.clip import CLIPConfig

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



def to_torch_layout(x: np.ndarray, rule) -> np.ndarray:
    return x if rule is None else np.ascontiguousarray(np.transpose(x, np.argsort(TRANSPOSES[rule])))


def from_torch_layout(x: np.ndarray, rule) -> np.ndarray:
    return x if rule is None else np.ascontiguousarray(np.transpose(x, TRANSPOSES[rule]))


def openai_table(cfg: CLIPConfig) -> list[tuple[str, str, str | None]]:
    """Every (OpenAI name, our dotted path, rule) of a CLIP with this architecture."""
    table = list(OPENAI_TOP)
    for tower, layers in (("visual", cfg.vision_layers), ("text", cfg.text_layers)):
        pre = TOWER_PREFIX[tower]
        for i in range(layers):
            table += [(f"{pre}.{i}.{a}", f"{pre}.{i}.{b}", r) for a, b, r in OPENAI_BLOCK]
    return table


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

