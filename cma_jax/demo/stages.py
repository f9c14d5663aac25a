"""The demo's stages, shared by its table (`cma_jax.demo.table`) and its training-set-size sweep (`.sweep`).

  demo_config(arg)     the demo's config: '' (the table), 'quick' (CI) or 'sweep', optionally ',width=N'
  stage_config(...)    the plain cma_jax config of one stage: pre-training, zero-shot, or a method and seed
  prepare_data(...)    build the synthetic datasets and write the word vocabulary beside them
  pretrain(...)        pre-train the small CLIP once -> a read-only backbone folder
  train_and_test(...)  one run: train a method from the backbone (optionally choosing its step on val), test it

Every stage saves its result with the config that made it (paths and logging knobs left out) and
reuses it when the same config comes again; another config in the same folder is refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shutil
import time

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from flax import nnx

from cma_jax import checkpoint, console, evaluator, loader, optim, train
from cma_jax import config as config_lib
from cma_jax import run as run_lib
from cma_jax.data.builders import get_builder, synthetic
from cma_jax.files import write_atomic
from cma_jax.models import peft, state
from cma_jax.models.summary import count

# Stage (table row, run folder) -> the method it trains; the four rows of the first demo keep their names.
STAGE_METHOD = {"uni": "unimodal"}
# The first demo's four rows, with knobs of their own (extra.uni_lr, extra.full_lr, train.lr and
# config.adapter); every other method takes its declared demo settings (peft.base.Demo).
OWN_ROWS = {"zero_shot": "Zero-shot CLIP", "full": "Full fine-tuning", "uni": "Uni-modal adapters (d_s=0)",
            "cma": "Cross-Modal Adapter"}
FIRST_ROWS = ("zero_shot", "uni", "cma", "full")  # the table of the default demo
VOCAB_FILE = "synthetic_vocab.txt"
VARIANTS = ("", "quick", "sweep", "methods", "methods_quick", "methods_lr")
RECORD = "demo_run.json"  # a finished run's record, in its run folder


def declared() -> dict:
    """{method name: declaration class} of every method but the four rows with knobs of their own."""
    own = {STAGE_METHOD.get(s, s) for s in OWN_ROWS}
    return {name: cls for name, cls in peft.METHODS.items() if name not in own}


def rows() -> dict[str, str]:
    """Table row name -> its label, in the paper's order: the two ends, every declared method (the paper's
    baselines, then any added since), the two adapter rows; read when called, so a registered method is a row."""
    ends = ("zero_shot", "full")
    return {**{r: OWN_ROWS[r] for r in ends}, **{name: cls.label for name, cls in declared().items()},
            **{r: label for r, label in OWN_ROWS.items() if r not in ends}}


def say(msg: str) -> None:
    """Stage headers go to stdout: the demo is read by a person at a terminal."""
    print(msg, flush=True)


# ----------------------------------------------------------------------------- configs
def _parse_arg(arg: str | None) -> tuple[str, int | None]:
    variant, *options = (arg or "").split(",")
    if variant not in VARIANTS:
        raise ValueError(f"demo config: unknown variant {variant!r}; expected one of {VARIANTS} "
                         "(optionally followed by ',width=N')")
    width = None
    for option in options:
        key, _, value = option.partition("=")
        if key != "width" or not value.isdigit() or int(value) < 16 or int(value) % 16:
            raise ValueError(f"demo config: bad option {option!r}; expected width=N, N a multiple of 16")
        width = int(value)
    return variant, width


def demo_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The demo's config. arg: '' (the table of methods), 'quick' (the CI variant: tiny data, one
    seed, same path), 'sweep' (test R@1 vs training-set size), 'methods' (the paper's fourteen rows,
    3 seeds, and its efficiency figure), 'methods_quick' (those rows on tiny data, one seed, 100 steps:
    CI) or 'methods_lr' (the learning-rate search that chose `extra.lr`); ',width=N' sets the CLIP's width.

    The top-level fields describe the adaptation runs (the Cross-Modal Adapter on the synthetic `adapt`
    variant); `stage_config` derives every stage's config from them. The demo's own knobs, in `extra`:
      extra.task            'table' (methods x seeds on the full training set) or 'sweep'
      extra.seeds           seeds per trained method (each: adapter init and data order; one backbone)
      extra.pretrain.*      pre-training of the small CLIP from scratch (all weights, `pretrain` variant)
      extra.methods         which rows / lines (zero_shot, uni, cma, full)
      extra.uni_lr          learning rate of uni-modal adapters (d_s = 0)
      extra.full_lr         learning rate of full fine-tuning (every weight)
      extra.lr.<method>     learning rate of every other method (chosen by `methods_lr` on val)
      extra.fields.<method> their hyper-parameters, scaled to this small CLIP (the rest: the method's defaults)
      extra.lr_grid.<method> the learning rates `methods_lr` tries
    (the last three from each method's declaration, `demo=Demo(...)` in cma_jax/models/peft/)
      extra.eval_val        table: also evaluate every run on the val split (written, not tabulated)
      extra.sweep.*         the sweep: training-set sizes, val checks (see cma_jax.demo.sweep)
    The hyper-parameters were chosen on the val split and the training curves, never on test.
    """
    variant, width = _parse_arg(arg)
    quick = variant in ("quick", "methods_quick")
    c = config_lib.base_config()
    c.mode = "train_and_eval"
    c.method = "cma"
    c.seed = 0

    # A small CLIP for 32x32 frames: 2 layers per tower, width 64 (~0.2 M parameters). The quick
    # variant keeps the width: at width 32 adapters learned too little in CI's budget (t2v R@1 13-17
    # after 300 steps, against 33-38 at width 64, each step only ~1.5x slower).
    c.model.preset = "vit_b32"
    width = width or 64
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
    c.adapter.reduction_dim = 16
    c.adapter.share_dim = 16

    c.data.name = "synthetic"
    c.data.builder_config = "adapt_mini" if quick else "adapt"
    c.data.data_dir = ""  # '' = WORKDIR/data
    c.data.tokenizer = ""  # '' = the synthetic vocabulary file the demo writes beside the data
    c.data.num_frames = 4
    c.data.max_words = 16
    c.data.eval_split = "test"

    c.train.batch_size = 32 if quick else 64
    c.train.num_steps = 300
    c.train.lr = 1e-2  # adapters; chosen on val (1e-2 beat 3e-3 clearly at 300 steps, 3e-2 no better)
    c.train.weight_decay = 0.01
    c.train.log_every_steps = 50
    c.train.save_every_steps = 100
    c.train.keep_checkpoints = 1

    c.eval.batch_size = 128

    c.extra.task = {"sweep": "sweep", "methods_lr": "lr_search"}.get(variant, "table")
    c.extra.seeds = 1 if quick or variant == "methods_lr" else 3
    c.extra.pretrain = dict(
        builder_config="pretrain_mini" if quick else "pretrain",
        num_steps=200 if quick else 600,
        batch_size=64 if quick else 128,
        num_frames=1,  # image-text pre-training, as CLIP's
        lr=1e-3,
        weight_decay=0.01,
    )
    c.extra.methods = tuple(rows()) if variant.startswith("methods") else FIRST_ROWS
    if variant == "methods_quick":
        c.train.num_steps = 100
    c.extra.uni_lr = 1e-2
    c.extra.full_lr = 1e-3
    # Every other method on this CLIP, as it declares (peft.base.Demo): its fields scaled to width 64 and
    # 2 layers, its learning rate chosen on val by `methods_lr` (its table: docs/methods.md; 300 steps, one
    # seed: the best val t2v R@1), the grid it tried (widened wherever the best rate sat at an edge).
    methods = declared()
    c.extra.fields = {name: dict(cls.demo.fields) for name, cls in methods.items() if cls.demo.fields}
    c.extra.lr = {name: cls.demo.lr for name, cls in methods.items()}
    c.extra.lr_grid = {name: tuple(cls.demo.lr_grid) for name, cls in methods.items()}
    c.extra.eval_val = False
    c.extra.sweep = dict(
        # Training videos of `adapt` (1, 3, 10, 30, 100 % of its 3,000): synthetic.ADAPT_SUBSETS + the whole.
        train_videos=(30, 90, 300, 900, 3000),
        # Checkpoint choice on val (early stopping): val t2v R@1 this many times per run, test at the best.
        val_checks=15,
    )
    return c


def seeds(config) -> list[int]:
    """The seeds of the trained runs: config.seed, config.seed + 1, ... (extra.seeds of them)."""
    if config.extra.seeds < 1:
        raise ValueError(f"config.extra.seeds must be >= 1, got {config.extra.seeds}")
    return [config.seed + k for k in range(config.extra.seeds)]


def stage_config(config, stage: str, data_dir: str, backbone: str = "", seed: int | None = None
                 ) -> ml_collections.ConfigDict:
    """The plain cma_jax config (empty `extra`) of one demo stage.

    stage: 'pretrain' | 'pretrain_eval' | 'zero_shot' | 'uni' | 'cma' | 'full'; seed: the run's
    `config.seed` (adapter init, data order), default config.seed.
    """
    c = ml_collections.ConfigDict(config.to_dict())  # an unlocked deep copy
    extra = config.extra
    c.extra = ml_collections.ConfigDict()
    c.data.data_dir = data_dir
    c.data.tokenizer = config.data.tokenizer or os.path.join(data_dir, VOCAB_FILE)
    c.backbone = backbone
    c.seed = config.seed if seed is None else seed
    if stage in ("pretrain", "pretrain_eval"):
        p = extra.pretrain
        c.method = "full"
        c.backbone = "random"  # pre-training from scratch
        c.seed = config.seed
        c.adapter = config_lib.base_config().adapter  # no adapters: their settings must not matter
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
        c.method = "unimodal"
        c.train.lr = extra.uni_lr
    elif stage == "cma":
        c.method = "cma"
    elif stage == "full":
        c.method = "full"
        c.train.lr = c.train.backbone_lr = extra.full_lr
    elif stage in rows():  # another method: its section's fields and its learning rate
        c.method = stage
        section = peft.get(stage).section
        for k, v in extra.fields.get(stage, {}).items():
            c[section][k] = v
        c.train.lr = extra.lr.get(stage, peft.get(stage).demo.lr)
    else:
        raise ValueError(f"unknown demo stage {stage!r}; expected pretrain, zero_shot or one of {list(rows())}")
    if stage in rows() and stage != "zero_shot":
        c.mode = "train"
    return c


# ----------------------------------------------------------------------------- stage 1: data
def prepare_data(data_dir: str, builder_configs) -> None:
    """Write the vocabulary and build these synthetic builder configs (each skipped when already built)."""
    os.makedirs(data_dir, exist_ok=True)
    vocab = os.path.join(data_dir, VOCAB_FILE)
    if not os.path.exists(vocab):
        tmp = vocab + ".tmp"
        synthetic.write_vocabulary(tmp)
        os.replace(tmp, vocab)
    for name in dict.fromkeys(builder_configs):
        with console.without_log_lines("Variant folder"):  # TFDS: the folder it fills has no dataset_info yet
            builder = get_builder("synthetic", data_dir, name)
            if builder.is_prepared():
                say(f"  synthetic/{name}: already built in {builder.data_dir}")
                continue
            t0 = time.time()
            c = builder.builder_config
            say(f"  synthetic/{name}: generating {c.num_train + c.num_val + c.num_test:,} videos and their captions")
            with _without_download_wording():
                builder.download_and_prepare()
        counts = ", ".join(f"{s} {builder.info.splits[s].num_examples}" for s in builder.info.splits)
        say(f"  synthetic/{name}: built ({counts} videos) in {time.time() - t0:.1f}s")


@contextlib.contextmanager
def _without_download_wording():
    """TFDS preparing a generated dataset, minus what reads as a download: no progress bars (`Shuffling
    …incomplete…`), no `Downloading and preparing dataset Unknown size` (TFDS prints it to stdout)."""
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(True)


# ----------------------------------------------------------------------------- saved results
def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2))


def write_results(path: str, results: dict) -> str:
    """Write the demo's results (results.json, sweep.json) -> how long they took, for its last line.

    A re-run that reused every stage finds the same results in `path` and keeps their
    `wall_seconds_this_run`: the time of the run that made them, not of the one that only read them.
    """
    previous = read_json(path) if os.path.exists(path) else None
    now = json.loads(json.dumps(results))  # as it reads back
    if previous is not None and all(previous.get(k) == v for k, v in now.items()
                                    if k not in ("wall_seconds_this_run", "machine")):
        results["wall_seconds_this_run"] = previous["wall_seconds_this_run"]
        took = f"every stage reused; {results['wall_seconds_this_run']:.0f}s when they ran"
    else:
        took = f"{results['wall_seconds_this_run']:.0f}s this run"
    write_json(path, results)
    return took


def config_key(cfg) -> str:
    """What a saved stage result depends on: its config minus paths and logging knobs (config.PLACE_FIELDS)."""
    d = cfg.to_dict()
    for name in config_lib.PLACE_FIELDS:
        *sections, key = name.split(".")
        node = d
        for sec in sections:
            node = node.get(sec, {})
        node.pop(key, None)
    return json.dumps(d, sort_keys=True, default=str)


def cached(path: str, cfg):
    """The saved result of a stage if it was made with this very config; None if there is none."""
    if not os.path.exists(path):
        return None
    saved = read_json(path)
    if saved.get("config") != config_key(cfg):
        raise ValueError(f"{path} was made with a different configuration; use another --workdir "
                         "(or delete that folder) to run the demo with this one")
    return saved


def _claim(run_dir: str, cfg) -> None:
    """Mark run_dir as this stage config's (before training), so a resumed run cannot mix configs."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "demo_stage_config.json")
    if os.path.exists(path):
        cached(path, cfg)
    else:
        write_json(path, {"config": config_key(cfg)})


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _run_checkpoint_bytes(workdir: str) -> int:
    """On-disk size of the trained parameters in the run's latest checkpoint (what a task stores)."""
    ckpt_dir = checkpoint.checkpoint_dir(workdir)
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
    if not steps:
        return 0
    return _dir_bytes(os.path.join(ckpt_dir, str(max(steps)), "params"))


def _param_counts(model, run) -> dict:
    total, cfg = count(nnx.state(model, nnx.Param)), run.config
    trainable = 0 if not run.method.trains else count(
        nnx.state(model, optim.trainable_filter(cfg.method, cfg.model.train_logit_scale)))
    return {"total_params": int(total), "trainable_params": int(trainable),
            "trainable_percent": 100.0 * trainable / total}


def _history(workdir: str) -> list[dict]:
    """The run's whole per-step history (resumes included)."""
    return [{k: h[k] for k in ("step", "loss", "step_time")} for h in train.read_history(workdir)]


# ----------------------------------------------------------------------------- stage 2: pre-training
def pretrain(config, workdir: str, data_dir: str) -> tuple[str, dict]:
    """Pre-train the small CLIP (or reuse it) -> (backbone checkpoint path, summary)."""
    backbone = os.path.join(workdir, "backbone")
    run_dir = os.path.join(workdir, "pretrain")
    summary_path = os.path.join(run_dir, "demo_summary.json")
    cfg = stage_config(config, "pretrain", data_dir)
    summary = cached(summary_path, cfg) if os.path.isdir(backbone) else None
    if summary is not None:
        say(f"  reusing the pre-trained backbone {backbone}")
        return backbone, summary
    _claim(run_dir, cfg)
    t0 = time.time()
    scratch = loader.Backbone.random(loader.clip_config(cfg), cfg.data.tokenizer)  # on purpose
    run = run_lib.resolve(cfg, run_dir, backbone=scratch)
    try:
        model, _ = train.train(run)
    finally:
        run.close()
    checkpoint.save_backbone(backbone, scratch.clip, jax.device_get(state.backbone_state(model)),
                             tokenizer_files=(cfg.data.tokenizer,), overwrite=True)
    # How well it does on its own task (pretrain val): the backbone is a working CLIP.
    eval_run = run_lib.resolve(stage_config(config, "pretrain_eval", data_dir), run_dir, backbone=scratch)
    try:
        val = evaluator.evaluate_from_config(eval_run, model)
    finally:
        eval_run.close()
    summary = {"config": config_key(cfg), "seconds": time.time() - t0, "history": _history(run_dir),
               "val_metrics": val["metrics"], **_param_counts(model, run)}
    write_json(summary_path, summary)
    m = val["metrics"]
    say(f"  pre-trained in {summary['seconds']:.0f}s; on pretrain/val: t2v R@1 {m['t2v']['R1']:.1f}, "
        f"v2t R@1 {m['v2t']['R1']:.1f}")
    return backbone, summary


# ----------------------------------------------------------------------------- stage 3: one run
def evaluators(config, data_dir: str, backbone: str, splits) -> tuple[loader.Backbone, dict]:
    """The backbone folder resolved with its weights (loaded once, shared by every run) and one
    `evaluator.Evaluator` per split of `splits` (None: skipped), built once and run by every run."""
    shared = loader.with_weights(loader.resolve(backbone))
    base = run_lib.resolve(stage_config(config, "zero_shot", data_dir, backbone), backbone=shared)
    return shared, {split: evaluator.Evaluator(base, split) for split in splits if split is not None}


def train_and_test(cfg, stage: str, run_dir: str, backbone: loader.Backbone, test_set: evaluator.Evaluator,
                   val_set: evaluator.Evaluator | None = None, *,
                   val_checks: int = 0, test_name: str = "test") -> dict:
    """One run of `stage` (train unless zero-shot, then test) -> its record, saved in run_dir and reused.

    backbone, test_set, val_set: from `evaluators` (built once, shared by every run); val_set is also evaluated.
    val_checks > 0 chooses the checkpoint on val (early stopping): val t2v R@1 every num_steps /
    val_checks steps and at the end; `metrics` are then the test metrics of the best val step (the
    earliest of ties) and `selection.final_metrics` those of the last step. Such a run restarts
    from scratch when it was interrupted (its val history would be incomplete). `test_name` names the
    split `test_set` holds in the run's reports.
    """
    record_path = os.path.join(run_dir, RECORD)
    if val_checks and stage != "zero_shot":
        cfg = ml_collections.ConfigDict(cfg.to_dict())
        cfg.train.eval_every_steps = max(1, cfg.train.num_steps // val_checks)
    record = cached(record_path, cfg)
    if record is not None:
        return record
    if val_checks and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    _claim(run_dir, cfg)
    t0 = time.time()
    history, curve, best = [], [], {"r1": -1.0}

    def check_on_val(model, step):
        r1 = val_set.run(model, name="val")["metrics"]["t2v"]["R1"]
        curve.append({"step": step, "t2v_R1": r1})
        if r1 > best["r1"]:
            trainable = optim.trainable_filter(cfg.method, cfg.model.train_logit_scale)
            best.update(r1=r1, step=step, params=jax.device_get(nnx.state(model, trainable)))

    run = run_lib.resolve(cfg, run_dir, backbone=backbone)
    try:
        if stage == "zero_shot":
            model, _ = loader.from_run(run)
        else:
            model, _ = train.train(run, eval_fn=check_on_val if val_checks else None)
            history = _history(run_dir)
    finally:
        run.close()
    train_seconds = time.time() - t0
    record = {"config": config_key(cfg), "method": stage, "name": rows()[stage], "seed": cfg.seed,
              "data": cfg.data.builder_config, "num_steps": len(history), "batch_size": cfg.train.batch_size,
              **_param_counts(model, run)}
    metrics = test_set.run(model, workdir=run_dir, name=test_name)["metrics"]
    if val_checks and stage != "zero_shot":
        check_on_val(model, len(history))
        final = metrics
        if best["step"] != len(history):
            nnx.update(model, best["params"])
            metrics = test_set.run(model)["metrics"]
        record["selection"] = {"best_step": best["step"], "val_t2v_R1": curve, "final_metrics": final}
    times = [h["step_time"] for h in history[1:]]  # the first step includes compilation
    record.update({
        "metrics": metrics, "num_videos": test_set.num_videos,
        "step_time_s": float(np.median(times)) if times else None,
        "checkpoint_bytes": _run_checkpoint_bytes(run_dir) if history else 0,
        "train_seconds": train_seconds if history else 0.0, "history": history,
    })
    if val_set is not None and not val_checks:
        record["val_metrics"] = val_set.run(model, name="val")["metrics"]
    write_json(record_path, record)
    return record


# ----------------------------------------------------------------------------- summaries
def machine() -> dict:
    """Where the numbers were measured: XLA's CPU code (and so the last digits of results) differs by CPU."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"devices": f"{jax.device_count()} x {jax.devices()[0].platform}", "cpu": cpu,
            "cpu_count": os.cpu_count(), "jax": jax.__version__}


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def metrics_mean_std(metrics: list[dict]) -> tuple[dict, dict]:
    """Per-metric mean and std over runs: ({direction: {metric: mean}}, the same for std)."""
    stats = {d: {k: mean_std([m[d][k] for m in metrics]) for k in metrics[0][d]} for d in metrics[0]}
    return ({d: {k: s[0] for k, s in v.items()} for d, v in stats.items()},
            {d: {k: s[1] for k, s in v.items()} for d, v in stats.items()})


def pm(mean: float, std: float, n: int, digits: int = 1) -> str:
    """'48.6 ± 0.3' over n > 1 runs, '48.6' for one."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"
