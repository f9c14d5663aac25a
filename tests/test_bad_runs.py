"""Runs that go wrong keep the last good state: divergence, concurrent runs, changed configs, damaged checkpoints."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from cma_jax import checkpoint as ckpt_lib
from cma_jax import lock
from cma_jax import run as run_lib
from cma_jax import train as train_lib
from cma_jax.errors import CheckpointError, CheckpointMismatch, TrainingDiverged
from cma_jax.models.peft.adapter import AdapterParam
from tiny import SyntheticBatches, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PoisonedBatches(SyntheticBatches):
    """SyntheticBatches whose batches from `poison_at` on carry NaN frames (a corrupt input or a blown-up model)."""

    def __init__(self, config, poison_at, **kw):
        super().__init__(config, **kw)
        self.poison_at = poison_at

    def __next__(self):
        poisoned = self.i >= self.poison_at
        b = super().__next__()
        if poisoned:
            b["frames"] = np.full(b["frames"].shape, np.nan, np.float32)
        return b


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit())


def test_non_finite_loss_stops_before_saving_and_names_the_step(tmp_path):
    config = tiny_config(num_steps=10, save_every_steps=2)
    workdir = str(tmp_path)
    with pytest.raises(TrainingDiverged) as e:
        train_lib.train(run_lib.resolve(config, workdir), train_iter=PoisonedBatches(config, poison_at=5))
    msg = str(e.value)
    assert msg.startswith("training diverged at step 6: loss nan")
    assert "the last checkpoint, step 4, is intact: run the same command with a lower --config.train.lr" in msg
    assert _steps(workdir) == [2, 4]  # nothing of step 6 (nor later) reached the disk
    model = train_lib.loader.from_run(run_lib.resolve(config))[0]
    ckpt_lib.load_adapters(workdir, model)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model, AdapterParam)))


def test_loss_spike_guard_is_opt_in_and_names_the_factor():
    off = train_lib._DivergenceGuard(0.0)
    for step, loss in enumerate([1.0] * 20 + [1e6], 1):
        off.check(step, {"loss": loss, "grad_norm": 1.0}, lambda: None)  # finite: only the opt-in factor would stop it
    guard = train_lib._DivergenceGuard(3.0)
    for step in range(1, 21):
        guard.check(step, {"loss": 1.0, "grad_norm": 1.0}, lambda: 20)
    guard.check(21, {"loss": 2.9, "grad_norm": 1.0}, lambda: 20)
    with pytest.raises(TrainingDiverged, match=r"step 22: loss 3.5 is over 3x the median 1 of the last 21 steps "
                                               r"\(config.train.max_loss_ratio\)"):
        guard.check(22, {"loss": 3.5, "grad_norm": 1.0}, lambda: 20)
    assert not guard.healthy
    config = tiny_config()
    config.train.max_loss_ratio = 0.5
    with pytest.raises(ValueError, match="config.train.max_loss_ratio: must be 0 \\(off\\) or > 1"):
        run_lib.check(config)


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0])
def test_learning_rate_must_be_finite_and_positive(lr):
    config = tiny_config()
    config.train.lr = lr
    with pytest.raises(ValueError, match="config.train.lr: must be finite and > 0"):
        run_lib.check(config)


def test_best_checkpoint_is_kept_out_of_rotation(tmp_path, ):
    config = tiny_config()
    model = train_lib.loader.from_run(run_lib.resolve(config))[0]
    graphdef, params, rngs, _ = train_lib.optim.split(model, "cma")
    tx, _ = train_lib.optim.make_optimizer(config.train, params, 10)
    state = train_lib.optim.TrainState(params=params, opt_state=tx.init(params), rngs=rngs, step=0)
    meta = ckpt_lib.run_meta(model)
    ckpt = ckpt_lib.RunCheckpointer(str(tmp_path), keep=1)
    for step, loss in ((2, 3.0), (4, 1.0), (6, 2.5), (8, 2.0)):
        ckpt.save(step, state, {}, meta, force=True, loss=loss)
        ckpt.wait()
    assert _steps(str(tmp_path)) == [4, 8]  # the newest, and the lowest-loss one (step 4)
    ckpt.close()


def test_a_live_run_holds_the_workdir(tmp_path):
    workdir = str(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom cma_jax import lock\n"
         f"with lock.workdir_lock({workdir!r}, is_leader=True):\n    print('locked', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = tiny_config()
        with pytest.raises(lock.WorkdirLockedError, match=f"pid {holder.pid}"):
            train_lib.train(run_lib.resolve(config, workdir), train_iter=SyntheticBatches(config))
        assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()


def test_resuming_with_another_training_config_is_refused_unless_allowed(tmp_path):
    workdir = str(tmp_path)
    config = tiny_config()
    train_lib.train(run_lib.resolve(config, workdir), train_iter=SyntheticBatches(config))
    changed = tiny_config(num_steps=6)
    changed.train.lr = 3e-2
    with pytest.raises(CheckpointMismatch) as e:
        train_lib.train(run_lib.resolve(changed, workdir), train_iter=SyntheticBatches(changed))
    assert "config.train.lr: checkpoint 0.01, now 0.03" in str(e.value)
    assert "config.train.num_steps: checkpoint 4, now 6" in str(e.value)
    assert "--config.train.allow_config_change=True" in str(e.value)
    changed.train.allow_config_change = True
    _, history = train_lib.train(run_lib.resolve(changed, workdir), train_iter=SyntheticBatches(changed))
    assert [h["step"] for h in history] == [5, 6]


def _damage(step_dir, how):
    if how == "truncated arrays":
        for root, _, files in os.walk(os.path.join(step_dir, "params")):
            for f in files:
                path = os.path.join(root, f)
                if os.path.getsize(path) > 100:
                    with open(path, "r+b") as fh:
                        fh.truncate(os.path.getsize(path) // 2)
    elif how == "no params item":
        import shutil
        shutil.rmtree(os.path.join(step_dir, "params"))
    elif how == "garbage metadata":
        for root, _, files in os.walk(os.path.join(step_dir, "meta")):
            for f in files:
                with open(os.path.join(root, f), "w") as fh:
                    fh.write("{not json")


@pytest.mark.parametrize("how", ["truncated arrays", "no params item", "garbage metadata"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_resumes(tmp_path, caplog, how):
    workdir = str(tmp_path)
    config = tiny_config()  # checkpoints at 2 and 4
    _, full = train_lib.train(run_lib.resolve(config, workdir), train_iter=SyntheticBatches(config))
    _damage(os.path.join(workdir, "checkpoints", "4"), how)
    with caplog.at_level("WARNING"):
        _, history = train_lib.train(run_lib.resolve(config, workdir), train_iter=SyntheticBatches(config))
    assert "checkpoint step 4 in" in caplog.text and "cannot be restored" in caplog.text
    assert "resuming from step 2, the newest intact checkpoint" in caplog.text
    assert [h["step"] for h in history] == [3, 4]
    np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in full[2:]], rtol=1e-6)
    aside = os.listdir(os.path.join(workdir, "checkpoints_damaged"))
    assert len(aside) == 1 and aside[0].startswith("4-")  # kept, never deleted
    assert _steps(workdir) == [2, 4]


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    workdir = str(tmp_path)
    config = tiny_config()
    train_lib.train(run_lib.resolve(config, workdir), train_iter=SyntheticBatches(config))
    for s in (2, 4):
        _damage(os.path.join(workdir, "checkpoints", str(s)), "no params item")
    with pytest.raises(CheckpointError, match="no checkpoint could be restored: step 4 .*; step 2 "):
        train_lib.train(run_lib.resolve(config, workdir), train_iter=SyntheticBatches(config))
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "1"))
