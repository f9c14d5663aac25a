"""The TensorBoard writer of a run: WORKDIR/tb, one per program, shared by training and evaluation, on process 0.

Event files on a remote workdir (gs://) are written through the path layer (`cma_jax.paths`, etils epath),
as every other file of a run, instead of tensorboardX's own Cloud Storage client.
"""

from __future__ import annotations

import io

import jax
from tensorboardX import SummaryWriter, record_writer

from cma_jax import paths


def open_writer(workdir: str) -> SummaryWriter | None:
    """A writer of WORKDIR/tb on process 0; None on the others (they write nothing)."""
    if jax.process_index() != 0:
        return None
    return SummaryWriter(str(paths.Workdir(workdir).tb))


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
