"""Backbone resolution: downloads from a loopback HTTP server, a pre-populated Hugging Face cache, offline errors.

The server (127.0.0.1, started and stopped here) serves a tiny CLIP saved in OpenAI's format (a torch.save'd
state dict) and a tiny stand-in for OpenAI's BPE file, and counts the requests it answers.
"""

import gzip
import hashlib
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax import nnx  # noqa: E402

from cma_jax import backbones, checkpoint, convert  # noqa: E402
from cma_jax.models.clip import CLIP, CLIPConfig  # noqa: E402
from cma_jax.models.state import apply_state  # noqa: E402
from cma_jax.trees import flatten  # noqa: E402
from loopback import Server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# OpenAI's text tower has width // 64 heads (at least 1): what conversion infers from the shapes.
TINY = CLIPConfig(embed_dim=16, image_resolution=32, vision_layers=2, vision_width=32, vision_patch_size=8,
                  context_length=8, vocab_size=64, text_width=32, text_heads=1, text_layers=2)
BPE = gzip.compress(b"#version: 0.2\nt h\nth e</w>\n", mtime=0)  # a tiny merges file: copied, never parsed here


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory):
    """(bytes of a tiny OpenAI-format checkpoint, its backbone tree)."""
    model = CLIP(TINY, None, rngs=nnx.Rngs(0))
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    path = tmp_path_factory.mktemp("pt") / "tiny.pt"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in convert.to_openai(tree, TINY).items()}, path)
    return path.read_bytes(), flatten(tree)


# ----------------------------------------------------------------------------- the loopback server
@pytest.fixture()
def server(tiny_pt, monkeypatch, tmp_path):
    """The server with the tiny CLIP at /<sha256>/ViT-B-32.pt and the BPE file; the BPE URL points at it."""
    pt, _ = tiny_pt
    pt_path = f"/{sha256(pt)}/ViT-B-32.pt"
    with Server({pt_path: pt, "/clip/bpe_simple_vocab_16e6.txt.gz": BPE}) as s:
        s.pt_path = pt_path
        monkeypatch.setattr(backbones, "BPE_URL", f"{s.url}/clip/bpe_simple_vocab_16e6.txt.gz#sha256={sha256(BPE)}")
        monkeypatch.setenv("CMA_JAX_CACHE", str(tmp_path / "cache"))
        for var in ("CMA_JAX_OFFLINE", "HF_HUB_OFFLINE", "CMA_JAX_MIRROR"):
            monkeypatch.delenv(var, raising=False)
        yield s


def check_backbone(folder, tiny_pt):
    """The folder is a read-only converted backbone holding exactly the tiny CLIP's weights and the BPE."""
    cfg, state = checkpoint.load_backbone(folder)
    assert cfg == TINY
    want, got = tiny_pt[1], flatten(state)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    with open(os.path.join(checkpoint.tokenizer_dir(folder), "bpe_simple_vocab_16e6.txt.gz"), "rb") as f:
        assert f.read() == BPE
    files = [os.path.join(r, n) for r, _, ns in os.walk(folder) for n in ns]
    assert files and all(os.stat(f).st_mode & 0o222 == 0 for f in files)


def cache_listing(tmp_path):
    """Every file and folder under the cache except the lock files."""
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "locks" not in p.parts)


# ----------------------------------------------------------------------------- URLs and presets
def test_url_is_downloaded_once_then_served_from_the_cache(server, tiny_pt, tmp_path, capsys):
    url = f"{server.url}{server.pt_path}"
    folder = backbones.resolve(url)
    assert folder == str(tmp_path / "cache" / "backbones" / f"ViT-B-32-{sha256(tiny_pt[0])[:12]}")
    check_backbone(folder, tiny_pt)
    assert "ViT-B-32.pt: 100%" in capsys.readouterr().err  # the progress bar
    n = len(server.requests)
    assert server.gets(server.pt_path) == [None] and n == 2  # the checkpoint and the BPE file, once each
    assert backbones.resolve(url) == folder
    assert len(server.requests) == n  # the second resolution does not touch the network
    assert not [p for p in cache_listing(tmp_path) if ".part" in p or ".tmp" in p]


def test_preset_names_use_the_url_table(server, tiny_pt, monkeypatch):
    monkeypatch.setitem(backbones.OPENAI_URLS, "ViT-B/32", f"{server.url}{server.pt_path}")
    folder = backbones.resolve("ViT-B/32")
    check_backbone(folder, tiny_pt)
    assert backbones.resolve("vit_b32") == folder  # the config-preset spelling names the same backbone
    assert len(server.gets(server.pt_path)) == 1


def test_the_preset_table_is_openais_with_the_sha256_in_each_path():
    assert set(backbones.ALIASES.values()) == set(backbones.OPENAI_URLS)
    for name, url in backbones.OPENAI_URLS.items():
        base, sha = backbones.split_sha256(url)
        assert url.startswith("https://openaipublic.azureedge.net/clip/models/") and len(sha) == 64, name
    assert backbones.split_sha256(backbones.BPE_URL)[1] == (
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a")


def test_wrong_sha256_fails_and_leaves_no_file(server, tmp_path):
    url = f"{server.url}{server.pt_path}#sha256={'0' * 64}"
    with pytest.raises(backbones.DownloadError, match=rf"ViT-B-32.pt: SHA256 {sha256(server.files[server.pt_path])} "
                                                     rf"does not match the expected 0{{64}}; the file was deleted"):
        backbones.resolve(url)
    assert cache_listing(tmp_path) == ["downloads"]  # no file


def test_cut_download_is_not_trusted_and_the_next_try_resumes(server, tiny_pt, tmp_path):
    server.cut[server.pt_path] = 1
    url = f"{server.url}{server.pt_path}"
    with pytest.raises(backbones.DownloadError, match=r"cannot download .*ViT-B-32.pt: the connection closed after "
                                                      r"[\d,]+ of [\d,]+ bytes \(run again to resume\)") as e:
        backbones.resolve(url)
    assert "\n" not in str(e.value)
    # Only the partial file remains, under a name no lookup trusts; nothing converted.
    assert [p for p in cache_listing(tmp_path) if os.path.basename(p).startswith("ViT")] == [
        f"downloads/{sha256(tiny_pt[0])}/ViT-B-32.pt.part"]
    check_backbone(backbones.resolve(url), tiny_pt)
    half = len(tiny_pt[0]) // 2
    assert server.gets(server.pt_path) == [None, f"bytes={half}-"]  # resumed where the cut left it


def _resolve_in_child(url, cache, env, barrier, out):
    os.environ.update(env)
    os.environ["CMA_JAX_CACHE"] = cache
    from cma_jax import backbones as b  # noqa: PLC0415 - a fresh process

    b.BPE_URL = env["TEST_BPE_URL"]
    barrier.wait()
    out.put(b.resolve(url))


@pytest.mark.slow
def test_two_processes_resolving_at_once_download_once(server, tiny_pt, tmp_path):
    server.delay_s = 0.5  # both requests would overlap without the lock
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    env = {"TEST_BPE_URL": backbones.BPE_URL, "JAX_PLATFORMS": "cpu"}
    url = f"{server.url}{server.pt_path}"
    procs = [ctx.Process(target=_resolve_in_child, args=(url, str(tmp_path / "cache"), env, barrier, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    folders = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert folders[0] == folders[1]
    check_backbone(folders[0], tiny_pt)
    assert len(server.gets(server.pt_path)) == 1
    assert len(os.listdir(tmp_path / "cache" / "backbones")) == 1  # converted once, no temporary folder left


def test_mirror_serves_openais_files_under_the_same_checksums(tiny_pt, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "ViT-B-32.pt").write_bytes(tiny_pt[0])
    (mirror / "bpe_simple_vocab_16e6.txt.gz").write_bytes(BPE)
    monkeypatch.setitem(backbones.OPENAI_URLS, "ViT-B/32",
                        f"https://openaipublic.azureedge.net/clip/models/{sha256(tiny_pt[0])}/ViT-B-32.pt")
    monkeypatch.setattr(backbones, "BPE_URL",
                        f"https://example.invalid/bpe_simple_vocab_16e6.txt.gz#sha256={sha256(BPE)}")
    monkeypatch.setenv("CMA_JAX_MIRROR", mirror.as_uri())
    monkeypatch.delenv("CMA_JAX_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    check_backbone(backbones.resolve("ViT-B/32", cache_dir=str(tmp_path / "cache")), tiny_pt)


# ----------------------------------------------------------------------------- local files and folders
def test_local_file_is_converted_once_and_again_when_it_changes(tiny_pt, tmp_path, monkeypatch):
    monkeypatch.setenv("CMA_JAX_OFFLINE", "1")  # the BPE file beside the checkpoint: no download needed
    src = tmp_path / "weights"
    src.mkdir()
    (src / "ViT-B-32.pt").write_bytes(tiny_pt[0])
    (src / "bpe_simple_vocab_16e6.txt.gz").write_bytes(BPE)
    cache = str(tmp_path / "cache")
    first = backbones.resolve(str(src / "ViT-B-32.pt"), cache_dir=cache)
    check_backbone(first, tiny_pt)
    assert backbones.resolve(str(src / "ViT-B-32.pt"), cache_dir=cache) == first
    assert backbones.resolve(first, cache_dir=cache) == first  # a converted folder is used as it is
    os.utime(src / "ViT-B-32.pt", ns=(0, 0))
    second = backbones.resolve(str(src / "ViT-B-32.pt"), cache_dir=cache)
    assert second != first and os.path.basename(second).startswith("ViT-B-32.pt-local")
    assert backbones.resolve("gs://bucket/ckpt/clip_vit_b32") == "gs://bucket/ckpt/clip_vit_b32"


def test_no_backbone_is_an_error_and_random_is_explicit():
    assert backbones.resolve("random") is None
    with pytest.raises(backbones.BackboneError, match=r"^no backbone given: set --config.backbone=ViT-B/32 .*"
                                                      r"--config.backbone=random"):
        backbones.resolve("")
    with pytest.raises(backbones.BackboneError, match=r"backbone 'no such thing': not a preset \(ViT-B/32, "):
        backbones.resolve("no such thing")


# ----------------------------------------------------------------------------- offline
def test_offline_uncached_name_fails_at_once_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CMA_JAX_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(backbones.DownloadError) as e:
        backbones.resolve("ViT-B/32", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 2
    assert str(e.value) == (
        f"cannot download {backbones.OPENAI_URLS['ViT-B/32']}: downloads are off (CMA_JAX_OFFLINE=1) and it is not "
        "cached; without internet, download it elsewhere and pass the file: --config.backbone=/path/ViT-B-32.pt")


def test_unreachable_server_fails_fast_with_the_same_advice(tmp_path, monkeypatch):
    for var in ("CMA_JAX_OFFLINE", "HF_HUB_OFFLINE", "CMA_JAX_MIRROR"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:  # a free port; nothing listens there once it is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{'1' * 64}/ViT-L-14.pt"
    monkeypatch.setitem(backbones.OPENAI_URLS, "ViT-L/14", url)
    start = time.monotonic()
    with pytest.raises(backbones.DownloadError, match=rf"^cannot download {url}: .*refused.*; without internet, "
                                                      r"download it elsewhere and pass the file: "
                                                      r"--config.backbone=/path/ViT-L-14.pt$"):
        backbones.resolve("vit_l14", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 5


# ----------------------------------------------------------------------------- Hugging Face
HF_COMMIT = "0123456789abcdef0123456789abcdef01234567"
VOCAB = 64


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """HF_HOME with hub/models--tiny-org--tiny-clip (refs/main -> one snapshot): a tiny CLIPModel + tokenizer."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=8, hidden_act="quick_gelu",
                         bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                           image_size=32, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=16)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # perturb every tensor so that a wrong mapping of any of them shows
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--tiny-org--tiny-clip"
    snapshot = repo / "snapshots" / HF_COMMIT
    model.save_pretrained(snapshot)
    (snapshot / "vocab.json").write_text(json.dumps({"a</w>": 0, "<|endoftext|>": 1}))
    (snapshot / "merges.txt").write_text("#version: 0.2\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HF_COMMIT)
    return home, model


@pytest.mark.slow
def test_hf_repo_id_resolves_offline_from_the_cache_and_runs(hf_home, tmp_path):
    """In a fresh process (huggingface_hub reads HF_HOME at import): HF_HUB_OFFLINE=1, cached and uncached ids."""
    home, hf_model = hf_home
    script = textwrap.dedent("""
        import json, time
        from cma_jax import backbones
        folder = backbones.resolve("tiny-org/tiny-clip")
        again = backbones.resolve("tiny-org/tiny-clip@main")
        start = time.monotonic()
        try:
            backbones.resolve("tiny-org/not-cached")
            error = None
        except OSError as e:
            error = str(e)
        print(json.dumps({"folder": folder, "again": again, "error": error, "seconds": time.monotonic() - start}))
    """)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "CMA_JAX_CACHE": str(tmp_path / "cache"),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    env.pop("CMA_JAX_OFFLINE", None)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["folder"] == out["again"] == str(tmp_path / "cache" / "backbones" /
                                                f"hf-tiny-org--tiny-clip-{HF_COMMIT[:12]}")
    assert out["error"].startswith("backbone tiny-org/not-cached: cannot get it from the Hugging Face Hub (not in "
                                   "the Hugging Face cache and downloads are off (HF_HUB_OFFLINE=1))")
    assert "\n" not in out["error"] and out["seconds"] < 5
    assert sorted(os.listdir(checkpoint.tokenizer_dir(out["folder"]))) == ["merges.txt", "vocab.json"]

    # The converted folder loads into our CLIP, which computes what the Hugging Face model computes.
    cfg, state = checkpoint.load_backbone(out["folder"])
    assert (cfg.vision_layers, cfg.text_layers, cfg.text_heads, cfg.vocab_size) == (2, 2, 2, VOCAB)
    model = CLIP(cfg, None, rngs=nnx.Rngs(1))
    apply_state(model, state)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    ids = np.array([[VOCAB - 2, 5, 9, VOCAB - 1, 0, 0], [VOCAB - 2, 7, VOCAB - 1, 0, 0, 0]])
    with torch.no_grad():
        want_img = hf_model.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
        want_txt = hf_model.get_text_features(input_ids=torch.from_numpy(ids))
    want_img, want_txt = (np.asarray(getattr(w, "pooler_output", w)) for w in (want_img, want_txt))
    np.testing.assert_allclose(np.asarray(model.encode_image(jnp.asarray(images))), want_img, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.encode_text(jnp.asarray(ids, jnp.int32))), want_txt, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.slow
def test_hf_repo_id_as_config_backbone_trains_a_step(hf_home, tmp_path):
    """`--config.backbone=org/name` from a pre-populated Hugging Face cache, offline: converted, trained one step."""
    home, _ = hf_home
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        from tiny import SyntheticBatches, tiny_config
        from cma_jax import backbones, checkpoint, train
        from cma_jax import run as run_lib
        config = tiny_config(num_steps=1)
        config.backbone = "tiny-org/tiny-clip"
        model, history = train.train(run_lib.resolve(config, {str(tmp_path / "run")!r}), train_iter=SyntheticBatches(config))
        _, state = checkpoint.load_backbone(backbones.resolve(config.backbone))
        same = bool(np.array_equal(np.asarray(model.clip.visual.proj[...]), np.asarray(state["visual"]["proj"])))
        print(json.dumps({{"losses": [h["loss"] for h in history], "same_backbone": same}}))
    """)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "CMA_JAX_CACHE": str(tmp_path / "cache"),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(out["losses"]) == 1 and np.isfinite(out["losses"][0]) and out["same_backbone"]
