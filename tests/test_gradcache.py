"""Exact contrastive accumulation (cma_jax.gradcache) against the one-shot full-batch gradient.

Both heads, k = 2 and 4, on one device and on 8 simulated devices (data, fsdp and tensor parallel
meshes, as cma_jax.train shards the step); logit_scale trains so the head's own gradient is covered.
With adapter dropout, each micro-batch must see the same masks in its two passes: the gradient then
equals the one-shot gradient of the loss computed on micro-batch embeddings drawn in the same order.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cma_jax import gradcache, optim
from cma_jax import loader
from cma_jax.models import state
from cma_jax.models.retrieval import symmetric_infonce
from tiny import SyntheticBatches, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def rel_err(got, want) -> float:
    """max over leaves of max |got - want| / max |want|."""
    return max(float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) for g, w in zip(jax.tree.leaves(got),
                                                                                 jax.tree.leaves(want)))


def setup(head, dropout=0.0):
    c = tiny_config()
    # init_std 0.2: adapters large enough that their gradients are not dominated by rounding
    adapter_cfg = dataclasses.replace(loader.method(c), dropout=dropout, init_std=0.2)
    model = state.new_model(loader.clip_config(c), adapter_cfg, head=head, seed=0)
    graphdef, params, rngs, frozen = optim.split(model, "cma", train_logit_scale=True)
    batch = jax.tree.map(jnp.asarray, SyntheticBatches(c).global_batch(0))  # 8 videos x 2 frames
    return graphdef, params, rngs, frozen, batch


def one_shot(graphdef, params, rngs, frozen, batch):
    def loss_fn(p):
        return nnx.merge(graphdef, p, rngs, frozen, copy=True)(batch)
    return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.parametrize("head", ["meanp", "text_conditioned"])
@pytest.mark.parametrize("k", [2, 4])
def test_gradient_equals_one_shot(head, k):
    graphdef, params, rngs, frozen, batch = setup(head)
    loss, want = one_shot(graphdef, params, rngs, frozen, batch)
    (got_loss, _), got = jax.jit(lambda p, r, f, b: gradcache.value_and_grad(graphdef, p, r, f, b, k))(
        params, rngs, frozen, batch)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    np.testing.assert_allclose(float(got_loss), float(loss), rtol=1e-6)
    assert rel_err(got, want) <= TOL
    assert float(jnp.abs(got["clip"]["logit_scale"][...])) > 0  # the head's own gradient is in


def test_dropout_masks_are_replayed():
    graphdef, params, rngs, frozen, batch = setup("text_conditioned", dropout=0.5)
    k = 2

    def drawn_in_order(p):  # one-shot, but embedding the micro-batches in gradcache's order and RNG chain
        r, texts, frames = rngs, [], []
        for i in range(k):
            mb = jax.tree.map(lambda x: x[i::k], batch)
            m = nnx.merge(graphdef, p, r, frozen, copy=True)
            texts.append(m.encode_text(mb["text_ids"]))
            frames.append(m.encode_frames(mb["frames"]))
            r = nnx.state(m, nnx.RngState)
        mask = jnp.concatenate([batch["frame_mask"][i::k] for i in range(k)])
        return symmetric_infonce(m.similarity(jnp.concatenate(texts), jnp.concatenate(frames), mask))

    loss, want = jax.jit(jax.value_and_grad(drawn_in_order))(params)
    (got_loss, new_rngs), got = jax.jit(lambda p, r: gradcache.value_and_grad(graphdef, p, r, frozen, batch, k))(
        params, rngs)
    no_dropout_loss, _ = one_shot(*setup("text_conditioned"))
    assert abs(float(loss) - float(no_dropout_loss)) > 1e-3  # dropout is really on
    np.testing.assert_allclose(float(got_loss), float(loss), rtol=1e-6)
    assert rel_err(got, want) <= TOL
    counts = [int(v) for p, v in jax.tree_util.tree_flatten_with_path(new_rngs)[0]
              if "count" in jax.tree_util.keystr(p)]
    assert counts and all(c == k for c in counts)  # every stream advanced once per micro-batch


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path[:0] = [{root!r}, {tests!r}]
    from cma_jax import gradcache, sharding as shd
    from test_gradcache import one_shot, rel_err, setup
    from tiny import tiny_config
    shd.MIN_SHARD_SIZE = 0  # shard even the tiny model's parameters
    out = {{}}
    for head in ("meanp", "text_conditioned"):
        graphdef, params, rngs, frozen, batch = setup(head)
        loss, want = one_shot(graphdef, params, rngs, frozen, batch)  # one device
        for d, f, m in {meshes!r}:
            c = tiny_config()
            c.mesh.data, c.mesh.fsdp, c.mesh.model = d, f, m
            shd.select_partitioner(c, jax.device_count())  # what cma_jax.main does at start-up
            mesh = shd.make_mesh(c)
            psh, fsh = shd.tree_shardings(params, mesh), shd.tree_shardings(frozen, mesh)
            rep = shd.replicated(mesh)
            micro = lambda ndim: jax.sharding.NamedSharding(
                mesh, jax.sharding.PartitionSpec(None, shd.BATCH_AXES, *([None] * (ndim - 2))))
            for k in (2, 4):
                fn = jax.jit(lambda p, r, fr, b: gradcache.value_and_grad(graphdef, p, r, fr, b, k, micro),
                             in_shardings=(psh, jax.tree.map(lambda _: rep, rngs), fsh, shd.batch_sharding(mesh)))
                (got_loss, _), got = fn(params, rngs, frozen, batch)
                out[f"{{head}} {{d}}x{{f}}x{{m}} k={{k}}"] = [abs(float(got_loss - loss)) / float(loss),
                                                          rel_err(got, want)]
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_gradient_equals_one_shot_on_eight_devices():
    meshes = [(2, 4, 1), (2, 2, 2)]  # data + fsdp; all three axes
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), meshes=meshes)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert len(results) == 2 * len(meshes) * 2
    for name, (loss_err, grad_err) in results.items():
        assert loss_err <= 1e-6 and grad_err <= TOL, (name, loss_err, grad_err)
