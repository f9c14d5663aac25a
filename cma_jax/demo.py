"""The end-to-end demo: synthetic data -> a small CLIP pre-trained here -> CMA vs baselines -> table.

    python -m cma_jax.demo [--config=configs/demo.py[:quick]] [--workdir=DIR]   (default: the full demo)

Stages, each reused from the workdir when already done (so an interrupted run resumes, and a
finished one only prints its table again):
  1. build the synthetic `pretrain` and `adapt` datasets (TFDS builder, cma_jax.data.builders.synthetic)
     and write the word vocabulary beside them;
  2. pre-train a small CLIP from scratch on `pretrain` (every weight trains: the stand-in for CLIP's
     web-scale image-text pre-training) and save it as a read-only backbone checkpoint;
  3. from that backbone, train on `adapt` with cma_jax.train: uni-modal adapters (d_s = 0), the
     Cross-Modal Adapter, and full fine-tuning;
  4. evaluate zero-shot and each trained model on the `adapt` test split with cma_jax.evaluate and
     write `results.md`, `results.json` and `curves.png` to the workdir.

Workdir layout: data/ (TFDS + synthetic_vocab.txt), pretrain/ (its run), backbone/, runs/<method>/,
results.{md,json}, curves.png.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

import jax
import ml_collections
import numpy as np
from flax import nnx

from cma_jax import checkpoint, evaluate, optim, train
from cma_jax import config as config_lib
from cma_jax.data.builders import get_builder, open_source, synthetic
from cma_jax.files import write_atomic
from cma_jax.models import load
from cma_jax.models.summary import count

log = logging.getLogger(__name__)

METHODS = {  # table row name, in the paper's terms
    "zero_shot": "Zero-shot CLIP",
    "uni": "Uni-modal adapters (d_s=0)",
    "cma": "Cross-Modal Adapter",
    "full": "Full fine-tuning",
}
VOCAB_FILE = "synthetic_vocab.txt"


def _say(msg: str) -> None:
    """Stage headers go to stdout: the demo is read by a person at a terminal."""
    print(msg, flush=True)


# ----------------------------------------------------------------------------- configs
def demo_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The demo's config; arg: '' (the full demo) or 'quick' (tiny data, few steps: the CI variant).

    The top-level fields describe the adaptation runs (the Cross-Modal Adapter on the synthetic `adapt`
    variant); `stage_config` derives every stage's config from them. The demo's own knobs, in `extra`:
      extra.pretrain.*      pre-training of the small CLIP from scratch (all weights, `pretrain` variant)
      extra.methods         which rows the table gets (zero_shot, uni, cma, full)
      extra.uni_lr          learning rate of uni-modal adapters (d_s = 0)
      extra.full_lr         learning rate of full fine-tuning (every weight)
      extra.eval_val        also evaluate every method on the val split (written, not tabulated)
    The hyper-parameters were chosen on the val split and the training curves, never on test.
    """
    if arg not in (None, "", "quick"):
        raise ValueError(f"demo config: unknown variant {arg!r}; expected '' or 'quick'")
    quick = arg == "quick"
    c = config_lib.base_config()
    c.mode = "train_and_eval"
    c.method = "cma"
    c.seed = 0

    # A small CLIP for 32x32 frames: 2 layers per tower, width 64 (~0.2 M parameters).
    c.model.preset = "vit_b32"
    width = 32 if quick else 64
    c.model.clip.embed_dim = width
    c.model.clip.image_resolution = 32
    c.model.clip.vision_patch_size = 8
    c.model.clip.vision_width = width
    c.model.clip.vision_layers = 2
    c.model.clip.text_width = width
    c.model.clip.text_heads = 2
    c.model.clip.text_layers = 2
    c.model.clip.context_length = 16
    c.model.clip.vocab_size = len(synthetic.VOCABULARY) + 3  # words + unk, start, end (WordTokenizer)
    c.model.head = "text_conditioned"

    # r = 16 (chosen on val: R@1 67 vs 60 for r = 8 at 300 steps); d_s = 16 as the paper (on val
    # d_s = 16 / 32 / 0 gave t2v R@1 67.2 / 63.0 / 66.8: the sharing is neutral on this task).
    c.adapter.reduction_dim = 8 if quick else 16
    c.adapter.share_dim = 16

    c.data.name = "synthetic"
    c.data.builder_config = "adapt_mini" if quick else "adapt"
    c.data.data_dir = ""  # '' = WORKDIR/data
    c.data.tokenizer = ""  # '' = the synthetic vocabulary file the demo writes beside the data
    c.data.num_frames = 4
    c.data.max_words = 16
    c.data.eval_split = "test"

    c.train.batch_size = 32 if quick else 64
    c.train.num_steps = 20 if quick else 300
    c.train.lr = 1e-2  # adapters; chosen on val (1e-2 beat 3e-3 clearly at 300 steps, 3e-2 no better)
    c.train.weight_decay = 0.01
    c.train.log_every_steps = 50
    c.train.save_every_steps = 100
    c.train.keep_checkpoints = 1

    c.eval.batch_size = 128

    c.extra.pretrain = dict(
        builder_config="pretrain_mini" if quick else "pretrain",
        num_steps=30 if quick else 600,
        batch_size=64 if quick else 128,
        num_frames=1,  # image-text pre-training, as CLIP's
        lr=1e-3,
        weight_decay=0.01,
    )
    c.extra.methods = ("zero_shot", "uni", "cma", "full")
    c.extra.uni_lr = 1e-2
    c.extra.full_lr = 1e-3
    c.extra.eval_val = False
    return c


def stage_config(config, stage: str, data_dir: str, backbone: str = "") -> ml_collections.ConfigDict:
    """The plain cma_jax config (empty `extra`) of one demo stage.

    stage: 'pretrain' | 'pretrain_eval' | 'zero_shot' | 'uni' | 'cma' | 'full'.
    """
    c = ml_collections.ConfigDict(config.to_dict())  # an unlocked deep copy
    extra = config.extra
    c.extra = ml_collections.ConfigDict()
    c.data.data_dir = data_dir
    c.data.tokenizer = config.data.tokenizer or os.path.join(data_dir, VOCAB_FILE)
    c.backbone = backbone
    if stage in ("pretrain", "pretrain_eval"):
        p = extra.pretrain
        c.method = "full"
        c.backbone = "random"  # pre-training from scratch
        c.model.train_logit_scale = True
        c.data.builder_config = p.builder_config
        c.data.num_frames = p.num_frames
        c.data.eval_split = "val"
        c.train.batch_size = p.batch_size
        c.train.num_steps = p.num_steps
        c.train.lr = c.train.backbone_lr = p.lr
        c.train.weight_decay = p.weight_decay
        c.mode = "eval" if stage == "pretrain_eval" else "train"
    elif stage == "zero_shot":
        c.method, c.mode = "zero_shot", "eval"
    elif stage == "uni":
        c.method = "cma"
        c.adapter.share_dim = 0
        c.train.lr = extra.uni_lr
    elif stage == "cma":
        c.method = "cma"
    elif stage == "full":
        c.method = "full"
        c.train.lr = c.train.backbone_lr = extra.full_lr
    else:
        raise ValueError(f"unknown demo stage {stage!r}; expected pretrain, zero_shot or one of {list(METHODS)}")
    if stage in METHODS and stage != "zero_shot":
        c.mode = "train"
    return c


# ----------------------------------------------------------------------------- stage 1: data
def prepare_data(config, data_dir: str) -> None:
    """Build the synthetic pre-training and adaptation datasets (skipped when already built)."""
    os.makedirs(data_dir, exist_ok=True)
    vocab = os.path.join(data_dir, VOCAB_FILE)
    if not os.path.exists(vocab):
        tmp = vocab + ".tmp"
        synthetic.write_vocabulary(tmp)
        os.replace(tmp, vocab)
    for name in (config.extra.pretrain.builder_config, config.data.builder_config):
        builder = get_builder("synthetic", data_dir, name)
        if builder.is_prepared():
            _say(f"  synthetic/{name}: already built in {builder.data_dir}")
            continue
        t0 = time.time()
        builder.download_and_prepare()
        counts = ", ".join(f"{s} {builder.info.splits[s].num_examples}" for s in builder.info.splits)
        _say(f"  synthetic/{name}: built ({counts} videos) in {time.time() - t0:.1f}s")


# ----------------------------------------------------------------------------- helpers
def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2))


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _run_checkpoint_bytes(workdir: str) -> int:
    """On-disk size of the trained parameters in the run's latest checkpoint (what a task stores)."""
    ckpt_dir = checkpoint.checkpoint_dir(workdir)
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
    if not steps:
        return 0
    return _dir_bytes(os.path.join(ckpt_dir, str(max(steps)), "params"))


def _param_counts(model, cfg) -> dict:
    total = count(nnx.state(model, nnx.Param))
    trainable = 0 if cfg.method == "zero_shot" else count(
        nnx.state(model, optim.trainable_filter(cfg.method, cfg.model.train_logit_scale)))
    return {"total_params": int(total), "trainable_params": int(trainable),
            "trainable_percent": 100.0 * trainable / total}


def _train(cfg, workdir: str):
    """cma_jax.train.train -> (model, the run's whole per-step history, resumes included)."""
    model, _ = train.train(cfg, workdir)
    history = [{k: h[k] for k in ("step", "loss", "step_time")} for h in train.read_history(workdir)]
    return model, history


# Fields that do not change a stage's result (paths move with the workdir; logging, I/O).
_NOT_IN_KEY = {"backbone_checkpoint": None, "adapter_checkpoint": None,
               "data": ("data_dir", "tokenizer", "workers"),
               "train": ("progress_bar", "log_every_steps", "save_every_steps", "keep_checkpoints")}


def _config_key(cfg) -> str:
    """What a saved stage result depends on: its config minus paths and logging knobs."""
    d = cfg.to_dict()
    for key, sub in _NOT_IN_KEY.items():
        if sub is None:
            d.pop(key, None)
        else:
            for k in sub:
                d[key].pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


def _cached(path: str, cfg):
    """The saved result of a stage if it was made with this very config; None if there is none."""
    if not os.path.exists(path):
        return None
    saved = _read_json(path)
    if saved.get("config") != _config_key(cfg):
        raise ValueError(f"{path} was made with a different configuration; use another --workdir "
                         "(or delete that folder) to run the demo with this one")
    return saved


def _claim(run_dir: str, cfg) -> None:
    """Mark run_dir as this stage config's (before training), so a resumed run cannot mix configs."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "demo_stage_config.json")
    if os.path.exists(path):
        _cached(path, cfg)
    else:
        _write_json(path, {"config": _config_key(cfg)})


# ----------------------------------------------------------------------------- stage 2: pre-training
def pretrain(config, workdir: str, data_dir: str) -> tuple[str, dict]:
    """Pre-train the small CLIP (or reuse it) -> (backbone checkpoint path, summary)."""
    backbone = os.path.join(workdir, "backbone")
    run_dir = os.path.join(workdir, "pretrain")
    summary_path = os.path.join(run_dir, "demo_summary.json")
    cfg = stage_config(config, "pretrain", data_dir)
    summary = _cached(summary_path, cfg) if os.path.isdir(backbone) else None
    if summary is not None:
        _say(f"  reusing the pre-trained backbone {backbone}")
        return backbone, summary
    _claim(run_dir, cfg)
    t0 = time.time()
    model, history = _train(cfg, run_dir)
    checkpoint.save_backbone(backbone, config_lib.clip_config(cfg), jax.device_get(load.backbone_state(model)),
                             tokenizer_files=(cfg.data.tokenizer,), overwrite=True)
    # How well it does on its own task (pretrain val): the backbone is a working CLIP.
    val = evaluate.evaluate_from_config(stage_config(config, "pretrain_eval", data_dir), run_dir, model=model)
    summary = {"config": _config_key(cfg), "seconds": time.time() - t0, "history": history,
               "val_metrics": val["metrics"], **_param_counts(model, cfg)}
    _write_json(summary_path, summary)
    m = val["metrics"]
    _say(f"  pre-trained in {summary['seconds']:.0f}s; on pretrain/val: t2v R@1 {m['t2v']['R1']:.1f}, "
         f"v2t R@1 {m['v2t']['R1']:.1f}")
    return backbone, summary


# ----------------------------------------------------------------------------- stage 3+4: methods
def run_method(config, method: str, workdir: str, data_dir: str, backbone: str) -> dict:
    """Train (unless zero-shot) and evaluate one method on the adapt task -> its table row."""
    cfg = stage_config(config, method, data_dir, backbone)
    run_dir = os.path.join(workdir, "runs", method)
    row_path = os.path.join(run_dir, "demo_row.json")
    row = _cached(row_path, cfg)
    if row is not None:
        _say(f"  {METHODS[method]}: reusing {row_path}")
        return row
    _claim(run_dir, cfg)
    t0 = time.time()
    history = []
    if method == "zero_shot":
        model, _ = load.from_config(cfg)
    else:
        model, history = _train(cfg, run_dir)
    train_seconds = time.time() - t0
    results = evaluate.evaluate_from_config(cfg, run_dir, model=model)
    times = [h["step_time"] for h in history[1:]]  # the first step includes compilation
    row = {
        "config": _config_key(cfg), "method": method, "name": METHODS[method],
        "metrics": results["metrics"], "num_videos": results["num_videos"], **_param_counts(model, cfg),
        "step_time_s": float(np.median(times)) if times else None,
        "checkpoint_bytes": _run_checkpoint_bytes(run_dir) if method != "zero_shot" else 0,
        "train_seconds": train_seconds if history else 0.0, "history": history,
    }
    if config.extra.eval_val:
        val_cfg = ml_collections.ConfigDict(cfg.to_dict())
        val_cfg.data.eval_split = "val"
        row["val_metrics"] = evaluate.evaluate_from_config(val_cfg, run_dir, model=model)["metrics"]
    _write_json(row_path, row)
    m = row["metrics"]
    _say(f"  {METHODS[method]}: t2v R@1 {m['t2v']['R1']:.1f}, v2t R@1 {m['v2t']['R1']:.1f} "
         f"({time.time() - t0:.0f}s)")
    return row


# ----------------------------------------------------------------------------- report
def _fmt_bytes(n: int) -> str:
    if n == 0:
        return "0"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0


def markdown_table(rows: list[dict], header: str) -> str:
    """The paper's main table in miniature: both directions, parameters, step time, checkpoint size."""
    cols = ["Method", "Trainable params", "Share", "t2v R@1", "R@5", "R@10", "MdR", "MnR",
            "v2t R@1", "R@5", "R@10", "MdR", "MnR", "Step time", "Checkpoint"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        m = r["metrics"]
        metric_cells = [f"{m[d][k]:.1f}" for d in ("t2v", "v2t") for k in ("R1", "R5", "R10", "MdR", "MnR")]
        step = f"{1000 * r['step_time_s']:.0f} ms" if r["step_time_s"] else "-"
        lines.append("| " + " | ".join([r["name"], f"{r['trainable_params']:,}", f"{r['trainable_percent']:.2f} %",
                                        *metric_cells, step, _fmt_bytes(r["checkpoint_bytes"])]) + " |")
    return "\n".join(lines) + "\n"


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if len(y) < k or k <= 1:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def plot_curves(pretrain_history: list[dict], rows: list[dict], path: str) -> None:
    """Training loss of the pre-training and of every trained method (moving average) -> PNG."""
    import matplotlib  # heavy: only when the plot is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, title, series in (
            (axes[0], "pre-training (synthetic 'pretrain', all weights)", [("CLIP from scratch", pretrain_history)]),
            (axes[1], "adaptation (synthetic 'adapt')", [(r["name"], r["history"]) for r in rows if r["history"]])):
        for label, hist in series:
            if not hist:
                continue
            steps = np.asarray([h["step"] for h in hist])
            loss = np.asarray([h["loss"] for h in hist])
            k = max(1, len(loss) // 30)
            ax.plot(steps[k - 1:] if len(loss) >= k else steps, _smooth(loss, k), label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("InfoNCE loss (moving average)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def r1_ceiling(config, data_dir: str) -> float:
    """Best expected R@1 (%) on the eval split: a caption shared by k videos cannot tell them apart."""
    src = open_source(config.data.name, config.data.eval_split, data_dir, config.data.builder_config)
    captions = [c for caps in src.captions for c in caps]
    counts = {}
    for c in captions:
        counts[c] = counts.get(c, 0) + 1
    return 100.0 * float(np.mean([1.0 / counts[c] for c in captions]))


# ----------------------------------------------------------------------------- entry point
def run(config, workdir: str) -> dict:
    """The demo: every stage, then the table -> results dict."""
    t_start = time.time()
    workdir = os.path.abspath(workdir)
    data_dir = os.path.abspath(config.data.data_dir) if config.data.data_dir else os.path.join(workdir, "data")
    unknown = [m for m in config.extra.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"config.extra.methods: unknown {unknown}; expected some of {list(METHODS)}")
    os.makedirs(workdir, exist_ok=True)
    try:
        _say(f"[1/3] synthetic datasets -> {data_dir}")
        prepare_data(config, data_dir)
        _say(f"[2/3] pre-training a small CLIP from scratch -> {workdir}/backbone")
        backbone, pre = pretrain(config, workdir, data_dir)
        _say("[3/3] adapting to the shifted task and evaluating on its test split")
        rows = [run_method(config, m, workdir, data_dir, backbone) for m in config.extra.methods]
    except KeyboardInterrupt:
        _say(f"\ninterrupted: finished stages and the last checkpoint are kept in {workdir}; "
             "run the same command again to resume")
        raise SystemExit(130) from None  # the shell's code for Ctrl-C, without a traceback
    wall = time.time() - t_start
    ceiling = r1_ceiling(config, data_dir)
    header = (f"# Cross-Modal Adapter demo: synthetic text-video retrieval\n\n"
              f"Test split of `synthetic/{config.data.builder_config}` ({rows[0]['num_videos']} videos): "
              f"{config.data.num_frames} frames per video, head `{config.model.head}`. "
              f"Identical captions of different videos cap the expected R@1 at {ceiling:.1f}. "
              f"Backbone: a {pre['total_params']:,}-parameter CLIP pre-trained here on "
              f"`synthetic/{config.extra.pretrain.builder_config}` "
              f"(its val t2v R@1 {pre['val_metrics']['t2v']['R1']:.1f}). "
              f"Step time: median train step (2-core CPU here); checkpoint: what each task stores beyond the "
              f"backbone (its Orbax params folder on disk, per-array metadata included).")
    table = markdown_table(rows, header)
    results = {
        "dataset": f"synthetic/{config.data.builder_config}", "eval_split": config.data.eval_split,
        "r1_ceiling": ceiling, "backbone": backbone, "pretrain": {k: v for k, v in pre.items() if k not in ("config", "history")},
        "methods": {r["method"]: {k: v for k, v in r.items() if k not in ("config", "history")} for r in rows},
        "wall_seconds_this_run": wall, "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
    }
    _write_json(os.path.join(workdir, "results.json"), results)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table)
    plot_curves(pre["history"], rows, os.path.join(workdir, "curves.png"))
    print("\n" + table, flush=True)
    _say(f"written: {workdir}/results.md, results.json, curves.png ({wall:.0f}s this run)")
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config if FLAGS.config is not None else demo_config()
    try:
        config_lib.validate(config, num_devices=jax.device_count())
        run(config, FLAGS.workdir)
    except (ValueError, OSError) as e:
        logging.debug("traceback", exc_info=True)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Demo config file, e.g. configs/demo.py:quick (default: the "
                                    "full demo embedded in cma_jax.demo).", lock_config=True)
    flags.DEFINE_string("workdir", "runs/demo", "Folder for the demo's data, runs and results.")
    FLAGS = flags.FLAGS
    app.run(main)
