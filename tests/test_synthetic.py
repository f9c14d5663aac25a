"""The synthetic text-video builder: counts, determinism, captions that match every frame, the shift."""

import io

import numpy as np
import pytest
from PIL import Image

from cma_jax.data.builders import get_builder, open_source, synthetic as S
from cma_jax.data.tokenizer import WordTokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both mini variants built once into one data dir."""
    data_dir = tmp_path_factory.mktemp("tfds")
    for name in ("pretrain_mini", "adapt_mini"):
        get_builder("synthetic", data_dir, name).download_and_prepare()
    return data_dir


def _decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.float32)


def check_frame_matches(frame: np.ndarray, scene: S.Scene) -> None:
    """A single frame [H, W, 3] shows what the caption says: background, colour, position, size, texture."""
    res = frame.shape[0]
    bg = np.asarray(S.BACKGROUNDS[scene.background], np.float32)
    corners = np.stack([frame[1, 1], frame[1, -2], frame[-2, 1], frame[-2, -2]])
    assert np.abs(corners - bg).max() < 40, (scene, corners)
    # Object pixels: far from the background colour.
    obj = np.abs(frame - bg).sum(-1) > 90
    ys, xs = np.nonzero(obj)
    assert len(ys) > 10, scene
    # The object's bounding-box centre is nearer its named position than any other position.
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    dists = {p: np.hypot(cx - px * res, cy - py * res) for p, (px, py) in S.POSITIONS.items()}
    assert min(dists, key=dists.get) == scene.position, (scene, cx, cy)
    # Size: the extent separates small (r=4.5) and large (r=9.5) shapes whatever the shape.
    extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    assert (extent > 13) == (scene.size == "large"), (scene, extent)
    # Colour: object pixels vote for the nearest palette colour (full or texture-darkened);
    # the named colour wins (edge pixels blended with the background vote at random).
    pix = frame[obj]
    names = list(S.COLOURS)
    palette = np.asarray([S.COLOURS[n] for n in names] + [np.multiply(S.COLOURS[n], 0.35) for n in names]
                         + [bg], np.float32)
    votes = np.argmin(np.abs(pix[:, None] - palette[None]).sum(-1), axis=1)
    votes = votes[votes < 2 * len(names)] % len(names)
    assert names[np.bincount(votes, minlength=len(names)).argmax()] == scene.colour, scene
    # Texture: along a column a plain (convex or cross) shape enters and leaves once: <= 2
    # transitions of "pixel has the shape's colour"; stripes and dots add many more.
    fg = np.asarray(S.COLOURS[scene.colour], np.float32)
    near = np.stack([np.abs(frame - c).sum(-1) for c in (fg, fg * 0.35, bg)])
    is_fg = (near.argmin(0) == 0).astype(int)  # [H, W]
    transitions = np.abs(np.diff(is_fg, axis=0)).sum(0)  # per column
    transitions = transitions[is_fg.any(0)]
    if scene.texture == "plain":
        assert np.percentile(transitions, 90) <= 2, (scene, transitions)
    else:
        assert transitions.max() >= 4, (scene, transitions)


def test_counts_and_splits(built):
    for name, variant in (("pretrain_mini", "pretrain"), ("adapt_mini", "adapt")):
        cfg = next(c for c in S.Synthetic.BUILDER_CONFIGS if c.name == name)
        for split, n in (("train", cfg.num_train), ("val", cfg.num_val), ("test", cfg.num_test)):
            src = open_source("synthetic", split, built, name)
            assert len(src) == n
            assert src.num_captions.tolist() == [1] * n
            assert len(set(src.video_ids)) == n
            rec = src[n - 1]
            assert rec["num_frames"] == cfg.num_frames == len(rec["frames"])
            assert _decode(rec["frames"][0]).shape == (32, 32, 3)
            assert src.video_ids[0] == f"{variant}_{split}_00000"


def test_records_are_the_generated_clips(built):
    src = open_source("synthetic", "test", built, "adapt_mini")
    for i in (0, 17, 127):
        scene, frames, caption = S.make_clip("adapt", "test", i)
        rec = src[i]
        assert rec["captions"] == [caption]
        assert S.parse_caption("adapt", caption) == scene
        decoded = np.stack([_decode(f) for f in rec["frames"]])
        other = S.make_clip("adapt", "test", i + 1)[1]
        err, err_other = np.abs(decoded - frames).mean(), np.abs(decoded - other).mean()
        assert err < 8.0 and err < 0.5 * err_other, (err, err_other)  # JPEG loses the sensor noise


def test_deterministic_given_seed():
    a = S.make_clip("adapt", "train", 5, seed=3)
    b = S.make_clip("adapt", "train", 5, seed=3)
    c = S.make_clip("adapt", "train", 5, seed=4)
    assert a[0] == b[0] and a[2] == b[2] and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert S.clip_jpegs(("adapt", "train", 5, 3, 4, 32)) == S.clip_jpegs(("adapt", "train", 5, 3, 4, 32))
    # Splits are different draws.
    assert not np.array_equal(S.make_clip("adapt", "val", 5)[1], S.make_clip("adapt", "test", 5)[1])


@pytest.mark.parametrize("variant", S.VARIANTS)
def test_every_frame_shows_its_caption(built, variant):
    src = open_source("synthetic", "val", built, f"{variant}_mini")
    for i in range(len(src)):
        rec = src[i]
        scene = S.parse_caption(variant, rec["captions"][0])
        for jpeg in rec["frames"]:  # every single frame, so a frame-wise model can match it
            check_frame_matches(_decode(jpeg), scene)


def test_variants_differ_as_designed(built):
    pre = open_source("synthetic", "train", built, "pretrain_mini").captions
    ada = open_source("synthetic", "train", built, "adapt_mini").captions
    pre_words = {w for (c,) in pre for w in c.split()}
    ada_words = {w for (c,) in ada for w in c.split()}
    # New wording: colour and size synonyms and texture words appear only in the adapt captions ...
    new = set(S.COLOUR_SYNONYMS.values()) | set(S.SIZE_SYNONYMS.values()) | set(S.TEXTURES)
    assert new <= ada_words and not new & pre_words
    assert not set(S.COLOURS) & ada_words and not set(S.SIZES) & ada_words
    # ... while shape, position and background words are shared, so zero-shot is not pure chance.
    shared = set(S.SHAPES) | set(S.POSITIONS) | set(S.BACKGROUNDS)
    assert shared <= pre_words and shared <= ada_words
    # New content: only the adapt variant has textured shapes, and it has all three textures.
    pre_tex = {S.parse_caption("pretrain", c).texture for (c,) in pre}
    ada_tex = {S.parse_caption("adapt", c).texture for (c,) in ada}
    assert pre_tex == {"plain"} and ada_tex == set(S.TEXTURES)


def test_vocabulary_covers_every_caption():
    tok = WordTokenizer(S.VOCABULARY)
    for variant in S.VARIANTS:
        for i in range(200):
            caption = S.make_clip(variant, "train", i)[2]
            ids, mask = tok.tokenize([caption], 16)
            assert tok.unk_id not in ids[0][mask[0] == 1], caption
            assert mask[0].sum() == len(caption.split()) + 2 <= 16  # fits max_words=16 uncut


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="variant"):
        S.make_clip("weird", "train", 0)
    with pytest.raises(ValueError, match="not a pretrain caption"):
        S.parse_caption("pretrain", "a small pink circle at the left on a grey background")
    with pytest.raises(ValueError, match="num_train"):
        S.SyntheticConfig(name="x", variant="adapt", num_train=0)


def test_adapt_subsets_are_the_first_training_videos_and_the_same_eval_splits(tmp_path):
    entries = {name: get_builder("synthetic", tmp_path, name)._split_entries(None)
               for name in ("adapt", "adapt_train30")}
    whole, subset = entries["adapt"], entries["adapt_train30"]
    assert len(subset["train"]) == 30
    for split, n in (("train", 30), ("val", 500), ("test", 1000)):
        assert [(e.video_id, e.captions, e.source) for e in subset[split]] == \
               [(e.video_id, e.captions, e.source) for e in whole[split][:n]]
    assert [S.adapt_train_config(n) for n in (*S.ADAPT_SUBSETS, S.ADAPT_TRAIN_VIDEOS)] == \
           ["adapt_train30", "adapt_train90", "adapt_train300", "adapt_train900", "adapt"]
    with pytest.raises(ValueError, match="no adapt config with 100 training videos"):
        S.adapt_train_config(100)


def test_image_variant_has_one_frame_and_both_wordings_per_image(tmp_path):
    get_builder("synthetic_images", tmp_path, "adapt_mini").download_and_prepare()
    src = open_source("synthetic_images", "test", tmp_path, "adapt_mini")
    assert (len(src), src.media, src.num_captions.tolist()) == (128, "image", [2] * 128)
    for i in (0, 5, 127):
        rec = src[i]
        adapt, pretrain = rec["captions"]
        scene = S.parse_caption("adapt", adapt)
        assert S.parse_caption("pretrain", pretrain) == S.Scene(scene.shape, scene.colour, scene.size,
                                                                scene.position, scene.background)  # no texture
        assert rec["num_frames"] == 1 and len(rec["frames"]) == 1
        check_frame_matches(_decode(rec["frames"][0]), scene)
        assert rec["captions"][0] == S.make_clip("adapt", "test", i)[2]  # the video variant's scene i
    assert get_builder("synthetic", tmp_path, "adapt_mini").builder_config.both_wordings is False
