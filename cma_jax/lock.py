"""One run per workdir: a lock file that names the run holding it (host, pid, start time).

    with lock.workdir_lock(workdir):
        ...  # train

A second run on the same workdir is refused with one line naming the first. The lock is the kernel's
(`flock` on `WORKDIR/run.lock`): it is released when its process ends, however it ends, so a run
killed with -9 never blocks the next one; the JSON inside only says who holds it. A file that a dead
process left behind is taken over with a warning. A file written on another host is not judged dead
from here (its process cannot be checked): the refusal says so and how to remove it by hand.

Multi-host runs lock once, on process 0, and every process learns the outcome (a broadcast), so a
refusal stops all of them instead of leaving the others waiting in a collective. A remote workdir
(gs://...) cannot be locked: that is logged and the run goes on.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# Filesystems without flock (some network and FUSE mounts) answer with one of these.
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirLockedError(OSError):
    """The workdir is in use by another run (or may be: a lock written on another host)."""


class _Lock:
    """This process's hold on `path` (an open, flock-ed descriptor)."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        # Unlink before unlocking: a run that opened the old file and then gets the flock finds it
        # unlinked (acquire compares inodes) and starts over on a fresh file.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)


def _holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}


def _describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def _read_holder(fd: int) -> dict | None:
    """The JSON the holder wrote; None while empty (just created, or released cleanly)."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64 * 1024).decode(errors="replace").strip()
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


def _refusal(path: str, workdir: str, fd: int) -> WorkdirLockedError:
    """The message for a lock that another process holds right now."""
    holder = None
    for _ in range(20):  # it may be between taking the lock and writing its name (microseconds)
        holder = _read_holder(fd)
        if holder is not None:
            break
        time.sleep(0.05)
    who = "another run" if holder is None or "unreadable" in holder else f"another run ({_describe(holder)})"
    return WorkdirLockedError(f"workdir {workdir} is in use by {who}; lock file {path}. Wait for that run to "
                              "finish or stop it, or use another --workdir")


def acquire(workdir: str) -> _Lock | None:
    """Lock `workdir` for this process -> the lock (None where locking is impossible: logged).

    Raises WorkdirLockedError naming the holder when another live run holds it.
    """
    workdir = os.fspath(workdir)
    if "://" in workdir:
        log.warning("workdir %s is remote: it cannot be locked, so make sure no other run uses it", workdir)
        return None
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _refusal(path, workdir, fd)
            os.close(fd)
            raise error from None
        except OSError as e:
            os.close(fd)
            if e.errno in _UNSUPPORTED:
                log.warning("workdir %s: this filesystem does not support file locks (%s), so it is not "
                            "locked; make sure no other run uses it", workdir, e.strerror)
                return None
            raise
        try:  # the previous holder may have unlinked the file between our open and our flock
            on_disk, ours = os.stat(path), os.fstat(fd)
            same = (on_disk.st_dev, on_disk.st_ino) == (ours.st_dev, ours.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)

    try:
        previous = _read_holder(fd)
        if previous is not None:
            _check_left_behind(previous, path, workdir)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_holder_info()) + "\n").encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return _Lock(path, fd)


def _check_left_behind(previous: dict, path: str, workdir: str) -> None:
    """A lock file that no process holds but that was not released: take it over, or refuse."""
    here = socket.gethostname()
    if "unreadable" in previous:
        log.warning("taking over the lock of workdir %s: %s was not released and is unreadable (%r)",
                    workdir, path, previous["unreadable"])
    elif previous.get("host") != here:
        # The flock of a process on another host may not be visible from here (it depends on the
        # filesystem), and its pid cannot be checked: never assume it is dead.
        raise WorkdirLockedError(
            f"workdir {workdir} is locked by a run on another host ({_describe(previous)}); lock file {path}. "
            f"From {here} it cannot be told whether that run is still alive: if it is not, delete {path} "
            "by hand and start again")
    elif _pid_alive(previous.get("pid")) and previous.get("pid") != os.getpid():
        log.warning("taking over the lock of workdir %s from pid %s (started %s): that pid is running but no "
                    "longer holds the lock (a reused pid)", workdir, previous.get("pid"), previous.get("started"))
    else:
        log.warning("taking over the stale lock of workdir %s left by a run that is no longer running (%s)",
                    workdir, _describe(previous))


@contextlib.contextmanager
def workdir_lock(workdir: str, is_leader: bool | None = None):
    """Hold the workdir lock for the duration of the block (released on exit, Ctrl-C included).

    is_leader: whether this process takes the lock (default: jax.process_index() == 0). In
    multi-process runs every process must enter the block: process 0's outcome is broadcast, so a
    refusal raises WorkdirLockedError in all of them.
    """
    if is_leader is None:
        is_leader = jax.process_index() == 0
    held, error = None, None
    if is_leader:
        try:
            held = acquire(workdir)
        except Exception as e:  # noqa: BLE001 -- re-raised below, after the others are told
            error = e
    if jax.process_count() > 1:
        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            error = WorkdirLockedError(f"process 0 could not lock workdir {workdir} (its log says why)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if held is not None:
            held.release()
