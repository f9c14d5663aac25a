"""Training: only adapters learn, frozen weights stay bit-identical, resume is exact, accumulation is right."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cma_jax import checkpoint as ckpt_lib
from cma_jax import optim
from cma_jax import loader
from cma_jax import run as run_lib
from cma_jax.models.summary import count
from cma_jax import train as train_lib
from cma_jax.models.peft.adapter import AdapterParam
from test_tb import tb_scalars
from tiny import SyntheticBatches, tiny_config


def _flat(state):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def _frozen(model):
    return _flat(nnx.state(model, nnx.All(nnx.Param, nnx.Not(AdapterParam))))


def _adapters(model):
    return _flat(nnx.state(model, AdapterParam))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps of adapter training (checkpoints at 2 and 4)."""
    config = tiny_config()
    workdir = str(tmp_path_factory.mktemp("run"))
    model, history = train_lib.train(run_lib.resolve(config, workdir), train_iter=SyntheticBatches(config))
    return config, workdir, model, history


def test_frozen_weights_bit_identical_and_adapters_learn(trained):
    config, _, model, history = trained
    init = loader.from_run(run_lib.resolve(config))[0]  # same seed -> the starting point of the run
    before, after = _frozen(init), _frozen(model)
    assert before.keys() == after.keys() and len(before) > 20
    for k in before:
        assert np.array_equal(before[k], after[k]), k
    a0, a1 = _adapters(init), _adapters(model)
    changed = [k for k in a0 if not np.array_equal(a0[k], a1[k])]
    assert len(changed) == len(a0)  # every adapter tensor moved
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(np.isfinite(h["loss"]) and h["step_time"] > 0 and h["examples_per_s"] > 0 for h in history)
    # warmup (1 step) then cosine: lr(0)=0, lr(1)=peak
    np.testing.assert_allclose([h["lr"] for h in history][:2], [0.0, config.train.lr], rtol=1e-6)


def test_each_step_records_its_wait_for_the_batch_near_zero_for_a_fast_pipeline(trained):
    """history.jsonl and TensorBoard get the seconds waiting for each batch and its share of the step; batches
    made while the previous step ran are waited for ~0 (a slow pipeline: test_prefetch.py)."""
    _, workdir, _, history = trained
    for h in history:
        assert h["data_wait_share"] == pytest.approx(h["data_wait"] / (h["data_wait"] + h["step_time"]))
    assert max(h["data_wait"] for h in history[1:]) < 0.05
    assert tb_scalars(workdir, "train/data_wait") == pytest.approx([h["data_wait"] for h in history])
    assert tb_scalars(workdir, "train/data_wait_share") == pytest.approx([h["data_wait_share"] for h in history])


def test_the_step_compiled_from_shapes_is_the_step_training_runs(trained):
    """train.build_step on abstract values (no weights, no data: the compile command's way) lowers and
    compiles; run on the tiny model's real initial state it gives training's first loss."""
    config, _, _, history = trained
    run = run_lib.resolve(config)
    graphdef, params, rngs, frozen = optim.split(nnx.eval_shape(lambda: loader.from_run(run)[0]), run.method)
    step_fn, state_sh, frozen_sh, tx, _ = train_lib.build_step(run, graphdef, params, rngs, frozen, 4)
    assert isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct)
    batch = SyntheticBatches(config).global_batch(0)
    shapes = optim.TrainState(params=params, opt_state=jax.eval_shape(tx.init, params), rngs=rngs,
                              step=jax.ShapeDtypeStruct((), jnp.int32))
    compiled = step_fn.lower(shapes, frozen, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
                             ).compile()
    assert compiled.cost_analysis()["flops"] > 0

    _, params, rngs, frozen = optim.split(loader.from_run(run)[0], run.method)
    state = jax.device_put(optim.TrainState(params=params, opt_state=tx.init(params), rngs=rngs, step=jnp.int32(0)),
                           state_sh)
    _, metrics = compiled(state, jax.device_put(frozen, frozen_sh), batch)
    np.testing.assert_allclose(float(metrics["loss"]), history[0]["loss"], rtol=1e-6)


def test_logit_scale_frozen_unless_configured():
    config = tiny_config()
    model = loader.from_run(run_lib.resolve(config))[0]
    _, params, _, frozen = optim.split(model, config.method, config.model.train_logit_scale)
    assert "logit_scale" not in jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(params)[0])
    config.model.train_logit_scale = True
    _, params, _, _ = optim.split(model, config.method, config.model.train_logit_scale)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert sum("logit_scale" in p for p in paths) == 1
    assert count(params) == count(nnx.state(model, AdapterParam)) + 1


def test_weight_decay_skips_biases():
    config = tiny_config()
    model = loader.from_run(run_lib.resolve(config))[0]
    _, params, _, _ = optim.split(model, config.method, config.model.train_logit_scale)
    mask = _flat(optim.decay_mask(params))
    assert all(v == ("kernel" in k) for k, v in mask.items()), mask


def test_adapter_step_computes_no_backbone_weight_gradients():
    """Compiled FLOPs: the adapter step must be far cheaper than the full fine-tuning step."""
    flops = {}
    for method in ("cma", "full"):
        config = tiny_config()
        config.method = method
        model = loader.from_run(run_lib.resolve(config))[0]
        graphdef, params, rngs, frozen = optim.split(model, config.method, config.model.train_logit_scale)
        tx, lr = optim.make_optimizer(config.train, params, 10)
        step = jax.jit(train_lib.make_train_step(graphdef, tx, lr, 1))
        state = optim.TrainState(params=params, opt_state=tx.init(params), rngs=rngs, step=jnp.int32(0))
        batch = SyntheticBatches(config).global_batch(0)
        cost = step.lower(state, frozen, batch).compile().cost_analysis()
        flops[method] = (cost[0] if isinstance(cost, list) else cost)["flops"]
    # no weight gradients: ~2/3 of full fine-tuning's forward+backward (the tiny model has
    # relatively more non-matmul work, so allow up to 0.8)
    assert flops["cma"] < 0.8 * flops["full"], flops


def test_full_finetuning_trains_backbone_but_not_logit_scale(tmp_path):
    config = tiny_config(num_steps=2, save_every_steps=10)
    config.method = "full"
    config.train.backbone_lr = 1e-3
    model, _ = train_lib.train(run_lib.resolve(config, str(tmp_path)), train_iter=SyntheticBatches(config))
    init = loader.from_run(run_lib.resolve(config))[0]
    before, after = _frozen(init), _frozen(model)
    moved = [k for k in before if not np.array_equal(before[k], after[k])]
    assert len(moved) == len(before) - 1 and not any("logit_scale" in k for k in moved)
    assert not _adapters(model)  # no adapters in the full fine-tuning baseline


@pytest.mark.slow
def test_grad_accumulation_is_the_whole_batch_objective():
    """k micro-batches take the InfoNCE over the whole batch (gradient caching): same loss, same update."""
    config = tiny_config(grad_accum_steps=2, grad_clip=0.0)
    model = loader.from_run(run_lib.resolve(config))[0]
    graphdef, params, rngs, frozen = optim.split(model, config.method, config.model.train_logit_scale)
    tx = optax.sgd(1.0)  # new params = params - gradient
    state = optim.TrainState(params=params, opt_state=tx.init(params), rngs=rngs, step=jnp.int32(0))
    batch = SyntheticBatches(config).global_batch(0)
    new, metrics = jax.jit(train_lib.make_train_step(graphdef, tx, lambda s: 1.0, 2))(state, frozen, batch)

    def loss(p):
        return nnx.merge(graphdef, p, rngs, frozen)(batch)

    whole, grads = jax.jit(jax.value_and_grad(loss))(params)
    expected = jax.tree.map(lambda p, g: p - g, params, grads)
    np.testing.assert_allclose(float(metrics["loss"]), float(whole), rtol=1e-5)
    micro = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]  # the old, per-micro-batch objective
    assert abs(float(metrics["loss"]) - np.mean([float(nnx.merge(graphdef, params, rngs, frozen)(mb))
                                                 for mb in micro])) > 0.1
    for k, v in _flat(expected).items():
        np.testing.assert_allclose(_flat(new.params)[k], v, rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_killed_run_resumes_to_the_same_parameters(trained, tmp_path, exc):
    """Interrupt (Ctrl-C, saved at once) or crash (periodic checkpoint only) at batch 3 of 4; rerun."""
    config, _, uninterrupted, _ = trained
    workdir = str(tmp_path)
    with pytest.raises(exc):
        train_lib.train(run_lib.resolve(config, workdir), train_iter=SyntheticBatches(config, fail_at=3, exc=exc))
    saved = ckpt_lib.RunCheckpointer(workdir).latest_step()
    assert saved == (3 if exc is KeyboardInterrupt else 2)
    model, history = train_lib.train(run_lib.resolve(config, workdir), train_iter=SyntheticBatches(config))
    assert [h["step"] for h in history] == list(range(saved + 1, 5))
    # The workdir's history spans both runs, with the steps re-run after the checkpoint taken from the rerun.
    whole = train_lib.read_history(workdir)
    assert [h["step"] for h in whole] == [1, 2, 3, 4]
    assert [h["loss"] for h in whole[saved:]] == [h["loss"] for h in history]
    a, b = _adapters(uninterrupted), _adapters(model)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-7, err_msg=k)


def test_load_adapters_for_eval_and_wrong_checkpoint_message(trained, tmp_path):
    config, workdir, model, _ = trained
    fresh = loader.from_run(run_lib.resolve(config))[0]
    assert ckpt_lib.load_adapters(workdir, fresh) == 4
    a, b = _adapters(model), _adapters(fresh)
    assert all(np.array_equal(a[k], b[k]) for k in a)

    other = tiny_config()
    other.adapter.reduction_dim = 2
    with pytest.raises(ValueError, match="adapter.reduction_dim: checkpoint 4, config 2"):
        ckpt_lib.load_adapters(workdir, loader.from_run(run_lib.resolve(other))[0])
    with pytest.raises(ValueError, match="reduction_dim"):  # resuming a run with another r
        train_lib.train(run_lib.resolve(other, workdir), train_iter=SyntheticBatches(other))


def test_bfloat16_compute_keeps_float32_parameters(tmp_path):
    config = tiny_config(num_steps=2, save_every_steps=10)
    config.model.dtype = "bfloat16"
    model, history = train_lib.train(run_lib.resolve(config, str(tmp_path)), train_iter=SyntheticBatches(config))
    assert all(np.isfinite(h["loss"]) for h in history)
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype("float32")}
    init = loader.from_run(run_lib.resolve(config))[0]
    before, after = _frozen(init), _frozen(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_interrupt_while_waiting_for_a_step_saves_the_matching_iterator_state(trained, tmp_path, monkeypatch):
    """Ctrl-C in the blocking wait for step 3's metrics: step 3 is done, so its batch must not be re-run."""
    config, _, uninterrupted, _ = trained
    workdir = str(tmp_path)
    real, calls = jax.device_get, []

    def device_get(x):
        if isinstance(x, dict) and "loss" in x:  # the train loop's wait for one step's metrics
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return real(x)

    monkeypatch.setattr(jax, "device_get", device_get)
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(run_lib.resolve(config, workdir), train_iter=SyntheticBatches(config))
    monkeypatch.setattr(jax, "device_get", real)
    assert ckpt_lib.RunCheckpointer(workdir).latest_step() == 3
    it = SyntheticBatches(config)
    model, history = train_lib.train(run_lib.resolve(config, workdir), train_iter=it)
    assert [h["step"] for h in history] == [4] and it.i == 4  # batch 3 (0-based) trained once, as step 4
    a, b = _adapters(uninterrupted), _adapters(model)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-7, err_msg=k)


def test_trained_logit_scale_is_clamped_at_log_100():
    """As CLIP / the original train.py: after each update, logit_scale <= log(100)."""
    config = tiny_config()
    config.model.train_logit_scale = True
    model = loader.from_run(run_lib.resolve(config))[0]
    model.clip.logit_scale[...] = jnp.float32(4.5)
    graphdef, params, rngs, frozen = optim.split(model, config.method, config.model.train_logit_scale)
    plus_one = optax.GradientTransformation(lambda p: optax.EmptyState(),
                                            lambda g, s, p=None: (jax.tree.map(jnp.ones_like, g), s))
    step = jax.jit(train_lib.make_train_step(graphdef, plus_one, lambda s: 1.0, 1))
    state = optim.TrainState(params=params, opt_state=plus_one.init(params), rngs=rngs, step=jnp.int32(0))
    new, _ = step(state, frozen, SyntheticBatches(config).global_batch(0))
    flat = _flat(new.params)
    scale = [v for k, v in flat.items() if "logit_scale" in k]
    np.testing.assert_allclose(scale, [np.log(100.0)], rtol=1e-6)
    before = _flat(params)
    others = [k for k in flat if "logit_scale" not in k]
    assert others and all(np.allclose(flat[k], before[k] + 1) for k in others)  # nothing else is clamped


def test_adapter_dropout_trains(tmp_path):
    config = tiny_config(num_steps=2, save_every_steps=10)
    config.adapter.dropout = 0.1
    _, history = train_lib.train(run_lib.resolve(config, str(tmp_path)), train_iter=SyntheticBatches(config))
    assert [h["step"] for h in history] == [1, 2] and all(np.isfinite(h["loss"]) for h in history)
