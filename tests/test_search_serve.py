"""The served search (in process, Starlette's TestClient): one backbone under several adapter sets, the JSON
API, the best moment of a hit, range requests, and every bad input: paths out of the video folder, queries
that are empty, too long or not UTF-8, a video deleted after indexing, an index of another backbone."""

import asyncio
import json
import os

import av
import numpy as np
import pytest
from flax import nnx
from starlette.testclient import TestClient

import videofiles
from cma_jax import api, checkpoint
from cma_jax.models import peft, retrieval, state
from cma_jax.models.peft.adapter import AdapterConfig
from cma_jax.models.retrieval import RetrievalModel
from cma_jax.search import cli, scoring, serve, store
from test_search import CFG, COLOURS, caption, trained  # noqa: F401  (the module's trained model)

RED, GREEN, BLUE = 0, 1, 2  # videofiles.PALETTE


def write_segments(path, colours, *, fps=10, size=(64, 48)):
    """A video showing palette colour colours[s] during second s (so its best moment for a colour is known)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(len(colours) * fps):
            img = videofiles.frame_image(colours[i // fps], i / fps, size)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def index(t, video_dir, index_dir, adapters, *extra):
    args = ["index", str(video_dir), str(index_dir), "--backbone", t["backbone"], "--tokenizer", t["vocab"],
            "--adapters", adapters, "--num_frames", "3", "--max_words", "8", "--no_progress", *extra]
    assert cli.main(args) == 0


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):  # noqa: F811
    """Two indexes of one folder, built with two adapter sets of one backbone; the loaded server."""
    t, root = trained, tmp_path_factory.mktemp("serve")
    videos = root / "videos"
    for i, colour in enumerate(COLOURS):
        videofiles.write_video(videos / f"{colour}.mp4", i, 3.0)
    write_segments(videos / "moments.mp4", [GREEN, BLUE, RED])  # red only during its third second
    write_segments(root / "outside" / "secret.mp4", [RED, RED, RED])
    os.symlink(root / "outside" / "secret.mp4", videos / "escape.mp4")  # indexed, but lies outside the folder
    videofiles.write_video(videos / "doomed.mp4", 5, 3.0)  # deleted once indexed (cyan: no caption names it)
    other = RetrievalModel(CFG, peft.make("unimodal", {"reduction_dim": 4}), rngs=nnx.Rngs(5))
    state.apply_state(other, state.backbone_state(t["model"]))  # the same backbone, another adapter set
    checkpoint.save_adapters(str(root / "uni"), other)
    index(t, videos, root / "cma", t["adapters"])
    index(t, videos, root / "uni", str(root / "uni"))
    os.remove(videos / "doomed.mp4")
    backbone, loaded = serve.load_indexes([str(root / "cma"), str(root / "uni")], tokenizer=t["vocab"],
                                          log=lambda line: None)
    return {"root": root, "videos": videos, "backbone": backbone, "served": loaded,
            "client": TestClient(serve.make_app(loaded))}


def test_two_adapter_sets_share_one_backbone(served):
    cma, uni = served["served"]
    backbone = {id(a) for a in jax_leaves(served["backbone"].tree)}
    for s in (cma, uni):
        own = state.backbone_state(s.retriever.model)
        assert {id(a) for a in jax_leaves(own)} == backbone  # the very same arrays, not copies
    assert (cma.searcher.manifest["fingerprint"]["method"], uni.searcher.manifest["fingerprint"]["method"]) == (
        "cma", "unimodal")
    m = serve.memory(served["backbone"], served["served"])
    params = lambda model: sum(x.nbytes for x in jax_leaves(nnx.state(model)))  # noqa: E731
    assert m["separate"] == params(cma.retriever.model) + params(uni.retriever.model)
    assert m["total"] == m["backbone"] + sum(m["own"]) < m["separate"]
    assert 0 < m["own"][0] < m["backbone"] / 4 and 0 < m["own"][1] < m["backbone"] / 4
    lines = serve.memory_lines(served["backbone"], served["served"])
    assert lines[-1].startswith("parameters in memory: ") and "for 2 adapter sets on one backbone" in lines[-1]


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def test_the_api_lists_indexes_and_finds_each_colour_in_either(served):
    c = served["client"]
    listed = c.get("/api/indexes").json()["indexes"]
    assert [(x["name"], x["method"], x["videos"], x["search"]) for x in listed] == [
        ("cma", "cma", 8, "exact"), ("uni", "unimodal", 8, "exact")]
    for colour in ("yellow", "purple"):  # (green, blue and red are also moments of moments.mp4)
        r = c.get("/api/search", params={"q": caption(colour), "index": "cma", "k": 3})
        assert r.status_code == 200, r.text
        hits = r.json()["hits"]
        assert hits[0]["video"] == f"{colour}.mp4" and len(hits) == 3
        assert hits[0]["url"] == f"/video/cma/{colour}.mp4" and hits[0]["available"]
    # The other adapter set answers from the same server (no reload): its own, untrained scores.
    other = c.get("/api/search", params={"q": caption("red"), "index": "uni", "k": 8}).json()
    mine = c.get("/api/search", params={"q": caption("red"), "index": "cma", "k": 8}).json()
    assert other["index"] == "uni" and [h["score"] for h in other["hits"]] != [h["score"] for h in mine["hits"]]


def test_a_hit_starts_at_the_frame_the_head_weighs_most(served):
    cma = served["served"][0]
    hits = served["client"].get("/api/search", params={"q": caption("red"), "index": "cma", "k": 8}).json()["hits"]
    moments = next(h for h in hits if h["video"] == "moments.mp4")
    assert moments["time"] == 2.0 and moments["frame"] == 2  # red is its third second: frames at 0, 1, 2 s
    # The same as the model's own head: its frame weights and its similarity.
    index = store.load_index(cma.index_dir)
    text = cma.retriever.encode_text([caption("red")])
    w = np.asarray(retrieval.head_scores("text_conditioned", text, index["frame_emb"], index["frame_mask"], 5.0)[1])
    i = index["videos"].index("moments.mp4")
    assert int(np.argmax(w[0, i])) == 2
    sim = cma.retriever.similarity(text, index["frame_emb"], index["frame_mask"])[0]
    np.testing.assert_allclose(sorted(h["score"] for h in hits), np.sort(sim), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(index["frame_time"][i], [0.0, 1.0, 2.0])


@pytest.mark.parametrize("head", ["text_conditioned", "meanp"])
def test_scoring_is_the_models_head_exact_or_two_stage(served, head):
    cma = served["served"][0]
    index = store.load_index(cma.index_dir)
    r = api.Retriever(RetrievalModel(CFG, AdapterConfig(8, 8), head=head, rngs=nnx.Rngs(0)), cma.retriever.tokenizer,
                      num_frames=3, max_words=8)
    texts = [caption(c) for c in COLOURS]
    sim = r.similarity(r.encode_text(texts), index["frame_emb"], index["frame_mask"])
    for candidates in (0, len(index["videos"])):  # every video as a candidate: the two stages give the exact hits
        hits = scoring.Searcher(r, index, candidates=candidates).search(texts, k=4)
        for row, h in zip(sim, hits):  # (ties of near-equal videos may fall either way)
            np.testing.assert_allclose([x["score"] for x in h], np.sort(row)[::-1][:4], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose([row[index["videos"].index(x["video"])] for x in h], [x["score"] for x in h],
                                       rtol=1e-4, atol=1e-5)
            if head == "meanp":  # uniform weights: the first frame
                assert {x["frame"] for x in h} == {0} and {x["time"] for x in h} == {0.0}


def test_videos_are_served_with_range_requests(served):
    c, path = served["client"], served["videos"] / "green.mp4"
    data = path.read_bytes()
    whole = c.get("/video/cma/green.mp4")
    assert whole.status_code == 200 and whole.content == data and whole.headers["accept-ranges"] == "bytes"
    part = c.get("/video/cma/green.mp4", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    tail = c.get("/video/cma/green.mp4", headers={"Range": f"bytes={len(data) - 10}-"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    assert c.get("/video/cma/green.mp4", headers={"Range": f"bytes={len(data) + 5}-"}).status_code == 416
    thumb = c.get("/thumb/cma/moments.mp4", params={"t": 2})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


def _raw_get(app, raw_path: str) -> tuple[int, bytes]:
    """A GET whose path reaches the app as sent (a client that does not remove '..' segments)."""
    from urllib.parse import unquote

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": unquote(raw_path), "raw_path": raw_path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.parametrize("path", [
    "/video/cma/../../outside/secret.mp4",  # '..' out of the video folder
    "/video/cma/../cma/manifest.json",
    "/video/cma/%2e%2e/outside/secret.mp4",  # URL-encoded '..'
    "/video/cma/%2E%2E%2Foutside%2Fsecret.mp4",
    "/video/cma//etc/passwd",  # absolute
    "/video/cma/%2Fetc%2Fpasswd",
    "/video/cma/escape.mp4",  # indexed, but a symlink to a file outside the folder
    "/video/cma/notes.txt",  # in no index
    "/thumb/cma/escape.mp4",
    "/video/nope/green.mp4",  # no such index
])
def test_only_the_indexed_videos_of_the_folder_are_served(served, path):
    app = served["client"].app
    status, body = _raw_get(app, path)
    assert status == 404, (path, body)
    assert b"secret" not in body or b"no video" in body or b"outside" in body


def test_the_symlink_is_named_as_outside_the_folder(served):
    r = served["client"].get("/video/cma/escape.mp4")
    assert r.status_code == 404 and r.json() == {
        "error": "video 'escape.mp4' of index cma lies outside its video folder"}


@pytest.mark.parametrize("query, status, message", [
    ("", 400, "empty query: type a few words describing the video"),
    ("   ", 400, "empty query: type a few words describing the video"),
    ("a red video of a red video", 400, "query too long: 7 tokens, this model reads at most 6; shorten it"),
    ("x" * 5000, 400, "query too long: 5000 characters, at most 1000"),
])
def test_bad_queries_get_a_clear_4xx(served, query, status, message):
    r = served["client"].get("/api/search", params={"q": query, "index": "cma"})
    assert (r.status_code, r.json()) == (status, {"error": message})


def test_more_bad_requests_get_a_clear_4xx(served):
    c = served["client"]
    r = c.get("/api/search?q=%FF%FEred&index=cma")  # not UTF-8
    assert (r.status_code, r.json()) == (400, {"error": "the query string is not UTF-8 text"})
    r = c.get("/api/search", params={"q": "red"})  # no index: the first
    assert r.status_code == 200 and r.json()["index"] == "cma"
    assert c.get("/api/search", params={"q": "red", "index": "nope"}).json() == {
        "error": "no index named 'nope'; loaded: cma, uni"}
    bad_k = {"many": "k must be an integer, got 'many'", "0": "k must be between 1 and 1000, got 0"}
    for k, message in bad_k.items():
        r = c.get("/api/search", params={"q": "red", "k": k})
        assert (r.status_code, r.json()) == (400, {"error": message})
    assert c.get("/thumb/cma/green.mp4", params={"t": "soon"}).json() == {"error": "t must be a time in seconds"}


def test_a_video_deleted_after_indexing_is_said_so(served):
    c = served["client"]
    hits = c.get("/api/search", params={"q": caption("yellow"), "index": "cma", "k": 8}).json()["hits"]
    doomed = next(h for h in hits if h["video"] == "doomed.mp4")
    assert doomed["available"] is False
    assert doomed["unavailable"] == "video 'doomed.mp4' was deleted or moved since index cma was built"
    assert {h["video"] for h in hits if not h["available"]} == {"doomed.mp4", "escape.mp4"}  # (escape: a symlink out)
    r = c.get(doomed["url"])
    assert (r.status_code, r.json()) == (404, {"error": "video 'doomed.mp4' was deleted or moved since index cma "
                                                        "was built"})
    page = c.get("/").text
    assert "was deleted or moved since it was indexed: nothing to play." in page  # what the page shows instead


def test_an_index_of_another_backbone_is_refused_naming_both(served, trained, tmp_path):  # noqa: F811
    t = trained
    other = RetrievalModel(CFG, AdapterConfig(8, 8), rngs=nnx.Rngs(9))
    checkpoint.save_backbone(str(tmp_path / "backbone2"), CFG, state.backbone_state(other))
    checkpoint.save_adapters(str(tmp_path / "adapters2"), other)
    videos = tmp_path / "videos"
    videofiles.write_video(videos / "red.mp4", RED, 2.0)
    assert cli.main(["index", str(videos), str(tmp_path / "ix"), "--backbone", str(tmp_path / "backbone2"),
                     "--tokenizer", t["vocab"], "--adapters", str(tmp_path / "adapters2"), "--max_words", "8",
                     "--no_progress"]) == 0
    first = str(served["root"] / "cma")
    with pytest.raises(store.IndexMismatchError) as e:
        serve.load_indexes([first, str(tmp_path / "ix")], tokenizer=t["vocab"], log=lambda line: None)
    mine, theirs = served["backbone"].sha256[:12], store.read_manifest(str(tmp_path / "ix"))["backbone_sha256"][:12]
    assert str(e.value) == (
        f"index {tmp_path / 'ix'} was built on backbone {tmp_path / 'backbone2'} (weights {theirs}), not on the "
        f"loaded backbone {t['backbone']} (weights {mine}): serve indexes of one backbone together, or start "
        "another server for it")


def test_an_older_index_is_refused_with_the_command_that_rebuilds_it(tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"format": "cma_jax.search/1", "shards": []}))
    assert cli.main(["serve", str(tmp_path / "old")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'old'} is an index of an older format (cma_jax.search/1; this version reads "
        "cma_jax.search/2, whose shards record each frame's time); rebuild it: python -m cma_jax.search index "
        f"VIDEO_DIR {tmp_path / 'old'} --overwrite\n")


def test_serve_binds_loopback_unless_told_and_says_so(served, trained, monkeypatch, capsys):  # noqa: F811
    calls = []
    monkeypatch.setattr(serve.uvicorn, "run", lambda app, **kw: calls.append(kw))
    root = served["root"]
    assert cli.main(["serve", str(root / "cma"), str(root / "uni"), "--tokenizer", trained["vocab"]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 8000
    assert out[-1] == ("serving 2 indexes on http://127.0.0.1:8000/ (bound to 127.0.0.1: reachable from this "
                       "machine only; --host changes it)")
    assert out[-2].startswith("parameters in memory: ") and "for 2 adapter sets on one backbone" in out[-2]
    assert sum(line.startswith("loaded backbone ") for line in out) == 1  # once, for both indexes
    assert "index 'cma' (" in "\n".join(out) and "  index 'uni': method unimodal, its own parameters " in "\n".join(out)
    lines = []
    serve.serve(served["served"][:1], host="127.0.0.1", port=9000, log=lines.append)
    assert lines[-1].startswith("serving 1 index on http://127.0.0.1:9000/")
    assert serve.memory_lines(served["backbone"], served["served"][:1])[-1].endswith(
        " for 1 adapter set on one backbone")
    lines = []
    serve.serve(served["served"], host="0.0.0.0", port=9000, log=lines.append)
    assert calls[-1]["host"] == "0.0.0.0" and "reachable from other machines too" in lines[0]


def test_a_two_stage_index_saves_its_graph_for_the_next_start(served, trained, monkeypatch):  # noqa: F811
    from cma_jax.search import ann

    d = str(served["root"] / "cma")
    built, lines = [], []
    real = ann.MeanPooledIndex.build
    monkeypatch.setattr(ann.MeanPooledIndex, "build", classmethod(lambda cls, *a: built.append(1) or real(*a)))
    try:
        for _ in range(2):
            _, (s,) = serve.load_indexes([d], tokenizer=trained["vocab"], exact_up_to=4, candidates=6, log=lines.append)
            assert s.describe()["search"] == "two-stage (6 candidates)"
        assert len(built) == 1  # the second start read the saved graph
        assert sum("candidate graph of" in line and "saved beside its shards" in line for line in lines) == 1
        exact = served["served"][0].searcher.search([caption("purple")], 3)[0]
        assert [h["video"] for h in s.searcher.search([caption("purple")], 3)[0]][0] == exact[0]["video"]
    finally:  # the other tests' index stays exact
        for name in os.listdir(d):
            if name.startswith("graph_"):
                os.remove(os.path.join(d, name))
