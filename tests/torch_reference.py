"""A PyTorch statement of OpenAI's ViT CLIP with the original Cross-Modal-Adapter repo's adapters.

Shared by the parity tests (tests/test_clip_parity.py) and the speed comparison
(benchmarks/bench_vs_pytorch.py). Names and layouts are those of OpenAI's state dicts and of the
original repo's stacked adapter tensors (`clip.visual_adapter_down_weight [2L, r, W]`, ...), so a
`cma_jax.convert.to_cma` dict loads into `RetrievalReference` with `load_state_dict`. The code
follows OpenAI's (sequence-first [S, N, W] activations, `nn.MultiheadAttention` with
`need_weights=False`) and is written independently of cma_jax's model code; only the documented
depth mapping of the shared adapter bank (`shared_layer_index`) is taken from it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from cma_jax.models.clip import CLIPConfig
from cma_jax.models.peft.adapter import shared_layer_index

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            [("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x, mask, attn_adapter, mlp_adapter):  # x: [S, N, W]
        y = self.ln_1(x)
        x = x + attn_adapter(self.attn(y, y, y, need_weights=False, attn_mask=mask)[0])
        return x + mlp_adapter(self.mlp(self.ln_2(x)))


class OpenAICLIP(nn.Module):
    """OpenAI's CLIP for `cfg`'s architecture; with `adapter_r > 0`, the original repo's adapters."""

    def __init__(self, cfg: CLIPConfig, adapter_r: int = 0, share_dim: int = 0):
        super().__init__()
        vw, tw, grid = cfg.vision_width, cfg.text_width, cfg.grid
        self.register_buffer("input_resolution", torch.tensor(cfg.image_resolution))  # as in OpenAI's archives
        self.register_buffer("context_length", torch.tensor(cfg.context_length))
        self.register_buffer("vocab_size", torch.tensor(cfg.vocab_size))
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, vw, cfg.vision_patch_size, cfg.vision_patch_size, bias=False)
        self.visual.class_embedding = nn.Parameter(torch.randn(vw))
        self.visual.positional_embedding = nn.Parameter(torch.randn(grid ** 2 + 1, vw))
        self.visual.ln_pre = nn.LayerNorm(vw)
        self.visual.transformer = nn.Module()
        self.visual.transformer.resblocks = nn.ModuleList(
            [Block(vw, cfg.vision_heads) for _ in range(cfg.vision_layers)])
        self.visual.ln_post = nn.LayerNorm(vw)
        self.visual.proj = nn.Parameter(torch.randn(vw, cfg.embed_dim))
        self.token_embedding = nn.Embedding(cfg.vocab_size, tw)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, tw))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([Block(tw, cfg.text_heads) for _ in range(cfg.text_layers)])
        self.ln_final = nn.LayerNorm(tw)
        self.text_projection = nn.Parameter(torch.randn(tw, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        self.r, self.d_s = adapter_r, share_dim
        self.n_shared = min(cfg.vision_layers, cfg.text_layers)
        if adapter_r:
            g = lambda *s: nn.Parameter(0.3 * torch.randn(*s))  # noqa: E731 - large enough to matter in tests
            lv, lt = cfg.vision_layers, cfg.text_layers
            self.visual_adapter_down_weight = g(2 * lv, adapter_r, vw)
            self.visual_adapter_down_bias = g(2 * lv, adapter_r)
            self.visual_adapter_up_unique_weight = g(2 * lv, vw - share_dim, adapter_r)
            self.visual_adapter_up_unique_bias = g(2 * lv, vw - share_dim)
            self.text_adapter_down_weight = g(2 * lt, adapter_r, tw)
            self.text_adapter_down_bias = g(2 * lt, adapter_r)
            self.text_adapter_up_unique_weight = g(2 * lt, tw - share_dim, adapter_r)
            self.text_adapter_up_unique_bias = g(2 * lt, tw - share_dim)
            self.vt_adapter_up_share_weight = g(2 * self.n_shared, share_dim, adapter_r)
            self.vt_adapter_up_share_bias = g(2 * self.n_shared, share_dim)

    def adapter(self, tower, j, shared_j):
        """The original repo's A(h) = h + cat(up_unique(z), up_share(z)), z = quick_gelu(down(h))."""
        if not self.r:
            return lambda h: h
        p = lambda name: getattr(self, f"{tower}_adapter_{name}")  # noqa: E731

        def apply(h):
            z = QuickGELU()(nn.functional.linear(h, p("down_weight")[j], p("down_bias")[j]))
            unique = nn.functional.linear(z, p("up_unique_weight")[j], p("up_unique_bias")[j])
            share = nn.functional.linear(z, self.vt_adapter_up_share_weight[shared_j],
                                         self.vt_adapter_up_share_bias[shared_j])
            return h + torch.cat([unique, share], dim=-1)
        return apply

    def run(self, tower, blocks, x, mask):
        for i, block in enumerate(blocks):
            k = shared_layer_index(i, len(blocks), self.n_shared)
            x = block(x, mask, self.adapter(tower, 2 * i, 2 * k), self.adapter(tower, 2 * i + 1, 2 * k + 1))
        return x

    def encode_image(self, images):  # [N, 3, H, W] normalised
        v = self.visual
        x = v.conv1(images).flatten(2).permute(0, 2, 1)  # [N, g*g, W]
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
        x = self.run("visual", v.transformer.resblocks, v.ln_pre(x).permute(1, 0, 2), None).permute(1, 0, 2)
        return v.ln_post(x[:, 0]) @ v.proj

    def encode_text(self, ids):  # [N, L]
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:length]
        mask = torch.full((length, length), float("-inf"), device=ids.device).triu(1)
        x = self.run("text", self.transformer.resblocks, x.permute(1, 0, 2), mask).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection

    def forward(self, images, ids):
        return self.encode_image(images), self.encode_text(ids)


def text_conditioned_similarity(text, frames, frame_mask, tau: float = 5.0):
    """The paper's head: v = sum_j softmax_j(t . f_j / tau) f_j over valid frames; cos(t, v), [Nt, Nv]."""
    dots = torch.einsum("td,vjd->tvj", text, frames)
    w = torch.softmax((dots / tau).masked_fill(~frame_mask[None], float("-inf")), dim=-1)
    video = torch.einsum("tvj,vjd->tvd", w, frames)
    return nn.functional.cosine_similarity(text[:, None], video, dim=-1, eps=1e-12)


def meanp_similarity(text, frames, frame_mask):
    m = frame_mask.float()[..., None]
    video = (frames * m).sum(1) / m.sum(1).clamp(min=1.0)
    return nn.functional.normalize(text, dim=-1) @ nn.functional.normalize(video, dim=-1).T


class RetrievalReference(nn.Module):
    """`clip` + similarity head + symmetric InfoNCE: the PyTorch counterpart of cma_jax's RetrievalModel."""

    def __init__(self, cfg: CLIPConfig, adapter_r: int = 0, share_dim: int = 0, head: str = "text_conditioned",
                 tau: float = 5.0):
        super().__init__()
        self.clip = OpenAICLIP(cfg, adapter_r, share_dim)
        self.head, self.tau = head, tau
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, frames, frame_mask, text_ids):  # frames: [B, T, H, W, 3] uint8
        b, t = frames.shape[:2]
        images = frames.reshape((b * t,) + frames.shape[2:]).permute(0, 3, 1, 2).float() / 255.0
        frame_emb = self.clip.encode_image((images - self.mean) / self.std).reshape(b, t, -1)
        text_emb = self.clip.encode_text(text_ids)
        if self.head == "meanp":
            cos = meanp_similarity(text_emb, frame_emb, frame_mask)
        else:
            cos = text_conditioned_similarity(text_emb, frame_emb, frame_mask, self.tau)
        logits = self.clip.logit_scale.exp() * cos
        labels = torch.arange(b)
        return 0.5 * (nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels))
