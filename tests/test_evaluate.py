"""Evaluation: block-wise similarity equals the full matrix; end-to-end metrics, reports, padding, mesh."""

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from flax import nnx

from cma_jax import evaluate as ev
from cma_jax import evaluator
from cma_jax import metrics
from cma_jax import run as run_lib
from cma_jax.models.clip import CLIPConfig
from cma_jax.models.peft.adapter import AdapterConfig
from cma_jax.models.retrieval import RetrievalModel

TINY = CLIPConfig(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=32, vision_patch_size=16,
                  context_length=8, vocab_size=50, text_width=32, text_heads=2, text_layers=1)


def tiny_model(head="text_conditioned", seed=0):
    return RetrievalModel(TINY, AdapterConfig(reduction_dim=4, share_dim=8), head=head, tau=0.5,
                          rngs=nnx.Rngs(seed))


def direct_similarity(model, ids, frames, fmask):
    """Reference: one jitted pass over everything, no batching, padding or tiling."""
    fn = nnx.jit(lambda m, i, f, k: m.similarity(m.encode_text(i), m.encode_frames(f), k))
    return np.asarray(fn(model, ids, frames, fmask))


def embeddings(nt=23, nv=17, t=5, d=16, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, nv)
    mask = np.arange(t)[None] < lengths[:, None]  # variable number of valid frames per video
    return (rng.normal(size=(nt, d)).astype(np.float32), rng.normal(size=(nv, t, d)).astype(np.float32), mask)


@pytest.mark.parametrize("head", ["text_conditioned", "meanp"])
def test_block_similarity_equals_full_matrix(head):
    model = tiny_model(head)
    text, frames, mask = embeddings()
    full = np.asarray(model.similarity(text, frames, mask))
    assert full.shape == (23, 17) and np.isfinite(full).all()
    for block in (1, 4, 7, 17, 64):
        got = ev.block_similarity(model, text, frames, mask, block_size=block)
        np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5, err_msg=f"block {block}")


def make_batches(n_videos=6, captions_per_video=(1, 2, 1, 3, 1, 2), batch=4, t=3, seed=0):
    """Eval batches per the contract: last batch padded with valid=False rows (garbage content)."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(n_videos, t, 32, 32, 3), dtype=np.uint8)
    fmask = np.ones((n_videos, t), bool)
    fmask[0, 2:] = False
    cap_vid = np.repeat(np.arange(n_videos), captions_per_video)
    ids = rng.integers(1, 48, size=(len(cap_vid), 6)).astype(np.int32)
    ids[:, -1] = 49  # end-of-text = largest id
    perm = rng.permutation(n_videos)  # videos arrive in any order

    def batches(arrays, n):
        out = []
        for s in range(0, n, batch):
            b = {k: v[s:s + batch] for k, v in arrays.items()}
            real = len(b["video_index"])
            pad = batch - real
            b = {k: np.concatenate([v, np.repeat(v[:1], pad, 0)]) for k, v in b.items()}
            b["valid"] = np.arange(batch) < real
            out.append(b)
        return out

    vb = batches({"frames": frames[perm], "frame_mask": fmask[perm], "video_index": perm.astype(np.int32)},
                 n_videos)
    tb = batches({"text_ids": ids, "text_mask": (ids > 0).astype(np.int32),
                  "video_index": cap_vid.astype(np.int32)}, len(cap_vid))
    return tb, vb, (frames, fmask, ids, cap_vid)


def test_evaluate_end_to_end_matches_direct_computation(tmp_path, caplog):
    from tensorboardX import SummaryWriter

    caplog.set_level(logging.INFO)
    model = tiny_model()
    tb, vb, (frames, fmask, ids, cap_vid) = make_batches()
    writer = SummaryWriter(str(tmp_path / "tb"))
    res = ev.evaluate(model, tb, vb, block_size=4, dsl=True, workdir=str(tmp_path), writer=writer, step=7,
                      name="test")
    writer.close()
    # Direct: encode without batching or padding, full similarity, same metrics.
    sim = direct_similarity(model, ids, frames, fmask)
    expected = metrics.retrieval_metrics(sim, cap_vid)
    assert res["num_texts"] == 10 and res["num_videos"] == 6
    for d in ("t2v", "v2t"):
        for k, v in expected[d].items():
            assert res["metrics"][d][k] == pytest.approx(v), (d, k)
    assert res["dsl"] == metrics.retrieval_metrics(sim, cap_vid, dsl_temp=1.0)
    saved = json.loads((tmp_path / "eval_test_step7.json").read_text())
    assert saved["metrics"]["t2v"]["R1"] == pytest.approx(expected["t2v"]["R1"])
    md = (tmp_path / "eval_test_step7.md").read_text()
    assert "| test |" in md and "| test + DSL |" in md
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tb"))
    # The encode pass reports its rate: the 6 videos (padding rows not counted), videos/s, the input's share.
    assert re.search(r"encoded 6 videos in [\d.]+ s: [\d.]+ videos/s \(\d+ % of it waiting", caplog.text)


def test_qbnorm_reports_metrics_re_scored_with_the_banks_encoded_at_evaluation(tmp_path):
    """A query bank (eval batches of another split) is encoded with the model being evaluated; its captions
    re-score t2v, its videos v2t, on cosines: as QB-Norm computed directly on unbatched, untiled scores."""
    model = tiny_model()
    tb, vb, (frames, fmask, ids, cap_vid) = make_batches()
    btb, bvb, (b_frames, b_fmask, b_ids, _) = make_batches(n_videos=5, captions_per_video=(2, 1, 3, 1, 2), seed=1)
    bank = types.SimpleNamespace(texts=btb, videos=bvb, num_text_batches=len(btb), num_video_batches=len(bvb))
    res = ev.evaluate(model, tb, vb, block_size=4, workdir=str(tmp_path), name="test", bank=bank, qbnorm_k=2,
                      qbnorm_beta=10.0)
    scale = float(np.exp(model.clip.logit_scale[...]))
    sim = direct_similarity(model, ids, frames, fmask) / scale
    banks = metrics.QueryBanks(text=direct_similarity(model, b_ids, frames, fmask) / scale,
                               video=direct_similarity(model, ids, b_frames, b_fmask).T / scale, k=2, beta=10.0)
    want = metrics.retrieval_metrics(sim, cap_vid, qbnorm=banks)
    for d in ("t2v", "v2t"):
        for k, v in want[d].items():
            assert res["qbnorm"][d][k] == pytest.approx(v), (d, k)
    assert res["qbnorm_bank"] == {"texts": 9, "videos": 5, "k": 2, "beta": 10.0}
    assert res["metrics"] == ev.evaluate(model, tb, vb, block_size=4)["metrics"]  # the plain numbers as without
    assert "| test + QB-Norm |" in (tmp_path / "eval_test.md").read_text()


def test_duplicate_or_missing_videos_are_rejected():
    model = tiny_model()
    tb, vb, _ = make_batches()
    vb[0]["video_index"][0] = vb[0]["video_index"][1]
    with pytest.raises(ValueError, match="exactly once"):
        ev.encode_eval_set(model, tb, vb)


MESH_SCRIPT = textwrap.dedent("""
    import numpy as np, jax
    from jax.sharding import AxisType
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("t", sys.argv[1]); t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t)
    from cma_jax import evaluate as ev
    from cma_jax import evaluator
    assert jax.device_count() == 8, jax.device_count()
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
    model = t.tiny_model()
    text, frames, mask = t.embeddings()
    full = np.asarray(model.similarity(text, frames, mask))
    for block in (5, 16):
        got = ev.block_similarity(model, text, frames, mask, block_size=block, mesh=mesh)
        np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
    tb, vb, _ = t.make_batches(batch=8)
    plain = ev.evaluate(model, tb, vb, block_size=4)
    sharded = ev.evaluate(model, tb, vb, block_size=4, mesh=mesh)
    assert plain["metrics"] == sharded["metrics"], (plain["metrics"], sharded["metrics"])
    # The search API encodes data-parallel over the local devices (batch 5 -> 8, one row per device).
    from cma_jax import api
    r = api.Retriever(model, ["clip"], num_frames=3, max_words=6, batch_size=5)
    assert r.batch_size == 8 and r._batch_sharding is not None
    _, _, (frames, fmask, ids, _) = t.make_batches()
    np.testing.assert_allclose(r.encode_clips(frames), np.asarray(model.encode_frames(frames)), atol=1e-5)
    print("MESH OK")
""")


@pytest.mark.slow
def test_sharded_evaluation_on_8_simulated_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT, __file__], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "MESH OK" in out.stdout, out.stderr[-3000:]


# ----------------------------------------------------------------------------- from a config
TEST_FRAMES = [4, 9, 2, 6, 3]
TEST_CAPTIONS = [1, 3, 2, 1, 4]  # multi-caption: 11 texts
WORDS = ["clip"] + [f"v{i}" for i in range(5)] + [f"c{c}" for c in range(4)]
DATASET = "tiny_eval"


def _clip_frames(src):
    from PIL import Image

    from cma_jax.data import video
    i, n = src
    return [video.encode_jpeg(Image.fromarray(np.full((32, 32, 3), (40 * i, 20 * j, 200 - 30 * i), np.uint8)))
            for j in range(n)]


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    """A built tiny split, a saved tiny backbone and a config (method zero_shot, mode eval)."""
    from cma_jax import checkpoint
    from cma_jax.data.builders import REGISTRY
    from cma_jax.data.builders.base import Entry, VideoTextBuilder, VideoTextConfig
    from cma_jax.models.peft.adapter import AdapterParam
    from cma_jax import config as config_lib

    class TinyEval(VideoTextBuilder, skip_registration=True):
        name = DATASET
        BUILDER_CONFIGS = [VideoTextConfig(name="default", resolution=32)]

        def _split_entries(self, manual_dir):
            return {"test": [Entry(f"v{i}", tuple(f"clip v{i} c{c}" for c in range(k)), (i, n))
                             for i, (n, k) in enumerate(zip(TEST_FRAMES, TEST_CAPTIONS))],
                    "val": [Entry(f"w{i}", (f"clip v{i} c{i}", f"v{i} clip"), (i, 3)) for i in range(3)]}

        def _frame_loader(self):
            return _clip_frames

    root = tmp_path_factory.mktemp("eval_cfg")
    TinyEval(data_dir=str(root / "data"), num_workers=0).download_and_prepare()
    REGISTRY[DATASET] = TinyEval
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    model = RetrievalModel(TINY, None, head="text_conditioned", tau=0.5, rngs=nnx.Rngs(3))
    tree = nnx.to_pure_dict(nnx.state(model.clip, nnx.All(nnx.Param, nnx.Not(AdapterParam))))
    checkpoint.save_backbone(str(root / "backbone"), TINY, tree)

    c = config_lib.base_config()
    c.mode, c.method = "eval", "zero_shot"
    c.backbone = str(root / "backbone")
    for f in config_lib.CLIP_FIELDS:
        c.model.clip[f] = getattr(TINY, f)
    c.model.tau = 0.5
    c.data.name, c.data.data_dir, c.data.eval_split = DATASET, str(root / "data"), "test"
    c.data.num_frames, c.data.max_words, c.data.tokenizer = 4, 6, str(vocab)
    c.eval.batch_size, c.eval.block_size, c.eval.dsl = 4, 3, True
    yield c, model
    del REGISTRY[DATASET]


def test_evaluate_from_config_zero_shot(eval_setup, tmp_path):
    from cma_jax.data import pipeline
    from cma_jax.data.builders.base import open_source
    from cma_jax.data.tokenizer import load_tokenizer

    config, model = eval_setup
    run = run_lib.resolve(config, str(tmp_path))
    res = evaluator.evaluate_from_config(run)
    run.close()
    assert (res["num_texts"], res["num_videos"], res["step"]) == (11, 5, None)
    # Reference: the same model, every clip and caption encoded directly from the built split.
    source = open_source(DATASET, "test", config.data.data_dir)
    clips = [pipeline.load_clip(source[i]["frames"], 4) for i in range(5)]
    frames, fmask = np.stack([c[0] for c in clips]), np.stack([c[1] for c in clips])
    captions = [c for caps in source.captions for c in caps]
    ids, _ = load_tokenizer(config.data.tokenizer).tokenize(captions, 6)
    sim = direct_similarity(model, ids, frames, fmask)
    idx = np.repeat(np.arange(5), TEST_CAPTIONS)
    expected = metrics.retrieval_metrics(sim, idx)
    for d in ("t2v", "v2t"):
        for k, v in expected[d].items():
            assert res["metrics"][d][k] == pytest.approx(v), (d, k)
    assert res["dsl"] == metrics.retrieval_metrics(sim, idx, dsl_temp=1.0)
    assert (tmp_path / "eval_test.json").exists() and (tmp_path / "eval_test.md").exists()
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tb"))  # beside training's, not in WORKDIR

    # eval.qbnorm: val's 6 captions and 3 videos as the query banks, encoded by the evaluated model.
    config.eval.qbnorm = "val"
    try:
        qb = evaluator.evaluate_from_config(run_lib.resolve(config, str(tmp_path)), model)
    finally:
        config.eval.qbnorm = ""
    assert qb["qbnorm_bank"] == {"texts": 6, "videos": 3, "k": 1, "beta": 20.0}
    assert qb["metrics"] == res["metrics"] and set(qb["qbnorm"]) == {"t2v", "v2t"}
    assert "| test + QB-Norm |" in (tmp_path / "eval_test.md").read_text()
    config.eval.qbnorm = "test"
    with pytest.raises(ValueError, match=r"config.eval.qbnorm: the query bank must be another split than the one"):
        run_lib.check(config)
    config.eval.qbnorm = ""

    # eval.max_videos: the first 3 videos and their 6 captions only.
    config.eval.max_videos = 3
    try:
        small = evaluator.evaluate_from_config(run_lib.resolve(config, str(tmp_path)), model)
    finally:
        config.eval.max_videos = 0
    assert (small["num_texts"], small["num_videos"]) == (6, 3)
    sub = metrics.retrieval_metrics(sim[:6, :3], idx[:6])
    assert small["metrics"]["t2v"]["R1"] == pytest.approx(sub["t2v"]["R1"])
    assert small["metrics"]["v2t"]["MnR"] == pytest.approx(sub["v2t"]["MnR"])


def test_periodic_evaluations_build_the_evaluation_data_once(eval_setup, tmp_path, monkeypatch):
    """train_and_eval evaluating every step of 4 (three periodic evaluations and the final one): the evaluation
    split's source is opened once (the Evaluator is built once), the training data once."""
    import ml_collections

    from cma_jax import train as train_lib
    from cma_jax.data import pipeline

    config, _ = eval_setup
    c = ml_collections.ConfigDict(config.to_dict())
    c.mode, c.method, c.data.train_split = "train_and_eval", "cma", "test"
    c.adapter.reduction_dim, c.adapter.share_dim = 4, 8
    c.train.batch_size, c.train.num_steps, c.train.eval_every_steps = 4, 4, 1
    c.train.save_every_steps, c.train.progress_bar = 10, False
    opened = []
    real = pipeline.open_source
    monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: opened.append(a[:2]) or real(*a, **k))
    run = run_lib.resolve(c, str(tmp_path))
    try:
        final = train_lib.train_and_evaluate(run)
    finally:
        run.close()
    assert final["step"] == 4 and final["num_videos"] == 5
    assert sorted((tmp_path / f"eval_test_step{s}.json").exists() for s in (1, 2, 3, 4)) == [True] * 4
    assert opened == [(DATASET, "test")] * 2  # one for evaluation, one for training


MULTIHOST_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.sharding import AxisType
    args = dict(a[2:].split("=", 1) for a in sys.argv[2:])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args["coordinator_address"], int(args["num_processes"]), int(args["process_id"]))
    import importlib.util
    spec = importlib.util.spec_from_file_location("t", sys.argv[1]); t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t)
    from cma_jax import evaluate as ev, metrics
    p, n = jax.process_index(), jax.process_count()
    mesh = jax.make_mesh((jax.device_count(), 1, 1), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
    model = t.tiny_model()
    tb, vb, (frames, fmask, ids, cap_vid) = t.make_batches(batch=4)
    local = lambda batches: [{k: v[p * 2:(p + 1) * 2] for k, v in b.items()} for b in batches]  # 2 rows each
    res = ev.evaluate(model, local(tb), local(vb), block_size=4, mesh=mesh, dsl=True)
    sim = t.direct_similarity(model, ids, frames, fmask)
    expected = metrics.retrieval_metrics(sim, cap_vid)
    ok = all(abs(res["metrics"][d][k] - v) < 1e-6 for d in expected for k, v in expected[d].items())
    te, ti, fe, fm = ev.encode_eval_set(model, local(tb), local(vb), mesh)  # gathered on every process
    ok = ok and np.allclose(te, np.asarray(model.encode_text(ids)), atol=1e-5) and (ti == cap_vid).all()
    ok = ok and np.allclose(fe, np.asarray(model.encode_frames(frames)), atol=1e-5) and (fm == fmask).all()
    print("RESULT", p, json.dumps({"ok": bool(ok), "num_texts": res["num_texts"], "num_videos": res["num_videos"]}))
""")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_gather_embeddings(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "mh.py"
    script.write_text(MULTIHOST_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, os.path.join(root, "launch", "local.py"), "--num_processes=2",
                          "--devices_per_process=2", "--", sys.executable, str(script), __file__],
                         env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    for i in range(2):
        line = next(x for x in out.stdout.splitlines() if x.startswith(f"[{i}] RESULT {i} "))
        got = json.loads(line.split(f"RESULT {i} ", 1)[1])
        assert got == {"ok": True, "num_texts": 10, "num_videos": 6}, line


def test_repeated_evaluation_does_not_recompile(capsys):
    """Periodic evaluation during training reuses the compiled encoders and similarity tiles;
    process 0 shows a progress bar while encoding."""
    import jax

    compiles = []

    def listener(event, duration, **kw):
        # A jit cache miss either compiles or reads the persistent compilation cache (conftest).
        if event.endswith(("backend_compile_duration", "cache_retrieval_time_sec")):
            compiles.append(event)

    jax.clear_caches()  # earlier tests may have compiled the same encoders in this process
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        model = tiny_model()
        tb, vb, _ = make_batches()
        first = ev.evaluate(model, tb, vb, block_size=4)
        assert compiles, "the first evaluation compiles its encoders"
        err = capsys.readouterr().err
        assert "encoding captions" in err and "0/3" in err and "encoding videos" in err and "0/2" in err
        compiles.clear()
        second = ev.evaluate(model, tb, vb, block_size=4)
        assert compiles == []
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert second["metrics"] == first["metrics"]
