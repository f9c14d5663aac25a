"""Atomic local file writes: a reader (or a rerun after a crash) never sees a half-written file."""

from __future__ import annotations

import os
from typing import BinaryIO, Callable


def write_atomic(path: str, data: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Write `data` (text, bytes, or a function writing to a binary file) to `path` via a rename."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
