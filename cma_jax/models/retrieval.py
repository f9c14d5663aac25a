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


def frame_dots(text: jax.Array, frames: jax.Array, flat: bool = False) -> jax.Array:
    """t . f_j [Nt, Nv, T] of text [Nt, D] and frames [Nv, T, D].

    flat: as one [Nt, Nv*T] product, which XLA's CPU dot runs several times faster than the batched einsum
    (search: a few queries against a whole index); rounded differently in the last bits, so training and
    evaluation keep the einsum their recorded numbers were made with.
    """
    if flat:
        n, t, d = frames.shape
        return (text @ frames.reshape(n * t, d).T).reshape(text.shape[0], n, t)
    return jnp.einsum("td,vjd->tvj", text, frames)


def video_grams(frames: jax.Array) -> jax.Array:
    """[Nv, T, D] -> [Nv, T, T]: f_j . f_k per video (held by a search index for many queries)."""
    return jnp.einsum("vjd,vkd->vjk", frames, frames)


def head_scores(head: str, text: jax.Array, frames: jax.Array, frame_mask: jax.Array, tau: float = 5.0, *,
                gram: jax.Array | None = None, flat: bool = False) -> tuple[jax.Array, jax.Array]:
    """The video-text head: (cosine [Nt, Nv], frame weights [Nt, Nv, T]) for text [Nt, D], frames [Nv, T, D].

    Each video's embedding is v = sum_j w_j f_j over its valid frames (w zero on padded frames, each row
    summing to 1) and the score is cos(t, v). meanp: w uniform, v the mean frame. text_conditioned (the
    paper's): w the softmax over valid frames of (t . f_j) / tau; computed without materialising v
    ([Nt, Nv, D]): t . v = sum_j w_j (t . f_j) and |v|^2 = w^T G w with the per-video Gram matrix
    G = F F^T (`gram`, [Nv, T, T], when held; else computed). `flat`: see `frame_dots`. Training,
    evaluation, the API and search all score with this function.
    """
    valid = frame_mask[None].astype(bool)
    if head == "meanp":
        w = jnp.broadcast_to(valid, (text.shape[0],) + frame_mask.shape).astype(jnp.float32)
        w = w / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
        m = frame_mask.astype(jnp.float32)[..., None]
        video = (frames * m).sum(1) / jnp.maximum(m.sum(1), 1.0)  # v does not depend on the text
        return _l2_normalize(text) @ _l2_normalize(video).T, w
    if head != "text_conditioned":
        raise ValueError(f"unknown similarity head {head!r}; expected one of {HEADS}")
    dots = frame_dots(text, frames, flat)
    w = jax.nn.softmax(jnp.where(valid, dots / tau, -jnp.inf), axis=-1)
    w = jnp.where(valid, w, 0.0)
    tv = jnp.sum(w * dots, axis=-1)
    gram = video_grams(frames) if gram is None else gram
    vv = jnp.einsum("tvj,vjk,tvk->tv", w, gram, w)
    tt = jnp.sum(text * text, axis=-1)[:, None]
    return tv * jax.lax.rsqrt(jnp.maximum(tt * vv, 1e-24)), w


def similarity(head: str, text, frames, frame_mask, tau: float = 5.0) -> jax.Array:
    """Unscaled cosine similarity [Nt, Nv] of the named head (`head_scores` without the weights)."""
    return head_scores(head, text, frames, frame_mask, tau)[0]


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
