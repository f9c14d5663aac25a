"""Parameter counts: every parameter vs what a method trains (its declared variable type).

    python -m cma_jax.models.summary --method vpt [--preset vit_b32] [--set num_tokens=10]
    python -m cma_jax.models.summary --method all          # the comparison table, every method

builds the model abstractly (`nnx.eval_shape`: shapes only, no memory) and prints the counts, the
method's formula, its default hyper-parameters and the paper's count at ViT-B/32.
"""

from __future__ import annotations

import argparse
import ast
import math

import jax
import numpy as np
from flax import nnx

from cma_jax.models import peft
from cma_jax.models.clip import PRESETS, preset
from cma_jax.models.params import AdapterParam
from cma_jax.models.retrieval import RetrievalModel


def count(tree) -> int:
    """Number of scalars in a state or pytree of arrays (concrete or abstract): the one parameter counter."""
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def count_params(model: nnx.Module) -> dict:
    """{'total', 'adapter', 'trained', 'percent'}: every nnx.Param, the AdapterParams, what the model's
    method trains (logit_scale excluded), and 100 * trained / total. Works on `nnx.eval_shape` models."""
    method = getattr(model, "clip", model).method  # a RetrievalModel or its CLIP
    total = count(nnx.state(model, nnx.Param))
    trained = count(nnx.state(model, nnx.All(method.trainable, nnx.Not(nnx.PathContains("logit_scale")))))
    return {"total": total, "adapter": count(nnx.state(model, AdapterParam)), "trained": trained,
            "percent": 100.0 * trained / total if total else 0.0}


def _millions(n: float) -> str:
    return f"{n / 1e6:.4g} M"


def describe(method: peft.Method, preset_name: str) -> str:
    """The method's counts on `preset_name` (built abstractly), formula, defaults and the paper's count."""
    cfg = preset(preset_name)
    model = nnx.eval_shape(lambda: RetrievalModel(cfg, method, rngs=nnx.Rngs(0)))
    c = count_params(model)
    fields = ", ".join(f"{k}={v}" for k, v in method.to_dict().items()) or "none"
    lines = [f"{preset_name}, {method.name} ({method.label}): {c['trained']:,} trained params of {c['total']:,} total "
             f"({c['percent']:.3f} %)",
             f"  formula: {method.formula} = {method.count(cfg):,}",
             f"  hyper-parameters: {fields}" + (f" (config.{method.section}.*)" if method.section else "")]
    if method.paper_count:
        own = method.count(preset("vit_b32"))
        lines.append(f"  the paper's count (MSR-VTT table, ViT-B/32): {_millions(method.paper_count)}; "
                     f"cma_jax at ViT-B/32: {own:,} ({own / method.paper_count:.2f}x)")
    if method.paper_note:
        lines.append(f"  as implemented: {method.paper_note}")
    return "\n".join(lines)


def table(preset_name: str = "vit_b32") -> str:
    """A markdown row per method: trained params, the paper's, the ratio, the formula, the defaults."""
    cfg = preset(preset_name)
    rows = ["| method | name | trained params | paper | ratio | formula | defaults |", "|---|---|---|---|---|---|---|"]
    for name, cls in peft.METHODS.items():
        m = cls()
        n = m.count(cfg)
        paper = _millions(cls.paper_count) if cls.paper_count else "-"
        ratio = f"{n / cls.paper_count:.2f}" if cls.paper_count else "-"
        fields = ", ".join(f"{k}={v}" for k, v in m.to_dict().items()) or "-"
        rows.append(f"| {cls.label} | `{name}` | {n:,} | {paper} | {ratio} | {cls.formula} | {fields} |")
    return "\n".join(rows)


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a string such as activation=gelu


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m cma_jax.models.summary", description=__doc__.split("\n")[0])
    p.add_argument("--method", default="cma", choices=[*peft.METHODS, "all"],
                   help="a method of cma_jax.models.peft, or 'all' for the table of every method")
    p.add_argument("--preset", default="vit_b32", choices=sorted(PRESETS))
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a hyper-parameter of the method (repeatable), e.g. --set num_tokens=10")
    p.add_argument("--reduction_dim", type=int, help="the adapters' bottleneck r (cma, unimodal, other adapters)")
    p.add_argument("--share_dim", type=int, help="the Cross-Modal Adapter's shared dims d_s")
    p.add_argument("--no_adapter", action="store_true", help="count the plain CLIP (= --method zero_shot)")
    args = p.parse_args(argv)
    if args.method == "all":
        print(table(args.preset))
        return
    name = "zero_shot" if args.no_adapter else args.method
    fields = {k: v for k, v in (("reduction_dim", args.reduction_dim), ("share_dim", args.share_dim)) if v is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.exit(2, f"error: --set {item!r}: expected FIELD=VALUE\n")
        fields[key] = _value(value)
    try:
        print(describe(peft.make(name, fields), args.preset))
    except (ValueError, TypeError) as e:  # an impossible or unknown field for this method / preset: no traceback
        p.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
