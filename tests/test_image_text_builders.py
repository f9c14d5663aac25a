"""Flickr30K and MSCOCO builders on generated images and caption files in Karpathy's real format.

Image i is a band of palette colour i between two bands of other colours, set so that CLIP's geometry (shorter
side to the resolution, centre crop) keeps only the middle band: a stored frame that shows colour i alone
proves both the pairing with image i's captions ('image i, caption j') and the crop.
"""

import io
import json
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import videofiles as vf
from cma_jax.data import builders, video
from cma_jax.data.builders import __main__ as build_cli
from cma_jax.data.builders import base, karpathy, mscoco
from loopback import Server

RES = 32
CONFIG = f"default-{RES}px"
EDGE = (np.array([250, 250, 250], np.uint8), np.array([10, 10, 10], np.uint8))  # palette 8 and 9: never an id


def write_image(path, color: int, portrait: bool = False, fmt: str = "JPEG"):
    """A 60x40 (or 40x60) image: colour `color` in the middle 40 px, the two edge colours in the outer 10 px."""
    img = np.empty((40, 60, 3), np.uint8)
    img[:, :10], img[:, 10:50], img[:, 50:] = EDGE[0], vf.PALETTE[color], EDGE[1]
    if portrait:
        img = img.transpose(1, 0, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format=fmt, quality=95)
    return path


def shown_colour(jpeg: bytes) -> int:
    """The palette colour a stored frame shows; asserts it is square, RES px and free of the edge bands."""
    frame = video.decode_jpeg(jpeg).astype(np.float32)
    assert frame.shape == (RES, RES, 3)
    dist = np.abs(frame[:, :, None] - vf.PALETTE[None, None].astype(np.float32)).sum(-1)  # [H, W, palette]
    nearest = dist.argmin(-1)
    assert not np.isin(nearest[1:-1, 1:-1], [8, 9]).any(), "the centre crop kept an edge band"
    colours, counts = np.unique(nearest, return_counts=True)
    return int(colours[counts.argmax()])


def karpathy_entry(i, split, filename, n_captions=5, filepath=None):
    entry = {"filename": filename, "imgid": i, "split": split, "sentids": list(range(5 * i, 5 * i + n_captions)),
             "sentences": [{"tokens": ["image", str(i)], "raw": f"Image {i}, caption {j}. ", "imgid": i,
                            "sentid": 5 * i + j} for j in range(n_captions)]}
    if filepath is not None:
        entry.update(filepath=filepath, cocoid=100 + i)
    return entry


def build(name, manual_dir, data_dir, workers=1):
    b = builders.get_builder(name, data_dir, CONFIG, num_workers=workers)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))


def records(name, data_dir):
    out = {}
    for split in ("train", "val", "test"):
        src = builders.open_source(name, split, data_dir, CONFIG)
        out[split] = (src.video_ids, src.captions, src.skipped, [src[i] for i in range(len(src))])
    return out


# --- Flickr30K ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    root = tmp_path_factory.mktemp("flickr30k")
    manual = root / "manual"
    images = manual / "flickr30k-images"
    splits = ["train", "train", "test", "val", "train", "test", "train"]
    listed = []
    for i, split in enumerate(splits):
        name = f"{1000092795 + i}.jpg"
        listed.append(karpathy_entry(i, split, name, n_captions=6 if i == 1 else 5))
        if i == 4:
            continue  # listed, no file
        if i == 6:
            (images / name).write_bytes(b"\xff\xd8\xff not a jpeg")  # cut-off download
        else:
            write_image(images / name, i, portrait=i % 2 == 1, fmt="PNG" if i == 3 else "JPEG")
    (manual / "dataset_flickr30k.json").write_text(json.dumps({"images": listed, "dataset": "flickr30k"}))
    build("flickr30k", manual, root / "data", workers=2)  # worker processes load the images
    return manual, root / "data"


def test_flickr30k_splits_keep_every_caption_in_file_order(flickr):
    _, data = flickr
    got = records("flickr30k", data)
    ids, captions, skipped, recs = got["train"]
    assert ids == ["1000092795", "1000092796"]  # 1000092799 has no file, 1000092801 is unreadable
    assert captions[1] == [f"Image 1, caption {j}." for j in range(6)]  # all six, stripped
    assert [r["num_frames"] for r in recs] == [1, 1] and all(len(r["frames"]) == 1 for r in recs)
    assert [shown_colour(r["frames"][0]) for r in recs] == [0, 1]  # landscape and portrait, centre-cropped
    assert got["test"][0] == ["1000092797", "1000092800"] and got["val"][0] == ["1000092798"]
    assert [shown_colour(r["frames"][0]) for r in got["test"][3] + got["val"][3]] == [2, 5, 3]  # 3 is a PNG
    assert builders.open_source("flickr30k", "test", data, CONFIG).media == "image"


def test_flickr30k_counts_and_names_missing_and_unreadable_images(flickr):
    manual, data = flickr
    skipped = records("flickr30k", data)["train"][2]
    assert [s["video_id"] for s in skipped] == ["1000092799", "1000092801"]
    assert skipped[0]["reason"] == f"missing image file {manual}/1000092799.jpg"
    assert skipped[1]["reason"].startswith(f"cannot read image {manual}/flickr30k-images/1000092801.jpg: ")


def test_flickr30k_cli_reports_images(flickr, tmp_path, capsys):
    manual, _ = flickr
    build_cli.main(["flickr30k", f"--manual_dir={manual}", f"--data_dir={tmp_path}", f"--config={CONFIG}",
                    "--workers=1"])
    out = capsys.readouterr().out
    assert f"flickr30k/{CONFIG} train: 2 images, 11 captions, 2 skipped: 1000092799, 1000092801" in out
    assert f"flickr30k/{CONFIG} test: 2 images, 10 captions, 0 skipped" in out


def test_flickr30k_needs_a_manual_dir_and_prints_its_layout(tmp_path):
    instructions = builders.REGISTRY["flickr30k"].MANUAL_DOWNLOAD_INSTRUCTIONS
    assert "dataset_flickr30k.json" in instructions and "flickr30k-images/" in instructions
    with pytest.raises(FileNotFoundError) as e:
        base.ensure_built("flickr30k", tmp_path, None)
    assert "--manual_dir=DIR\n" in str(e.value) and str(e.value).endswith(instructions)
    with pytest.raises(SystemExit) as e:
        build_cli.main(["flickr30k", f"--manual_dir={tmp_path / 'empty'}", f"--data_dir={tmp_path}"])
    assert str(e.value).endswith(instructions)


@pytest.mark.parametrize("images, message", [
    ('{"images": [{"filename": "a.jpg", "split": "train", "sentences": [', r"not valid JSON"),
    ('[{"filename": "a.jpg"}]', r'expected a top-level "images" list .*got list'),
    ('{"dataset": "flickr30k"}', r"expected a top-level \"images\" list .*got keys \['dataset'\]"),
    ('{"images": [{"filename": "a.jpg", "split": "train", "sentences": []}, {"filename": "b.jpg", '
     '"split": "test"}]}', r'images\[1\]: "sentences" must be a list, got no such field'),
    ('{"images": [{"filename": 7, "split": "train", "sentences": []}]}',
     r'images\[0\]: "filename" must be a str, got a int'),
    ('{"images": [{"filename": "a.jpg", "split": "dev", "sentences": []}]}',
     r"images\[0\] \(a.jpg\): \"split\" is 'dev'; expected one of \['restval', 'test', 'train', 'val'\]"),
    ('{"images": [{"filename": "a.jpg", "split": "val", "sentences": [{"raw": "x"}, {"tokens": []}]}]}',
     r'images\[0\] \(a.jpg\): sentences\[1\] has no "raw" caption string'),
])
def test_a_malformed_caption_file_stops_naming_the_file_and_field(tmp_path, images, message):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "dataset_flickr30k.json").write_text(images)
    with pytest.raises(SystemExit, match=rf"^error: {tmp_path}/manual/dataset_flickr30k.json: {message}"):
        build_cli.main(["flickr30k", f"--manual_dir={tmp_path / 'manual'}", f"--data_dir={tmp_path / 'data'}"])
    assert not list((tmp_path / "data").rglob("*.array_record*"))  # nothing half-built


def test_read_karpathy_returns_the_checked_entries(tmp_path):
    listed = [karpathy_entry(0, "restval", "COCO_val2014_000000000000.jpg", filepath="val2014")]
    (tmp_path / "d.json").write_text(json.dumps({"images": listed}))
    assert karpathy.read_karpathy(tmp_path / "d.json") == listed
    assert karpathy.SPLITS["train"] == ("train", "restval")


# --- MSCOCO ---------------------------------------------------------------------------------------------

# (split, folder) of the generated COCO images; image 2 (restval) trains, image 4 has seven captions.
COCO = [("train", "train2014"), ("train", "train2014"), ("restval", "val2014"), ("val", "val2014"),
        ("test", "val2014"), ("test", "val2014")]


def coco_name(i, folder):
    return f"COCO_{folder}_{100 + i:012d}.jpg"


def coco_caption_file() -> str:
    listed = [karpathy_entry(i, split, coco_name(i, folder), n_captions=7 if i == 4 else 5, filepath=folder)
              for i, (split, folder) in enumerate(COCO)]
    return json.dumps({"images": listed, "dataset": "coco"})


@pytest.fixture(scope="module")
def coco_sources(tmp_path_factory):
    """(manual dir, {url path: archive bytes}) with the same caption file and images."""
    manual = tmp_path_factory.mktemp("mscoco") / "manual"
    for i, (_, folder) in enumerate(COCO):
        write_image(manual / folder / coco_name(i, folder), i, portrait=i == 3)
    (manual / "dataset_coco.json").write_text(coco_caption_file())
    archives = {}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # Karpathy's zip holds all three caption files
        z.writestr("dataset_coco.json", coco_caption_file())
        z.writestr("dataset_flickr30k.json", json.dumps({"images": []}))
        z.writestr("dataset_flickr8k.json", json.dumps({"images": []}))
    archives["/people/karpathy/deepimagesent/caption_datasets.zip"] = buf.getvalue()
    for folder in ("train2014", "val2014"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for i, (_, f) in enumerate(COCO):
                if f == folder:
                    z.write(manual / folder / coco_name(i, folder), f"{folder}/{coco_name(i, folder)}")
        archives[f"/zips/{folder}.zip"] = buf.getvalue()
    return manual, archives


def test_mscoco_manual_dir_build_trains_on_restval_and_keeps_every_caption(coco_sources, tmp_path):
    manual, _ = coco_sources
    build("mscoco", manual, tmp_path)
    got = records("mscoco", tmp_path)
    assert got["train"][0] == ["COCO_train2014_000000000100", "COCO_train2014_000000000101",
                               "COCO_val2014_000000000102"]
    assert got["val"][0] == ["COCO_val2014_000000000103"]
    assert got["test"][0] == ["COCO_val2014_000000000104", "COCO_val2014_000000000105"]
    assert [len(c) for c in got["test"][1]] == [7, 5]
    for split, (_, captions, skipped, recs) in got.items():
        assert skipped == []
        for caps, rec in zip(captions, recs):
            i = shown_colour(rec["frames"][0])
            assert caps == [f"Image {i}, caption {j}." for j in range(len(caps))], split


def test_mscoco_downloads_captions_and_images_through_tfds(coco_sources, tmp_path, monkeypatch):
    manual, archives = coco_sources
    build("mscoco", manual, tmp_path / "manual_build")
    with Server(archives) as s:
        monkeypatch.setattr(mscoco, "URLS", {
            "annotations": s.url + "/people/karpathy/deepimagesent/caption_datasets.zip",
            "train2014": s.url + "/zips/train2014.zip", "val2014": s.url + "/zips/val2014.zip"})
        monkeypatch.setenv("CMA_JAX_BUILD_WORKERS", "1")
        base.ensure_built("mscoco", tmp_path / "downloaded", CONFIG)  # what training calls: downloads, builds
        assert sorted(p for p, _ in s.requests) == sorted(archives)  # each archive once
        base.ensure_built("mscoco", tmp_path / "downloaded", CONFIG)  # built: nothing more to fetch
        assert len(s.requests) == 3
    assert records("mscoco", tmp_path / "downloaded") == records("mscoco", tmp_path / "manual_build")


def test_mscoco_names_the_command_when_it_may_not_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"build it with: python -m cma_jax.data.builders mscoco "
                                                rf"--data_dir={tmp_path} --config=default$"):
        base.ensure_built("mscoco", tmp_path, None, build=False)
