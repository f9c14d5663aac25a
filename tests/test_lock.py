"""The workdir lock: one run per workdir; stale locks are taken over; other hosts are not judged.

run.lock is the kernel lock (filelock); run.lock.json names its holder (host, pid, start time).
"""

import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys

import pytest

from cma_jax import lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = """
import sys, time
from cma_jax import lock
with lock.workdir_lock(sys.argv[1], is_leader=True):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A real other process holding the lock of tmp_path/run."""
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, workdir], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield workdir, proc
    finally:
        proc.kill()
        proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_lock_is_refused_naming_its_process(holder):
    workdir, proc = holder
    with pytest.raises(lock.WorkdirLockedError) as e:
        with lock.workdir_lock(workdir, is_leader=True):
            pass
    msg = str(e.value)
    assert "\n" not in msg
    assert f"workdir {workdir} is in use by another run (host {socket.gethostname()}, pid {proc.pid}, started " in msg
    assert f"lock file {workdir}/run.lock" in msg
    assert isinstance(e.value, OSError)  # cma_jax.main prints it as one `error:` line


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(holder, caplog):
    workdir, proc = holder
    proc.kill()  # kill -9: no cleanup, the file stays behind naming a dead pid
    proc.wait()
    with caplog.at_level(logging.WARNING, logger="cma_jax.lock"):
        with lock.workdir_lock(workdir, is_leader=True):
            with open(os.path.join(workdir, "run.lock.json")) as f:
                assert json.load(f)["pid"] == os.getpid()
    assert f"taking over the stale lock of workdir {workdir}" in caplog.text
    assert f"pid {proc.pid}" in caplog.text


def test_a_stale_pid_on_this_host_is_taken_over(tmp_path, caplog):
    pid = _dead_pid()
    (tmp_path / "run.lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "then"}))
    with caplog.at_level(logging.WARNING, logger="cma_jax.lock"):
        with lock.workdir_lock(str(tmp_path), is_leader=True):
            pass
    assert f"no longer running (host {socket.gethostname()}, pid {pid}, started then)" in caplog.text


def test_a_lock_from_another_host_is_not_judged_dead(tmp_path):
    path = tmp_path / "run.lock.json"
    path.write_text(json.dumps({"host": "node-17", "pid": 4242, "started": "2025-01-01 00:00:00 UTC"}))
    with pytest.raises(lock.WorkdirLockedError, match="locked by a run on another host "
                       r"\(host node-17, pid 4242, started 2025-01-01 00:00:00 UTC\)") as e:
        with lock.workdir_lock(str(tmp_path), is_leader=True):
            pass
    assert f"if it is not, delete {path} by hand" in str(e.value)
    assert json.loads(path.read_text())["host"] == "node-17"  # left as it was


def test_released_on_exit_and_on_ctrl_c(tmp_path):
    path = tmp_path / "run.lock.json"
    with lock.workdir_lock(str(tmp_path), is_leader=True):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()
    with pytest.raises(KeyboardInterrupt):
        with lock.workdir_lock(str(tmp_path), is_leader=True):
            raise KeyboardInterrupt
    assert not path.exists()
    with lock.workdir_lock(str(tmp_path), is_leader=True):  # free again, no warning needed
        pass


def test_a_second_lock_in_the_same_process_is_refused_and_the_first_kept(tmp_path):
    with lock.workdir_lock(str(tmp_path), is_leader=True):
        with pytest.raises(lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
            with lock.workdir_lock(str(tmp_path), is_leader=True):
                pass
        assert json.loads((tmp_path / "run.lock.json").read_text())["pid"] == os.getpid()


def test_only_the_leader_locks(holder):
    workdir, _ = holder
    with lock.workdir_lock(workdir, is_leader=False):  # not process 0: neither takes nor checks it
        pass


def test_a_remote_workdir_is_not_locked(caplog):
    with caplog.at_level(logging.WARNING, logger="cma_jax.lock"):
        with lock.workdir_lock("gs://bucket/runs/x", is_leader=True):
            pass
    assert "workdir gs://bucket/runs/x is remote: it cannot be locked" in caplog.text


def _race(workdir, barrier, release, results):
    barrier.wait()
    try:
        with lock.workdir_lock(workdir, is_leader=True):
            results.put(("won", os.getpid()))
            release.wait(60)
    except lock.WorkdirLockedError as e:
        results.put(("refused", str(e)))


def test_two_racing_processes_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs JAX threads
    barrier, release, results = ctx.Barrier(2), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, release, results)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        outcomes = dict([results.get(timeout=120), results.get(timeout=120)])
    finally:
        release.set()
        for p in procs:
            p.join(60)
    assert sorted(outcomes) == ["refused", "won"]
    assert f"pid {outcomes['won']}," in outcomes["refused"]
    assert [p.exitcode for p in procs] == [0, 0]
    assert not (tmp_path / "run.lock.json").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_refusal_on_process_0_stops_every_process(holder):
    """Two JAX processes: process 0 is refused, and process 1 learns it instead of waiting forever."""
    workdir, _ = holder
    script = ("import sys, jax\n"
              "flags = dict(a[2:].split('=', 1) for a in sys.argv[1:])\n"
              "jax.config.update('jax_cpu_collectives_implementation', 'gloo')\n"
              "jax.distributed.initialize(flags['coordinator_address'], int(flags['num_processes']), "
              "int(flags['process_id']))\n"
              "from cma_jax import lock\n"
              "try:\n"
              f"    with lock.workdir_lock({workdir!r}):\n"
              "        print('locked')\n"
              "except lock.WorkdirLockedError as e:\n"
              "    print('refused:', e)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes=2", "--",
                        sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"[0] refused: workdir {workdir} is in use by another run" in p.stdout
    assert f"[1] refused: process 0 could not lock workdir {workdir}" in p.stdout
