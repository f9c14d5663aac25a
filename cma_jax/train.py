"""Training: the update step, built once and jitted with shardings, and the loop around it (checkpoints,
resume, logging, evaluation): `train` and `train_and_evaluate`; docs/training.md describes a run.
"""

from __future__ import annotations

import collections
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from cma_jax import checkpoint as ckpt_lib
from cma_jax import config as config_lib
from cma_jax import evaluator as evaluator_lib
from cma_jax import gradcache, loader, lock, optim, paths
from cma_jax import sharding as shd
from cma_jax.data import pipeline
from cma_jax.errors import TrainingDiverged
from cma_jax.models.summary import count
from cma_jax.optim import TrainState

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- update step
def make_train_step(graphdef, tx, lr_fn, grad_accum_steps: int, micro_sharding=None):
    """The pure step `(state: TrainState, frozen, batch) -> (state, metrics)`.

    Gradients are taken w.r.t. `state.params` only: the frozen weights enter as constants, so
    no weight gradient is ever computed for them (only the activation gradients the adapters need).
    With grad_accum_steps = k the loss is still the InfoNCE over the whole batch, computed in k
    micro-batches (rows i::k, so each stays spread over all data-parallel devices) by gradient
    caching (cma_jax.gradcache): the exact full-batch gradient with one micro-batch's activations.
    """

    def loss_fn(params, rngs, frozen, batch):
        model = nnx.merge(graphdef, params, rngs, frozen, copy=True)  # dropout RNG counts are traced here
        loss = model(batch)
        return loss, nnx.state(model, nnx.RngState)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, frozen, batch):
        params = state.params
        if grad_accum_steps == 1:
            (loss, rngs), grads = grad_fn(params, state.rngs, frozen, batch)
        else:
            (loss, rngs), grads = gradcache.value_and_grad(graphdef, params, state.rngs, frozen, batch,
                                                           grad_accum_steps, micro_sharding)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        new = TrainState(params=optim.clamp_logit_scale(optax.apply_updates(params, updates)), opt_state=opt_state,
                         rngs=rngs, step=state.step + 1)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(state.step)}
        return new, metrics

    return step


def build_step(run, graphdef, params, rngs, frozen, num_steps: int):
    """The jitted, donated train step of a run -> (step_fn, state_shardings, frozen_shardings, tx, lr_fn).

    The one used by training (`train`) and by the ahead-of-time compile command: from the run's mesh and
    config.train and the model's split state (`optim.split`), which may be abstract (jax.ShapeDtypeStruct,
    nnx.eval_shape output): nothing is allocated. `step_fn(state: TrainState, frozen, batch)` has explicit
    shardings: parameters and optimizer state by the shape rule (cma_jax.sharding), RNG state and step
    replicated, the batch on the data axes; the train state's buffers are donated.
    """
    mesh, t = run.mesh, run.config.train
    tx, lr_fn = optim.make_optimizer(t, params, num_steps)
    rep = shd.replicated(mesh)
    frozen_sh = shd.tree_shardings(frozen, mesh)
    state_sh = TrainState(params=shd.tree_shardings(params, mesh),
                          opt_state=shd.tree_shardings(jax.eval_shape(tx.init, params), mesh),
                          rngs=jax.tree.map(lambda _: rep, rngs), step=rep)
    micro_sharding = None
    if t.grad_accum_steps > 1:
        micro_sharding = lambda ndim: jax.sharding.NamedSharding(  # noqa: E731
            mesh, jax.sharding.PartitionSpec(None, shd.BATCH_AXES, *([None] * (ndim - 2))))
    step = make_train_step(graphdef, tx, lr_fn, t.grad_accum_steps, micro_sharding)
    step_fn = jax.jit(step, in_shardings=(state_sh, frozen_sh, shd.batch_sharding(mesh)),
                      out_shardings=(state_sh, {"loss": rep, "grad_norm": rep, "lr": rep}), donate_argnums=(0,))
    return step_fn, state_sh, frozen_sh, tx, lr_fn


# ----------------------------------------------------------------------------- data
def num_train_steps(config, train_iter) -> int:
    if config.train.num_steps > 0:
        return config.train.num_steps
    per_epoch = getattr(train_iter, "steps_per_epoch", None)
    if not per_epoch:
        raise ValueError("config.train.num_steps is 0 and the training iterator does not report "
                         "steps_per_epoch; set config.train.num_steps")
    return int(config.train.epochs * per_epoch)


def _iterator_state(state, consumed: int):
    """What a checkpoint saves of the data after `consumed` batches: the iterator's own state
    (`get_state()`, None if it has none), else the count `_restore_iterator` skips."""
    return state if state is not None else {"batches_consumed": consumed}


def _restore_iterator(it, state):
    if hasattr(it, "set_state"):
        it.set_state(state)
    else:  # deterministic iterator without state: skip what was already trained on
        for _ in range(state["batches_consumed"]):
            next(it)


# ----------------------------------------------------------------------------- loop
def read_history(workdir: str) -> list[dict]:
    """Every step logged in `workdir` across runs and resumes (a re-run step keeps its last record)."""
    file = paths.Workdir(workdir).history
    if not file.exists():
        return []
    records = {}
    for line in file.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            records[rec["step"]] = rec
    return [records[k] for k in sorted(records)]


# A run that spends this share of its time waiting for batches is reported as input-bound.
INPUT_BOUND = 0.1


class _Logger:
    """Log lines, TensorBoard scalars (the program's one writer), and the per-step history (process 0).

    Each step's record is also appended to WORKDIR/history.jsonl as it happens, so the curve of a
    run that was interrupted and resumed is complete (`read_history`). An object store cannot append:
    on a remote workdir the file is written again, whole, when the run ends.
    """

    def __init__(self, workdir, config, num_steps, start, writer):
        self.history = []
        self.every = config.train.log_every_steps
        self.examples = config.train.batch_size
        self.writer, self.file, self.remote_history = writer, None, None
        self.waited = self.stepped = 0.0  # seconds waiting for batches / in steps, after the first step
        if jax.process_index() == 0:
            history = paths.Workdir(workdir).history
            if paths.is_remote(history):
                self.remote_history = history
            else:
                self.file = open(history, "a")
        self.bar = None
        if config.train.progress_bar and jax.process_index() == 0:
            self.bar = tqdm(total=num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def step(self, step, metrics, seconds, wait):
        """One step's record: its metrics, `seconds` of step and `wait` seconds waiting for its batch before."""
        m = {k: float(v) for k, v in metrics.items()}
        rec = {"step": step, **m, "step_time": seconds, "examples_per_s": self.examples / max(seconds, 1e-9),
               "data_wait": wait, "data_wait_share": wait / max(wait + seconds, 1e-9)}
        self.history.append(rec)
        if len(self.history) > 1:  # the first step of a run compiles: not what the input pipeline competes with
            self.waited += wait
            self.stepped += seconds
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.writer is not None:
            for k in ("loss", "lr", "grad_norm", "step_time", "examples_per_s", "data_wait", "data_wait_share"):
                self.writer.add_scalar(f"train/{k}", rec[k], step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", refresh=False)
        if step % self.every == 0:
            log.info("step %d loss %.5f lr %.3e grad_norm %.3f step %.3fs %.1f examples/s, waited %.3fs for the "
                     "batch (%.0f %%)", step, m["loss"], m["lr"], m["grad_norm"], seconds, rec["examples_per_s"],
                     wait, 100 * rec["data_wait_share"])

    def summary(self) -> str:
        """How much of the time after the first step went to waiting for batches; 'input-bound: ...' from
        INPUT_BOUND on."""
        share = self.waited / max(self.waited + self.stepped, 1e-9)
        if share >= INPUT_BOUND:
            return (f"input-bound: {100 * share:.0f} % of the time waiting for the next batch ({self.waited:.1f} s "
                    f"of {self.waited + self.stepped:.1f} s): more input workers (config.data.workers) or cores")
        return f"data wait: {100 * share:.1f} % of the time ({self.waited:.1f} s of {self.waited + self.stepped:.1f} s)"

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
        if self.file is not None:
            self.file.close()
        if self.remote_history is not None and self.history:
            before = self.remote_history.read_text() if self.remote_history.exists() else ""
            self.remote_history.write_text(before + "".join(json.dumps(r) + "\n" for r in self.history))


def train(run, train_iter=None, eval_fn=None):
    """Train `run` (a `cma_jax.run.Run`) in run.workdir, resuming from its last checkpoint -> (model, history).

    train_iter: any iterator of this process's rows of each global batch (default: config.data's grain
    pipeline), resumed exactly through `get_state()` / `set_state()` (grain's) or else by skipping the
    batches already trained on, with `steps_per_epoch` for `train.num_steps = 0`; a Ctrl-C saves the step
    it interrupted; eval_fn(model, step) is called every train.eval_every_steps (if > 0). The returned
    model holds the trained parameters; history is one dict per step run here (step, loss, lr, grad_norm,
    step_time, examples_per_s, data_wait: seconds waiting for the step's batch, data_wait_share of
    wait + step). Batches are put on the mesh ahead by `sharding.Prefetcher`. TensorBoard scalars go to
    run.writer; the end says how much of the time went to waiting ('input-bound: ...' from 10 %).
    """
    if not run.method.trains:
        raise ValueError(f"config.method={run.config.method} has nothing to train; use config.mode=eval")
    paths.path(run.workdir).mkdir(parents=True, exist_ok=True)
    with lock.workdir_lock(run.workdir):  # one run per workdir
        return _train(run, train_iter, eval_fn)


def _train(run, train_iter, eval_fn):
    config, workdir, mesh = run.config, run.workdir, run.mesh
    # ------------------------------------------------------------------------- model and optimizer
    model, _ = loader.from_run(run)
    train_ls = bool(config.model.train_logit_scale)
    graphdef, params, rngs, frozen = optim.split(model, run.method, train_ls)
    own_iter = train_iter is None
    if own_iter:
        train_iter = pipeline.train_iterator_from_config(config, loader.require_tokenizer(run))
    num_steps = num_train_steps(config, train_iter)
    total, trainable = count(nnx.state(model, nnx.Param)), count(params)
    log.info("parameters: %s total, %s trainable (%.3f %%), method=%s", f"{total:,}", f"{trainable:,}",
             100.0 * trainable / total, config.method)
    meta = ckpt_lib.run_meta(model, train_ls, data=config.data, training=config_lib.training_settings(config))
    del model  # its arrays are the unsharded copies; the step uses the sharded ones

    # ------------------------------------------------------------------------- update step and shardings
    step_fn, state_sh, frozen_sh, tx, _ = build_step(run, graphdef, params, rngs, frozen, num_steps)
    rep = shd.replicated(mesh)
    params = shd.shard_tree(params, state_sh.params)
    frozen = shd.shard_tree(frozen, frozen_sh)
    state = TrainState(params=params, opt_state=jax.jit(tx.init, out_shardings=state_sh.opt_state)(params),
                       rngs=shd.shard_tree(rngs, state_sh.rngs), step=jax.device_put(jnp.int32(0), rep))

    # ------------------------------------------------------------------------- checkpoint (resume)
    ckpt = ckpt_lib.RunCheckpointer(workdir, keep=config.train.keep_checkpoints)
    start = 0
    found = ckpt.restore_latest(ckpt_lib.abstract(state, state_sh), meta, config.train.allow_config_change)
    if found is not None:
        restored, data_state, start = found
        state = restored.replace(step=jax.device_put(jnp.int32(start), rep))
        _restore_iterator(train_iter, data_state)
        log.info("resumed from %s at step %d", ckpt.directory, start)

    # ------------------------------------------------------------------------- loop
    logger = _Logger(workdir, config, num_steps, start, run.writer)
    # The iterator state that goes with a model at each step: at an interrupt the state's own step
    # (done before or after the interrupted wait) picks the matching one (_save_on_interrupt). The
    # prefetcher reads ahead, so the state comes with each batch, not from the iterator.
    data_state = _iterator_state(train_iter.get_state() if hasattr(train_iter, "get_state") else None, start)
    batches = shd.Prefetcher(train_iter, mesh, count=num_steps - start)
    step, data_at = start, {}
    guard = _DivergenceGuard(config.train.max_loss_ratio)
    try:
        while step < num_steps:
            data_at = {step: data_state}
            t_wait = time.perf_counter()
            batch, after = next(batches)  # on the mesh already: put there while the last step ran
            t0 = time.perf_counter()
            data_state = data_at[step + 1] = _iterator_state(after, step + 1)
            state, metrics = step_fn(state, frozen, batch)
            metrics = jax.device_get(metrics)  # waits for the step: honest step times
            step += 1
            guard.check(step, metrics, ckpt.latest_step)  # before anything of this state is saved or logged
            logger.step(step, metrics, time.perf_counter() - t0, t0 - t_wait)
            if step % config.train.save_every_steps == 0 or step == num_steps:
                ckpt.save(step, state, data_state, meta, force=step == num_steps, loss=guard.mean_since_save())
            if eval_fn is not None and config.train.eval_every_steps and step % config.train.eval_every_steps == 0 \
                    and step < num_steps:
                eval_fn(nnx.merge(graphdef, state.params, state.rngs, frozen), step)
        if len(logger.history) > 1:
            log.info("%s", logger.summary())
    except KeyboardInterrupt:
        if guard.healthy:
            _save_on_interrupt(ckpt, state, data_at, meta, guard.mean_since_save())
        raise
    finally:
        batches.close()  # before the iterator it reads from
        ckpt.wait()
        ckpt.close()
        logger.close()
        if own_iter and hasattr(train_iter, "close"):
            train_iter.close()
    return nnx.merge(graphdef, state.params, state.rngs, frozen), logger.history


def _save_on_interrupt(ckpt, state: TrainState, data_at, meta, loss):
    """Best effort: save the last consistent (state, iterator) pair unless it is already saved.

    `data_at[s]` is the iterator state that goes with a model at step s for the step the loop was
    in; the interrupt may come before or after that step's update, so the state's own step decides.
    """
    try:
        done = int(jax.device_get(state.step))
    except RuntimeError:  # the interrupted call had already donated the state: periodic saves remain
        log.warning("interrupted inside a step; resume will start from the last periodic checkpoint")
        return
    if done == ckpt.latest_step() or done == 0:
        return
    if done not in data_at:  # not the step the loop was in: no iterator state known to match it
        log.warning("interrupted at step %d without its data position; resume starts from the last periodic "
                    "checkpoint", done)
        return
    ckpt.save(done, state, data_at[done], meta, force=True, loss=loss)
    log.warning("interrupted: saved step %d to %s", done, ckpt.directory)


class _DivergenceGuard:
    """Stops the run (TrainingDiverged) at a non-finite loss or gradient norm, or a loss spike."""

    WINDOW = 100

    def __init__(self, max_loss_ratio: float):
        self.ratio = max_loss_ratio
        self.recent, self.since_save = collections.deque(maxlen=self.WINDOW), []
        self.healthy = True

    def check(self, step: int, metrics: dict, last_saved) -> None:
        """`last_saved()` gives the newest checkpoint's step (asked only when the run must stop)."""
        loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
        problem = None
        if not (np.isfinite(loss) and np.isfinite(gnorm)):
            problem = f"loss {loss} / gradient norm {gnorm} is not finite"
        elif self.ratio and len(self.recent) >= 10 and loss > self.ratio * float(np.median(self.recent)):
            problem = (f"loss {loss:.4g} is over {self.ratio:g}x the median {np.median(self.recent):.4g} of the last "
                       f"{len(self.recent)} steps (config.train.max_loss_ratio)")
        if problem is not None:
            self.healthy = False
            fix = "a lower --config.train.lr (the usual cause) or a --config.train.grad_clip"
            saved = last_saved()
            next_step = (f"the last checkpoint, step {saved}, is intact: run the same command with {fix} "
                         "(and --config.train.allow_config_change=True) to resume from it" if saved else
                         f"no checkpoint was saved yet: start again with {fix}")
            raise TrainingDiverged(f"training diverged at step {step}: {problem}. Nothing of this step was saved; "
                                   f"{next_step}")
        self.recent.append(loss)
        self.since_save.append(loss)

    def mean_since_save(self) -> float | None:
        """The mean loss since the previous save (then starts a new window)."""
        out = float(np.mean(self.since_save)) if self.since_save else None
        self.since_save = []
        return out


# ----------------------------------------------------------------------------- train and evaluate
def train_and_evaluate(run):
    """The program `python -m cma_jax.main` runs on a resolved `cma_jax.run.Run`: train and/or evaluate as
    config.mode says.

    Evaluation (cma_jax.evaluator) runs on config.data.eval_split at the end of training and every
    train.eval_every_steps; mode=eval loads the backbone plus, unless zero-shot, the trained
    parameters of config.adapter_checkpoint (default: the workdir's latest run checkpoint).
    Returns the final evaluation results (None for mode=train).
    """
    config = run.config
    evaluate_now = config.mode in ("eval", "train_and_eval")
    # Built once: the periodic evaluations during training and the final one share its data and tokenizer.
    evaluator = evaluator_lib.Evaluator(run) if evaluate_now or config.train.eval_every_steps else None
    model, step = None, None
    if config.mode in ("train", "train_and_eval"):
        def eval_fn(model, step):
            evaluator.run(model, step, workdir=run.workdir, writer=run.writer)
        model, history = train(run, eval_fn=eval_fn if evaluator is not None else None)
        step = history[-1]["step"] if history else None
    if not evaluate_now:
        return None
    if model is None:
        model, step = evaluator_lib.trained_model(run)
    return evaluator.run(model, step, workdir=run.workdir, writer=run.writer)
