"""Subprocesses that can compile for TPUs or GPUs: libtpu / the CUDA plugin, kept out of the suite's own
environment (libtpu prints discovery warnings in every JAX process that loads it).

A test runs its compile in a subprocess whose PYTHONPATH adds the folder named by CMA_JAX_TPU_PYTHONPATH /
CMA_JAX_CUDA_PYTHONPATH (where .ci/run installs them), or uses this python when it imports them itself;
otherwise the test skips, saying so.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (module, variable naming a folder that holds it, how to fill that folder)
TPU = ("libtpu", "CMA_JAX_TPU_PYTHONPATH", "pip install --no-deps --target=DIR 'libtpu==0.0.42.*' (.ci/run does)")
CUDA = ("jax_plugins.xla_cuda12", "CMA_JAX_CUDA_PYTHONPATH",
        "pip install --target=DIR 'jax-cuda12-plugin[with-cuda]==0.10.2' (about 3 GB; CI does not)")


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def env(plugin=None) -> dict:
    """The environment of a subprocess that can import `plugin` (TPU, CUDA or None: plain CPU JAX); skips,
    naming what to set, when none can."""
    extra = ""
    if plugin is not None:
        module, variable, how = plugin
        extra = os.environ.get(variable, "")
        if not importable(module) and not extra:
            pytest.skip(reason=f"{module} is not importable here and {variable} is not set: {how}, then {variable}=DIR")
    out = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.path.join(ROOT, "tests"), extra) if p))
    out.pop("XLA_FLAGS", None)
    return out


def run_python(code: str, environment: dict, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=environment, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def result(r: subprocess.CompletedProcess):
    """The JSON a subprocess printed after 'RESULT ' (its stderr in the message when it failed)."""
    import json

    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULT ")[-1])
