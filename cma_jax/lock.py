"""One run per workdir: a kernel file lock (filelock) on WORKDIR/run.lock, and WORKDIR/run.lock.json naming its holder.

    with lock.workdir_lock(workdir):
        ...  # train

docs/training.md ("Two runs, one workdir") says what a second run, a killed run, another host's run, a
multi-host run and a gs:// workdir meet.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import time

import filelock
import jax
import numpy as np
from jax.experimental import multihost_utils

from cma_jax import paths

log = logging.getLogger(__name__)

# Filesystems without flock (some network and FUSE mounts) answer with one of these.
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirLockedError(OSError):
    """The workdir is in use by another run (or may be: a lock written on another host)."""


def _holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}


def _describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def _read_holder(path: str) -> dict | None:
    """The holder's record; None when there is none (not yet written, or released)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    if not text:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {"unreadable": text[:80]}
    return holder if isinstance(holder, dict) else {"unreadable": text[:80]}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # another user's process (or a pid we cannot judge): assume alive
    return True


def _refusal(workdir: str, lock_file: str, holder_file: str) -> WorkdirLockedError:
    """The message for a lock that another process holds right now."""
    holder = None
    for _ in range(20):  # it may be between taking the lock and writing its name (milliseconds)
        holder = _read_holder(holder_file)
        if holder is not None:
            break
        time.sleep(0.05)
    who = "another run" if holder is None or "unreadable" in holder else f"another run ({_describe(holder)})"
    return WorkdirLockedError(f"workdir {workdir} is in use by {who}; lock file {lock_file}. Wait for that run to "
                              "finish or stop it, or use another --workdir")


def _check_left_behind(previous: dict, holder_file: str, workdir: str) -> None:
    """A holder record that no process holds the lock for (its run was killed): take it over, or refuse."""
    here = socket.gethostname()
    if "unreadable" in previous:
        log.warning("taking over the lock of workdir %s: %s was not released and is unreadable (%r)",
                    workdir, holder_file, previous["unreadable"])
    elif previous.get("host") != here:
        # The flock of a process on another host may not be visible from here (it depends on the
        # filesystem), and its pid cannot be checked: never assume it is dead.
        raise WorkdirLockedError(
            f"workdir {workdir} is locked by a run on another host ({_describe(previous)}); lock file "
            f"{holder_file}. From {here} it cannot be told whether that run is still alive: if it is not, delete "
            f"{holder_file} by hand and start again")
    elif _pid_alive(previous.get("pid")) and previous.get("pid") != os.getpid():
        log.warning("taking over the lock of workdir %s from pid %s (started %s): that pid is running but no "
                    "longer holds the lock (a reused pid)", workdir, previous.get("pid"), previous.get("started"))
    else:
        log.warning("taking over the stale lock of workdir %s left by a run that is no longer running (%s)",
                    workdir, _describe(previous))


@contextlib.contextmanager
def _hold(workdir: str):
    """Hold the lock of a local workdir in this process (WorkdirLockedError naming the holder if taken)."""
    run = paths.Workdir(workdir)
    run.root.mkdir(parents=True, exist_ok=True)
    lock_file, holder_file = os.fspath(run.lock), os.fspath(run.holder)
    kernel_lock = filelock.FileLock(lock_file)
    try:
        kernel_lock.acquire(timeout=0)
    except filelock.Timeout:
        raise _refusal(workdir, lock_file, holder_file) from None
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
        log.warning("workdir %s: this filesystem does not support file locks (%s), so it is not locked; make "
                    "sure no other run uses it", workdir, e.strerror)
        yield
        return
    try:
        previous = _read_holder(holder_file)
        if previous is not None:
            _check_left_behind(previous, holder_file, workdir)
        with open(holder_file, "w") as f:
            f.write(json.dumps(_holder_info()) + "\n")
        try:
            yield
        finally:
            # Before the kernel lock goes: a run that gets it next finds no record and no warning.
            with contextlib.suppress(FileNotFoundError):
                os.remove(holder_file)
    finally:
        kernel_lock.release()


@contextlib.contextmanager
def workdir_lock(workdir: str, is_leader: bool | None = None):
    """Hold the workdir lock for the duration of the block (released on exit, Ctrl-C included).

    is_leader: whether this process takes the lock (default: jax.process_index() == 0). In
    multi-process runs every process must enter the block: process 0's outcome is broadcast, so a
    refusal raises WorkdirLockedError in all of them. A remote workdir (gs://) is not locked (logged).
    """
    workdir = os.fspath(workdir)
    if is_leader is None:
        is_leader = jax.process_index() == 0
    with contextlib.ExitStack() as stack:
        error = None
        if is_leader and paths.is_remote(workdir):
            log.warning("workdir %s is remote: it cannot be locked, so make sure no other run uses it", workdir)
        elif is_leader:
            try:
                stack.enter_context(_hold(workdir))
            except Exception as e:  # noqa: BLE001 -- re-raised below, after the others are told
                error = e
        if jax.process_count() > 1:
            failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
            if failed and error is None:
                error = WorkdirLockedError(f"process 0 could not lock workdir {workdir} (its log says why)")
        if error is not None:
            raise error
        yield
