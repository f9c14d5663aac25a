"""Run checkpoints: adapters only (< 10 MB for ViT-B/32), keep-last-N, atomic saves, clear mismatch errors."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from cma_jax import checkpoint as ckpt_lib
from cma_jax import loader
from cma_jax import optim
from cma_jax.models.summary import count
from cma_jax.models.retrieval import RetrievalModel
from cma_jax import config as config_lib


def _run_state(model, config, seed=0):
    """A train state with real (random) values, built without materialising the frozen backbone."""
    graphdef, params, rngs, _ = optim.split(model, config.method)
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    params = jax.tree.map(lambda s: jax.random.normal(next(keys), s.shape, s.dtype), params)
    tx, _ = optim.make_optimizer(config.train, params, 100)
    # Adam moments as after training (random, not zeros: zeros would compress away)
    opt_state = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype) if x.ndim else x,
                             tx.init(params))
    return optim.TrainState(params=params, opt_state=opt_state, rngs=rngs, step=0)


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_vit_b32_run_checkpoint_is_small_and_holds_no_backbone(tmp_path):
    config = config_lib.base_config()  # MSR-VTT: ViT-B/32, r=8, d_s=16
    model = nnx.eval_shape(lambda: RetrievalModel(loader.clip_config(config), loader.method(config),
                                                  rngs=nnx.Rngs(0)))
    state = _run_state(model, config)
    ckpt = ckpt_lib.RunCheckpointer(str(tmp_path))
    ckpt.save(7, state, {"next_batch": 7}, ckpt_lib.run_meta(model), force=True)
    ckpt.wait()
    size = _dir_bytes(os.path.join(tmp_path, "checkpoints", "7"))
    n = count(state.params)
    assert 3 * n * 4 <= size < 10 * 2 ** 20, (n, size)  # params + Adam mu, nu in float32; far below 10 MB
    items = {f for f in os.listdir(os.path.join(tmp_path, "checkpoints", "7")) if not f.startswith(("_", "commit"))}
    assert items == {"data", "meta", "opt_state", "params"}


@pytest.fixture
def tiny():
    config = config_lib.base_config()
    for k, v in dict(embed_dim=16, image_resolution=32, vision_layers=2, vision_width=32, vision_patch_size=8,
                     context_length=8, vocab_size=64, text_width=32, text_heads=2, text_layers=2).items():
        config.model.clip[k] = v
    config.adapter.reduction_dim, config.adapter.share_dim = 4, 8
    model = RetrievalModel(loader.clip_config(config), loader.method(config), rngs=nnx.Rngs(0))
    return config, model


def test_keep_last_n_and_restore_roundtrip(tmp_path, tiny):
    config, model = tiny
    meta = ckpt_lib.run_meta(model)
    ckpt = ckpt_lib.RunCheckpointer(str(tmp_path), keep=2)
    states = {s: _run_state(model, config, seed=s) for s in (1, 2, 3)}
    for s, st in states.items():
        ckpt.save(s, st, {"next_batch": s, "epoch": [s, "x"]}, meta, force=True)
    ckpt.wait()
    assert sorted(os.listdir(ckpt.directory)) == ["2", "3"]
    restored, data = ckpt.restore(3, ckpt_lib.abstract(states[3]), meta)
    assert data == {"next_batch": 3, "epoch": [3, "x"]}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states[3])):
        np.testing.assert_array_equal(a, b)
    assert os.listdir(os.path.join(ckpt.directory, "3", "data")).count("process_0-of-1.json") == 1
    ckpt.close()


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, tiny, monkeypatch):
    config, model = tiny
    meta = ckpt_lib.run_meta(model)
    good = _run_state(model, config, seed=1)
    ckpt = ckpt_lib.RunCheckpointer(str(tmp_path))
    ckpt.save(1, good, {"next_batch": 1}, meta, force=True)
    ckpt.wait()

    def crash(self, directory, args):
        raise KeyboardInterrupt("killed while saving")
    monkeypatch.setattr(ckpt_lib.DataStateHandler, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, _run_state(model, config, seed=2), {"next_batch": 2}, meta, force=True)
        ckpt.wait()
    monkeypatch.undo()

    again = ckpt_lib.RunCheckpointer(str(tmp_path))  # a restarted run
    assert again.latest_step() == 1
    restored, data = again.restore(1, ckpt_lib.abstract(good), meta)
    assert data == {"next_batch": 1}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(good)):
        np.testing.assert_array_equal(a, b)


def test_grain_bytes_state_roundtrip():
    state = b'{"last_seen_indices": {"0": 5}}'
    assert ckpt_lib.decode_iterator_state(ckpt_lib.encode_iterator_state(state)) == state
    assert ckpt_lib.decode_iterator_state(ckpt_lib.encode_iterator_state({"a": 1})) == {"a": 1}


def test_restore_into_other_architecture_names_the_difference(tmp_path, tiny):
    config, model = tiny
    ckpt = ckpt_lib.RunCheckpointer(str(tmp_path))
    ckpt.save(1, _run_state(model, config), {"next_batch": 1}, ckpt_lib.run_meta(model), force=True)
    ckpt.wait()
    other = config_lib.base_config()
    for k, v in config.model.clip.items():
        other.model.clip[k] = v
    other.model.clip.vision_layers = 3
    other.adapter.reduction_dim, other.adapter.share_dim = 4, 4
    model2 = RetrievalModel(loader.clip_config(other), loader.method(other), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError) as e:
        ckpt.restore(1, ckpt_lib.abstract(_run_state(model2, other)), ckpt_lib.run_meta(model2))
    assert "clip.vision_layers: checkpoint 2, config 3" in str(e.value)
    assert "adapter.share_dim: checkpoint 8, config 4" in str(e.value)
    with pytest.raises(FileNotFoundError, match="no run checkpoint"):
        ckpt_lib.load_adapters(str(tmp_path / "nowhere"), model)


def test_remote_workdir_is_kept_as_a_url(monkeypatch):
    """A gs:// workdir (the TPU pod launcher requires one) must not become a local 'CWD/gs:/...' path."""
    seen = []

    class Manager:  # stands in for Orbax's manager: no bucket to reach in tests
        def __init__(self, directory, options=None):
            seen.append(str(directory))

    monkeypatch.setattr(ckpt_lib.ocp, "CheckpointManager", Manager)
    assert ckpt_lib.RunCheckpointer("gs://bucket/runs/msrvtt").directory == "gs://bucket/runs/msrvtt/checkpoints"
    assert seen == ["gs://bucket/runs/msrvtt/checkpoints"]
    assert ckpt_lib.RunCheckpointer("rel/run").directory == os.path.abspath("rel/run/checkpoints")
