"""A gs:// bucket kept in a local folder, for tests of remote workdirs (nothing leaves the machine).

    from fake_bucket import bucket  # the fixture: gs://BUCKET/x is then bucket/BUCKET/x, a local folder

etils epath reaches gs:// through fsspec's "gcs" filesystem (without TensorFlow installed): it is replaced by
a folder-backed one. Orbax writes arrays through TensorStore's own GCS driver: its kvstore spec is pointed at
the same folder with TensorStore's file driver. Everything else (Orbax's commit files instead of renames,
our path layer, TensorBoard through epath) runs its gs:// code as it would on a real bucket.
"""

import importlib

import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils


def _in_bucket(path: str) -> str:
    return path.split("://", 1)[-1]


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """The local folder behind gs:// for the duration of a test."""
    root = tmp_path / "gcs"
    root.mkdir()

    class FolderBucket(DirFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

        def _join(self, path):  # gcsfs takes gs://bucket/x and bucket/x alike
            if isinstance(path, (list, tuple)):
                return super()._join([_in_bucket(p) for p in path])
            return super()._join(_in_bucket(path) if isinstance(path, str) else path)

    registry = importlib.import_module("fsspec.registry")._registry  # noqa: SLF001 - no public unregister
    for name in FolderBucket.protocol:
        monkeypatch.setitem(registry, name, FolderBucket)
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                        lambda path: {"driver": "file", "path": f"{root}/{_in_bucket(path)}"})
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    cached = type(epath_backend.fsspec_backend)._get_filesystem  # noqa: SLF001 - epath keeps one fs per scheme
    cached.cache_clear()
    yield root
    cached.cache_clear()
