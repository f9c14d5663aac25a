"""Builders that download their public archives (served by a loopback HTTP server), and the not-built messages.

MSR-VTT built from its archives equals MSR-VTT built from a manual dir. The archives are generated in the
layout of the real ones: CLIP4Clip's msrvtt_data.zip (the split CSVs and MSRVTT_data.json in a msrvtt_data/
folder) and Frozen-in-Time's MSRVTT.zip (MSRVTT/videos/all/videoN.mp4, beside its own annotation/ and
high-quality/ folders, which the builder does not use); for MSVD a zip of raw-captions.pkl and the split
lists, and a tar of YouTubeClips/*.avi.
"""

import csv
import io
import json
import os
import pickle
import re
import socket
import tarfile
import time
import zipfile

import pytest
import tensorflow_datasets as tfds

import videofiles as vf
from cma_jax.data import builders
from cma_jax.data.builders import __main__ as build_cli
from cma_jax import network
from cma_jax.data.builders import base, mscoco, msrvtt, msvd
from loopback import Server

CONFIG = "9k-32px"


def annotation_files() -> dict[str, str]:
    """MSR-VTT's annotation files in CLIP4Clip's format: 5 videos, 2 captions each, a 3-pair 1k-A test."""
    sentences = [{"caption": f"colour {i} take {j}", "video_id": f"video{i}", "sen_id": 2 * i + j}
                 for i in range(5) for j in range(2)]
    test = io.StringIO()
    writer = csv.writer(test)
    writer.writerow(["key", "vid_key", "video_id", "sentence"])
    for k, i in enumerate([3, 4, 0]):
        writer.writerow([f"ret{k}", f"msr{i}", f"video{i}", f"colour {i} in the test"])
    return {"MSRVTT_data.json": json.dumps({"videos": [], "sentences": sentences}),
            "MSRVTT_train.9k.csv": "video_id\nvideo0\nvideo1\nvideo2\n",
            "MSRVTT_train.7k.csv": "video_id\nvideo2\nvideo1\n",
            "MSRVTT_JSFUSION_test.csv": test.getvalue()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(manual dir, {url path: archive bytes}) holding the same annotation files and videos."""
    root = tmp_path_factory.mktemp("msrvtt_sources")
    manual = root / "manual"
    for i in range(5):
        vf.write_video(manual / "videos" / f"video{i}.mp4", i, 1.5 + 0.5 * i)
    for name, text in annotation_files().items():
        (manual / name).write_text(text)
    archives = {}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in annotation_files():
            z.write(manual / name, f"msrvtt_data/{name}")
    archives["/ArrowLuo/CLIP4Clip/releases/download/v0.0/msrvtt_data.zip"] = buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(5):
            z.write(manual / "videos" / f"video{i}.mp4", f"MSRVTT/videos/all/video{i}.mp4")
        z.writestr("MSRVTT/annotation/MSR_VTT.json", json.dumps({"annotations": []}))
        z.writestr("MSRVTT/high-quality/structured-symlinks/train_list_jsfusion.txt", "video0\n")
    archives["/maxbain/frozen-in-time/data/MSRVTT.zip"] = buf.getvalue()
    return manual, archives


@pytest.fixture()
def server(sources, monkeypatch):
    """The archives on a loopback server, msrvtt.URLS pointed at it, one decoding process."""
    with Server(sources[1]) as s:
        paths = sorted(sources[1])
        monkeypatch.setattr(msrvtt, "URLS", {"annotations": s.url + paths[0], "videos": s.url + paths[1]})
        monkeypatch.setenv("CMA_JAX_BUILD_WORKERS", "1")
        yield s


def records(data_dir, config=CONFIG):
    """Every split's metadata and records (frames as JPEG bytes) of a built MSR-VTT."""
    out = {}
    for split in ("train", "test"):
        src = builders.open_source("msrvtt", split, data_dir, config)
        out[split] = (src.video_ids, src.captions, src.num_captions.tolist(), src.skipped,
                      [src[i] for i in range(len(src))])
    return out


def test_downloaded_msrvtt_equals_the_manual_dir_build(sources, server, tmp_path, monkeypatch):
    manual, _ = sources
    b = builders.get_builder("msrvtt", tmp_path / "manual_build", CONFIG, num_workers=1)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    assert server.requests == []  # a complete manual dir is used as it is

    base.ensure_built("msrvtt", tmp_path / "downloaded", CONFIG)  # what training calls: downloads, builds
    assert sorted(p for p, _ in server.requests) == sorted(sources[1])  # each archive once
    want, got = records(tmp_path / "manual_build"), records(tmp_path / "downloaded")
    assert got == want
    assert got["train"][0] == ["video0", "video1", "video2"] and got["train"][2] == [2, 2, 2]
    assert got["test"][1] == [["colour 3 in the test"], ["colour 4 in the test"], ["colour 0 in the test"]]
    assert all(r["num_frames"] >= 2 for r in got["train"][4])

    base.ensure_built("msrvtt", tmp_path / "downloaded", CONFIG)  # built: nothing to do
    # Another config reuses the downloaded archives (TFDS's download cache): no new request, no network needed.
    monkeypatch.setenv("CMA_JAX_OFFLINE", "1")
    build_cli.main(["msrvtt", f"--data_dir={tmp_path / 'downloaded'}", "--config=7k-32px", "--workers=1"])
    assert len(server.requests) == 2
    assert records(tmp_path / "downloaded", "7k-32px")["train"][0] == ["video2", "video1"]


def test_a_manual_dir_given_explicitly_must_be_complete(sources, server, tmp_path, capsys):
    manual, _ = sources
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "MSRVTT_data.json").write_text((manual / "MSRVTT_data.json").read_text())
    with pytest.raises(SystemExit, match=r"error: msrvtt: manual_dir .*partial is missing 2 required file\(s\): "
                                         r"MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv"):
        build_cli.main(["msrvtt", f"--manual_dir={partial}", f"--data_dir={tmp_path / 'data'}", "--workers=1"])
    assert server.requests == []  # never a silent download instead


def test_an_archive_without_the_annotation_files_is_named(sources, server, tmp_path, monkeypatch):
    monkeypatch.setitem(msrvtt.URLS, "annotations", msrvtt.URLS["videos"])  # the wrong archive
    with pytest.raises(base.ManualDirLayoutError, match=r"msrvtt: the archive http://127.0.0.1:\d+/maxbain/"
                                                        r"frozen-in-time/data/MSRVTT.zip \(extracted to .*\) has no "
                                                        r"folder holding MSRVTT_data.json, MSRVTT_train.9k.csv, "
                                                        r"MSRVTT_JSFUSION_test.csv; point "
                                                        r"cma_jax.data.builders.msrvtt.URLS at a copy"):
        base.ensure_built("msrvtt", tmp_path / "data", CONFIG)


def test_msvd_downloads_its_caption_zip_and_clip_tar(tmp_path, monkeypatch):
    """CLIP4Clip's msvd_data.zip (raw-captions.pkl + split lists in msvd_data/), UT Austin's YouTubeClips.tar."""
    ids = ["-4wsuPCjDBc_5_15", "-7KMZQEsJW4_205_208", "-8y1Q0rA3n8_108_115"]
    captions = {v: [["colour", str(i)], ["clip", "of", "colour", str(i)]] for i, v in enumerate(ids)}
    ann = io.BytesIO()
    with zipfile.ZipFile(ann, "w") as z:
        z.writestr("msvd_data/raw-captions.pkl", pickle.dumps(captions))
        for split, vids in (("train", ids[:2]), ("val", ids[2:]), ("test", ids[2:])):
            z.writestr(f"msvd_data/{split}_list.txt", "\n".join(vids) + "\n")
    clips = io.BytesIO()
    with tarfile.open(fileobj=clips, mode="w") as tar:
        for i, v in enumerate(ids):
            tar.add(vf.write_video(tmp_path / "avi" / f"{v}.avi", i, 2.0), f"YouTubeClips/{v}.avi")
    with Server({"/msvd_data.zip": ann.getvalue(), "/YouTubeClips.tar": clips.getvalue()}) as s:
        monkeypatch.setattr(msvd, "URLS", {"annotations": s.url + "/msvd_data.zip",
                                           "videos": s.url + "/YouTubeClips.tar"})
        monkeypatch.setenv("CMA_JAX_BUILD_WORKERS", "1")
        base.ensure_built("msvd", tmp_path / "data", "default-32px")
    train = builders.open_source("msvd", "train", tmp_path / "data", "default-32px")
    assert train.video_ids == ids[:2] and train.captions[1] == ["colour 1", "clip of colour 1"]
    assert builders.open_source("msvd", "test", tmp_path / "data", "default-32px").video_ids == ids[2:]
    assert train.skipped == [] and len(train[0]["frames"]) == 2


def _refused_port() -> int:
    with socket.socket() as s:  # a free port; nothing listens there once it is closed
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("module", [msrvtt, msvd, mscoco])
@pytest.mark.parametrize("network_down", ["refused", "unresolvable", "offline"])
def test_no_network_fails_at_once_in_one_line_leaving_nothing(module, network_down, tmp_path, monkeypatch):
    host = {"refused": f"127.0.0.1:{_refused_port()}", "unresolvable": "archives.cma-jax-test.invalid",
            "offline": "127.0.0.1:1"}[network_down]
    urls = {k: f"http://{host}/{k}/{os.path.basename(u)}" for k, u in module.URLS.items()}
    monkeypatch.setattr(module, "URLS", urls)
    for var in ("CMA_JAX_OFFLINE", "HF_HUB_OFFLINE", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    if network_down == "offline":
        monkeypatch.setenv("CMA_JAX_OFFLINE", "1")
    name = module.__name__.rsplit(".", 1)[1]
    data = tmp_path / "tfds"
    start = time.monotonic()
    with pytest.raises(network.DownloadError) as e:
        base.ensure_built(name, data, None)
    assert time.monotonic() - start < 5  # no retry loop
    why = {"refused": rf"cannot connect to {host} \(Connection refused\)",
           "unresolvable": r"the host name archives.cma-jax-test.invalid does not resolve \(.*; no network\?\)",
           "offline": r"downloads are off \(CMA_JAX_OFFLINE=1\) and it is not downloaded"}[network_down]
    builder = builders.get_builder(name, data, None)
    assert "\n" not in str(e.value)
    assert re.fullmatch(
        rf"{name}: cannot download {re.escape(urls['annotations'])}: {why}; to build offline, download "
        rf"{re.escape(os.path.basename(urls['annotations']))}.* elsewhere, unpack them into one folder holding "
        rf"{re.escape(', '.join(builder.required_files()))} and the {builder.MEDIA}s \(docs/data.md, Preparing the "
        rf"datasets\) and run `python -m cma_jax.data.builders {name} --data_dir={data} "
        rf"--config={builder.builder_config.name} --manual_dir=DIR`, or point {module.__name__}.URLS at a mirror",
        str(e.value)), str(e.value)
    assert not data.exists()  # nothing half-built: no dataset folder, no downloads folder


def test_the_build_command_says_it_in_one_error_line(tmp_path, monkeypatch):
    port = _refused_port()
    monkeypatch.setattr(msvd, "URLS", {"annotations": f"http://127.0.0.1:{port}/msvd_data.zip",
                                       "videos": f"http://127.0.0.1:{port}/YouTubeClips.tar"})
    (tmp_path / "tfds").mkdir()
    with pytest.raises(SystemExit, match=rf"^error: msvd: cannot download http://127.0.0.1:{port}/msvd_data.zip: "
                                         rf"cannot connect to 127.0.0.1:{port} \(Connection refused\); to build "
                                         r"offline, download msvd_data.zip and YouTubeClips.tar elsewhere, "):
        build_cli.main(["msvd", f"--data_dir={tmp_path / 'tfds'}", "--workers=1"])
    assert os.listdir(tmp_path / "tfds") == []  # the data dir was there before: it stays, empty


def test_a_failed_download_leaves_complete_archives_and_nothing_half_built(sources, tmp_path, monkeypatch):
    with Server({"/msrvtt_data.zip": b"not a zip archive"}) as s:  # and no video archive: HTTP 404
        monkeypatch.setattr(msrvtt, "URLS", {"annotations": s.url + "/msrvtt_data.zip",
                                             "videos": s.url + "/MSRVTT.zip"})
        with pytest.raises(network.DownloadError, match=r"^msrvtt: (Failed to get url .*MSRVTT.zip. HTTP code: 404"
                                                        r"|Error while extracting .*File is not a zip file); to build "
                                                        r"offline, download msrvtt_data.zip and MSRVTT.zip "):
            base.ensure_built("msrvtt", tmp_path, CONFIG)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left[:2] == ["downloads", "downloads/msrvtt"] and len(left) == 4, left  # the complete download + .INFO
    assert "msrvtt_data" in left[2] and left[2].endswith(".zip") and left[3] == left[2] + ".INFO", left


@pytest.mark.parametrize("name", ["vatex", "activitynet", "didemo"])
def test_manual_only_datasets_say_how_to_build_them(name, tmp_path):
    instructions = builders.REGISTRY[name].MANUAL_DOWNLOAD_INSTRUCTIONS
    with pytest.raises(FileNotFoundError) as e:
        base.ensure_built(name, tmp_path, None)
    msg = str(e.value)
    assert msg.startswith(f"dataset {name} (config default) is not built in {tmp_path} (expected ")
    assert f"build it with: python -m cma_jax.data.builders {name} --data_dir={tmp_path} --config=default " \
           "--manual_dir=DIR\n" in msg
    assert msg.endswith(instructions)  # in full
    with pytest.raises(SystemExit) as e:
        build_cli.main([name, f"--manual_dir={tmp_path / 'empty'}", f"--data_dir={tmp_path}"])
    assert str(e.value).endswith(instructions)


def test_not_built_downloadable_dataset_names_the_command_when_it_may_not_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"build it with: python -m cma_jax.data.builders msrvtt "
                                                rf"--data_dir={tmp_path} --config=9k$"):
        base.ensure_built("msrvtt", tmp_path, None, build=False)  # e.g. one of several processes
    assert not os.path.exists(tmp_path / "downloads")
