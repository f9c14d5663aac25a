"""Video decoding for the builders: PyAV, frames sampled by timestamp, CLIP's resize + crop, JPEG.

Frames are taken at times k / fps (k = 0, 1, ...) from the first frame's timestamp, each one
the first decoded frame at or after its target time, while the video lasts: a 2.5 s video gives
3 frames at 1 fps and any video with a frame gives at least one. Decoding is one sequential
pass (no seeking, which is unreliable across containers); only the chosen frames are converted.
A missing, empty or unreadable file raises VideoDecodeError; a file that breaks off after its
first frame (a truncated download) keeps the frames before the break.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Iterator

import av
import numpy as np
import simplejpeg
from PIL import Image


_log = logging.getLogger(__name__)

# File extensions taken for videos when a folder is scanned (dataset builds, search indexes).
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".3gp", ".3g2", ".mpg", ".mpeg", ".wmv",
                    ".flv", ".ogv")


class VideoDecodeError(Exception):
    """A video that is missing, empty, corrupt or has no decodable video frame."""


def _frame_time(frame: av.VideoFrame, index: int, rate: float | None) -> float | None:
    if frame.time is not None:
        return float(frame.time)
    return index / rate if rate else None


def _decode_until_error(container, stream, path: str) -> Iterator[av.VideoFrame]:
    """Decoded frames; a decode error after the first frame ends the video there (a truncated
    download keeps what it has, as FFmpeg's command line would), before it, it is raised."""
    any_frame = False
    try:
        for frame in container.decode(stream):
            any_frame = True
            yield frame
    except av.error.FFmpegError as e:
        if not any_frame:
            raise
        _log.warning("%s: decoding stopped early (%s); keeping the frames before it", path, e)


def iter_sampled_frames(path: str | os.PathLike, fps: float = 1.0) -> Iterator[Image.Image]:
    """Yields RGB PIL images sampled at `fps` from the video file at `path`.

    Raises VideoDecodeError for a missing, empty or undecodable file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoDecodeError(f"missing video file {path}")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(f"empty video file {path}")
    step = 1.0 / fps
    try:
        with av.open(path, metadata_errors="ignore") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"no video stream in {path}")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame + slice threads: the decoder is the bottleneck
            rate = float(stream.average_rate) if stream.average_rate else None
            start = None
            next_k = 0
            for i, frame in enumerate(_decode_until_error(container, stream, path)):
                t = _frame_time(frame, i, rate)
                if t is None:
                    raise VideoDecodeError(f"frames without timestamps or frame rate in {path}")
                if start is None:
                    start = t
                t -= start
                # A frame slightly before its target (rounded pts) still counts: 1/1000 s tolerance.
                if t + 1e-3 >= next_k * step:
                    yield upright(frame.to_image(), frame.rotation)
                    # Targets a long gap skipped over (variable frame rate) are not repeated.
                    next_k = int(np.floor((t + 1e-3) / step)) + 1
            if start is None:
                raise VideoDecodeError(f"no decodable video frame in {path}")
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"cannot decode {path}: {e}") from e
    except (OSError, ValueError, RuntimeError) as e:
        raise VideoDecodeError(f"cannot decode {path}: {type(e).__name__}: {e}") from e


_ROTATIONS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def upright(image: Image.Image, rotation: float) -> Image.Image:
    """Applies a display-matrix rotation (degrees counterclockwise, as PyAV reports it), as
    FFmpeg's autorotate does: phone videos stored sideways come out upright."""
    angle = int(round(rotation / 90.0)) * 90 % 360
    return image.transpose(_ROTATIONS[angle]) if angle else image


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """CLIP's preprocessing geometry: shorter side to `resolution` (bicubic), centre crop."""
    w, h = image.size
    if w <= h:
        nw, nh = resolution, int(resolution * h / w)
    else:
        nw, nh = int(resolution * w / h), resolution
    image = image.convert("RGB").resize((nw, nh), Image.BICUBIC)
    left = int(round((nw - resolution) / 2.0))
    top = int(round((nh - resolution) / 2.0))
    return image.crop((left, top, left + resolution, top + resolution))


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """JPEG bytes -> uint8 [H, W, 3], written into `out` (that shape) when given.

    libjpeg-turbo through simplejpeg: the pixels PIL's decoder gives (the same library, accurate DCT, fancy
    upsampling) in about half its time on a 224-px frame, most of PIL's being its Python header parsing.
    """
    image = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
    if out is not None and image.shape != out.shape:
        raise ValueError(f"a JPEG frame of shape {image.shape} where the clip holds {out.shape}: rebuild the dataset")
    return image


def load_frames(
    path: str | os.PathLike, *, fps: float = 1.0, resolution: int = 224, jpeg_quality: int = 90
) -> list[bytes]:
    """The frames a record stores: sampled at `fps`, resized + cropped, JPEG-encoded."""
    frames = [
        encode_jpeg(resize_center_crop(im, resolution), jpeg_quality) for im in iter_sampled_frames(path, fps)
    ]
    if not frames:  # unreachable unless the decoder yields nothing without raising
        raise VideoDecodeError(f"no frames sampled from {path}")
    return frames


def load_or_error(loader, source, name: str = ""):
    """`loader(source)`, or the VideoDecodeError it raised (returned, so a build can go on)."""
    try:
        if source is None:
            raise VideoDecodeError(f"no video file found for id {name!r}")
        return loader(source)
    except VideoDecodeError as e:
        return e


def decode_video(path: str | os.PathLike, *, fps: float = 1.0, resolution: int = 224) -> np.ndarray:
    """Sampled, resized and cropped frames as uint8 [N, resolution, resolution, 3]."""
    return np.stack([np.asarray(resize_center_crop(im, resolution)) for im in iter_sampled_frames(path, fps)])
