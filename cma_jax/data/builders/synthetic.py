"""A synthetic text-video dataset, generated procedurally: no files, no downloads.

Each clip shows one coloured shape on a plain background, and its caption says what every single frame
shows. Two builder configs: `pretrain`, the stand-in for CLIP's web-scale image-text pre-training, and
`adapt`, the shifted downstream task (new wording, and a texture that the captions name); `synthetic_images`
(`SyntheticImages`) is the same scenes as an image-text set. Everything is a pure function of (variant,
split, seed, index), so builds are deterministic; `VOCABULARY` holds both variants' words, for the
word-level tokenizer. docs/demo.md ("The synthetic data") describes the scenes and their captions.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import zlib

import numpy as np
from PIL import Image

from cma_jax.data.builders import base

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {  # name -> RGB
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"grey": (128, 128, 128), "black": (20, 20, 20), "white": (240, 240, 240)}
SIZES = {"small": 4.5, "large": 9.5}  # radius in pixels at 32x32 (scaled with the resolution)
POSITIONS = {  # name -> centre as a fraction of (x, y)
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "centre": (0.5, 0.5),
}
TEXTURES = ("plain", "striped", "dotted")

# The adapt variant's new words for the same concepts.
COLOUR_SYNONYMS = {"red": "crimson", "green": "emerald", "blue": "azure", "yellow": "golden",
                   "purple": "violet", "orange": "amber"}
SIZE_SYNONYMS = {"small": "tiny", "large": "big"}

VARIANTS = ("pretrain", "adapt")


def caption(variant: str, shape: str, colour: str, size: str, position: str, background: str,
            texture: str = "plain") -> str:
    """The caption of a clip with these attributes, worded as the variant words it."""
    if variant == "pretrain":
        return f"a {size} {colour} {shape} at the {position} on a {background} background"
    if variant == "adapt":
        return (f"a {texture} {shape} coloured {COLOUR_SYNONYMS[colour]} , {SIZE_SYNONYMS[size]} , "
                f"{position} , over {background}")
    raise ValueError(f"unknown synthetic variant {variant!r}; expected one of {VARIANTS}")


def parse_caption(variant: str, text: str) -> "Scene":
    """The scene a caption describes (the inverse of `caption`); ValueError if it is not one."""
    words = text.split()
    try:
        if variant == "pretrain":  # a {size} {colour} {shape} at the {position} on a {bg} background
            size, colour, shape, position, background = words[1], words[2], words[3], words[6], words[9]
            texture = "plain"
        elif variant == "adapt":  # a {texture} {shape} coloured {colour'} , {size'} , {position} , over {bg}
            texture, shape, position, background = words[1], words[2], words[8], words[11]
            colour = {v: k for k, v in COLOUR_SYNONYMS.items()}[words[4]]
            size = {v: k for k, v in SIZE_SYNONYMS.items()}[words[6]]
        else:
            raise ValueError(f"unknown synthetic variant {variant!r}; expected one of {VARIANTS}")
        scene = Scene(shape, colour, size, position, background, texture)
    except (IndexError, KeyError):
        raise ValueError(f"not a {variant} caption: {text!r}") from None
    known = (shape in SHAPES and colour in COLOURS and size in SIZES and position in POSITIONS
             and background in BACKGROUNDS and texture in TEXTURES)
    if not known or scene.caption(variant) != text:
        raise ValueError(f"not a {variant} caption: {text!r}")
    return scene


def _vocabulary() -> tuple[str, ...]:
    words = []
    for variant in VARIANTS:
        for texture in TEXTURES:
            for size in SIZES:
                for colour in COLOURS:
                    text = caption(variant, SHAPES[0], colour, size, "left", "grey", texture)
                    words += text.split()
    words += list(SHAPES) + list(POSITIONS) + list(BACKGROUNDS)
    return tuple(dict.fromkeys(words))  # first-seen order, deterministic


VOCABULARY = _vocabulary()


def write_vocabulary(path: str) -> str:
    """Write VOCABULARY one word per line (the word tokenizer's file format); returns path."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(VOCABULARY) + "\n")
    return path


@dataclasses.dataclass(frozen=True)
class Scene:
    """The attributes of one clip; they hold in every frame."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    texture: str = "plain"

    def caption(self, variant: str) -> str:
        return caption(variant, self.shape, self.colour, self.size, self.position, self.background, self.texture)


def _shape_mask(shape: str, xx, yy, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean [H, W] mask of a shape centred at (cx, cy) with 'radius' r (pixel centres xx, yy)."""
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = 0.85 * r
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if shape == "triangle":  # apex up, base at cy + r
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "cross":
        arm = 0.4 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _texture_mask(texture: str, dx, dy, scale: float) -> np.ndarray:
    """Where the texture darkens the shape ([H, W] bool), in coordinates relative to its centre."""
    w = 2.0 * scale  # 2-pixel features at 32x32: they survive JPEG
    # Phase: a dot / stripe boundary runs through the centre, so even the cross's thin arms get dots.
    cx, cy = np.floor(dx / w).astype(int) % 2 == 1, np.floor(dy / w).astype(int) % 2 == 1
    if texture == "plain":
        return np.zeros(dx.shape, bool)
    if texture == "striped":  # horizontal stripes
        return cy
    if texture == "dotted":  # a grid of square dots
        return cx & cy
    raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def render(scene: Scene, num_frames: int, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Frames [T, H, W, 3] uint8 of a scene: the shape drifts a little around its position."""
    scale = resolution / 32.0
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float32) + 0.5
    r = SIZES[scene.size] * scale * rng.uniform(0.95, 1.05)
    fx, fy = POSITIONS[scene.position]
    cx, cy = fx * resolution, fy * resolution
    # Constant drift per frame, at most ~2 px over the clip: the shape moves but stays at its position.
    step = np.clip(rng.normal(0.0, 0.8 * scale, size=2), -1.2 * scale, 1.2 * scale) * 4.0 / max(num_frames, 4)
    bg = np.asarray(BACKGROUNDS[scene.background], np.float32)
    fg = np.asarray(COLOURS[scene.colour], np.float32)
    # Small per-clip lighting changes so no two clips are pixel-identical.
    fg = np.clip(fg * rng.uniform(0.9, 1.1) + rng.normal(0, 6, 3), 0, 255)
    bg = np.clip(bg + rng.normal(0, 6, 3), 0, 255)
    frames = np.empty((num_frames, resolution, resolution, 3), np.uint8)
    t0 = (num_frames - 1) / 2.0
    for t in range(num_frames):
        ox, oy = (t - t0) * step
        mask = _shape_mask(scene.shape, xx, yy, cx + ox, cy + oy, r)
        img = np.broadcast_to(bg, (resolution, resolution, 3)).copy()
        img[mask] = fg
        tex = mask & _texture_mask(scene.texture, xx - (cx + ox), yy - (cy + oy), scale)
        img[tex] = fg * 0.35
        img += rng.normal(0, 3.0, img.shape).astype(np.float32)  # sensor noise
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def _rng(variant: str, split: str, seed: int, index: int) -> np.random.Generator:
    key = zlib.crc32(f"{variant}/{split}".encode())
    return np.random.default_rng([seed, key, index])


def sample_scene(variant: str, rng: np.random.Generator) -> Scene:
    """Uniformly random attributes; only the adapt variant varies the texture."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown synthetic variant {variant!r}; expected one of {VARIANTS}")
    pick = lambda seq: list(seq)[rng.integers(len(seq))]  # noqa: E731
    return Scene(shape=pick(SHAPES), colour=pick(COLOURS), size=pick(SIZES), position=pick(POSITIONS),
                 background=pick(BACKGROUNDS), texture=pick(TEXTURES) if variant == "adapt" else "plain")


def make_clip(variant: str, split: str, index: int, *, seed: int = 0, num_frames: int = 4,
              resolution: int = 32) -> tuple[Scene, np.ndarray, str]:
    """Clip `index` of (variant, split): (scene, frames [T, H, W, 3] uint8, caption)."""
    rng = _rng(variant, split, seed, index)
    scene = sample_scene(variant, rng)
    return scene, render(scene, num_frames, resolution, rng), scene.caption(variant)


# --- the TFDS builder ------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class SyntheticConfig(base.VideoTextConfig):
    """A variant (`pretrain` | `adapt`) and its size: videos per split, frames per video, seed."""

    num_train: int = 4000
    num_val: int = 500
    num_test: int = 1000
    num_frames: int = 4
    seed: int = 0
    both_wordings: bool = False  # each record also gets the other variant's caption of its scene

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"synthetic config {self.name!r}: variant must be one of {VARIANTS}, "
                             f"got {self.variant!r}")
        for field in ("num_train", "num_val", "num_test", "num_frames"):
            if getattr(self, field) < 1:
                raise ValueError(f"synthetic config {self.name!r}: {field} must be >= 1, "
                                 f"got {getattr(self, field)}")


def _config(name, variant, num_train, num_val, num_test, media="video"):
    return SyntheticConfig(name=name, variant=variant, resolution=32, jpeg_quality=95,
                           num_train=num_train, num_val=num_val, num_test=num_test,
                           num_frames=4 if media == "video" else 1, both_wordings=media == "image",
                           description=f"{variant} variant, {num_train}/{num_val}/{num_test} {media}s")


def clip_jpegs(source: tuple, jpeg_quality: int = 95) -> list[bytes]:
    """The stored frames of one clip: source = (variant, split, index, seed, num_frames, resolution)."""
    variant, split, index, seed, num_frames, resolution = source
    _, frames, _ = make_clip(variant, split, index, seed=seed, num_frames=num_frames, resolution=resolution)
    out = []
    for frame in frames:
        buf = io.BytesIO()
        # No chroma subsampling: 2-pixel coloured stripes and dots would be averaged away.
        Image.fromarray(frame).save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
        out.append(buf.getvalue())
    return out


ADAPT_TRAIN_VIDEOS = 3000  # training videos of `adapt`
# Smaller training sets for the demo's sweep (1, 3, 10, 30 % of adapt's): `adapt_train<N>` holds the
# first N training videos of `adapt` and the very same val and test splits (clips are pure functions
# of their index), so every size is tested on the same videos.
ADAPT_SUBSETS = (30, 90, 300, 900)


def adapt_train_config(num_train: int) -> str:
    """The builder config whose train split is the first num_train training videos of `adapt`."""
    if num_train == ADAPT_TRAIN_VIDEOS:
        return "adapt"
    if num_train not in ADAPT_SUBSETS:
        raise ValueError(f"synthetic: no adapt config with {num_train} training videos; "
                         f"expected one of {sorted(ADAPT_SUBSETS + (ADAPT_TRAIN_VIDEOS,))}")
    return f"adapt_train{num_train}"


class Synthetic(base.VideoTextBuilder):
    """Procedural coloured shapes with frame-wise captions; no files needed (see the module docstring)."""

    name = "synthetic"
    BUILDER_CONFIGS = [
        _config("pretrain", "pretrain", 4000, 500, 500),
        _config("adapt", "adapt", ADAPT_TRAIN_VIDEOS, 500, 1000),
        # Tiny versions for tests and the demo's quick CI variant.
        _config("pretrain_mini", "pretrain", 256, 64, 64),
        _config("adapt_mini", "adapt", 256, 64, 128),
        *(_config(f"adapt_train{n}", "adapt", n, 500, 1000) for n in ADAPT_SUBSETS),
    ]

    def __init__(self, *, num_workers: int | None = None, **kwargs):
        # Generating a clip takes ~1 ms: worker processes would cost more than they save.
        super().__init__(num_workers=num_workers or 0, **kwargs)

    def _split_entries(self, manual_dir):
        cfg = self.builder_config
        entries = {}
        for split, n in (("train", cfg.num_train), ("val", cfg.num_val), ("test", cfg.num_test)):
            entries[split] = []
            for i in range(n):
                scene = sample_scene(cfg.variant, _rng(cfg.variant, split, cfg.seed, i))
                source = (cfg.variant, split, i, cfg.seed, cfg.num_frames, cfg.resolution)
                captions = (scene.caption(cfg.variant),)
                if cfg.both_wordings:
                    captions += (scene.caption(VARIANTS[1 - VARIANTS.index(cfg.variant)]),)
                entries[split].append(base.Entry(f"{cfg.variant}_{split}_{i:05d}", captions, source))
        return entries

    def _frame_loader(self):
        return functools.partial(clip_jpegs, jpeg_quality=self.builder_config.jpeg_quality)


class SyntheticImages(Synthetic):
    """The same scenes as images (one frame, T = 1) with two captions each: an image-text set (see the module doc)."""

    name = "synthetic_images"
    MEDIA = "image"
    BUILDER_CONFIGS = [
        _config("pretrain", "pretrain", 4000, 500, 500, media="image"),
        _config("adapt", "adapt", ADAPT_TRAIN_VIDEOS, 500, 1000, media="image"),
        _config("pretrain_mini", "pretrain", 256, 64, 64, media="image"),
        _config("adapt_mini", "adapt", 256, 64, 128, media="image"),
    ]
