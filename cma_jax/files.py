"""Atomic writes: a reader (or a rerun after a crash) never sees a half-written file or folder."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import BinaryIO, Callable

from cma_jax import paths


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Write `data` (text, bytes, or a function writing to a binary file) to `path` via a rename.

    A URL (gs://...) is written in one piece: an object store shows an object only once it is complete.
    """
    if paths.is_remote(path):
        if callable(data):
            buffer = io.BytesIO()
            data(buffer)
            data = buffer.getvalue()
        paths.path(path).write_bytes(data.encode() if isinstance(data, str) else data)
        return
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_dir_atomic(path: str, write: Callable[[str], None], overwrite: bool = False) -> None:
    """Run `write(tmp_folder)` beside `path`, then rename it into place; nothing half-written remains.

    Refuses to replace an existing `path` unless `overwrite` (FileExistsError naming it), and a URL (an object
    store renames a folder object by object, never at once).
    """
    if paths.is_remote(path):
        raise ValueError(f"{path}: a folder is written to a local disk only (atomically); write it to a local "
                         "folder and copy it there (gcloud storage cp -r)")
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass --overwrite / overwrite=True)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    target = os.path.join(tmp, "out")
    try:
        write(target)
        if os.path.exists(path):
            os.rename(path, os.path.join(tmp, "old"))  # kept inside tmp, removed below
        os.rename(target, path)
    finally:
        for root, dirs, _ in os.walk(tmp):  # read-only files inside read-only folders still delete
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
        shutil.rmtree(tmp, ignore_errors=True)
