"""The TensorBoard writer of a run: WORKDIR/tb, one per program, shared by training and evaluation, on process 0.

Event files on a remote workdir (gs://) are written through the path layer (`cma_jax.paths`, etils epath),
as every other file of a run, instead of tensorboardX's own Cloud Storage client.
"""

from __future__ import annotations

import io

import jax
from tensorboardX import SummaryWriter, record_writer

from cma_jax import paths


class Writer:
    """TensorBoard scalars into one event file of WORKDIR/tb, opened at the first scalar: a run that stops
    before it has one (refused by the workdir lock, a bad config) leaves nothing in another run's folder."""

    def __init__(self, workdir: str):
        self.logdir, self._events = str(paths.Workdir(workdir).tb), None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._events is None:
            self._events = SummaryWriter(self.logdir)
        self._events.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()


def open_writer(workdir: str) -> Writer | None:
    """The writer of WORKDIR/tb on process 0; None on the others (they write nothing)."""
    return Writer(workdir) if jax.process_index() == 0 else None


class _RemoteEventFile:
    """An event file on an object store, which cannot append: each flush writes the whole file again."""

    def __init__(self, path: str):
        self.path, self.buffer = paths.path(path), io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _RemoteEventFiles:
    """tensorboardX's writer factory for one URL scheme."""

    def open(self, path: str) -> _RemoteEventFile:
        return _RemoteEventFile(path)

    def directory_check(self, path: str) -> None:
        paths.path(path).mkdir(parents=True, exist_ok=True)


record_writer.register_writer_factory("gs", _RemoteEventFiles())
