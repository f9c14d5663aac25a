"""Numerical parity of our CLIP towers with transformers' PyTorch CLIPModel (random tiny configs).

Paths checked: a Hugging Face CLIPModel folder, an OpenAI-layout state dict, an OpenAI-style
TorchScript archive, and a Cross-Modal-Adapter (CLIP4Clip) checkpoint against the PyTorch reference
with the original repo's stacked adapters (tests/torch_reference.py). The measured errors are printed
(run with `-s`).
"""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from cma_jax.convert import convert_checkpoint, convert_state_dict  # noqa: E402
from cma_jax.models.state import apply_state  # noqa: E402
from cma_jax.models.clip import CLIP, CLIPConfig  # noqa: E402
from torch_reference import OpenAICLIP  # noqa: E402

VOCAB, CONTEXT, EMBED = 100, 16, 32
V_WIDTH, V_LAYERS, PATCH, RES = 128, 3, 8, 32  # 2 heads (OpenAI's width // 64)
T_WIDTH, T_LAYERS, T_HEADS = 128, 2, 2  # unequal depths on purpose
TOL = 1e-4
# The same architecture for the PyTorch reference (tests/torch_reference.py).
REF_CONFIG = CLIPConfig(embed_dim=EMBED, image_resolution=RES, vision_layers=V_LAYERS, vision_width=V_WIDTH,
                        vision_patch_size=PATCH, context_length=CONTEXT, vocab_size=VOCAB, text_width=T_WIDTH,
                        text_heads=T_HEADS, text_layers=T_LAYERS)


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=T_WIDTH, intermediate_size=4 * T_WIDTH,
                         num_hidden_layers=T_LAYERS, num_attention_heads=T_HEADS, max_position_embeddings=CONTEXT,
                         hidden_act="quick_gelu", bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0),
        vision_config=dict(hidden_size=V_WIDTH, intermediate_size=4 * V_WIDTH, num_hidden_layers=V_LAYERS,
                           num_attention_heads=V_WIDTH // 64, image_size=RES, patch_size=PATCH,
                           hidden_act="quick_gelu"),
        projection_dim=EMBED)
    model = transformers.CLIPModel(cfg).eval()
    # Random init leaves LayerNorms at identity and biases at zero: perturb every tensor so a
    # wrong mapping of any of them shows.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 3, RES, RES)).astype(np.float32)  # NCHW, already normalised
    lengths = [3, 7, 12]  # all shorter than the context length 16
    ids = np.zeros((3, 12), np.int64)  # L = 12 < CONTEXT
    for row, n in enumerate(lengths):
        ids[row, 0] = VOCAB - 2  # start of text
        ids[row, 1:n - 1] = rng.integers(1, VOCAB - 2, n - 2)
        ids[row, n - 1] = VOCAB - 1  # end of text: the largest id
    return images, ids


@pytest.fixture(scope="module")
def hf_features(hf_model, inputs):
    images, ids = inputs
    with torch.no_grad():
        img = features(hf_model.get_image_features(pixel_values=torch.from_numpy(images))).numpy()
        txt = features(hf_model.get_text_features(input_ids=torch.from_numpy(ids))).numpy()
    return img, txt


def ours(conv, inputs, dtype="float32"):
    images, ids = inputs
    model = CLIP(dataclasses.replace(conv.clip_config, dtype=dtype), conv.adapter_config, rngs=nnx.Rngs(1))
    apply_state(model, conv.backbone)
    if conv.adapters is not None:
        apply_state(model, conv.adapters)
    img = model.encode_image(jnp.asarray(images.transpose(0, 2, 3, 1)))
    txt = model.encode_text(jnp.asarray(ids, jnp.int32))
    return np.asarray(img), np.asarray(txt)


def check(name, got, want, tol=TOL):
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    print(f"\nparity {name}: image max rel err {errs[0]:.3e}, text max rel err {errs[1]:.3e}")
    assert errs[0] < tol and errs[1] < tol, (name, errs)


# ----------------------------------------------------------------------------- an OpenAI-architecture module
def openai_from_hf(hf) -> dict:
    """HF CLIPModel weights under OpenAI's names (written independently of cma_jax.convert)."""
    s = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    out = {
        "visual.conv1.weight": s["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": s["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": s["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": s["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": s["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": s["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": s["vision_model.post_layernorm.bias"],
        "visual.proj": s["visual_projection.weight"].T.contiguous(),
        "token_embedding.weight": s["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": s["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": s["text_model.final_layer_norm.weight"],
        "ln_final.bias": s["text_model.final_layer_norm.bias"],
        "text_projection": s["text_projection.weight"].T.contiguous(),
        "logit_scale": s["logit_scale"],
    }
    for src, dst, n in (("vision_model", "visual.transformer", V_LAYERS), ("text_model", "transformer", T_LAYERS)):
        for i in range(n):
            a, b = f"{src}.encoder.layers.{i}.", f"{dst}.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[b + f"attn.in_proj_{kind}"] = torch.cat([s[a + f"self_attn.{q}_proj.{kind}"] for q in "qkv"])
                out[b + f"attn.out_proj.{kind}"] = s[a + f"self_attn.out_proj.{kind}"]
                out[b + f"ln_1.{kind}"] = s[a + f"layer_norm1.{kind}"]
                out[b + f"ln_2.{kind}"] = s[a + f"layer_norm2.{kind}"]
                out[b + f"mlp.c_fc.{kind}"] = s[a + f"mlp.fc1.{kind}"]
                out[b + f"mlp.c_proj.{kind}"] = s[a + f"mlp.fc2.{kind}"]
    return out


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, hf_model):
    path = tmp_path_factory.mktemp("hf") / "clip"
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def openai_module(hf_model, hf_features, inputs):
    ref = OpenAICLIP(REF_CONFIG).eval()
    missing, unexpected = ref.load_state_dict(openai_from_hf(hf_model), strict=False)
    assert unexpected == [] and set(missing) == {"input_resolution", "context_length", "vocab_size"}
    images, ids = inputs
    with torch.no_grad():  # the reference itself agrees with HF, so it is a faithful OpenAI CLIP
        img, txt = ref(torch.from_numpy(images), torch.from_numpy(ids))
    assert rel_err(img.numpy(), hf_features[0]) < 1e-5 and rel_err(txt.numpy(), hf_features[1]) < 1e-5
    return ref


# ----------------------------------------------------------------------------- the tests
def test_parity_hf_folder(hf_folder, inputs, hf_features):
    conv = convert_checkpoint(str(hf_folder))
    assert (conv.clip_config.vision_layers, conv.clip_config.text_layers) == (V_LAYERS, T_LAYERS)
    assert conv.clip_config.text_heads == T_HEADS and conv.clip_config.image_resolution == RES
    check("HF folder (safetensors)", ours(conv, inputs), hf_features)


def test_parity_hf_pytorch_model_bin(tmp_path, hf_model, inputs, hf_features):
    hf_model.config.save_pretrained(tmp_path / "hf")  # transformers 5 writes only safetensors itself
    torch.save(hf_model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    check("HF folder (pytorch_model.bin)", ours(convert_checkpoint(str(tmp_path / "hf")), inputs), hf_features)


def test_parity_openai_state_dict(tmp_path, openai_module, inputs, hf_features):
    torch.save(openai_module.state_dict(), tmp_path / "openai.pt")
    conv = convert_checkpoint(str(tmp_path / "openai.pt"))
    assert conv.clip_config.text_heads == T_WIDTH // 64  # OpenAI's rule, inferred
    check("OpenAI state dict", ours(conv, inputs), hf_features)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_parity_openai_torchscript(tmp_path, openai_module, inputs, hf_features):
    images, ids = inputs
    traced = torch.jit.trace(openai_module, (torch.from_numpy(images), torch.from_numpy(ids)))
    traced.save(str(tmp_path / "ViT-tiny.pt"))
    conv = convert_checkpoint(str(tmp_path / "ViT-tiny.pt"))
    check("OpenAI TorchScript archive", ours(conv, inputs), hf_features)


def test_parity_bfloat16_compute(hf_folder, inputs, hf_features):
    check("HF folder, bfloat16 compute", ours(convert_checkpoint(str(hf_folder)), inputs, "bfloat16"),
          hf_features, tol=5e-2)


def test_parity_cross_modal_adapter_checkpoint(hf_model, inputs):
    """A CLIP4Clip-style checkpoint with the original repo's stacked adapters, unequal depths."""
    torch.manual_seed(1)
    ref = OpenAICLIP(REF_CONFIG, adapter_r=4, share_dim=16).eval()
    ref.load_state_dict(openai_from_hf(hf_model), strict=False)
    sd = {"clip." + k: v for k, v in ref.state_dict().items()}
    sd["similarity_dense.weight"] = torch.zeros(1, 8)  # a CLIP4Clip head tensor: ignored, listed
    conv = convert_state_dict({k: v.numpy() for k, v in sd.items()}, source="cma")
    assert conv.adapter_config.reduction_dim == 4 and conv.adapter_config.share_dim == 16
    assert conv.ignored == ["similarity_dense.weight"]
    images, ids = inputs
    with torch.no_grad():
        want = [t.numpy() for t in ref(torch.from_numpy(images), torch.from_numpy(ids))]
    plain = ours(dataclasses.replace(conv, adapters=None, adapter_config=None), inputs)
    assert rel_err(plain[0], want[0]) > 1e-2  # the adapters change the output, so the check below means something
    check("Cross-Modal-Adapter checkpoint (with adapters)", ours(conv, inputs), want)


def test_hf_missing_tensor_is_listed(hf_model):
    from cma_jax.convert import CheckpointError

    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()
          if k not in ("text_model.encoder.layers.1.self_attn.q_proj.weight", "visual_projection.weight")}
    sd["text_model.extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointError) as e:
        convert_state_dict(sd, hf_model.config.to_dict(), source="hf")
    msg = str(e.value)
    assert "missing (2): transformer.resblocks.1.attn.in_proj_weight, visual.proj" in msg
    assert ("unexpected (3): text_model.encoder.layers.1.self_attn.k_proj.weight, "
            "text_model.encoder.layers.1.self_attn.v_proj.weight, text_model.extra.weight") in msg


def test_hf_config_with_another_activation_is_refused(hf_model):
    from cma_jax.convert import CheckpointError

    cfg = hf_model.config.to_dict()
    cfg["text_config"]["hidden_act"] = "gelu"
    with pytest.raises(CheckpointError, match="text_config.hidden_act='gelu' \\(expected 'quick_gelu'\\)"):
        convert_state_dict({k: v.numpy() for k, v in hf_model.state_dict().items()}, cfg, source="hf")
