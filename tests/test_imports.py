"""Imports point down: the inference API and search do not import the training input stack."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", ["cma_jax.api", "cma_jax.search"])
def test_api_and_search_import_neither_grain_nor_tfds(module):
    code = (f"import sys, {module}; print(sorted(m for m in ('grain', 'tensorflow_datasets', 'tensorflow') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
