"""Image-text benchmarks on Karpathy's splits (Flickr30K, MSCOCO): the caption file read and checked, one record per image.

Karpathy's `dataset_<name>.json` lists {'images': [{'filename', 'filepath' (COCO), 'split' (train / val / test /
restval), 'sentences': [{'raw', ...}, ...]}, ...]}; train is train + restval, as every paper since VSE++ trains
on it, and every caption of an image is kept (COCO gives some images six or seven).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from absl import logging
from etils import epath

from cma_jax.data.builders import annotation_files, base, images, media

SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
_SPLIT_OF = {kind: split for split, kinds in SPLITS.items() for kind in kinds}
_FORMAT = "Karpathy's format: {\"images\": [{\"filename\", \"split\", \"sentences\": [{\"raw\"}, ...]}, ...]}"


def read_karpathy(path: epath.PathLike) -> list[dict[str, Any]]:
    """The checked image entries of a Karpathy caption file; ValueError naming the file and the field if malformed."""
    data = annotation_files.read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        got = f"keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__
        raise ValueError(f'{path}: expected a top-level "images" list ({_FORMAT}), got {got}')
    for i, image in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(image, dict):
            raise ValueError(f"{where}: expected an object ({_FORMAT}), got {type(image).__name__}")
        for field, kind in (("filename", str), ("split", str), ("sentences", list)):
            if not isinstance(image.get(field), kind):
                got = "no such field" if field not in image else f"a {type(image[field]).__name__}"
                raise ValueError(f'{where}: "{field}" must be a {kind.__name__}, got {got} ({_FORMAT})')
        where += f" ({image['filename']})"
        if image["split"] not in _SPLIT_OF:
            raise ValueError(f'{where}: "split" is {image["split"]!r}; expected one of {sorted(_SPLIT_OF)}')
        if "filepath" in image and not isinstance(image["filepath"], str):
            raise ValueError(f'{where}: "filepath" must be a str, got a {type(image["filepath"]).__name__}')
        for j, sentence in enumerate(image["sentences"]):
            if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
                raise ValueError(f'{where}: sentences[{j}] has no "raw" caption string ({_FORMAT})')
    return data["images"]


class KarpathyBuilder(base.VideoTextBuilder, skip_registration=True):
    """One record per image of Karpathy's train (+ restval) / val / test; subclasses name the caption file."""

    MEDIA = "image"
    CAPTION_FILE = ""  # e.g. dataset_flickr30k.json
    EXPECTED_IMAGES: dict[str, int] = {}  # {split: images} of the real caption file, to warn on another one
    BUILDER_CONFIGS = [base.VideoTextConfig(name="default", description="224 px images, JPEG quality 90")]

    def required_files(self):
        return (self.CAPTION_FILE,)

    def _frame_loader(self):
        cfg = self.builder_config
        return functools.partial(images.load_image, resolution=cfg.resolution, jpeg_quality=cfg.jpeg_quality)

    def _split_entries(self, manual_dir: epath.Path, *image_roots: epath.Path):
        """Entries in the caption file's order; an image is found by file name anywhere below the image roots
        (default: the manual dir); a missing one keeps the path it was expected at, so its skip names it."""
        listed = read_karpathy(manual_dir / self.CAPTION_FILE)
        roots = image_roots or (manual_dir,)
        found = media.index_images(*roots)
        out: dict[str, list[base.Entry]] = {split: [] for split in SPLITS}
        for image in listed:
            name = image["filename"]
            path = found.get(name) or os.path.join(roots[0], image.get("filepath", ""), name)
            captions = tuple(c for c in (s["raw"].strip() for s in image["sentences"]) if c)
            out[_SPLIT_OF[image["split"]]].append(base.Entry(os.path.splitext(name)[0], captions, path))
        counts = {split: len(entries) for split, entries in out.items()}
        if self.EXPECTED_IMAGES and counts != self.EXPECTED_IMAGES:
            logging.warning("%s: %s lists %s images per split; Karpathy's split has %s", self.name,
                            manual_dir / self.CAPTION_FILE, counts, self.EXPECTED_IMAGES)
        return out
