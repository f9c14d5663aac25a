"""Every benchmark builder on generated videos + annotation files in the benchmark's real format.

Video i has palette colour i and every caption of it names 'colour i', so a record's frames and
captions must agree; each frame also says which second it was taken from.
"""

import csv
import json
import math
import pickle
import time

import pytest
import tensorflow_datasets as tfds

import videofiles as vf
from cma_jax.data import builders
from cma_jax.data import video
from cma_jax.data.builders import base, decode_pool, media

RES = 32


def build(name, manual_dir, data_dir, config=None, workers=1):
    config = config or f"{builders.resolve_config(builders.REGISTRY[name], None).name}-{RES}px"
    b = builders.get_builder(name, data_dir, config, num_workers=workers)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return config


def read_split(name, split, data_dir, config):
    src = builders.open_source(name, split, data_dir, config)
    return src, [src[i] for i in range(len(src))]


def check_pairing(records, durations):
    """Frames of record r are video r's (colour) at seconds 0, 1, ..; captions name it."""
    for rec in records:
        frames = [video.decode_jpeg(f) for f in rec["frames"]]
        colors = {vf.identify(f)[0] for f in frames}
        assert len(colors) == 1, rec["video_id"]
        color = colors.pop()
        assert all(f"colour {color}" in c for c in rec["captions"]), (rec["video_id"], color)
        assert frames[0].shape == (RES, RES, 3)
        assert rec["num_frames"] == len(frames) == math.ceil(durations[rec["video_id"]])
        assert [vf.identify(f)[1] for f in frames] == list(range(len(frames)))


# --- MSR-VTT ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def msrvtt(tmp_path_factory):
    root = tmp_path_factory.mktemp("msrvtt")
    manual, data = root / "manual", root / "data"
    durations = {}
    sentences = []
    for i in range(7):
        vid = f"video{i}"
        for j in range(3 if i < 4 else 1):
            sentences.append(
                {"caption": f"a clip of colour {i}, take {j} ", "video_id": vid, "sen_id": len(sentences)}
            )
        if i == 5:
            vf.write_corrupt(manual / "videos" / "all" / f"{vid}.mp4")
        elif i != 6:  # video6 is listed but has no file
            durations[vid] = 1.5 + 0.5 * i
            vf.write_video(manual / "videos" / "all" / f"{vid}.mp4", i, durations[vid])
    (manual / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
    (manual / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo5\nvideo1\nvideo2\nvideo3\n")
    (manual / "MSRVTT_train.7k.csv").write_text("video_id\nvideo2\nvideo0\n")
    with open(manual / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "vid_key", "video_id", "sentence"])
        for k, i in enumerate([4, 6, 1]):
            w.writerow([f"ret{k}", f"msr{i}", f"video{i}", f"colour {i} in the test"])
    config = build("msrvtt", manual, data, "9k-32px", workers=2)  # the multiprocess path
    return manual, data, config, durations


def test_msrvtt_train_has_every_caption_of_the_9k_videos_in_order(msrvtt):
    _, data, config, durations = msrvtt
    src, recs = read_split("msrvtt", "train", data, config)
    assert [r["video_id"] for r in recs] == src.video_ids == ["video0", "video1", "video2", "video3"]
    assert src.num_captions.tolist() == [3, 3, 3, 3]
    assert recs[1]["captions"] == [
        "a clip of colour 1, take 0",
        "a clip of colour 1, take 1",
        "a clip of colour 1, take 2",
    ]
    assert src.captions == [r["captions"] for r in recs]
    check_pairing(recs, durations)


def test_msrvtt_skips_corrupt_and_missing_videos_and_lists_them(msrvtt):
    _, data, config, durations = msrvtt
    train = builders.open_source("msrvtt", "train", data, config)
    assert [(s["video_id"], "cannot decode" in s["reason"]) for s in train.skipped] == [("video5", True)]
    test, recs = read_split("msrvtt", "test", data, config)
    assert [r["video_id"] for r in recs] == ["video4", "video1"]  # 1k-A rows, video6 has no file
    assert [s["video_id"] for s in test.skipped] == ["video6"]
    assert "no video file" in test.skipped[0]["reason"]
    assert test.num_captions.tolist() == [1, 1]
    assert recs[0]["captions"] == ["colour 4 in the test"]
    check_pairing(recs, durations)


def test_msrvtt_7k_config_uses_the_7k_list(msrvtt, tmp_path):
    manual, _, _, durations = msrvtt
    config = build("msrvtt", manual, tmp_path, "7k-32px")
    src, recs = read_split("msrvtt", "train", tmp_path, config)
    assert src.video_ids == ["video2", "video0"] and src.num_captions.tolist() == [3, 3]
    check_pairing(recs, durations)


def test_source_pickles_for_grain_workers(msrvtt):
    _, data, config, _ = msrvtt
    src = builders.open_source("msrvtt", "train", data, config)
    clone = pickle.loads(pickle.dumps(src))
    assert len(clone) == 4 and clone[2]["frames"] == src[2]["frames"]
    assert clone.num_captions.tolist() == src.num_captions.tolist()


def test_missing_annotation_files_are_listed(tmp_path):
    (tmp_path / "MSRVTT_data.json").write_text('{"sentences": []}')
    with pytest.raises(base.ManualDirLayoutError) as err:
        build("msrvtt", tmp_path, tmp_path / "data", "9k-32px")
    msg = str(err.value)
    assert "missing 2 required file(s): MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv" in msg
    assert "MSRVTT_data.json" in msg  # the expected layout is shown too
    assert not (tmp_path / "data" / "msrvtt" / "9k-32px" / "1.0.0").exists()


def test_no_decodable_video_is_a_clear_error(tmp_path):
    manual = tmp_path / "manual"
    sentences = [{"caption": "colour 0", "video_id": "video0"}]
    (manual / "videos").mkdir(parents=True)
    (manual / "MSRVTT_data.json").write_text(json.dumps({"sentences": sentences}))
    (manual / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\n")
    (manual / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr0,video0,colour 0\n"
    )
    vf.write_empty(manual / "videos" / "video0.mp4")
    with pytest.raises(base.NoVideosDecodedError, match=r"none of the 1 videos .*empty video"):
        build("msrvtt", manual, tmp_path / "data", "9k-32px")
    assert not list((tmp_path / "data" / "msrvtt").rglob("*.array_record*"))  # nothing half-built


def test_cli_builds_and_reports_layout_errors(msrvtt, tmp_path, capsys):
    from cma_jax.data.builders import __main__ as cli  # pylint: disable=import-outside-toplevel

    manual = msrvtt[0]
    cli.main(
        ["msrvtt", f"--manual_dir={manual}", f"--data_dir={tmp_path}", "--config=7k-32px", "--workers=1"]
    )
    out = capsys.readouterr().out
    assert "msrvtt/7k-32px train: 2 videos, 6 captions, 0 skipped" in out
    assert "msrvtt/7k-32px test: 2 videos, 2 captions, 1 skipped: video6" in out
    with pytest.raises(SystemExit, match="msvd: manual_dir .* missing 4 required file"):
        cli.main(["msvd", f"--manual_dir={tmp_path}", f"--data_dir={tmp_path}"])


def test_cli_expands_a_home_relative_data_dir(msrvtt, tmp_path, monkeypatch, capsys):
    """`--data_dir=~/...` (as the README writes it) reaches us unexpanded: the shell expands no `~`
    after `=`. It must land in the home folder, not in a folder named '~'."""
    from cma_jax.data.builders import __main__ as cli  # pylint: disable=import-outside-toplevel

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cli.main(["msrvtt", f"--manual_dir={msrvtt[0]}", "--data_dir=~/tfds", "--config=7k-32px", "--workers=1"])
    assert f"written to {tmp_path}/home/tfds/msrvtt/7k-32px/1.0.0" in capsys.readouterr().out
    assert not (tmp_path / "~").exists()
    assert len(builders.open_source("msrvtt", "train", "~/tfds", "7k-32px")) == 2


def test_unreadable_annotation_files_are_named(tmp_path):
    from cma_jax.data.builders import __main__ as cli  # pylint: disable=import-outside-toplevel

    manual = tmp_path / "manual"
    manual.mkdir()
    for name in ("train_data.json", "val_data.json", "test_data.json"):
        (manual / name).write_text("[]")
    (manual / "val_data.json").write_text('[{"video": "a.mov", "description": "x"')  # cut off
    with pytest.raises(SystemExit, match=r"val_data.json: not valid JSON"):
        cli.main(["didemo", f"--manual_dir={manual}", f"--data_dir={tmp_path / 'data'}"])
    msvd = tmp_path / "msvd"
    msvd.mkdir()
    for name in ("train_list.txt", "val_list.txt", "test_list.txt"):
        (msvd / name).write_text("a\n")
    (msvd / "raw-captions.pkl").write_bytes(b"not a pickle")
    with pytest.raises(SystemExit, match=r"raw-captions.pkl: cannot read the pickle"):
        cli.main(["msvd", f"--manual_dir={msvd}", f"--data_dir={tmp_path / 'data'}"])


@pytest.mark.slow
def test_a_crashing_decoder_costs_only_its_video(tmp_path, monkeypatch):
    manual = tmp_path / "manual"
    ids = [f"video{i}" for i in range(8)]
    durations = {}
    for i, vid in enumerate(ids):
        durations[vid] = 1.0
        vf.write_video(manual / f"{vid}{'_crash' if i == 3 else ''}.mp4", i, 1.0, fps=4)
    sentences = [{"caption": f"colour {i}", "video_id": v} for i, v in enumerate(ids)]
    (manual / "MSRVTT_data.json").write_text(json.dumps({"sentences": sentences}))
    (manual / "MSRVTT_train.9k.csv").write_text("video_id\n" + "\n".join(ids) + "\n")
    (manual / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr0,video0,colour 0\n"
    )
    # video3's file is video3_crash.mp4, on which the test loader kills its worker process.
    monkeypatch.setattr(
        media, "find_video", lambda index, vid, *alt: index.get(vid) or index.get(f"{vid}_crash")
    )
    monkeypatch.setattr(builders.REGISTRY["msrvtt"], "_frame_loader", lambda self: vf.crashing_loader)
    config = build("msrvtt", manual, tmp_path / "data", "9k-32px", workers=2)
    src, recs = read_split("msrvtt", "train", tmp_path / "data", config)
    assert src.video_ids == [v for v in ids if v != "video3"]
    assert [(s["video_id"], "crashed" in s["reason"]) for s in src.skipped] == [("video3", True)]
    check_pairing(recs, durations)


@pytest.mark.slow
def test_a_decoder_crash_while_the_writer_is_busy_costs_only_its_video(tmp_path):
    """The pool can break while the build writes a record (the generator is suspended): the next
    submission then fails at once, and that must not stop the build either."""
    # No files: every load is a quick 'missing video file' error, except v7, whose worker dies.
    entries = [base.Entry(f"v{i}", ("c",), str(tmp_path / f"v{i}{'_crash' if i == 7 else ''}.mp4"))
               for i in range(12)]  # more than the 4 * workers look-ahead: some are submitted later
    got = []
    for entry, result in decode_pool.load_all(vf.crashing_loader, entries, workers=2):
        got.append((entry.video_id, str(result)))
        if len(got) == 1:
            time.sleep(3)  # writing the first record: v7's worker dies meanwhile
    assert [v for v, _ in got] == [e.video_id for e in entries]
    assert "crashed" in got[7][1]
    assert all("missing video file" in r for v, r in got if v != "v7")


# --- MSVD ---------------------------------------------------------------------------------


def test_msvd_multi_caption_splits(tmp_path):
    manual = tmp_path / "manual"
    ids = ["-4wsuPCjDBc_5_15", "abc_1_7", "x_Y-z_0_3", "qq_2_9", "broken_0_1"]
    raw, durations = {}, {}
    for i, vid in enumerate(ids):
        raw[vid] = [["a", "video", "of", "colour", str(i), "nr", str(j)] for j in range(2 + i)]
        if vid == "broken_0_1":
            vf.write_corrupt(manual / "YouTubeClips" / f"{vid}.avi")
        else:
            durations[vid] = 1.2 + i
            vf.write_video(manual / "YouTubeClips" / f"{vid}.avi", i, durations[vid])
    with open(manual / "raw-captions.pkl", "wb") as f:
        pickle.dump(raw, f)
    (manual / "train_list.txt").write_text("-4wsuPCjDBc_5_15\nabc_1_7\n")
    (manual / "val_list.txt").write_text("x_Y-z_0_3\n")
    (manual / "test_list.txt").write_text("qq_2_9\nbroken_0_1\nabc_1_7\n")
    config = build("msvd", manual, tmp_path / "data")
    assert config == "default-32px"
    sizes = {}
    for split in ("train", "val", "test"):
        src, recs = read_split("msvd", split, tmp_path / "data", config)
        check_pairing(recs, durations)
        sizes[split] = src.num_captions.tolist()
    assert sizes == {"train": [2, 3], "val": [4], "test": [5, 3]}
    test, recs = read_split("msvd", "test", tmp_path / "data", config)
    assert recs[0]["captions"][4] == "a video of colour 3 nr 4"
    assert [s["video_id"] for s in test.skipped] == ["broken_0_1"]
    # Every (video, caption) pair, from the metadata alone.
    pairs = [(v, c) for v, n in enumerate(test.num_captions) for c in range(n)]
    assert len(pairs) == 8


# --- VATEX --------------------------------------------------------------------------------


def test_vatex_official_json_and_split_lists(tmp_path):
    manual = tmp_path / "manual"
    durations = {}

    def item(i):
        vid = f"Ptf_2VRj-V{i}_000122_000132"
        if i != 4:
            durations[vid] = 2.0
            vf.write_video(manual / "vatex_videos" / f"{vid}.mp4", i, 2.0)
        return {
            "videoID": vid,
            "enCap": [f"colour {i} caption {j}" for j in range(10)],
            "chCap": ["中文"] * 10,
        }

    (manual / "vatex_training_v1.0.json").write_text(json.dumps([item(0), item(1)]))
    (manual / "vatex_validation_v1.0.json").write_text(
        json.dumps([item(2), item(3), item(4)], ensure_ascii=False), encoding="utf-8"
    )
    ids = [f"Ptf_2VRj-V{i}_000122_000132" for i in range(5)]
    (manual / "train_list.txt").write_text("\n".join(ids[:2]) + "\n")
    (manual / "val_list.txt").write_text(ids[2] + "\n")
    (manual / "test_list.txt").write_text("\n".join(ids[3:]) + "\n")
    config = build("vatex", manual, tmp_path / "data")
    for split, want in [("train", [0, 1]), ("val", [2]), ("test", [3])]:
        src, recs = read_split("vatex", split, tmp_path / "data", config)
        assert src.video_ids == [ids[i] for i in want]
        assert src.num_captions.tolist() == [10] * len(want)
        check_pairing(recs, durations)
    test = builders.open_source("vatex", "test", tmp_path / "data", config)
    assert [s["video_id"] for s in test.skipped] == [ids[4]]  # listed, no file


# --- ActivityNet Captions -----------------------------------------------------------------


def test_activitynet_paragraphs(tmp_path):
    manual = tmp_path / "manual"
    durations = {"v_aaa": 2.5, "v_bbb": 3.0, "v_ccc": 1.0}
    vf.write_video(manual / "Activity_Videos" / "v_aaa.mp4", 0, 2.5)
    vf.write_video(manual / "Activity_Videos" / "v_bbb.mkv", 1, 3.0)
    vf.write_video(manual / "Activity_Videos" / "ccc.webm", 2, 1.0)  # stored without v_

    def ann(i, n):
        return {
            "duration": 10.0,
            "timestamps": [[0, 1]] * n,
            "sentences": [f"Colour {i} sentence {k}. " if k else f"colour {i} starts." for k in range(n)],
        }

    (manual / "train.json").write_text(json.dumps({"v_aaa": ann(0, 3), "v_bbb": ann(1, 2)}))
    (manual / "val_1.json").write_text(json.dumps({"v_ccc": ann(2, 2), "v_zzz": ann(3, 1)}))
    config = build("activitynet", manual, tmp_path / "data")
    train, recs = read_split("activitynet", "train", tmp_path / "data", config)
    assert train.video_ids == ["v_aaa", "v_bbb"]
    assert recs[0]["captions"] == ["colour 0 starts. Colour 0 sentence 1. Colour 0 sentence 2."]
    check_pairing(recs, durations)
    test, recs = read_split("activitynet", "test", tmp_path / "data", config)
    assert test.video_ids == ["v_ccc"] and test.num_captions.tolist() == [1]
    assert [s["video_id"] for s in test.skipped] == ["v_zzz"]
    check_pairing(recs, durations)


# --- DiDeMo -------------------------------------------------------------------------------


def test_didemo_paragraphs(tmp_path):
    manual = tmp_path / "manual"
    vids = ["10015567@N08_3655084291_d8b58466fa", "999@N00_1_abc", "77@N01_2_def", "5@N5_5_e"]
    durations = {}
    for i, v in enumerate(vids):
        if i == 3:
            vf.write_empty(manual / "videos" / f"{v}.mp4")
        else:
            durations[f"{v}.mov"] = 2.0 + i
            # the annotations say .mov; files converted to .mp4 (or .mov.mp4) are found too
            vf.write_video(manual / "videos" / (f"{v}.mp4" if i != 1 else f"{v}.mov.mp4"), i, 2.0 + i)

    def moment(i, k):
        return {
            "video": f"{vids[i]}.mov",
            "times": [[k, k]],
            "description": f"colour {i} moment {k}",
            "annotation_id": 10 * i + k,
            "num_segments": 6,
        }

    (manual / "train_data.json").write_text(
        json.dumps([moment(0, 0), moment(1, 0), moment(0, 1), moment(1, 1), moment(0, 2)])
    )
    (manual / "val_data.json").write_text(json.dumps([moment(2, 0)]))
    (manual / "test_data.json").write_text(json.dumps([moment(3, 0), moment(2, 1), moment(2, 2)]))
    config = build("didemo", manual, tmp_path / "data")
    train, recs = read_split("didemo", "train", tmp_path / "data", config)
    assert train.video_ids == [f"{vids[0]}.mov", f"{vids[1]}.mov"]
    assert recs[0]["captions"] == ["colour 0 moment 0 colour 0 moment 1 colour 0 moment 2"]
    check_pairing(recs, durations)
    val, recs = read_split("didemo", "val", tmp_path / "data", config)
    assert val.video_ids == [f"{vids[2]}.mov"]
    test, recs = read_split("didemo", "test", tmp_path / "data", config)
    assert test.video_ids == [f"{vids[2]}.mov"] and test.skipped[0]["video_id"] == f"{vids[3]}.mov"
    assert "empty video file" in test.skipped[0]["reason"]
    assert recs[0]["captions"] == ["colour 2 moment 1 colour 2 moment 2"]


# --- record order beyond TFDS' in-memory shuffle buffer, without TensorFlow ----------------


def test_order_is_kept_when_records_spill_to_disk_buckets(tmp_path, monkeypatch):
    from tensorflow_datasets.core import shuffle  # pylint: disable=import-outside-toplevel

    # Spill from the first record on: the path a >1 GiB split takes, which without TensorFlow
    # only works through base's plain-file stand-in for tf.io.gfile.
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 0)
    per_bucket = {}
    add = shuffle._Bucket.add  # pylint: disable=protected-access

    def counting_add(bucket, key, data):
        per_bucket[bucket._path] = per_bucket.get(bucket._path, 0) + 1  # pylint: disable=protected-access
        add(bucket, key, data)

    monkeypatch.setattr(shuffle._Bucket, "add", counting_add)  # pylint: disable=protected-access
    manual = tmp_path / "manual"
    n = 23
    order = [f"id{(7 * k) % n:02d}" for k in range(n)]  # not sorted, so order is really tested
    raw = {v: [["colour", str(int(v[2:]) % 10)]] for v in order}
    for v in order:
        vf.write_video(manual / f"{v}.avi", int(v[2:]) % 10, 1.0, fps=4, size=(32, 24))
    with open(manual / "raw-captions.pkl", "wb") as f:
        pickle.dump(raw, f)
    (manual / "train_list.txt").write_text("\n".join(order))
    (manual / "val_list.txt").write_text(order[0])
    (manual / "test_list.txt").write_text(order[1])
    config = build("msvd", manual, tmp_path / "data")
    src, recs = read_split("msvd", "train", tmp_path / "data", config)
    assert [r["video_id"] for r in recs] == src.video_ids == order
    for r in recs:
        color = vf.identify(video.decode_jpeg(r["frames"][0]))[0]
        assert r["captions"] == [f"colour {color}"] and color == int(r["video_id"][2:]) % 10
    assert not list((tmp_path / "data").rglob("bucket_*.tmp"))
    # Keys spread over the key space: records spread over the buckets, so sorting one bucket
    # never holds a large part of a split in memory (1 + 23 + 1 records, one per bucket).
    assert sum(per_bucket.values()) == n + 2 and max(per_bucket.values()) == 1


def test_config_names_set_resolution_fps_and_quality():
    cfg = builders.resolve_config(builders.REGISTRY["msrvtt"], "7k-336px-2fps-q80")
    assert (cfg.variant, cfg.resolution, cfg.fps, cfg.jpeg_quality) == ("7k", 336, 2.0, 80)
    default = builders.resolve_config(builders.REGISTRY["didemo"], None)
    assert (default.name, default.resolution, default.fps) == ("default", 224, 1.0)
    with pytest.raises(ValueError, match="unknown config '8k'"):
        builders.resolve_config(builders.REGISTRY["msrvtt"], "8k")
    with pytest.raises(ValueError, match="bad config suffix 'big'"):
        builders.resolve_config(builders.REGISTRY["msvd"], "default-big")


def test_open_source_names_what_is_not_built(tmp_path):
    with pytest.raises(FileNotFoundError, match="msvd .* is not built"):
        builders.open_source("msvd", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        builders.open_source("kinetics", "train", tmp_path)
