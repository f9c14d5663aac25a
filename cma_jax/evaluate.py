"""Benchmark evaluation: encode every caption and video once, block-wise similarity on device, metrics and
reports: `evaluate` (a run's evaluations go through `cma_jax.evaluator`); docs/evaluation_and_search.md
describes tiles and memory.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import Mesh

from cma_jax import metrics as metrics_lib
from cma_jax import paths, sharding
from cma_jax.files import write_atomic

# ----------------------------------------------------------------------------- jitted model calls
def _split_eval(model):
    """(graphdef, state) of the model with dropout switched off, parameters shared, not copied."""
    view = nnx.view(model, deterministic=True, raise_if_not_found=False)
    return nnx.split(view)


# Module-level with the graphdef static: periodic evaluation of the same model during training hits
# jit's cache instead of recompiling (a model of another shape has another graphdef).
@functools.partial(jax.jit, static_argnums=0)
def _encode_text(graphdef, state, ids):
    return nnx.merge(graphdef, state).encode_text(ids)


@functools.partial(jax.jit, static_argnums=0)
def _encode_frames(graphdef, state, frames, frame_mask):
    return nnx.merge(graphdef, state).encode_frames(frames, frame_mask)


@functools.partial(jax.jit, static_argnums=0)
def _similarity_tile(graphdef, state, text, frames, mask):
    return nnx.merge(graphdef, state).similarity(text, frames, mask)


# ----------------------------------------------------------------------------- encoding
def encode_eval_set(model, text_batches: Iterable[dict], video_batches: Iterable[dict],
                    mesh: Mesh | None = None, num_batches: tuple[int, int] | None = None):
    """Encode every caption and video once; padding rows (valid=False) dropped.

    Returns (text_emb [Nt, D], text_video_index [Nt], frame_emb [Nv, T, D], frame_mask [Nv, T]) as
    numpy on every process, videos ordered by their `video_index` (which must be 0..Nv-1, each once).
    `num_batches` (text, video batch counts, when the iterables have no len) sizes process 0's
    progress bars.
    """
    num_text_batches, num_video_batches = num_batches or (None, None)
    graphdef, state = _split_eval(model)
    state = sharding.place_on_mesh(state, mesh)

    def run(batches, fn, key, extra, what, total):
        outs = []
        keys = (key, "video_index", "valid") + extra
        bar = tqdm.tqdm(batches, desc=f"encoding {what}", total=total, unit="batch", leave=False,
                        disable=jax.process_index() != 0)
        t0 = time.perf_counter()
        waited, t_wait = 0.0, t0
        for b in bar:
            waited += time.perf_counter() - t_wait
            missing = [k for k in keys if k not in b]
            if missing:
                raise KeyError(f"eval batch is missing {missing}; expected keys {keys}")
            arrays = {k: sharding.global_array(b[k], mesh) for k in keys}
            arrays["emb"] = fn(graphdef, state, arrays.pop(key), *(arrays[k] for k in extra))
            outs.append(arrays)  # device arrays: dispatch of the next batch overlaps this one
            t_wait = time.perf_counter()
        if not outs:
            raise ValueError(f"no eval batches with {key!r} were given")
        host = {k: np.concatenate([sharding.to_host(o[k]) for o in outs]) for k in outs[0]}
        keep = host.pop("valid").astype(bool)
        seconds = time.perf_counter() - t0
        logging.info("encoded %d %s in %.2f s: %.1f %s/s (%.0f %% of it waiting for the input pipeline)",
                     keep.sum(), what, seconds, keep.sum() / max(seconds, 1e-9), what, 100 * waited / max(seconds, 1e-9))
        return {k: v[keep] for k, v in host.items()}

    texts = run(text_batches, _encode_text, "text_ids", (), "captions", num_text_batches)
    videos = run(video_batches, _encode_frames, "frames", ("frame_mask",), "videos", num_video_batches)

    vidx = videos["video_index"].astype(np.int64)
    nv = len(vidx)
    if nv == 0 or not np.array_equal(np.sort(vidx), np.arange(nv)):
        dup = nv - len(np.unique(vidx))
        raise ValueError(f"video batches must hold each video_index 0..{nv - 1} exactly once "
                         f"(got {nv} valid rows, {dup} duplicates, max index {vidx.max() if nv else None})")
    order = np.argsort(vidx)
    frame_emb = videos["emb"][order].astype(np.float32)
    frame_mask = videos["frame_mask"][order].astype(bool)
    text_idx = texts["video_index"].astype(np.int64)
    if len(text_idx) and (text_idx.min() < 0 or text_idx.max() >= nv):
        raise ValueError(f"a caption's video_index {text_idx.max()} is outside the {nv} encoded videos")
    return texts["emb"].astype(np.float32), text_idx, frame_emb, frame_mask


# ----------------------------------------------------------------------------- similarity
def block_similarity(model, text_emb: np.ndarray, frame_emb: np.ndarray, frame_mask: np.ndarray,
                     block_size: int = 1024, mesh: Mesh | None = None) -> np.ndarray:
    """The model's logits [Nt, Nv] (`model.similarity`) computed tile by tile on device.

    text_emb [Nt, D], frame_emb [Nv, T, D], frame_mask [Nv, T]. Tiles are [block, block]; the last
    ones are padded to full size (one compilation) and cut. With a mesh each text tile is split over
    the data axes, so the block is rounded up to a multiple of their size.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    graphdef, state = _split_eval(model)
    state = sharding.place_on_mesh(state, mesh)
    nt, nv = len(text_emb), len(frame_emb)
    ds = sharding.data_size(mesh)
    bt = -(-min(block_size, max(nt, 1)) // ds) * ds
    bv = min(block_size, max(nv, 1))

    def pad(x, n):  # repeat the last row: padded rows stay valid inputs (no all-masked videos)
        return np.pad(x, [(0, n - len(x))] + [(0, 0)] * (x.ndim - 1), mode="edge")

    if mesh is None:
        put_t = put_v = jnp.asarray
    else:
        rows, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
        put_t = lambda x: jax.device_put(x, rows)  # noqa: E731
        put_v = lambda x: jax.device_put(x, rep)  # noqa: E731
    t_tiles = [put_t(pad(text_emb[i:i + bt], bt)) for i in range(0, nt, bt)]
    cols = []
    for j in range(0, nv, bv):
        f = put_v(pad(frame_emb[j:j + bv], bv))
        m = put_v(pad(frame_mask[j:j + bv], bv))
        cols.append([_similarity_tile(graphdef, state, t, f, m) for t in t_tiles])
    out = np.concatenate([np.concatenate([sharding.to_host(x) for x in col], axis=0)[:nt] for col in cols], axis=1)
    return out[:, :nv]


def query_banks(model, bank, text_emb: np.ndarray, frame_emb: np.ndarray, frame_mask: np.ndarray, *, k: int = 1,
                beta: float = 20.0, block_size: int = 1024, mesh: Mesh | None = None) -> metrics_lib.QueryBanks:
    """QB-Norm's query banks against an evaluation set, as cosines: `bank` (eval batches of another split, e.g.
    the training split: `.texts`, `.videos`) encoded now; its captions scored against the set's videos
    (t2v) and its videos against the set's captions (v2t)."""
    b_text, _, b_frames, b_mask = encode_eval_set(model, bank.texts, bank.videos, mesh,
                                                  (bank.num_text_batches, bank.num_video_batches))
    scale = float(np.exp(np.asarray(model.clip.logit_scale[...])))
    text = block_similarity(model, b_text, frame_emb, frame_mask, block_size, mesh) / scale  # [B_t, Nv]
    video = block_similarity(model, text_emb, b_frames, b_mask, block_size, mesh).T / scale  # [B_v, Nt]
    return metrics_lib.QueryBanks(text, video, k, beta)


# ----------------------------------------------------------------------------- reports
def _summary_line(name, step, res: dict) -> str:
    def one(d):
        return (f"R@1 {d['R1']:.1f} R@5 {d['R5']:.1f} R@10 {d['R10']:.1f} "
                f"MdR {d['MdR']:.1f} MnR {d['MnR']:.1f}")
    at = f" step {step}" if step is not None else ""
    directions = " | ".join(f"{metrics_lib.LABELS[d]} {one(v)}" for d, v in res.items())
    return f"eval {name}{at}: {directions}"


RESCORED = {"dsl": "DSL", "qbnorm": "QB-Norm"}  # re-scored metrics a report may hold beside the plain ones


def write_reports(results: dict, workdir: str, name: str, step: int | None) -> tuple[str, str]:
    """`eval_{name}[_step{N}].json` and `.md` in workdir (local or gs://, written atomically) -> their paths."""
    run = paths.Workdir(workdir)
    run.root.mkdir(parents=True, exist_ok=True)
    json_file, md_file = (str(run.report(name, step, suffix)) for suffix in (".json", ".md"))
    rows = {name: results["metrics"]}
    for key, label in RESCORED.items():
        if key in results:
            rows[f"{name} + {label}"] = results[key]
    table = (f"# Retrieval: {name}" + (f", step {step}" if step is not None else "") + "\n\n"
             f"{results['num_texts']} captions x {results['num_videos']} {results.get('media', 'video')}s, "
             f"head {results['head']}.\n\n"
             + metrics_lib.markdown_table(rows))
    write_atomic(json_file, json.dumps(results, indent=2))
    write_atomic(md_file, table)
    return json_file, md_file


def _write_scalars(writer, results: dict, name: str, step: int | None):
    for key in ("metrics", *RESCORED):
        if key not in results:
            continue
        prefix = name if key == "metrics" else f"{name}_{key}"
        for direction, values in results[key].items():
            for metric, value in values.items():
                writer.add_scalar(f"{prefix}/{direction}_{metric}", value, step if step is not None else 0)
    writer.flush()


# ----------------------------------------------------------------------------- entry points
def evaluate(model, text_batches: Iterable[dict], video_batches: Iterable[dict], *, block_size: int = 1024,
             dsl: bool = False, dsl_temp: float = 1.0, workdir: str | None = None, writer=None,
             step: int | None = None, mesh: Mesh | None = None, name: str = "test",
             num_batches: tuple[int, int] | None = None, media: str = "video", bank=None, qbnorm_k: int = 1,
             qbnorm_beta: float = 20.0) -> dict:
    """Text->video and video->text retrieval metrics of `model` on one evaluation set.

    Batches follow the eval batch contract (`video_index`, `valid`). The head and tau are the
    model's. With `dsl`, dual-softmax re-scored metrics are added under 'dsl'. Files (process 0
    only): `eval_{name}[_step{N}].json` + `.md` in `workdir`; TensorBoard scalars to `writer`.
    `num_batches` = (text, video) batch counts for the progress bars. `media='image'` (one-frame
    records: Flickr30K, MSCOCO) reports TR / IR instead of t2v / v2t (see cma_jax.metrics). With a query
    `bank` (eval batches of another split), QB-Norm re-scored metrics (k, beta) are added under 'qbnorm'.
    """
    t0 = time.time()
    text_emb, text_idx, frame_emb, frame_mask = encode_eval_set(model, text_batches, video_batches, mesh,
                                                                 num_batches)
    t1 = time.time()
    sim = block_similarity(model, text_emb, frame_emb, frame_mask, block_size, mesh)
    t2 = time.time()
    results = {
        "name": name, "step": step, "num_texts": int(len(text_emb)), "num_videos": int(len(frame_emb)),
        "head": model.head, "tau": float(model.tau), "block_size": block_size, "media": media,
        "metrics": metrics_lib.retrieval_metrics(sim, text_idx, media=media),
    }
    if dsl:
        results["dsl"] = metrics_lib.retrieval_metrics(sim, text_idx, dsl_temp=dsl_temp, media=media)
        results["dsl_temp"] = dsl_temp
    if bank is not None:
        banks = query_banks(model, bank, text_emb, frame_emb, frame_mask, k=qbnorm_k, beta=qbnorm_beta,
                            block_size=block_size, mesh=mesh)
        cosine = sim / float(np.exp(np.asarray(model.clip.logit_scale[...])))  # the banks' units
        results["qbnorm"] = metrics_lib.retrieval_metrics(cosine, text_idx, qbnorm=banks, media=media)
        results["qbnorm_bank"] = {"texts": int(len(banks.text)), "videos": int(len(banks.video)), "k": qbnorm_k,
                                  "beta": qbnorm_beta}
    results["seconds"] = {"encode": round(t1 - t0, 3), "similarity": round(t2 - t1, 3),
                          "metrics": round(time.time() - t2, 3)}
    logging.info(_summary_line(name, step, results["metrics"]))
    for key, label in RESCORED.items():
        if key in results:
            logging.info(_summary_line(f"{name} +{label}", step, results[key]))
    if jax.process_index() == 0:
        if workdir is not None:
            write_reports(results, workdir, name, step)
        if writer is not None:
            _write_scalars(writer, results, name, step)
    return results
