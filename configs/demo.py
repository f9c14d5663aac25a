"""The self-contained demo: synthetic data, a small CLIP pre-trained here, then CMA vs baselines.

    python -m cma_jax.demo                                   # the full demo (this config, variant '')
    python -m cma_jax.demo --config=configs/demo.py:quick    # the same path in ~1 min (CI)

The config itself lives in the package (`cma_jax.demo.demo_config`) so that `python -m cma_jax.demo`
runs without this file; see its docstring for the demo's own knobs in `config.extra`.
"""

from cma_jax import demo


def get_config(arg: str | None = None):
    """arg: '' (the full demo) or 'quick' (tiny data, few steps: the CI variant)."""
    return demo.demo_config(arg)
