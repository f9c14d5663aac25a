"""Parameter counts: all parameters vs the trainable adapters (filter on `AdapterParam`).

    python -m cma_jax.models.summary --preset vit_b32 --reduction_dim 8 --share_dim 16

builds the model abstractly (`nnx.eval_shape`: shapes only, no memory) and prints the counts.
"""

from __future__ import annotations

import argparse
import math

import jax
import numpy as np
from flax import nnx

from cma_jax.models.adapter import AdapterConfig, AdapterParam
from cma_jax.models.clip import PRESETS, preset
from cma_jax.models.retrieval import RetrievalModel


def count(tree) -> int:
    """Number of scalars in a state or pytree of arrays (concrete or abstract): the one parameter counter."""
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def count_params(model: nnx.Module) -> dict:
    """{'total', 'adapter', 'percent'}: every nnx.Param (adapters included), the AdapterParams, 100*adapter/total.

    Works on concrete models and on `nnx.eval_shape` ones.
    """
    total = count(nnx.state(model, nnx.Param))
    adapter = count(nnx.state(model, AdapterParam))
    return {"total": total, "adapter": adapter, "percent": 100.0 * adapter / total if total else 0.0}


def format_counts(counts: dict) -> str:
    return (f"{counts['adapter']:,} adapter params of {counts['total']:,} total "
            f"({counts['percent']:.3f} %)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m cma_jax.models.summary", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="vit_b32", choices=sorted(PRESETS))
    p.add_argument("--reduction_dim", type=int, default=8, help="adapter bottleneck r")
    p.add_argument("--share_dim", type=int, default=16, help="shared up-projection dims d_s")
    p.add_argument("--no_adapter", action="store_true", help="count the plain CLIP")
    args = p.parse_args(argv)
    try:
        adapter = None if args.no_adapter else AdapterConfig(args.reduction_dim, args.share_dim)
        model = nnx.eval_shape(lambda: RetrievalModel(preset(args.preset), adapter, rngs=nnx.Rngs(0)))
    except ValueError as e:  # an impossible r / d_s for this preset: say which, no traceback
        p.exit(2, f"error: {e}\n")
    label = "no adapters" if adapter is None else f"r={adapter.reduction_dim}, d_s={adapter.share_dim}"
    print(f"{args.preset}, {label}: {format_counts(count_params(model))}")


if __name__ == "__main__":
    main()
