"""Video decoding: sampling by timestamp, CLIP's resize + crop, JPEG, and the errors."""

import numpy as np
import pytest
from PIL import Image

import videofiles as vf
from cma_jax.data import video


@pytest.mark.parametrize("ext", [".mp4", ".avi", ".mkv", ".webm"])
def test_decodes_every_container_at_one_frame_per_second(tmp_path, ext):
    path = vf.write_video(tmp_path / f"clip{ext}", color=3, seconds=3.5)
    frames = video.decode_video(path, fps=1.0, resolution=32)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8  # ceil(3.5 s * 1 fps)
    assert [vf.identify(f) for f in frames] == [(3, 0), (3, 1), (3, 2), (3, 3)]


def test_sampling_rate_is_configurable(tmp_path):
    path = vf.write_video(tmp_path / "clip.mp4", color=1, seconds=3.0)
    seconds = [vf.identify(f)[1] for f in video.decode_video(path, fps=2.0, resolution=32)]
    assert seconds == [0, 0, 1, 1, 2, 2]
    assert len(video.decode_video(path, fps=0.5, resolution=32)) == 2  # t = 0 s, 2 s


def test_very_short_video_gives_one_frame(tmp_path):
    path = vf.write_video(tmp_path / "short.mp4", color=2, seconds=0.3)
    frames = video.decode_video(path, resolution=32)
    assert frames.shape == (1, 32, 32, 3)
    assert vf.identify(frames[0]) == (2, 0)


def test_load_frames_are_jpegs_at_the_resolution(tmp_path):
    path = vf.write_video(tmp_path / "clip.avi", color=4, seconds=2.0)
    jpegs = video.load_frames(path, fps=1.0, resolution=40, jpeg_quality=90)
    assert len(jpegs) == 2
    assert all(j[:2] == b"\xff\xd8" for j in jpegs)  # JPEG SOI marker
    decoded = video.decode_jpeg(jpegs[1])
    assert decoded.shape == (40, 40, 3)
    assert vf.identify(decoded) == (4, 1)
    small = video.load_frames(path, resolution=40, jpeg_quality=20)
    assert sum(map(len, small)) < sum(map(len, jpegs))


def test_resize_center_crop_matches_clip_geometry():
    # 90x30 (w x h): shorter side 30 -> 10, so 30x10 then the centre 10x10 crop = columns 10..19
    # of the resized image, i.e. the middle third of the original.
    img = np.zeros((30, 90, 3), np.uint8)
    img[:, 30:60] = [200, 100, 50]
    out = np.asarray(video.resize_center_crop(Image.fromarray(img), 10))
    assert out.shape == (10, 10, 3)
    np.testing.assert_allclose(out[:, 2:8].reshape(-1, 3).mean(0), [200, 100, 50], atol=2)
    tall = np.asarray(video.resize_center_crop(Image.new("RGB", (20, 50)), 8))
    assert tall.shape == (8, 8, 3)


def test_upright_applies_the_display_rotation_counterclockwise():
    img = np.zeros((2, 3, 3), np.uint8)  # coded landscape 3x2, marker at the top-right pixel
    img[0, 2] = 255
    out = np.asarray(video.upright(Image.fromarray(img), 90))
    assert out.shape == (3, 2, 3) and out[0, 0, 0] == 255  # turned 90 deg counterclockwise
    out = np.asarray(video.upright(Image.fromarray(img), -90))
    assert out.shape == (3, 2, 3) and out[2, 1, 0] == 255
    assert np.array_equal(np.asarray(video.upright(Image.fromarray(img), 0)), img)


def test_rotated_phone_video_comes_out_upright(tmp_path):
    path = vf.write_video(tmp_path / "phone.mp4", color=0, seconds=1.0, rotation=90)
    (image,) = list(video.iter_sampled_frames(path))
    assert image.size == (48, 64)  # coded 64x48, displayed turned 90 deg counterclockwise
    img = np.asarray(image)
    # The coded top half (the identity colour) is now the left half.
    np.testing.assert_allclose(np.median(img[:, 4:20].reshape(-1, 3), 0), vf.PALETTE[0], atol=12)
    np.testing.assert_allclose(np.median(img[:, 30:44].reshape(-1, 3), 0), vf.second_grey(0), atol=12)


@pytest.mark.parametrize("ext", [".mkv", ".webm"])
def test_truncated_file_keeps_the_frames_before_the_break(tmp_path, ext):
    path = vf.write_video(tmp_path / f"full{ext}", color=5, seconds=4.0)
    data = open(path, "rb").read()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: len(data) // 2])
    frames = video.decode_video(cut, resolution=32)
    assert 1 <= len(frames) < 4
    assert [vf.identify(f) for f in frames] == [(5, s) for s in range(len(frames))]


@pytest.mark.parametrize("kind", ["corrupt", "empty", "missing", "not_a_video"])
def test_bad_files_raise_video_decode_error(tmp_path, kind):
    path = tmp_path / "bad.mp4"
    if kind == "corrupt":
        vf.write_corrupt(path)
    elif kind == "empty":
        vf.write_empty(path)
    elif kind == "not_a_video":
        path.write_text("hello " * 100)
    with pytest.raises(video.VideoDecodeError, match="bad.mp4"):
        video.load_frames(path, resolution=32)
