"""LoRA: updates at the named sub-layers of either tower or both, and merging them into a plain backbone that
evaluates as the LoRA model (python -m cma_jax.convert merge; api.load takes the result like any backbone)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cma_jax import api, checkpoint
from cma_jax.convert.__main__ import main as convert_main
from cma_jax.models import peft, state
from cma_jax.models.clip import CLIPConfig
from cma_jax.models.peft.lora import LoRAParam
from cma_jax.models.retrieval import RetrievalModel
from test_methods import batch
from tiny import TINY_CLIP

CFG = CLIPConfig(**TINY_CLIP)
ALL = ("q", "k", "v", "out", "mlp_in", "mlp_out")
embed = nnx.jit(lambda m, b: (m.encode_frames(b["frames"], b["frame_mask"]), m.encode_text(b["text_ids"])))


def trained_lora(seed=0, **fields):
    """A LoRA model whose B factors are no longer zero (as after training)."""
    model = RetrievalModel(CFG, peft.make("lora", fields), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    b = nnx.state(model, nnx.All(LoRAParam, nnx.PathContains("b")))
    nnx.update(model, jax.tree.map(lambda v: jnp.asarray(rng.normal(0, 0.2, v.shape), jnp.float32), b))
    return model


def assert_close_relative(got, want, tol=1e-5):
    assert np.abs(got - want).max() <= tol * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize("targets,towers", [(("q",), "both"), (("k",), "vision"), (("v",), "text"), (ALL, "both")])
def test_the_merged_backbone_gives_the_lora_models_embeddings(targets, towers):
    model = trained_lora(targets=targets, towers=towers)
    b = batch(3, frame_mask=[[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    want = embed(model, b)
    plain = RetrievalModel(CFG, None, rngs=nnx.Rngs(1))
    state.apply_state(plain, state.backbone_state(model))
    before = embed(plain, b)
    moved = {"vision": towers != "text", "text": towers != "vision"}
    for tower, x0, x1 in zip(("vision", "text"), before, want):  # the updates do something, where asked
        assert (np.abs(x1 - x0).max() > 1e-3) == moved[tower], tower
    model.clip.method.merge(model.clip)
    state.apply_state(plain, state.backbone_state(model))
    for got, w in zip(embed(plain, b), want):
        assert_close_relative(np.asarray(got), np.asarray(w))


def test_lora_counts_its_targets_and_towers():
    assert peft.make("lora").count(CFG) == 8 * (2 + 2) * (2 * 32 + 2 * 32)
    assert peft.make("lora", {"targets": ALL, "towers": "vision", "rank": 2}).count(CFG) == 2 * 18 * 2 * 32
    model = nnx.eval_shape(lambda: RetrievalModel(CFG, peft.make("lora", {"towers": "text"}), rngs=nnx.Rngs(0)))
    assert [p[-2] for p, _ in nnx.to_flat_state(nnx.state(model, LoRAParam))][:2] == ["on_q", "on_q"]
    assert all("visual" not in p for p, _ in nnx.to_flat_state(nnx.state(model, LoRAParam)))
    with pytest.raises(ValueError, match=r"lora targets must be distinct names among"):
        peft.make("lora", {"targets": ("q", "proj")})
    with pytest.raises(ValueError, match=r"lora towers must be one of"):
        peft.make("lora", {"towers": "audio"})


@pytest.mark.slow
def test_convert_merge_writes_a_backbone_that_api_load_takes(tmp_path, capsys):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nred\ncircle\nmoves\n")
    model = trained_lora(1, targets=("q", "v", "mlp_out"))
    checkpoint.save_backbone(str(tmp_path / "backbone"), CFG, state.backbone_state(model), [str(vocab)])
    checkpoint.save_adapters(str(tmp_path / "lora"), model)
    convert_main(["merge", str(tmp_path / "lora"), str(tmp_path / "merged"), "--backbone", str(tmp_path / "backbone")])
    assert "folded into" in capsys.readouterr().out
    lora = api.load(str(tmp_path / "backbone"), str(tmp_path / "lora"), num_frames=3, max_words=6)
    merged = api.load(str(tmp_path / "merged"), num_frames=3, max_words=6)
    assert merged.model.clip.method.name == "zero_shot"
    texts = ["a red circle", "circle moves"]
    assert_close_relative(merged.encode_text(texts), lora.encode_text(texts))
    frames = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32, 3), dtype=np.uint8)
    assert_close_relative(merged.encode_clips(frames), lora.encode_clips(frames))
    # a method whose modules cannot be folded: one line, nothing written
    cma = RetrievalModel(CFG, peft.make("cma", {"reduction_dim": 4, "share_dim": 8}), rngs=nnx.Rngs(0))
    checkpoint.save_adapters(str(tmp_path / "cma"), cma)
    with pytest.raises(SystemExit) as e:
        convert_main(["merge", str(tmp_path / "cma"), str(tmp_path / "no"), "--backbone", str(tmp_path / "backbone")])
    assert e.value.code == 1 and not (tmp_path / "no").exists()
    assert "method cma adds modules that cannot be folded into CLIP's weights" in capsys.readouterr().err
