"""Device prefetch (the host iterator's batches and states, in order, read ahead while steps run) and the data
wait every training step records."""

import logging
import re
import time

import numpy as np
import pytest

from cma_jax import run as run_lib
from cma_jax import sharding as shd
from cma_jax import train as train_lib
from test_tb import tb_scalars
from tiny import SyntheticBatches, tiny_config


class SlowBatches(SyntheticBatches):
    """SyntheticBatches whose every batch takes `seconds` to make (a slow input pipeline)."""

    def __init__(self, config, seconds, **kw):
        super().__init__(config, **kw)
        self.seconds = seconds

    def __next__(self):
        time.sleep(self.seconds)
        return super().__next__()


@pytest.fixture(scope="module")
def config():
    return tiny_config()


def test_prefetched_batches_and_states_follow_the_host_iterator(config):
    mesh = shd.make_mesh(config)
    host = SyntheticBatches(config)
    host.set_state({"i": 2})
    batches = shd.Prefetcher(host, mesh, count=3)
    got = list(batches)
    batches.close()
    assert [state for _, state in got] == [{"i": 3}, {"i": 4}, {"i": 5}]
    assert host.i == 5  # no batch read past `count`
    for i, (batch, _) in enumerate(got, start=2):
        want = SyntheticBatches(config).global_batch(i)
        assert batch["frames"].sharding == shd.batch_sharding(mesh)
        for key in want:
            np.testing.assert_array_equal(np.asarray(batch[key]), want[key])


def test_an_error_of_the_host_iterator_is_raised_at_its_batch(config):
    batches = shd.Prefetcher(SyntheticBatches(config, fail_at=2, exc=ValueError), shd.make_mesh(config))
    next(batches), next(batches)
    with pytest.raises(ValueError, match="simulated"):
        next(batches)
    with pytest.raises(StopIteration):
        next(batches)
    batches.close()


def test_the_next_batch_is_ready_when_the_step_ends(config):
    """A 0.2 s pipeline and 0.3 s steps: after the first batch, taking the next one waits ~0 with the
    prefetcher and the whole 0.2 s without it."""
    def waits(batches):
        out = []
        for _ in range(4):
            t0 = time.perf_counter()
            next(batches)
            out.append(time.perf_counter() - t0)
            time.sleep(0.3)  # the step
        return out

    prefetched = shd.Prefetcher(SlowBatches(config, 0.2), shd.make_mesh(config), count=4)
    ahead = waits(prefetched)
    prefetched.close()
    direct = waits(SlowBatches(config, 0.2))
    assert ahead[0] > 0.15 and max(ahead[1:]) < 0.1, ahead
    assert min(direct) > 0.19, direct


def _train_and_read(config, workdir, batches):
    """Trains; (the records of history.jsonl, the TensorBoard values of train/data_wait_share)."""
    _, history = train_lib.train(run_lib.resolve(config, workdir), train_iter=batches)
    assert train_lib.read_history(workdir) == history
    return history, tb_scalars(workdir, "train/data_wait_share")


@pytest.mark.slow
def test_a_slow_pipeline_shows_in_the_data_wait_and_the_summary(tmp_path, caplog):
    """0.5 s per batch against ~0.05 s steps: once the 3 batches made during the first step's compile are
    used up (steps 2-4), every step waits ~0.5 s, and the run says it is input-bound (the fast case:
    test_train.py)."""
    caplog.set_level(logging.INFO)
    config = tiny_config(save_every_steps=10, num_steps=6)  # a checkpoint save between steps would hide the wait
    history, tb_waits = _train_and_read(config, str(tmp_path), SlowBatches(config, 0.5))
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert tb_waits == pytest.approx([h["data_wait_share"] for h in history])
    assert all(h["data_wait"] > 0.3 and h["data_wait_share"] > 0.5 for h in history[4:]), history
    assert re.search(r"input-bound: \d+ % of the time waiting for the next batch", caplog.text)
