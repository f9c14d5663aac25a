"""Building without TensorFlow: plain-file stand-ins for the few `tf` calls TFDS's writer and archive extractor make.

TFDS's writer keeps up to 1 GiB of records in memory and then spills them to 1000 on-disk buckets through
`tf.io.gfile`, and its extractor writes extracted files through it too; without TensorFlow both fail. `install()`
gives those two modules local-file I/O; with TensorFlow installed it does nothing.
"""

from __future__ import annotations

import os

from tensorflow_datasets.core import shuffle
from tensorflow_datasets.core.download import extractor


class _ResourceExhaustedError(Exception):
    """Never raised: stands in for tf.errors.ResourceExhaustedError."""


class _Gfile:
    GFile = staticmethod(open)
    exists = staticmethod(os.path.exists)
    remove = staticmethod(os.remove)


def _as_text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else x


class _TfShim:
    """The slice of `tf` that tfds.core.shuffle and the archive extractor use, on local files."""

    class io:  # noqa: N801 (mirrors tf.io)
        gfile = _Gfile

    class errors:  # noqa: N801
        ResourceExhaustedError = _ResourceExhaustedError

    class compat:  # noqa: N801
        as_text = staticmethod(_as_text)


def install() -> None:
    """Point tfds.core.shuffle's and the extractor's `tf` at the shim when TensorFlow is not installed."""
    try:  # the heavy optional dependency, only probed
        import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        shuffle.tf = _TfShim
        extractor.tf = _TfShim
