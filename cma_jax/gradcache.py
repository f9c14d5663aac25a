"""Exact contrastive gradient accumulation: gradient caching (Gao et al. 2021).

`value_and_grad` gives the gradient of the symmetric InfoNCE over the whole batch while holding the
activations of one micro-batch only: the batch is embedded micro-batch by micro-batch without keeping
activations, the full-batch loss is differentiated w.r.t. the embeddings, and each micro-batch is recomputed
under `jax.vjp` to pull its slice of that gradient back to the parameters. docs/training.md ("How a step
works") says why the usual accumulation will not do and what this costs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cma_jax.models.retrieval import symmetric_infonce


def _micro(x, k, micro_sharding):
    """[B, ...] -> [k, B/k, ...]; micro-batch i = rows i::k, so each stays spread over the data devices."""
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
    if micro_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, micro_sharding(x.ndim))
    return x


def _whole(x):
    """[k, B/k, ...] -> [B, ...] in micro-batch order (a permutation of the rows: InfoNCE is invariant
    under permuting texts and videos together, which keeps every pair on the diagonal)."""
    return x.reshape((-1,) + x.shape[2:])


def _unwhole(x, k, micro_sharding):
    """The inverse of `_whole`: [B, ...] in micro-batch order -> [k, B/k, ...]."""
    x = x.reshape((k, -1) + x.shape[1:])
    if micro_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, micro_sharding(x.ndim))
    return x


def value_and_grad(graphdef, params, rngs, frozen, batch: dict, num_micro: int, micro_sharding=None):
    """((loss, rngs), grads) of the full-batch symmetric InfoNCE, in `num_micro` micro-batches.

    Equal to the one-shot gradient of the full-batch loss, at the price of a second forward pass through
    the towers. Each micro-batch's RNG state is recorded in pass 1 and replayed in pass 3, so adapter
    dropout draws the same masks in both passes.

    The model is `nnx.merge(graphdef, params, rngs, frozen)`, a RetrievalModel; gradients are
    w.r.t. `params`. `micro_sharding(ndim)`, if given, is the sharding of a micro-batched array
    [k, B/k, ...] (the batch axis over the data devices). The returned rngs are the RNG state after
    pass 1 (each micro-batch advanced it once, as a step over it would).
    """
    k = num_micro

    def model(p, r):
        return nnx.merge(graphdef, p, r, frozen, copy=True)

    def embed(p, r, mb):
        m = model(p, r)
        emb = (m.encode_text(mb["text_ids"]), m.encode_frames(mb["frames"], mb["frame_mask"]))
        return emb, nnx.state(m, nnx.RngState)

    micro = jax.tree.map(lambda x: _micro(x, k, micro_sharding), batch)

    # 1. Embeddings of every micro-batch; no gradient is taken here, so no activation is kept.
    def embed_step(r, mb):
        emb, r_next = embed(params, r, mb)
        return r_next, (emb, r)

    rngs_out, (emb, micro_rngs) = jax.lax.scan(embed_step, rngs, micro)

    # 2. The full-batch loss; its gradient w.r.t. the embeddings and the head's own parameters.
    def head_loss(p, text, frames):
        return symmetric_infonce(model(p, rngs).similarity(text, frames, _whole(micro["frame_mask"])))

    loss, (grads, d_text, d_frames) = jax.value_and_grad(head_loss, argnums=(0, 1, 2))(
        params, _whole(emb[0]), _whole(emb[1]))
    d_emb = jax.tree.map(lambda d: _unwhole(d, k, micro_sharding), (d_text, d_frames))

    # 3. Each micro-batch again, its slice of the embedding gradient pulled back to the parameters.
    def backward_step(grads, xs):
        mb, r, d = xs
        _, pullback = jax.vjp(lambda p: embed(p, r, mb)[0], params)
        return jax.tree.map(jnp.add, grads, pullback(d)[0]), None

    grads, _ = jax.lax.scan(backward_step, grads, (micro, micro_rngs, d_emb))
    return (loss, rngs_out), grads
