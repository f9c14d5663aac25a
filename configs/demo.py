"""The self-contained demo: synthetic data, a small CLIP pre-trained here, then CMA vs baselines.

    python -m cma_jax.demo                                   # the table: 3 trained methods x 3 seeds + zero-shot
    python -m cma_jax.demo --config=configs/demo.py:quick    # the same path in about 2 min, 1 seed (CI)
    python -m cma_jax.demo --config=configs/demo.py:sweep    # test R@1 vs training-set size, 3 seeds
    python -m cma_jax.demo --config=configs/demo.py:sweep,width=128 --workdir=runs/demo_w128  # a wider CLIP

The config itself lives in the package (`cma_jax.demo.stages.demo_config`) so that `python -m
cma_jax.demo` runs without this file; see its docstring for the demo's own knobs in `config.extra`.
"""

from cma_jax.demo import stages


def get_config(arg: str | None = None):
    """arg: '' (the table), 'quick' (the CI variant) or 'sweep'; optionally ',width=N'."""
    return stages.demo_config(arg)
