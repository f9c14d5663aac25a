"""Writes small real video files for the tests (PyAV encoders), and reads their markers back.

Each frame's top half is the video's identity colour (a palette index) with a moving white
square, its bottom half a grey level that says which second of the video the frame is from:
so a stored frame tells which video and which second it came from.
"""

from __future__ import annotations

import os

import av
import numpy as np

PALETTE = np.array(
    [
        [220, 30, 30],
        [30, 200, 40],
        [40, 60, 220],
        [230, 210, 30],
        [200, 40, 200],
        [30, 200, 210],
        [240, 130, 20],
        [120, 60, 20],
        [250, 250, 250],
        [10, 10, 10],
    ],
    np.uint8,
)


def _encoder(container: str) -> tuple[str, str]:
    """(codec, pixel format) for a container, preferring what the datasets use."""
    if container == ".webm":
        return "libvpx-vp9" if "libvpx-vp9" in av.codecs_available else "libvpx", "yuv420p"
    if container in (".mp4", ".mkv", ".mov"):
        return ("libx264" if "libx264" in av.codecs_available else "mpeg4"), "yuv420p"
    return "mpeg4", "yuv420p"  # .avi: MSVD's clips are MPEG-4 part 2


def second_grey(second: int) -> int:
    """Grey level of the bottom half during `second` (distinct for the first 5 seconds)."""
    return 20 + 45 * (second % 5)


def frame_image(color: int, t: float, size=(64, 48)) -> np.ndarray:
    """The frame at time `t` of the video with palette index `color`: uint8 [H, W, 3]."""
    w, h = size
    img = np.empty((h, w, 3), np.uint8)
    img[: h // 2] = PALETTE[color]
    img[h // 2 :] = second_grey(int(t))
    s = max(2, h // 8)  # a small white square sliding along the top-left edge
    x = int((t * 7) % (w // 4))
    img[1 : 1 + s, x : x + s] = 255
    return img


def write_video(
    path: str | os.PathLike, color: int, seconds: float, *, fps: int = 10, size=(64, 48), rotation: int = 0
) -> str:
    """Writes a `seconds`-long video of identity `color`; the codec follows the extension.

    `rotation`: display rotation in degrees counterclockwise stored in the container (as
    phones do), the coded frames staying as drawn.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    codec, pix_fmt = _encoder(os.path.splitext(path)[1].lower())
    with av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = pix_fmt
        if rotation:
            stream.set_display_rotation(rotation)
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        elif codec.startswith("libvpx"):
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        for i in range(int(round(seconds * fps))):
            frame = av.VideoFrame.from_ndarray(frame_image(color, i / fps, size), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_corrupt(path: str | os.PathLike) -> str:
    """A file with a video extension whose bytes are no video (truncated header + noise)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypisom" + rng.integers(0, 256, 4000, np.uint8).tobytes())
    return path


def write_empty(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    open(path, "wb").close()
    return path


def identify(frame: np.ndarray) -> tuple[int, int]:
    """(palette index, second) read back from a decoded frame uint8 [H, W, 3]."""
    h = frame.shape[0]
    top = np.median(frame[h // 8 : h * 3 // 8].reshape(-1, 3).astype(np.float32), axis=0)
    color = int(np.argmin(np.abs(PALETTE.astype(np.float32) - top).sum(-1)))
    grey = float(np.median(frame[h * 5 // 8 : h * 7 // 8]))
    second = int(np.argmin([abs(grey - second_grey(s)) for s in range(5)]))
    return color, second


def crashing_loader(source, *, resolution: int = 32) -> list[bytes]:
    """A frame loader whose process dies on files named *crash* (as a segfaulting decoder would)."""
    from cma_jax.data import video  # pylint: disable=import-outside-toplevel

    if "crash" in os.path.basename(os.fspath(source)):
        os._exit(11)  # pylint: disable=protected-access
    return video.load_frames(source, resolution=resolution)
