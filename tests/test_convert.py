"""Conversion: original Cross-Modal-Adapter format round trip, error listings, backbone storage, CLI."""

import dataclasses
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax import nnx  # noqa: E402

from cma_jax import checkpoint, convert  # noqa: E402
from cma_jax.convert.__main__ import main as convert_main  # noqa: E402
from cma_jax.models import peft  # noqa: E402
from cma_jax.models.state import apply_state  # noqa: E402
from cma_jax.trees import flatten  # noqa: E402
from cma_jax.convert import CheckpointError  # noqa: E402
from cma_jax.models.clip import CLIP  # noqa: E402
from cma_jax.models.peft.adapter import AdapterConfig, AdapterParam  # noqa: E402
from fake_bucket import bucket  # noqa: E402, F401 - the fixture: gs:// in a local folder

R = 4
ARCH = dict(vision_width=32, vision_layers=3, patch=8, resolution=16, text_width=64, text_layers=2,
            context=7, vocab=30, embed=12)


def openai_shapes(vision_width, vision_layers, patch, resolution, text_width, text_layers, context, vocab,
                  embed):
    """Every tensor of an OpenAI ViT CLIP state dict, with its PyTorch shape (written from OpenAI's model)."""
    grid = resolution // patch
    s = {"visual.conv1.weight": (vision_width, 3, patch, patch), "visual.class_embedding": (vision_width,),
         "visual.positional_embedding": (grid * grid + 1, vision_width), "visual.proj": (vision_width, embed),
         "token_embedding.weight": (vocab, text_width), "positional_embedding": (context, text_width),
         "text_projection": (text_width, embed), "logit_scale": ()}
    for ln, w in (("visual.ln_pre", vision_width), ("visual.ln_post", vision_width), ("ln_final", text_width)):
        s[f"{ln}.weight"] = s[f"{ln}.bias"] = (w,)
    for pre, w, n in (("visual.transformer", vision_width, vision_layers), ("transformer", text_width, text_layers)):
        for i in range(n):
            b = f"{pre}.resblocks.{i}."
            s.update({b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,),
                      b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
                      b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
                      b + "mlp.c_fc.weight": (4 * w, w), b + "mlp.c_fc.bias": (4 * w,),
                      b + "mlp.c_proj.weight": (w, 4 * w), b + "mlp.c_proj.bias": (w,)})
    return s


def cma_adapter_shapes(d_s, vision_width, vision_layers, text_width, text_layers, **_):
    """The original repo's stacked adapter tensors (image unique part always stored, maybe 0-sized)."""
    lv, lt, ls = 2 * vision_layers, 2 * text_layers, 2 * min(vision_layers, text_layers)
    s = {"visual_adapter_down_weight": (lv, R, vision_width), "visual_adapter_down_bias": (lv, R),
         "visual_adapter_up_unique_weight": (lv, vision_width - d_s, R),
         "visual_adapter_up_unique_bias": (lv, vision_width - d_s),
         "text_adapter_down_weight": (lt, R, text_width), "text_adapter_down_bias": (lt, R)}
    if text_width > d_s:
        s.update(text_adapter_up_unique_weight=(lt, text_width - d_s, R), text_adapter_up_unique_bias=(lt, text_width - d_s))
    if d_s:
        s.update(vt_adapter_up_share_weight=(ls, d_s, R), vt_adapter_up_share_bias=(ls, d_s))
    return s


def cma_state_dict(d_s=8, seed=0, **arch):
    arch = {**ARCH, **arch}
    rng = np.random.default_rng(seed)
    shapes = {**openai_shapes(**arch), **cma_adapter_shapes(d_s, **arch)}
    return {"clip." + k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype == np.float32 and x.shape == y.shape, k
        assert x.tobytes() == y.tobytes(), k  # bitwise


# ----------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("d_s,arch", [
    (8, {}),
    (0, {}),  # plain uni-modal adapters: no shared tensors
    (32, dict(vision_width=64, text_width=32)),  # d_s = text width: no text unique part (absent in the file)
    (32, dict(vision_width=32, text_width=64)),  # d_s = image width: zero-sized image unique part
    (8, dict(vision_layers=2, text_layers=4)),  # text deeper than image
])
def test_cma_round_trip_is_exact(d_s, arch):
    sd = cma_state_dict(d_s, **arch)
    conv = convert.convert_state_dict(sd, source="cma")
    assert conv.adapter_config == AdapterConfig(reduction_dim=R, share_dim=d_s)
    assert_same(convert.to_cma(conv.adapters, conv.clip_config, conv.backbone), sd)
    assert_same(convert.to_cma(conv.adapters, conv.clip_config),
                {k: v for k, v in sd.items() if k.split(".", 1)[1] in convert.CMA_KEYS})


def test_converted_adapters_land_in_the_model():
    """Index 2i is layer i's attention adapter, 2i+1 its MLP adapter; [out, in] is transposed."""
    sd = cma_state_dict(8)
    conv = convert.convert_state_dict(sd)
    model = CLIP(conv.clip_config, conv.adapter_config, rngs=nnx.Rngs(0))
    apply_state(model, conv.backbone)
    apply_state(model, conv.adapters)
    block = model.visual.transformer.resblocks[2]
    np.testing.assert_array_equal(block.mlp_adapter.down_kernel[...], sd["clip.visual_adapter_down_weight"][5].T)
    np.testing.assert_array_equal(block.attn_adapter.up_kernel[...], sd["clip.visual_adapter_up_unique_weight"][4].T)
    np.testing.assert_array_equal(model.shared_adapters[1].attn.kernel[...], sd["clip.vt_adapter_up_share_weight"][2].T)
    np.testing.assert_array_equal(model.transformer.resblocks[1].attn.in_proj.kernel[...],
                                  sd["clip.transformer.resblocks.1.attn.in_proj_weight"].T)
    np.testing.assert_array_equal(model.visual.conv1.kernel[...],
                                  sd["clip.visual.conv1.weight"].transpose(2, 3, 1, 0))
    # and every adapter parameter of the model came from the file
    n_file = sum(v.size for k, v in sd.items() if k.split(".", 1)[1] in convert.CMA_KEYS)
    n_model = sum(np.size(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model, AdapterParam)))
    assert n_file == n_model


def test_cma_round_trip_through_files(tmp_path):
    sd = cma_state_dict(8)
    sd_torch = {k: torch.from_numpy(v) for k, v in sd.items()}
    sd_torch["cross.embeddings.weight"] = torch.zeros(3)  # a CLIP4Clip head tensor: ignored and listed
    torch.save(sd_torch, tmp_path / "pytorch_model.bin.1")
    conv = convert.convert_checkpoint(str(tmp_path / "pytorch_model.bin.1"))
    assert conv.ignored == ["cross.embeddings.weight"]
    convert.export_adapters(str(tmp_path / "back.pth"), conv.adapters, conv.clip_config, conv.backbone)
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert_same({k: v.numpy() for k, v in back.items()}, sd)


def test_original_repo_training_checkpoint_is_unwrapped(tmp_path):
    """The original train.py saves {'model': state dict, 'optimizer', 'scheduler', 'epoch', 'args': Namespace}."""
    import argparse
    sd = cma_state_dict(8)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()},
                "optimizer": {"state": {0: {"step": 3, "next_m": torch.zeros(2)}},
                              "param_groups": [{"lr": 1e-5, "weight_decay": 0.2, "params": [0]}]},
                "scheduler": None, "epoch": 4,
                "args": argparse.Namespace(lr=1e-5, adapter_share_dim=8, output_dir="/runs/x", init_model=None)},
               tmp_path / "ckpt_epoch5.pth")
    conv = convert.convert_checkpoint(str(tmp_path / "ckpt_epoch5.pth"))
    assert conv.adapter_config == AdapterConfig(reduction_dim=R, share_dim=8)
    assert_same(convert.to_cma(conv.adapters, conv.clip_config, conv.backbone), sd)


def test_openai_half_precision_is_read_as_float32(tmp_path):
    sd = {k[len("clip."):]: v for k, v in cma_state_dict(8).items() if k[len("clip."):] not in convert.CMA_KEYS}
    torch.save({k: torch.from_numpy(v).half() for k, v in sd.items()}, tmp_path / "half.pt")
    conv = convert.convert_checkpoint(str(tmp_path / "half.pt"))
    assert conv.adapters is None and conv.clip_config.text_heads == 1  # OpenAI's width // 64
    back = convert.to_openai(conv.backbone, conv.clip_config)
    for k, v in sd.items():
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], v.astype(np.float16).astype(np.float32))


# ----------------------------------------------------------------------------- error listings
def test_missing_and_unexpected_are_listed_together():
    sd = cma_state_dict(8)
    del sd["clip.transformer.resblocks.1.ln_2.bias"]
    del sd["clip.visual.proj"]
    sd["clip.visual.conv2.weight"] = np.zeros((32, 3, 3, 8, 8), np.float32)  # CLIP4Clip's 3d patch: unsupported
    sd["clip.transformer.resblocks.0.attn.in_proj_weight"] = np.zeros((5, 64), np.float32)
    with pytest.raises(CheckpointError) as e:
        convert.convert_state_dict(sd, source="bad.pth")
    msg = str(e.value)
    assert msg.startswith("bad.pth")
    assert "missing (2): transformer.resblocks.1.ln_2.bias, visual.proj" in msg
    assert "unexpected (1): visual.conv2.weight" in msg
    assert "wrong shapes (1): transformer.resblocks.0.attn.in_proj_weight (5, 64)" in msg


def test_missing_adapter_tensors_are_listed():
    sd = cma_state_dict(8)
    del sd["clip.text_adapter_up_unique_bias"]
    del sd["clip.vt_adapter_up_share_bias"]
    sd["clip.text_adapter_down_weight"] = sd["clip.text_adapter_down_weight"][:3]
    with pytest.raises(CheckpointError) as e:
        convert.convert_state_dict(sd, source="cma.pth")
    msg = str(e.value)
    assert "missing (2): clip.text_adapter_up_unique_bias, clip.vt_adapter_up_share_bias" in msg
    assert "clip.text_adapter_down_weight (3, 4, 64) (expected (4, 4, 64))" in msg


def test_unrecognised_and_unreadable_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not a recognised CLIP checkpoint.*got bert.embeddings"):
        convert.convert_state_dict({"bert.embeddings": np.zeros(3)})
    with pytest.raises(CheckpointError, match="ResNet"):
        convert.convert_state_dict({"visual.layer1.0.conv1.weight": np.zeros(3)})
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: cannot read it as a PyTorch checkpoint"):
        convert.convert_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(CheckpointError, match="no such file"):
        convert.convert_checkpoint(str(tmp_path / "absent.pt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        convert.convert_checkpoint(str(tmp_path / "folder"))


def test_apply_state_rejects_a_tree_for_another_architecture():
    conv = convert.convert_state_dict(cma_state_dict(8))
    other = CLIP(dataclasses.replace(conv.clip_config, text_layers=1), None, rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match=r"unexpected \(12\): transformer.resblocks.1"):
        apply_state(other, conv.backbone)


# ----------------------------------------------------------------------------- backbone storage
@pytest.fixture()
def converted():
    return convert.convert_state_dict(cma_state_dict(8))


def test_save_load_backbone_round_trip(tmp_path, converted):
    (tmp_path / "src").mkdir()
    tok = [tmp_path / "src" / "vocab.json", tmp_path / "src" / "merges.txt"]
    for f in tok:
        f.write_text(f.name)
    path = str(tmp_path / "backbone")
    checkpoint.save_backbone(path, converted.clip_config, converted.backbone, [str(f) for f in tok])
    cfg, state = checkpoint.load_backbone(path)
    assert cfg == converted.clip_config
    a, b = flatten(state), flatten(converted.backbone)
    assert sorted(a) == sorted(b) and all(np.array_equal(np.asarray(a[k]), b[k]) for k in a)
    assert sorted(os.listdir(checkpoint.tokenizer_dir(path))) == ["merges.txt", "vocab.json"]
    # read-only files, no temporary folder left behind
    files = [os.path.join(r, n) for r, _, ns in os.walk(path) for n in ns]
    assert all(os.stat(f).st_mode & 0o222 == 0 for f in files)
    assert sorted(os.listdir(tmp_path)) == ["backbone", "src"]
    # and it loads into a model
    model = CLIP(dataclasses.replace(cfg, dtype="bfloat16"), AdapterConfig(R, 8), rngs=nnx.Rngs(0))
    apply_state(model, state)
    np.testing.assert_array_equal(model.visual.proj[...], converted.backbone["visual"]["proj"])


def test_save_backbone_refuses_to_overwrite(tmp_path, converted):
    path = str(tmp_path / "backbone")
    checkpoint.save_backbone(path, converted.clip_config, converted.backbone)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        checkpoint.save_backbone(path, converted.clip_config, converted.backbone)
    changed = {**converted.backbone, "logit_scale": np.float32(1.5)}
    checkpoint.save_backbone(path, converted.clip_config, changed, overwrite=True)
    assert float(checkpoint.load_backbone(path)[1]["logit_scale"]) == 1.5
    assert os.listdir(tmp_path) == ["backbone"]


def test_failed_save_leaves_nothing(tmp_path, converted):
    path = tmp_path / "backbone"
    with pytest.raises(FileNotFoundError):
        checkpoint.save_backbone(str(path), converted.clip_config, converted.backbone, [str(tmp_path / "nope.json")])
    assert os.listdir(tmp_path) == []


def test_load_backbone_from_a_bucket_url(bucket, converted, monkeypatch, tmp_path):  # noqa: F811
    """`config.backbone=gs://...` (the pod launcher's example) is read as a URL, not 'CWD/gs:/...'."""
    checkpoint.save_backbone(str(bucket / "bucket" / "ckpt"), converted.clip_config, converted.backbone)
    monkeypatch.chdir(tmp_path)
    cfg, state = checkpoint.load_backbone("gs://bucket/ckpt")
    assert cfg == converted.clip_config
    np.testing.assert_array_equal(np.asarray(state["visual"]["proj"]), converted.backbone["visual"]["proj"])
    assert checkpoint.tokenizer_dir("gs://bucket/ckpt") is None and not os.path.exists(tmp_path / "gs:")


def test_load_backbone_of_something_else_fails(tmp_path):
    with pytest.raises(CheckpointError, match="not a cma_jax backbone folder"):
        checkpoint.load_backbone(str(tmp_path))


# ----------------------------------------------------------------------------- CLI
def test_cli_import_and_export(tmp_path, capsys):
    sd = cma_state_dict(8)
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "cma.pth")
    convert_main(["import", str(tmp_path / "cma.pth"), str(tmp_path / "bb"), "--adapters_out", str(tmp_path / "ad")])
    out = capsys.readouterr().out
    assert "backbone" in out and "adapters" in out
    meta = checkpoint.saved_meta(str(tmp_path / "ad"))  # the run layout: one loading path for adapters
    assert checkpoint.saved_method(str(tmp_path / "ad")) == peft.as_method(AdapterConfig(R, 8))
    assert meta["clip"]["vision_layers"] == 3 and meta["method"] == "cma"
    with pytest.raises(SystemExit):
        convert_main(["import", str(tmp_path / "cma.pth"), str(tmp_path / "bb")])
    assert "already exists; refusing to overwrite" in capsys.readouterr().err
    convert_main(["export", str(tmp_path / "ad"), str(tmp_path / "back.pth"), "--backbone", str(tmp_path / "bb")])
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert_same({k: v.numpy() for k, v in back.items()}, sd)
