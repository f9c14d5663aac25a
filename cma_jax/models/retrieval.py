"""Video-text retrieval on CLIP: frames -> per-frame embeddings -> similarity head -> InfoNCE.

Batch contract (see ARCHITECTURE.md): `frames [B, T, H, W, 3]` uint8 (or already-normalised
float), `frame_mask [B, T]`, `text_ids [B, L] int32`, `text_mask [B, L]`. CLIP normalisation
happens here and only here (`normalize_frames`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cma_jax.models.clip import CLIP, CLIPConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEADS = ("meanp", "text_conditioned")


def normalize_frames(frames: jax.Array) -> jax.Array:
    """uint8 RGB in [0, 255] -> CLIP-normalised float32; float input is taken as normalised."""
    if frames.dtype != jnp.uint8:
        return frames.astype(jnp.float32)
    x = frames.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def _l2_normalize(x, axis=-1):
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-12))


def meanp_similarity(text: jax.Array, frames: jax.Array, frame_mask: jax.Array) -> jax.Array:
    """Cosine between each text and each video's masked mean frame embedding.

    text [Nt, D], frames [Nv, T, D], frame_mask [Nv, T] -> [Nt, Nv] (unscaled cosine).
    """
    m = frame_mask.astype(jnp.float32)[..., None]
    video = (frames * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    return _l2_normalize(text) @ _l2_normalize(video).T


def text_conditioned_similarity(text: jax.Array, frames: jax.Array, frame_mask: jax.Array,
                                tau: float = 5.0) -> jax.Array:
    """The paper's head: per (text, video), softmax over valid frames of (t . f_j) / tau.

    v = sum_j w_j f_j on unnormalised embeddings; returns cos(t, v) for every pair, [Nt, Nv].
    Computed without materialising v ([Nt, Nv, D]): t.v = sum_j w_j (t.f_j) and
    |v|^2 = w^T G w with the per-video Gram matrix G = F F^T ([Nv, T, T]).
    """
    dots = jnp.einsum("td,vjd->tvj", text, frames)  # [Nt, Nv, T]
    logits = jnp.where(frame_mask[None].astype(bool), dots / tau, -jnp.inf)
    w = jax.nn.softmax(logits, axis=-1)
    w = jnp.where(frame_mask[None].astype(bool), w, 0.0)
    tv = jnp.sum(w * dots, axis=-1)
    gram = jnp.einsum("vjd,vkd->vjk", frames, frames)
    vv = jnp.einsum("tvj,vjk,tvk->tv", w, gram, w)
    tt = jnp.sum(text * text, axis=-1)[:, None]
    return tv * jax.lax.rsqrt(jnp.maximum(tt * vv, 1e-24))


def frame_weights(head: str, text: jax.Array, frames: jax.Array, frame_mask: jax.Array, tau: float = 5.0) -> jax.Array:
    """[Nt, Nv, T]: how much each frame of each video counts for each text in the head's video embedding.

    text_conditioned: the softmax over valid frames of (t . f_j) / tau (as in the similarity); meanp:
    uniform over the valid frames. Zero on padded frames; each (text, video) row sums to 1.
    """
    valid = frame_mask[None].astype(bool)
    if head == "meanp":
        w = jnp.broadcast_to(valid, (text.shape[0],) + frame_mask.shape).astype(jnp.float32)
        return w / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
    dots = jnp.einsum("td,vjd->tvj", text, frames)
    w = jax.nn.softmax(jnp.where(valid, dots / tau, -jnp.inf), axis=-1)
    return jnp.where(valid, w, 0.0)


def similarity(head: str, text, frames, frame_mask, tau: float = 5.0) -> jax.Array:
    """Unscaled cosine similarity [Nt, Nv] for the named head."""
    if head == "meanp":
        return meanp_similarity(text, frames, frame_mask)
    if head == "text_conditioned":
        return text_conditioned_similarity(text, frames, frame_mask, tau)
    raise ValueError(f"unknown similarity head {head!r}; expected one of {HEADS}")


def symmetric_infonce(logits: jax.Array) -> jax.Array:
    """Mean of text->video and video->text cross-entropy with the diagonal as targets."""
    labels = jnp.arange(logits.shape[0])
    t2v = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    v2t = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return 0.5 * (t2v + v2t)


class RetrievalModel(nnx.Module):
    """CLIP with a fine-tuning method's modules (`method`: see cma_jax.models.peft) and a video similarity head."""

    def __init__(self, clip: CLIPConfig, method=None, head: str = "text_conditioned", tau: float = 5.0, *,
                 rngs: nnx.Rngs):
        if head not in HEADS:
            raise ValueError(f"unknown similarity head {head!r}; expected one of {HEADS}")
        self.head = head
        self.tau = tau
        self.clip = CLIP(clip, method, rngs=rngs)

    def encode_text(self, text_ids: jax.Array) -> jax.Array:
        """[B, L] int32 -> [B, D] float32 (unnormalised)."""
        return self.clip.encode_text(text_ids)

    def encode_frames(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        """[B, T, H, W, 3] uint8 or normalised float (+ frame_mask [B, T]) -> [B, T, D] float32 (unnormalised).

        The mask matters only to methods that work across a video's frames (ST-Adapter, VoP): padded
        frames then do not change the real frames' embeddings.
        """
        return self.clip.encode_video(normalize_frames(frames), frame_mask)

    def similarity(self, text_emb, frame_emb, frame_mask) -> jax.Array:
        """Scaled logits [Nt, Nv]: exp(logit_scale) * cosine."""
        cos = similarity(self.head, text_emb, frame_emb, frame_mask, self.tau)
        return jnp.exp(self.clip.logit_scale[...]) * cos

    def __call__(self, batch: dict) -> jax.Array:
        """Symmetric InfoNCE over the batch (the global batch when the arrays are sharded)."""
        text = self.encode_text(batch["text_ids"])
        frames = self.encode_frames(batch["frames"], batch["frame_mask"])
        return symmetric_infonce(self.similarity(text, frames, batch["frame_mask"]))
