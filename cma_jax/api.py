"""A small public API: load a retrieval model, embed captions and videos, score them.

`load(backbone, adapters)` gives a `Retriever` (a backbone, with any method's trained parameters or none)
whose `encode_text`, `encode_videos` and `similarity` embed captions and videos and score them with the
model's head; `shared_backbone` lets several Retrievers share one backbone in memory, and `fingerprint`
identifies what determines a model's embeddings. docs/evaluation_and_search.md ("From Python") shows it in use.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from cma_jax import checkpoint, loader, sharding
from cma_jax.data.sampling import pad_clip, sample_frame_indices
from cma_jax.data.tokenizer import load_tokenizer
from cma_jax.evaluate import block_similarity
from cma_jax.models import state as state_lib
from cma_jax.models.clip import CLIPConfig
from cma_jax.models.retrieval import RetrievalModel


def params_hash(model) -> str:
    """sha256 over every parameter (path + float32 bytes, in path order): identifies the weights."""
    h = hashlib.sha256()
    for path, var in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: str(kv[0])):
        h.update(".".join(map(str, path)).encode())
        h.update(np.ascontiguousarray(np.asarray(var[...], np.float32)).tobytes())
    return h.hexdigest()


def tree_hash(tree: dict) -> str:
    """sha256 over a pure dict of arrays (dotted path + float32 bytes, in path order): identifies a backbone."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()


def fingerprint(model) -> dict:
    """What determines the embeddings: the model a checkpoint records (architecture, method and its
    fields: `checkpoint.run_meta`), the compute dtype, and a hash of the parameters."""
    meta = checkpoint.run_meta(model)
    clip = {**meta["clip"], "dtype": model.clip.config.dtype}  # bfloat16 embeddings differ from float32 ones
    return {"clip": clip, "method": meta["method"], "method_config": meta["method_config"],
            "params_sha256": params_hash(model)}


def fit_frames(frames: np.ndarray, resolution: int) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, R, R, 3]: shorter side to R and centre crop (CLIP's geometry)."""
    from cma_jax.data import video  # PyAV, a heavy import: only when frames are resized here
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video frames must be uint8 [N, H, W, 3], got shape {frames.shape}")
    if frames.shape[1:3] == (resolution, resolution):
        return frames.astype(np.uint8)
    return np.stack([np.asarray(video.resize_center_crop(Image.fromarray(f.astype(np.uint8)), resolution))
                     for f in frames])


def sample_clip(frames: np.ndarray, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, R, R, 3] -> (frames [T, R, R, 3] zero-padded, mask [T]) with the eval pipeline's sampling."""
    if len(frames) == 0:
        raise ValueError("a video needs at least one frame")
    return pad_clip(frames[sample_frame_indices(len(frames), num_frames)], num_frames)


def frame_times(num_decoded: int, num_frames: int, fps: float) -> np.ndarray:
    """[T] float32: the time in seconds of each frame `sample_clip` keeps (0 on padding); decoded frame k
    is the one at k / fps from the video's first frame (cma_jax.data.video's sampling)."""
    times = np.zeros(num_frames, np.float32)
    kept = sample_frame_indices(num_decoded, num_frames)
    times[:len(kept)] = kept / fps
    return times


class Retriever:
    """A model + tokenizer with batched, jitted encoders (`load` builds one).

    Videos are decoded with cma_jax.data.video (frames at `fps`, shorter side resized + centre crop) and
    sampled to `num_frames` frames as the eval pipeline does (CLIP4Clip's uniform sampling).
    """

    def __init__(self, model: RetrievalModel, tokenizer, *, num_frames: int = 12, max_words: int = 32,
                 fps: float = 1.0, batch_size: int = 16, step: int | None = None,
                 backbone: "SharedBackbone | None" = None):
        for key, value, low in (("batch_size", batch_size, 1), ("num_frames", num_frames, 1),
                                ("max_words", max_words, 2)):
            if value < low:
                raise ValueError(f"{key} must be >= {low}, got {value!r}")
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps!r}")
        self.model = model
        self.tokenizer = load_tokenizer(tokenizer)
        # Captions are cut to the text tower's context (CLIP4Clip's max_words 32 < 77 anyway).
        max_words = min(max_words, model.clip.config.context_length)
        self.num_frames, self.max_words, self.fps = num_frames, max_words, fps
        self.step = step
        self.resolution = model.clip.config.image_resolution
        graphdef, self._state = nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False))
        # Data parallel over this process's devices: batches split over them, weights replicated.
        mesh = sharding.local_data_mesh()
        self._batch_sharding = None
        if mesh is not None:
            self._batch_sharding = sharding.batch_sharding(mesh)
            self._state = sharding.place_on_mesh(self._state, mesh)
            batch_size = -(-batch_size // mesh.size) * mesh.size
        self.batch_size = batch_size
        self._enc_text = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_text(x))
        self._enc_frames = jax.jit(lambda s, x, m: nnx.merge(graphdef, s).encode_frames(x, m))
        self._fingerprint = None
        self.backbone = backbone  # the SharedBackbone the model was built on, when `load` built it
        self._backbone_sha256 = None

    @property
    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model)
        return self._fingerprint

    @property
    def backbone_sha256(self) -> str:
        """sha256 of the backbone weights the model was built on (`SharedBackbone.sha256`: before its trained
        parameters were loaded), else of the model's backbone weights now."""
        if self._backbone_sha256 is None:
            self._backbone_sha256 = (self.backbone.sha256 if self.backbone is not None
                                     else tree_hash(state_lib.backbone_state(self.model)))
        return self._backbone_sha256

    def _batched(self, fn, *xs: np.ndarray) -> np.ndarray:
        """Run fn over the rows of xs (same length) in fixed-size batches (last one padded: one compilation)."""
        b, out, n = self.batch_size, [], len(xs[0])

        def put(chunk):
            pad = np.concatenate([chunk, np.repeat(chunk[-1:], b - len(chunk), 0)]) if len(chunk) < b else chunk
            return jnp.asarray(pad) if self._batch_sharding is None else jax.device_put(pad, self._batch_sharding)

        for s in range(0, n, b):
            out.append(np.asarray(fn(self._state, *(put(x[s:s + b]) for x in xs)))[: min(b, n - s)])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> [N, D] float32 text embeddings."""
        ids, _ = self.tokenizer.tokenize(list(texts), self.max_words)
        if ids.max(initial=0) >= self.model.clip.config.vocab_size:
            raise ValueError(f"tokenizer ids reach {ids.max()}, beyond the model's vocab_size "
                             f"{self.model.clip.config.vocab_size}: wrong tokenizer for this backbone?")
        return self._batched(self._enc_text, ids)

    def load_video(self, video, with_times: bool = False) -> tuple[np.ndarray, ...]:
        """A path (decoded at `fps`) or frames [N, H, W, 3] (taken as frames at `fps`) -> (frames [T, R, R, 3],
        mask [T]), and with `with_times` the kept frames' times in seconds [T] (`frame_times`)."""
        from cma_jax.data import video as video_lib  # PyAV, a heavy import: only when decoding
        if isinstance(video, (str, os.PathLike)):
            frames = video_lib.decode_video(video, fps=self.fps, resolution=self.resolution)
        else:
            frames = fit_frames(video, self.resolution)
        clip = sample_clip(frames, self.num_frames)
        return (*clip, frame_times(len(frames), self.num_frames, self.fps)) if with_times else clip

    def encode_clips(self, frames: np.ndarray, frame_mask: np.ndarray | None = None) -> np.ndarray:
        """Prepared clips [M, T, R, R, 3] uint8 (+ frame_mask [M, T], default all real) -> per-frame embeddings [M, T, D]."""
        mask = np.ones(frames.shape[:2], bool) if frame_mask is None else np.asarray(frame_mask, bool)
        return self._batched(self._enc_frames, frames, mask)

    def encode_videos(self, videos: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """Paths or frame arrays -> (frame_emb [M, T, D], frame_mask [M, T])."""
        clips = [self.load_video(v) for v in videos]
        frames = np.stack([c[0] for c in clips])
        masks = np.stack([c[1] for c in clips])
        return self.encode_clips(frames, masks), masks

    def similarity(self, text_emb, frame_emb, frame_mask, block_size: int = 1024) -> np.ndarray:
        """Cosine similarity [N, M] with the model's head, computed block-wise on device."""
        logits = block_similarity(self.model, np.asarray(text_emb, np.float32), np.asarray(frame_emb, np.float32),
                                  np.asarray(frame_mask, bool), block_size)
        return logits / float(np.exp(np.asarray(self.model.clip.logit_scale[...])))


@dataclasses.dataclass
class SharedBackbone:
    """A backbone loaded once: what it resolved to and its weights (jax arrays, shared by every model built
    on it: `load(shared, adapters)`); `sha256` (`tree_hash`, computed when first asked) tells two apart."""

    backbone: loader.Backbone
    tree: dict

    @functools.cached_property
    def sha256(self) -> str:
        return tree_hash(self.tree)


def shared_backbone(backbone) -> SharedBackbone:
    """Load a backbone (anything `config.backbone` takes, or a `cma_jax.loader.Backbone`) once, for several models."""
    b = backbone if isinstance(backbone, loader.Backbone) else loader.resolve(backbone)
    if b.folder is None:
        raise ValueError("a shared backbone needs a backbone folder or name, not a random initialisation")
    _, tree = checkpoint.load_backbone(b.folder)
    tree = jax.tree.map(jnp.asarray, tree)  # jax arrays: models built on them keep them, no copies
    return SharedBackbone(b, tree)


def load(backbone, adapters: str | None = None, *, tokenizer=None, head: str = "text_conditioned",
         tau: float = 5.0, num_frames: int | None = None, max_words: int | None = None, fps: float | None = None,
         batch_size: int = 16, dtype: str | None = None, clip_config: CLIPConfig | None = None,
         seed: int = 0) -> Retriever:
    """A Retriever from a backbone (its tokenizer unless `tokenizer` is given) + optional adapters.

    `backbone`: anything `config.backbone` accepts (a converted folder, `ViT-B/32`, a Hugging Face repo id, a
    .pt file; see cma_jax.backbones). `adapters`: a run workdir, its checkpoints/ folder or an adapter folder
    written by cma_jax.convert, of any method; without it the model is the zero-shot backbone.
    `backbone=None` builds a randomly initialised `clip_config` (tests); a `cma_jax.loader.Backbone`
    is used as it is; a `SharedBackbone` lends its weights without a copy (several adapter sets on one
    backbone). num_frames / max_words / fps default to what the adapters were trained with (recorded in
    their checkpoint), else 12 / 32 / 1.
    """
    shared = None
    if backbone is None or (isinstance(backbone, loader.Backbone) and backbone.folder is None):
        base = backbone or loader.Backbone.random(clip_config)
        clip_config = clip_config or base.clip
    else:
        shared = backbone if isinstance(backbone, SharedBackbone) else shared_backbone(backbone)
        base = shared.backbone
        if clip_config is not None and not base.clip.same_architecture(clip_config):
            raise ValueError(f"backbone {base.folder} holds {base.clip}, but clip_config is {clip_config}; "
                             "use the backbone's architecture")
    tokenizer = tokenizer or base.tokenizer
    if tokenizer is None:
        raise ValueError(f"no tokenizer: backbone {base.folder} has no tokenizer/ folder; pass a tokenizer "
                         "(Hugging Face CLIP tokenizer folder, bpe_simple_vocab_16e6.txt.gz or word list)")
    trained = (checkpoint.saved_data_config(adapters) if adapters else None) or {}
    model, step = loader.build_model(clip_config or base.clip, head=head, tau=tau,
                                     backbone=base if shared is None else shared.tree, adapters=adapters,
                                     dtype=dtype, seed=seed)
    return Retriever(model, tokenizer, num_frames=num_frames or trained.get("num_frames", 12),
                     max_words=max_words or trained.get("max_words", 32), fps=fps or trained.get("fps", 1.0),
                     batch_size=batch_size, step=step, backbone=shared)
