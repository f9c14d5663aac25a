"""The one model loader (cma_jax.loader over cma_jax.models.state): backbone folders, modules or trees,
trained parameters, the backbone resolved once into a plain value, config errors."""

import dataclasses
import logging

import numpy as np
import pytest
from flax import nnx

from cma_jax import checkpoint, loader, sharding
from cma_jax import run as run_lib
from cma_jax.errors import CheckpointError
from cma_jax.models import peft, state
from cma_jax.models.clip import BACKBONE, CLIPConfig
from cma_jax.models.peft.adapter import AdapterConfig, AdapterParam
from cma_jax.models.retrieval import RetrievalModel
from cma_jax.trees import flatten, unflatten
from tiny import TINY_CLIP, tiny_config

CFG = CLIPConfig(**TINY_CLIP)
ADAPTER = AdapterConfig(4, 8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A backbone folder and an adapter folder written from one model (seed 1)."""
    root = tmp_path_factory.mktemp("load")
    model = RetrievalModel(CFG, ADAPTER, rngs=nnx.Rngs(1))
    checkpoint.save_backbone(str(root / "backbone"), CFG, state.backbone_state(model))
    checkpoint.save_adapters(str(root / "adapters"), model)
    return root, model


def _same(a, b, what):
    fa, fb = flatten(nnx.to_pure_dict(nnx.state(a, what))), flatten(nnx.to_pure_dict(nnx.state(b, what)))
    return fa.keys() == fb.keys() and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


def test_backbone_folder_and_adapter_folder_rebuild_the_model(saved):
    root, model = saved
    built, step = loader.build_model(backbone=str(root / "backbone"), adapters=str(root / "adapters"))
    assert step == 0 and built.clip.config == CFG and built.clip.method == peft.as_method(ADAPTER)
    assert _same(built, model, BACKBONE) and _same(built, model, AdapterParam)
    fresh, step = loader.build_model(backbone=str(root / "backbone"), method=ADAPTER, seed=0)
    assert step is None and _same(fresh, model, BACKBONE) and not _same(fresh, model, AdapterParam)


def test_backbone_from_a_module_or_tree_and_compute_dtype(saved):
    _, model = saved
    from_module, _ = loader.build_model(CFG, ADAPTER, backbone=model, dtype="bfloat16")
    assert from_module.clip.config.dtype == "bfloat16" and _same(from_module, model, BACKBONE)
    from_tree, _ = loader.build_model(CFG, None, backbone=state.backbone_state(model))
    assert not from_tree.clip.method.trains and _same(from_tree, model, BACKBONE)


def test_another_architecture_is_named(saved):
    root, _ = saved
    with pytest.raises(CheckpointError, match="vision_layers=2.*but the model asked for is .*vision_layers=3"):
        loader.build_model(dataclasses.replace(CFG, vision_layers=3), backbone=str(root / "backbone"))
    same = dataclasses.replace(CFG, dtype="bfloat16")  # compute settings may differ
    assert loader.build_model(same, backbone=str(root / "backbone"))[0].clip.config.dtype == "bfloat16"
    with pytest.raises(ValueError, match="needs a backbone folder or a clip_cfg"):
        loader.build_model()


def test_apply_state_lists_what_does_not_fit():
    model = RetrievalModel(CFG, None, rngs=nnx.Rngs(0))
    tree = flatten(state.backbone_state(model))
    tree["visual.proj"] = np.zeros((3, 3), np.float32)
    tree["visual.extra"] = np.zeros((1,), np.float32)
    with pytest.raises(CheckpointError, match=r"(?s)unexpected \(1\): visual.extra.*wrong shapes \(1\): visual.proj"):
        state.apply_state(model, unflatten(tree))


def test_from_config_needs_an_explicit_backbone(caplog):
    config = tiny_config()
    config.backbone = ""
    with pytest.raises(ValueError, match="config.backbone is empty: set it to a CLIP name"):
        loader.from_run(run_lib.resolve(config))
    config.backbone = "random"
    with caplog.at_level(logging.WARNING):
        model, step = loader.from_run(run_lib.resolve(config))
    assert step is None and "RANDOMLY INITIALISED" in caplog.text
    assert model.clip.method == peft.make("cma", {"reduction_dim": 4, "share_dim": 8})


def test_adapter_folder_records_what_the_model_was_trained_with(saved, tmp_path):
    root, model = saved
    meta = checkpoint.saved_meta(str(root / "adapters"))
    assert meta["method"] == "cma" and meta["method_config"]["share_dim"] == 8
    assert checkpoint.saved_data_config(str(root / "adapters")) is None  # converted: no data settings known
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        checkpoint.save_adapters(str(root / "adapters"), model)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / checkpoint.LEGACY_ADAPTER_CONFIG).write_text("{}")
    with pytest.raises(CheckpointError, match="written by an older cma_jax; convert the original checkpoint again"):
        checkpoint.saved_meta(str(tmp_path / "old"))


def test_sharding_helpers_without_a_mesh():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert sharding.data_size(None) == 1
    np.testing.assert_array_equal(sharding.to_host(sharding.global_array(x, None)), x)
    assert sharding.place_on_mesh({"a": x}, None)["a"] is x


def test_a_backbone_with_a_word_list_tokenizer_needs_no_tokenizer_argument(tmp_path):
    """The demo's backbone keeps its word list in tokenizer/: api.load and search find it there."""
    from cma_jax import api

    vocab = tmp_path / "synthetic_vocab.txt"
    vocab.write_text("a\nred\ncircle\n")
    model = RetrievalModel(CFG, None, rngs=nnx.Rngs(0))
    checkpoint.save_backbone(str(tmp_path / "backbone"), CFG, state.backbone_state(model), [str(vocab)])
    r = api.load(str(tmp_path / "backbone"), num_frames=2, max_words=6)
    assert r.encode_text(["a red circle"]).shape == (1, CFG.embed_dim)


def test_the_backbone_is_resolved_once_into_a_plain_value(saved, caplog):
    """config.backbone -> Backbone(folder, tokenizer, architecture from the folder); compute settings from the
    config; a model.clip override that disagrees with the folder is named; 'random' warns only when asked by name."""
    root, model = saved
    config = tiny_config()
    config.backbone = str(root / "backbone")
    config.model.dtype = "bfloat16"
    for f in TINY_CLIP:  # the architecture comes from the folder, not from the config
        config.model.clip[f] = None
    b = loader.backbone_from_config(config, loader.clip_config(config))
    assert b.folder == str(root / "backbone") and b.tokenizer is None
    assert b.clip == dataclasses.replace(CFG, dtype="bfloat16")
    built, _ = loader.from_run(run_lib.resolve(config, backbone=b))
    assert _same(built, model, BACKBONE)
    config.model.clip.vision_layers = 3
    with pytest.raises(ValueError, match="config.model.clip.vision_layers=3, but backbone .* has vision_layers=2"):
        loader.backbone_from_config(config, loader.clip_config(config))
    config.data.tokenizer = ""
    with pytest.raises(ValueError, match="config.data.tokenizer='' takes the tokenizer/ folder of config.backbone"):
        loader.require_tokenizer(run_lib.resolve(config, backbone=b))
    config.data.tokenizer = "/some/vocab.txt"
    assert loader.tokenizer(config, b) == "/some/vocab.txt"
    with caplog.at_level(logging.WARNING):
        deliberate = loader.Backbone.random(CFG, "/some/vocab.txt")
        loader.build_model(backbone=deliberate)
    assert "RANDOMLY" not in caplog.text
