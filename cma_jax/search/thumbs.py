"""Small JPEG pictures of a video's frames, shrunk as they are decoded (for the report and the page)."""

from __future__ import annotations

import base64
import io

from cma_jax.data.sampling import sample_frame_indices


def _sampled_small(path: str, fps: float, height: int):
    from cma_jax.data.video import iter_sampled_frames  # PyAV, a heavy import: only when decoding

    # Shrunk as decoded: an hour of full-HD frames at 1 fps would not fit in memory.
    for im in iter_sampled_frames(path, fps):
        yield im.convert("RGB").resize((max(1, round(im.width * height / im.height)), height))


def _jpeg(im, quality: int = 80) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def thumbnails(path: str, count: int, fps: float, height: int) -> list[str]:
    """`count` frames spread over the video, as base64 JPEG strings (original aspect ratio)."""
    frames = list(_sampled_small(path, fps, height))
    return [base64.b64encode(_jpeg(frames[i])).decode() for i in sample_frame_indices(len(frames), count)]


def frame_jpeg(path: str, fps: float, time: float, height: int) -> bytes:
    """The frame at `time` seconds (the one decoded at round(time * fps) / fps, or the last) as JPEG bytes."""
    want, last = round(time * fps), None
    for i, im in enumerate(_sampled_small(path, fps, height)):
        last = im
        if i >= want:
            break
    return _jpeg(last)
