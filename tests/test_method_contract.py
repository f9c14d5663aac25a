"""A method is one file: the toy method of tests/toy_method.py, registered and named nowhere in cma_jax, goes
through configs, training, checkpoints, counting, the summary table and the demo's table like the fourteen."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from cma_jax import checkpoint as ckpt_lib
from cma_jax import loader, optim
from cma_jax import run as run_lib
from cma_jax import train as train_lib
from cma_jax.demo import stages as demo_stages
from cma_jax.models import peft, summary
from cma_jax.models.clip import PRESETS, CLIPConfig
from cma_jax.models.retrieval import RetrievalModel
from cma_jax.models.state import apply_state, backbone_state
from cma_jax.trees import flatten
from test_methods import batch, embeddings
from tiny import TINY_CLIP, SyntheticBatches, tiny_config
from toy_method import ToyParam, ToyScale

CFG = CLIPConfig(**TINY_CLIP)


@pytest.fixture(autouse=True)
def toy(monkeypatch):
    monkeypatch.setattr(peft, "METHODS", dict(peft.METHODS))  # the registry as it was, after the test
    return peft.register(ToyScale)


def _flat(state) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def toy_config(**train):
    c = tiny_config(**train)
    c.method = "toy_scale"
    c.toy_scale.targets = ("q", "out", "mlp_in", "ln_2")  # other sites than its defaults
    return c


def test_its_config_section_count_and_summary_row_come_from_its_declaration():
    config = toy_config()
    run_lib.check(config, overridden=["toy_scale.targets"])
    m = loader.method(config)
    assert m == ToyScale(targets=("q", "out", "mlp_in", "ln_2"))
    model = nnx.eval_shape(lambda: RetrievalModel(PRESETS["vit_b32"], ToyScale(), rngs=nnx.Rngs(0)))
    assert summary.count_params(model)["trained"] == ToyScale().count(PRESETS["vit_b32"]) == 3 * (12 * 768 + 12 * 512)
    assert "| Toy (IA)^3 scaling | `toy_scale` | 46,080 |" in summary.table()
    config.method = "cma"
    with pytest.raises(ValueError, match=r"config.toy_scale.targets is set, but config.method=cma does not use it"):
        run_lib.check(config, overridden=["toy_scale.targets"])
    with pytest.raises(ValueError, match=r"toy_scale targets must be some of"):
        peft.make("toy_scale", {"targets": ("q", "w")})


def test_it_starts_as_the_frozen_clip_at_its_sub_layer_sites():
    model = RetrievalModel(CFG, ToyScale(targets=("q", "k", "v", "out", "mlp_in", "mlp_out", "ln_1", "ln_2")),
                           rngs=nnx.Rngs(0))
    plain = RetrievalModel(CFG, None, rngs=nnx.Rngs(1))
    apply_state(plain, backbone_state(model))
    b = batch(1)
    embeddings = nnx.jit(lambda m, b: (m.encode_frames(b["frames"], b["frame_mask"]), m.encode_text(b["text_ids"])))
    want = embeddings(plain, b)
    for got, w in zip(embeddings(model, b), want):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-6)
    model.clip.visual.transformer.resblocks[0].on_v.scale[...] = np.full((CFG.vision_width,), 2.0, np.float32)
    moved = embeddings(model, b)
    assert np.abs(moved[0] - want[0]).max() > 1e-4  # the v site is on the path
    np.testing.assert_allclose(moved[1], want[1], rtol=1e-6, atol=1e-6)  # of the image tower only


@pytest.mark.slow
def test_one_step_trains_only_it_and_its_checkpoint_restores(tmp_path):
    config = toy_config(num_steps=1, save_every_steps=1)
    config.toy_scale.dropout = 0.1  # a named sub-layer's dropout, under rematerialisation too
    config.model.remat = "block"
    init = loader.from_run(run_lib.resolve(config))[0]
    model, history = train_lib.train(run_lib.resolve(config, str(tmp_path)), train_iter=SyntheticBatches(config))
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    m = model.clip.method
    frozen = nnx.All(nnx.Param, nnx.Not(ToyParam))
    before, after = _flat(nnx.state(init, frozen)), _flat(nnx.state(model, frozen))
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    t0, t1 = _flat(nnx.state(init, ToyParam)), _flat(nnx.state(model, ToyParam))
    assert len(t0) == 4 * 4 and all(not np.array_equal(t0[k], t1[k]) for k in t0)  # 4 sites x 2 blocks x 2 towers
    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.metadata(tmp_path / "checkpoints" / "1" / "params").item_metadata
    trained = nnx.to_pure_dict(nnx.state(model, optim.trainable_filter(m)))
    assert {k.removesuffix(".value") for k in flatten(dict(saved))} == set(flatten(trained))
    assert summary.count(trained) == m.count(CFG)
    assert ckpt_lib.saved_method(str(tmp_path)) == m  # its tuple field read back from JSON
    fresh, step = loader.build_model(backbone=init, adapters=str(tmp_path), seed=123)
    assert step == 1 and fresh.clip.method == m
    b = batch()  # dropout off (as evaluation has it)
    for got, want in zip(*(embeddings(nnx.view(x, deterministic=True), b) for x in (fresh, model))):
        np.testing.assert_array_equal(got, want)


def test_it_is_a_row_of_the_demo_with_its_declared_settings():
    from configs import demo as demo_config

    config = demo_config.get_config("methods_quick")
    assert list(config.extra.methods)[-3:] == ["toy_scale", "uni", "cma"]
    assert demo_stages.rows()["toy_scale"] == "Toy (IA)^3 scaling"
    c = demo_stages.stage_config(config, "toy_scale", "/data", "/bb")
    run_lib.check(c, num_devices=1)
    assert loader.method(c) == ToyScale(targets=("v", "mlp_out"))
    assert (c.train.lr, tuple(config.extra.lr_grid.toy_scale)) == (1e-2, (3e-3, 1e-2, 3e-2))  # the defaults
    assert c.mode == "train"


@pytest.mark.slow
def test_it_trains_and_is_tabulated_by_the_quick_demo(tmp_path):
    from cma_jax import demo
    from configs import demo as demo_config

    config = demo_config.get_config("methods_quick")
    config.extra.methods = ("zero_shot", "toy_scale")
    config.extra.pretrain.num_steps = 20
    config.train.num_steps = 20
    res = demo.run(config, str(tmp_path))
    row = res["methods"]["toy_scale"]
    clip = loader.clip_config(config)
    n = ToyScale(("v", "mlp_out")).count(clip)
    assert row["name"] == "Toy (IA)^3 scaling" and row["trainable_params"] == n == 2 * (2 * 64 + 2 * 64)
    assert np.isfinite(row["metrics"]["t2v"]["R1"])
    assert f"| Toy (IA)^3 scaling | {n:,} |" in (tmp_path / "results.md").read_text()
