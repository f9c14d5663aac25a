"""Video search end to end: train a tiny model on colour clips, index a folder, query, resume, refuse, report.

The "trained model" is a tiny random-init CLIP whose Cross-Modal Adapters (only) are trained with
optax for a few steps on five solid-colour videos captioned "a <colour> video"; the backbone and the
adapters are saved with cma_jax.checkpoint and used through the CLI entry point like a user would.
"""

import json
import os
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import videofiles
from cma_jax import api, checkpoint, console, search
from cma_jax.search import build, cli, thumbs
from cma_jax.models import peft
from cma_jax.models.clip import CLIPConfig
from cma_jax.models.peft.adapter import AdapterConfig, AdapterParam
from cma_jax.models.retrieval import RetrievalModel

COLOURS = ["red", "green", "blue", "yellow", "purple"]  # = videofiles.PALETTE order
CFG = CLIPConfig(embed_dim=16, image_resolution=32, vision_layers=2, vision_width=32, vision_patch_size=16,
                 context_length=8, vocab_size=16, text_width=32, text_heads=2, text_layers=2)
ADAPTER = AdapterConfig(reduction_dim=8, share_dim=8)


def caption(colour):
    return f"a {colour} video"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Videos (5 colours + a corrupt file), vocab, saved backbone and trained adapters."""
    root = tmp_path_factory.mktemp("search")
    videos = root / "videos"
    for i, colour in enumerate(COLOURS):
        sub = "more/" if i == 4 else ""  # nested folders are found too
        videofiles.write_video(videos / f"{sub}{colour}.mp4", i, 2.0)
    videofiles.write_corrupt(videos / "broken.mp4")
    (videos / "notes.txt").write_text("not a video")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["a", "video", "of"] + COLOURS) + "\n")

    model = RetrievalModel(CFG, ADAPTER, rngs=nnx.Rngs(0))
    r = api.Retriever(model, str(vocab), num_frames=2, max_words=8)
    clips = [r.load_video(videos / f"{'more/' if i == 4 else ''}{c}.mp4") for i, c in enumerate(COLOURS)]
    ids, tmask = r.tokenizer.tokenize([caption(c) for c in COLOURS], 8)
    batch = {"frames": np.stack([c[0] for c in clips]), "frame_mask": np.stack([c[1] for c in clips]),
             "text_ids": ids, "text_mask": tmask}
    backbone_tree = nnx.to_pure_dict(nnx.state(model.clip, nnx.All(nnx.Param, nnx.Not(AdapterParam))))
    checkpoint.save_backbone(str(root / "backbone"), CFG, backbone_tree)

    graphdef, adapters, rest = nnx.split(model, AdapterParam, ...)
    tx = optax.adam(3e-2)
    opt = tx.init(adapters)

    @jax.jit
    def step(adapters, opt):
        loss, grads = jax.value_and_grad(lambda a: nnx.merge(graphdef, a, rest)(batch))(adapters)
        updates, opt = tx.update(grads, opt, adapters)
        return optax.apply_updates(adapters, updates), opt, loss

    first = None
    for _ in range(30):
        adapters, opt, loss = step(adapters, opt)
        first = float(loss) if first is None else first
    assert float(loss) < 0.1 < first, (first, float(loss))  # it learned the colour <-> caption pairing
    nnx.update(model, adapters)
    checkpoint.save_adapters(str(root / "adapters"), model)
    return {"root": root, "videos": videos, "vocab": str(vocab), "backbone": str(root / "backbone"),
            "adapters": str(root / "adapters"), "model": model}


def index_args(t, index_dir, *extra):
    return ["index", str(t["videos"]), str(index_dir), "--backbone", t["backbone"], "--tokenizer", t["vocab"],
            "--num_frames", "2", "--max_words", "8", "--shard_size", "2", "--no_progress", *extra]


def test_index_resume_query_and_refusal(trained, tmp_path, capsys):
    t = trained
    index_dir = tmp_path / "index"
    assert search.main(index_args(t, index_dir, "--adapters", t["adapters"])) == 0
    out = capsys.readouterr().out
    assert "6 videos" in out and "6 to encode" in out
    assert out.splitlines()[-1] == (f"index {index_dir}: 5 encoded now; 5 videos in all, in 3 shards; "
                                    "1 unreadable video skipped (1 new)")
    manifest = json.loads((index_dir / "manifest.json").read_text())
    # sorted: [blue, broken] [green, more/purple] [red, yellow]: the unreadable one leaves a gap
    assert [s["count"] for s in manifest["shards"]] == [1, 2, 2]
    assert list(manifest["failed"]) == ["broken.mp4"]  # reported and skipped
    assert manifest["fingerprint"]["method_config"]["reduction_dim"] == 8

    # The index's embeddings are the trained model's own.
    index = search.load_index(str(index_dir))
    r = api.load(t["backbone"], t["adapters"], tokenizer=t["vocab"], num_frames=2, max_words=8)
    direct, _ = r.encode_videos([t["videos"] / v for v in index["videos"]])
    np.testing.assert_allclose(index["frame_emb"], direct, rtol=1e-2, atol=1e-2)  # stored as float16

    # Query: every caption retrieves its own video first (defaults: the model the index was built with).
    queries = [caption(c) for c in COLOURS]
    assert search.main(["query", str(index_dir), *queries, "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    for colour, q in zip(COLOURS, hits):
        assert q["query"] == caption(colour)
        assert os.path.basename(q["hits"][0]["video"]) == f"{colour}.mp4", q
        assert q["hits"][0]["score"] > q["hits"][1]["score"]
        assert len(q["hits"]) == 3

    # Resume: a rerun encodes nothing; a new file is the only one encoded.
    assert search.main(index_args(t, index_dir, "--adapters", t["adapters"])) == 0
    out = capsys.readouterr().out
    assert "0 to encode" in out and out.endswith(": 0 encoded now; 5 videos in all, in 3 shards; 1 unreadable video "
                                                 "skipped (0 new)\n")
    # (a second red clip: the model was trained on these five colours only)
    videofiles.write_video(t["videos"] / "late" / "red_again.mp4", 0, 3.0)
    try:
        assert search.main(index_args(t, index_dir, "--adapters", t["adapters"])) == 0
        assert "1 to encode" in capsys.readouterr().out
        manifest = json.loads((index_dir / "manifest.json").read_text())
        assert [s["count"] for s in manifest["shards"]] == [1, 2, 2, 1]
        assert search.main(["query", str(index_dir), caption("red"), "-k", "2"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "query: a red video"
        assert {line.split()[2] for line in lines[1:]} == {"red.mp4", "late/red_again.mp4"}, lines
        assert re.match(r"\s+1\. \+\d\.\d{4}  \S+  \(best at \d+\.\d s\)$", lines[1]), lines[1]
    finally:
        os.remove(t["videos"] / "late" / "red_again.mp4")

    # Another model (the same backbone without the adapters) is refused, for indexing and querying.
    assert search.main(index_args(t, index_dir, "--adapters", "")) == 2
    err = capsys.readouterr().err
    assert "different model" in err and "method: index 'cma', model 'zero_shot'" in err
    assert search.main(["query", str(index_dir), "red", "--adapters", ""]) == 2
    assert "different model" in capsys.readouterr().err
    # Same architecture, other weights: the hash tells them apart.
    other = api.Retriever(RetrievalModel(CFG, ADAPTER, rngs=nnx.Rngs(1)), t["vocab"], num_frames=2, max_words=8)
    with pytest.raises(search.IndexMismatchError, match="weights: index"):
        search.check_model(index["manifest"], other.fingerprint, str(index_dir))
    # Other frame settings on resume are refused too.
    assert search.main(index_args(t, index_dir, "--adapters", t["adapters"], "--fps", "2")) == 2
    assert "frame settings" in capsys.readouterr().err


def test_report_is_one_html_file_with_thumbnails(trained, tmp_path, capsys):
    t = trained
    index_dir = tmp_path / "index"
    assert search.main(index_args(t, index_dir, "--adapters", t["adapters"])) == 0
    out = tmp_path / "report.html"
    queries = tmp_path / "queries.txt"
    queries.write_text("a red video\na blue video\n")
    assert search.main(["report", str(index_dir), "a purple video", "--queries_file", str(queries), "-k", "2",
                        "--thumbs", "2", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"report with 3 queries x 2 hits, listing 1 unreadable video -> {out}")
    page = out.read_text()
    assert page.count("<section><h2>&ldquo;") == 3
    assert page.count("data:image/jpeg;base64,") == 3 * 2 * 2  # queries x hits x thumbnails
    assert "&ldquo;a red video&rdquo;" in page and "more/purple.mp4" in page
    assert "src='http" not in page  # self-contained: every image inline
    # The first hit of each query is the right video.
    for colour in ("purple", "red", "blue"):
        section = page.split(f"&ldquo;{caption(colour)}&rdquo;")[1].split("</section>")[0]
        first = re.search(r"<div class='rank'>1</div>.*?</div>(.*?)</div>", section, re.S).group(1)
        assert first.endswith(f"{colour}.mp4"), first
    # The videos the index could not read are listed, with the reason.
    unreadable = page.split("1 unreadable video, not in the index</h2>")[1].split("</section>")[0]
    assert "broken.mp4: <span class='err'>cannot decode " in unreadable


def test_report_counts_the_hits_it_shows(trained, tmp_path, capsys):
    t = trained
    index_dir = tmp_path / "index"
    assert search.main(index_args(t, index_dir, "--adapters", t["adapters"])) == 0
    out = tmp_path / "report.html"
    assert search.main(["report", str(index_dir), "a red video", "-k", "8", "--thumbs", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"report with 1 query x 5 hits (k=8, but the index holds 5 videos), listing 1 unreadable video -> {out}")
    assert out.read_text().count("<div class='rank'>") == 5


def test_index_defaults_to_the_frames_the_adapters_were_trained_with(trained, tmp_path, monkeypatch, capsys):
    t = trained
    monkeypatch.setattr(checkpoint, "saved_data_config", lambda path: {"num_frames": 3, "fps": 2.0, "max_words": 8})

    def index(name, *extra):
        return search.main(["index", str(t["videos"]), str(tmp_path / name), "--backbone", t["backbone"],
                            "--tokenizer", t["vocab"], "--no_progress", *extra])

    def settings(name):
        return search.read_manifest(str(tmp_path / name))["settings"]

    assert index("trained", "--adapters", t["adapters"]) == 0
    assert settings("trained") == {"num_frames": 3, "fps": 2.0, "resolution": 32}
    # Explicit flags win; a resumed index keeps its own settings.
    assert index("explicit", "--adapters", t["adapters"], "--num_frames", "2") == 0
    assert settings("explicit") == {"num_frames": 2, "fps": 2.0, "resolution": 32}
    capsys.readouterr()
    assert index("explicit", "--adapters", t["adapters"]) == 0
    assert "0 to encode" in capsys.readouterr().out
    # Without adapters nothing was trained: today's defaults.
    assert index("zero", "--max_words", "8") == 0
    assert settings("zero") == {"num_frames": 12, "fps": 1.0, "resolution": 32}


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        search.main(["index", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "videos per shard file (resume granularity) (default: 256)" in text
    assert "decoding threads (default: 4)" in text
    assert "(default: the index's, else text_conditioned)" in text
    assert "else what the adapters were trained with, else 12)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_a_full_disk_is_one_error_line(tmp_path, monkeypatch, capsys):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "index" / "shard_00003.npz.tmp"))

    monkeypatch.setattr(cli, "_retriever", lambda args, manifest: (None, {}))
    monkeypatch.setattr(build, "build_index", full)
    monkeypatch.setattr(console, "_exiting_on_full_disk", False)  # what the line sets for the exit hooks
    assert search.main(["index", str(tmp_path), str(tmp_path / "index")]) == 2
    assert capsys.readouterr().err == (
        f"error: the disk is full (no space left on device) writing {tmp_path}/index/shard_00003.npz.tmp; "
        "free some space or write to another disk, then run the same command again\n")


def test_missing_index_and_folder_give_clear_errors(tmp_path, capsys):
    assert search.main(["query", str(tmp_path / "nowhere"), "red", "--backbone", str(tmp_path)]) == 2
    assert "no search index here" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        search.list_videos(str(tmp_path / "no_videos"))


def test_api_loads_a_run_checkpoint(trained, tmp_path):
    """api.load takes the adapter shape and weights from a run checkpoint (cma_jax.checkpoint)."""
    from cma_jax import optim

    t = trained
    params = nnx.state(t["model"], optim.trainable_filter("cma"))
    state = optim.TrainState(params=params, opt_state=optax.adam(1e-3).init(params), rngs={}, step=7)
    ckpt = checkpoint.RunCheckpointer(str(tmp_path / "run"))
    ckpt.save(7, state, {"i": 0}, checkpoint.run_meta(t["model"]))
    ckpt.wait()
    ckpt.close()
    r = api.load(t["backbone"], str(tmp_path / "run"), tokenizer=t["vocab"], num_frames=2, max_words=8)
    assert r.step == 7 and r.model.clip.method == peft.as_method(ADAPTER)
    assert r.fingerprint == api.fingerprint(t["model"])  # the very same weights
    with pytest.raises(FileNotFoundError, match="no finished checkpoint|neither"):
        api.load(t["backbone"], str(tmp_path / "nothing"), tokenizer=t["vocab"])


def test_retriever_encodes_more_items_than_one_batch(trained):
    """Inputs longer than batch_size are encoded batch by batch, each row its own embedding."""
    t = trained
    small = api.Retriever(t["model"], t["vocab"], num_frames=2, max_words=8, batch_size=2)
    texts = [caption(c) for c in COLOURS]  # 5 texts = 2 full batches + 1 padded
    emb = small.encode_text(texts)
    whole = api.Retriever(t["model"], t["vocab"], num_frames=2, max_words=8, batch_size=8).encode_text(texts)
    assert emb.shape == (5, CFG.embed_dim)
    np.testing.assert_allclose(emb, whole, rtol=1e-5, atol=1e-5)


def test_query_defaults_to_the_dtype_the_index_was_built_with(trained, tmp_path, capsys):
    t = trained
    index_dir = tmp_path / "index"
    assert search.main(index_args(t, index_dir, "--adapters", t["adapters"], "--dtype", "bfloat16")) == 0
    capsys.readouterr()
    assert search.main(["query", str(index_dir), caption("red"), "-k", "1", "--json"]) == 0, capsys.readouterr().err
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["hits"][0]["video"] == "red.mp4"
    # An explicit other dtype is still refused: the fingerprint holds the compute dtype.
    assert search.main(["query", str(index_dir), "red", "--dtype", "float32"]) == 2
    assert "clip.dtype: index 'bfloat16', model 'float32'" in capsys.readouterr().err


def test_k_below_one_is_refused():
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        search.search(None, {}, ["a red video"], k=0)


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("num_frames", 0), ("fps", 0.0), ("max_words", 1)])
def test_retriever_settings_are_checked(trained, field, value):
    with pytest.raises(ValueError, match=f"{field} must be"):
        api.Retriever(trained["model"], trained["vocab"], **{field: value})


def test_report_thumbnails_do_not_hold_every_full_size_frame(monkeypatch):
    """A long video's frames are shrunk as they are decoded: the report never holds them all."""
    import base64
    import io
    import weakref

    from PIL import Image

    from cma_jax.data import video

    live, peak = [0], [0]

    def frames(path, fps):
        for i in range(30):
            im = Image.new("RGB", (640, 360), (8 * i, 0, 0))
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            weakref.finalize(im, lambda: live.__setitem__(0, live[0] - 1))
            yield im

    monkeypatch.setattr(video, "iter_sampled_frames", frames)
    pictures = thumbs.thumbnails("long.mp4", 3, 1.0, 45)
    assert len(pictures) == 3 and peak[0] <= 2, peak[0]
    first = Image.open(io.BytesIO(base64.b64decode(pictures[0])))
    assert first.size == (80, 45)


def test_qbnorm_ranks_hits_by_the_inverted_softmax_over_a_caption_bank():
    """A hub video that every bank caption retrieves loses the queries it tops; hits keep their cosine. The
    ranking is metrics.querybank_norm's on the head's cosines, exactly and in two stages."""
    import types

    import jax.numpy as jnp

    from cma_jax import metrics
    from cma_jax.models import retrieval
    from cma_jax.search import scoring

    rng = np.random.default_rng(0)
    frames = rng.normal(size=(6, 3, 8)).astype(np.float32)
    frames[0] += 2.0  # video 0: near every caption below (their embeddings are shifted the same way)
    queries = rng.normal(size=(4, 8)).astype(np.float32) + 1.5
    bank = rng.normal(size=(10, 8)).astype(np.float32) + 1.5
    texts = {f"q{i}": v for i, v in enumerate(queries)} | {f"b{i}": v for i, v in enumerate(bank)}
    model = types.SimpleNamespace(head="text_conditioned", tau=0.5)
    retriever = types.SimpleNamespace(model=model, encode_text=lambda ts: np.stack([texts[t] for t in ts]))
    index = {"videos": [f"v{i}.mp4" for i in range(6)], "manifest": {}, "frame_emb": frames,
             "frame_mask": np.ones((6, 3), bool), "frame_time": np.zeros((6, 3), np.float32)}
    names = [f"q{i}" for i in range(4)]
    def cos(t):  # the head's cosines [len(t), 6]
        return np.asarray(retrieval.head_scores("text_conditioned", jnp.asarray(t), jnp.asarray(frames),
                                                jnp.ones((6, 3), bool), 0.5)[0])
    plain = scoring.Searcher(retriever, index).search(names, k=6)
    assert [h[0]["video"] for h in plain] == ["v0.mp4"] * 4  # the hub tops every query
    want = np.argsort(-metrics.querybank_norm(cos(queries), cos(bank), k=1, beta=20.0), axis=1, kind="stable")
    bank_names = [f"b{i}" for i in range(10)]
    for candidates in (0, 6):
        got = scoring.Searcher(retriever, index, bank=bank_names, candidates=candidates).search(names, k=6)
        assert [[int(h["video"][1:-4]) for h in row] for row in got] == want.tolist()
        for row, c in zip(got, cos(queries)):
            np.testing.assert_allclose([h["score"] for h in row], c[[int(h["video"][1:-4]) for h in row]], rtol=1e-5)
    assert any(row[0] != 0 for row in want)  # QB-Norm moved the hub down somewhere
