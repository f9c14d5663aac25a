"""Suite-wide test setup.

Devices: the suite runs with ONE CPU device (no XLA_FLAGS here). Tests that need several devices
(8 simulated CPU devices, or several processes) start their own subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N set before jax is imported; see
tests/test_sharding.py and tests/test_multihost.py.

The repository root is put on sys.path so that the config files in `configs/` (next to the
package, not installed) import as `configs.msrvtt` etc.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Persistent XLA compilation cache: the tiny train step compiles to the same program in many
# tests (and in their subprocesses, through the environment), so later compiles are cache hits.
import tempfile  # noqa: E402

import jax  # noqa: E402

CACHE = os.path.join(tempfile.gettempdir(), "cma_jax_test_xla_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
