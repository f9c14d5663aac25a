"""The demo (configs/demo.py + cma_jax.demo): stage configs, and the quick variant end to end."""

import json
import os

import pytest
from PIL import Image

from cma_jax import demo, train
from cma_jax.data import pipeline
from cma_jax.data.builders.synthetic import Synthetic
from cma_jax import config as config_lib
from configs import demo as demo_config


@pytest.mark.parametrize("arg", ["", "quick"])
def test_stage_configs_are_valid_and_differ_as_intended(arg):
    config = demo_config.get_config(arg)
    config_lib.validate(config, num_devices=1)
    stages = {s: demo.stage_config(config, s, "/data", "/bb") for s in
              ("pretrain", "pretrain_eval", "zero_shot", "uni", "cma", "full")}
    for s, c in stages.items():
        config_lib.validate(c, num_devices=1)
        assert c.data.data_dir == "/data"
        assert c.data.tokenizer == os.path.join("/data", demo.VOCAB_FILE)
    pre = stages["pretrain"]
    assert (pre.method, pre.mode, pre.backbone) == ("full", "train", "random")  # from scratch
    assert pre.model.train_logit_scale and pre.train.backbone_lr == pre.train.lr == config.extra.pretrain.lr
    assert pre.data.builder_config.startswith("pretrain") and pre.data.num_frames == 1
    assert stages["pretrain_eval"].mode == "eval" and stages["pretrain_eval"].data.eval_split == "val"
    assert (stages["zero_shot"].method, stages["zero_shot"].mode) == ("zero_shot", "eval")
    assert stages["uni"].adapter.share_dim == 0 and stages["cma"].adapter.share_dim == config.adapter.share_dim > 0
    assert stages["full"].method == "full" and stages["full"].train.backbone_lr == config.extra.full_lr
    for s in ("zero_shot", "uni", "cma", "full"):  # same starting point, same task, same test split
        c = stages[s]
        assert c.backbone == "/bb" and c.data.builder_config == config.data.builder_config
        assert c.data.eval_split == "test"


def test_bad_variant_and_method_are_named():
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        demo_config.get_config("fast")
    config = demo_config.get_config("quick")
    config.extra.methods = ("cma", "lora")
    with pytest.raises(ValueError, match="config.extra.methods: unknown \\['lora'\\]"):
        demo.run(config, "/nonexistent/never/created")


class _InterruptAfter:
    """A training iterator that raises KeyboardInterrupt (a Ctrl-C) before batch `n`."""

    def __init__(self, it, n):
        self.it, self.n, self.seen = it, n, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.seen == self.n:
            raise KeyboardInterrupt
        self.seen += 1
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def _check_results(workdir, config):
    res = json.load(open(os.path.join(workdir, "results.json")))
    rows = res["methods"]
    assert list(rows) == ["zero_shot", "uni", "cma", "full"]
    num_videos = next(c for c in Synthetic.BUILDER_CONFIGS if c.name == config.data.builder_config).num_test
    for r in rows.values():
        for d in ("t2v", "v2t"):
            m = r["metrics"][d]
            assert 0 <= m["R1"] <= m["R5"] <= m["R10"] <= 100
            assert 1 <= m["MdR"] <= num_videos and 1 <= m["MnR"] <= num_videos
    zs, uni, cma, full = (rows[k] for k in ("zero_shot", "uni", "cma", "full"))
    # Parameters: CMA shares part of the up-projection, so it trains fewer than uni-modal adapters.
    assert zs["trainable_params"] == 0 < cma["trainable_params"] < uni["trainable_params"] < full["trainable_params"]
    assert cma["trainable_percent"] < 10 and full["trainable_percent"] > 99
    assert 0 < cma["checkpoint_bytes"] < full["checkpoint_bytes"] and zs["checkpoint_bytes"] == 0
    assert all(r["step_time_s"] > 0 for r in (uni, cma, full)) and zs["step_time_s"] is None
    # Even the quick run adapts: the mean rank of the right video improves over zero-shot.
    for d in ("t2v", "v2t"):
        assert cma["metrics"][d]["MnR"] < zs["metrics"][d]["MnR"]
        assert full["metrics"][d]["MnR"] < zs["metrics"][d]["MnR"]
    # The backbone learned its own (pre-training) task well above chance (R@10 = 10/64 by chance).
    assert res["pretrain"]["val_metrics"]["t2v"]["R10"] > 30
    table = open(os.path.join(workdir, "results.md")).read()
    for name in demo.METHODS.values():
        assert name in table
    with Image.open(os.path.join(workdir, "curves.png")) as png:
        assert png.size[0] > 400 and png.size[1] > 200
    return res


@pytest.mark.slow
def test_quick_demo_end_to_end_interrupt_resume_reuse(tmp_path, monkeypatch):
    config = demo_config.get_config("quick")
    workdir = str(tmp_path / "demo")

    # Run 1: Ctrl-C in the middle of the CMA training.
    real_iterator = pipeline.train_iterator_from_config

    def interrupting(cfg):
        it = real_iterator(cfg)
        return _InterruptAfter(it, 7) if cfg.method == "cma" and cfg.adapter.share_dim > 0 else it

    monkeypatch.setattr(pipeline, "train_iterator_from_config", interrupting)
    with pytest.raises(SystemExit, match="130"):
        demo.run(config, workdir)
    assert os.path.isdir(os.path.join(workdir, "backbone"))
    assert os.path.exists(os.path.join(workdir, "runs", "uni", "demo_row.json"))
    assert not os.path.exists(os.path.join(workdir, "runs", "cma", "demo_row.json"))
    assert os.listdir(os.path.join(workdir, "runs", "cma", "checkpoints")) == ["7"]  # saved on Ctrl-C
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    uni_row = os.path.join(workdir, "runs", "uni", "demo_row.json")
    uni_mtime = os.path.getmtime(uni_row)

    # Run 2: resumes CMA from step 7, reuses data, backbone and the uni-modal run.
    monkeypatch.setattr(pipeline, "train_iterator_from_config", real_iterator)
    demo.run(config, workdir)
    first = _check_results(workdir, config)
    assert os.path.getmtime(uni_row) == uni_mtime
    # The curve is whole: steps 1-7 from the interrupted run, 8 on from the resumed one.
    cma_steps = [h["step"] for h in train.read_history(os.path.join(workdir, "runs", "cma"))]
    assert cma_steps == list(range(1, config.train.num_steps + 1))
    assert json.load(open(os.path.join(workdir, "runs", "cma", "demo_row.json")))["history"][0]["step"] == 1

    # Run 3: everything is done: nothing trains, the table is rebuilt from the saved rows.
    def no_training(*a, **k):
        raise AssertionError("a finished demo trained again")

    monkeypatch.setattr(train, "train", no_training)
    demo.run(config, workdir)
    second = _check_results(workdir, config)
    assert second["methods"] == first["methods"]



def test_a_workdir_made_with_another_config_is_refused(tmp_path):
    config = demo_config.get_config("quick")
    os.makedirs(tmp_path / "pretrain")
    (tmp_path / "pretrain" / "demo_stage_config.json").write_text(json.dumps({"config": "{}"}))
    with pytest.raises(ValueError, match="made with a different configuration; use another --workdir"):
        demo.run(config, str(tmp_path))
    assert not (tmp_path / "backbone").exists()
