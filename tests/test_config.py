"""Configs: the dataset presets carry the paper's settings; bad configs fail naming the field."""

import importlib
import os
import subprocess
import sys

import pytest

from cma_jax import config as config_lib
from cma_jax import loader
from cma_jax import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {  # dataset: (r, d_s, frames, words, epochs)
    "msrvtt": (8, 16, 12, 32, 5), "didemo": (8, 8, 64, 64, 5), "msvd": (16, 16, 12, 32, 5),
    "vatex": (16, 64, 12, 32, 5), "activitynet": (16, 512, 64, 64, 20),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_dataset_configs_have_the_papers_settings(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    run_lib.check(config, num_devices=8)
    r, ds, frames, words, epochs = PAPER[name]
    assert (config.adapter.reduction_dim, config.adapter.share_dim) == (r, ds)
    assert (config.data.num_frames, config.data.max_words, config.train.epochs) == (frames, words, epochs)
    t = config.train
    assert (t.b1, t.b2, t.eps, t.lr, t.weight_decay, t.warmup_fraction, t.batch_size) == (0.9, 0.98, 1e-6, 1e-5,
                                                                                          0.2, 0.1, 128)
    assert (config.data.fps, config.data.name, config.method, config.model.preset) == (1, name, "cma", "vit_b32")
    assert not config.model.train_logit_scale


@pytest.mark.parametrize("name", sorted(PAPER))
def test_dataset_configs_name_splits_their_builder_writes(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    builder = importlib.import_module(f"cma_jax.data.builders.{name}")
    splits = getattr(builder, "SPLITS", ("train", "test"))  # msrvtt writes train (9k/7k) and test (1k-A)
    assert config.data.train_split in splits and config.data.eval_split in splits


def test_backbone_preset_is_the_config_arg():
    from configs import msrvtt
    config = msrvtt.get_config("vit_l14")
    assert loader.clip_config(config).vision_width == 1024
    run_lib.check(config)


def _config(**fields):
    c = config_lib.base_config()
    for dotted, value in fields.items():
        *parents, last = dotted.split("__")
        node = c
        for p in parents:
            node = node[p]
        node[last] = value
    return c


@pytest.mark.parametrize("fields, num_devices, message", [
    (dict(adapter__share_dim=600), None, "config.adapter.share_dim"),  # > text width 512
    (dict(train__batch_size=100), 8, "config.train.batch_size"),  # not divisible by 8 data-parallel devices
    (dict(train__batch_size=128, train__grad_accum_steps=3), None, "config.train.grad_accum_steps"),
    (dict(mode="fit"), None, "config.mode"),
    (dict(method="no_such_method"), None, "config.method"),
    (dict(model__head="maxp"), None, "config.model.head"),
    (dict(model__dtype="float16"), None, "config.model.dtype"),
    (dict(model__preset="vit_h14"), None, "config.model"),
    (dict(method="zero_shot", mode="train"), None, "config.mode"),
    (dict(data__max_words=100), None, "config.data.max_words"),  # > context length 77
    (dict(train__warmup_fraction=1.5), None, "config.train.warmup_fraction"),
    (dict(mesh__data=3), 8, "config.mesh"),
    (dict(adapter__reduction_dim=0), None, "config.adapter.reduction_dim"),
])
def test_impossible_values_fail_naming_the_field(fields, num_devices, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        run_lib.check(_config(**fields), num_devices=num_devices)


def test_unknown_field_fails_naming_it():
    c = config_lib.base_config()
    c.train.unlock()
    c.train.learning_rate = 1e-4
    with pytest.raises(ValueError, match=r"config\.train\.learning_rate"):
        run_lib.check(c)
    c = config_lib.base_config()
    c.extra.anything = 1  # the free-form section is not checked
    run_lib.check(c)


@pytest.mark.parametrize("section, field, hint", [
    ("train", "lerning_rate", "did you mean config.train.lr?"),  # ml_collections suggests nothing for these:
    ("train", "learning_rate", "did you mean config.train.lr?"),  # an abbreviation either way,
    ("train", "wd", "did you mean config.train.weight_decay?"),
    ("train", "num_frames", "did you mean config.data.num_frames?"),  # a field of another section,
    ("data", "fsp", "did you mean config.data.fps?"),  # a transposition difflib's default cutoff misses,
    (None, "backbone_checkpoint", "renamed to config.backbone"),  # a renamed field
])
def test_an_unknown_field_names_the_closest_real_one(section, field, hint):
    c = config_lib.base_config()
    node = c if section is None else c[section]
    node.unlock()
    node[field] = 1
    name = field if section is None else f"{section}.{field}"
    with pytest.raises(ValueError) as e:
        run_lib.check(c)
    assert str(e.value) == f"unknown config field(s): config.{name} ({hint})"


def test_place_fields_keep_paths_out_of_the_demo_reuse_key():
    """The demo reuses a stage's result by its config (cma_jax.demo.stages.config_key): folders must not enter it."""
    from cma_jax.demo import stages

    config = stages.demo_config("quick")
    here, there = (stages.stage_config(config, "cma", f"/{d}/data", f"/{d}/backbone", 0) for d in ("here", "there"))
    assert here.backbone == "/here/backbone" and here.data.data_dir == "/here/data"
    assert stages.config_key(here) == stages.config_key(there)
    assert "/here" not in stages.config_key(here)
    assert all("." not in f or f.split(".")[0] in config for f in config_lib.PLACE_FIELDS)


def test_baselines_are_config_changes_only():
    c = config_lib.base_config()
    assert loader.method(c).name == "cma" and loader.method(c).share_dim == 16
    c.adapter.share_dim = 0  # d_s = 0 by hand is still the Cross-Modal Adapter's code path
    assert loader.method(c).share_dim == 0
    c.method = "unimodal"  # the ablation as its own method: d_s is 0 whatever config.adapter.share_dim says
    c.adapter.share_dim = 16
    assert loader.method(c).share_dim == 0 and loader.method(c).reduction_dim == 8
    c.method = "full"
    assert loader.method(c).name == "full"
    c.method, c.mode = "zero_shot", "eval"
    run_lib.check(c)
    assert not loader.method(c).trains


@pytest.mark.slow
def test_main_rejects_unknown_override_and_bad_value():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "cma_jax.main", "--config=configs/msrvtt.py:vit_b16", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
    p = run("--config.train.learning_rate=1", "--workdir=/tmp/unused")
    assert p.returncode != 0 and "unknown config field config.train.learning_rate" in p.stderr
    p = run("--config.adapter.share_dim=700", "--workdir=/tmp/unused")
    assert p.returncode != 0 and "config.adapter.share_dim: d_s must be in [0, 512]" in p.stderr


def test_describe_gives_a_config_files_own_extra_fields_as_free_form():
    config = config_lib.base_config()
    config.extra.pretrain = {"num_steps": 200}
    config.train.lr = 3e-4
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in config_lib.describe(config).splitlines()}
    assert rows["extra.pretrain.num_steps"] == ["200", "free-form, set by the config file (not validated)"]
    assert "extra" not in rows
    assert rows["train.lr"] == ["0.0003", config_lib.field_meanings()["train.lr"]]
    assert rows["mode"] == ["'train_and_eval'", "train | eval | train_and_eval"]
