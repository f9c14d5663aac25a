"""Loading one image as a one-frame record: CLIP's geometry (shorter side to the resolution, bicubic, centre crop), JPEG.

Orientation is taken as the file stores it (no EXIF rotation), as torchvision's loaders and the published
Flickr30K / MSCOCO numbers do.
"""

from __future__ import annotations

import os

from PIL import Image

from cma_jax.data import video


def load_image(path: str | os.PathLike, *, resolution: int = 224, jpeg_quality: int = 90) -> list[bytes]:
    """[JPEG bytes] of the image at `path`; video.VideoDecodeError naming the file if it is missing or unreadable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise video.VideoDecodeError(f"missing image file {path}")
    try:
        with Image.open(path) as im:
            return [video.encode_jpeg(video.resize_center_crop(im, resolution), jpeg_quality)]
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise video.VideoDecodeError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
