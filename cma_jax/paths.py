"""Where a run's files go: the one place that tells a local path from a URL (gs://...), and the workdir's layout.

Every writer of a run (training, evaluation, checkpoints, the lock, TensorBoard) names its files through
`Workdir`, and every file it reads or writes goes through `path` (etils epath: the local filesystem, or
gs:// through gcsfs / TensorFlow). docs/training.md describes the layout.
"""

from __future__ import annotations

import os

from etils import epath

CHECKPOINTS = "checkpoints"  # Orbax run checkpoints, one folder per step
DAMAGED = "checkpoints_damaged"  # beside checkpoints/: steps that could not be restored, kept for a look
TB = "tb"  # TensorBoard event files of training and evaluation
LOCK = "run.lock"  # the kernel lock that keeps a second run out
HOLDER = "run.lock.json"  # who holds it: host, pid, start time
HISTORY = "history.jsonl"  # one JSON line per training step, across resumes


def is_remote(p: str | os.PathLike) -> bool:
    """Whether `p` is a URL (gs://bucket/...) rather than a local path."""
    return "://" in os.fspath(p)


def path(p: str | os.PathLike) -> epath.Path:
    """`p` as an epath.Path: a URL as it is, a local path as given (relative stays relative)."""
    return epath.Path(os.fspath(p))


def absolute(p: str | os.PathLike) -> epath.Path:
    """`p` as an absolute epath.Path: a URL as it is, a local path made absolute (what Orbax needs)."""
    p = os.fspath(p)
    return epath.Path(p if is_remote(p) else os.path.abspath(p))


class Workdir:
    """The files of one run folder (local or remote), by name."""

    def __init__(self, root: str | os.PathLike):
        self.root = path(root)
        self.checkpoints = self.root / CHECKPOINTS
        self.damaged = self.root / DAMAGED
        self.tb = self.root / TB
        self.lock = self.root / LOCK
        self.holder = self.root / HOLDER
        self.history = self.root / HISTORY

    def report(self, name: str, step: int | None, suffix: str) -> epath.Path:
        """An evaluation report: eval_{name}[_step{N}]{suffix}."""
        return self.root / (f"eval_{name}" + (f"_step{step}" if step is not None else "") + suffix)
