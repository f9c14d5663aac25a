"""Adapter training vs full fine-tuning in cma_jax alone: step time, XLA memory, run-checkpoint size.

    python benchmarks/bench_train_step.py [--preset vit_b32] [--videos 4] [--frames 4] [--words 32] [--rounds 7]

One model (Cross-Modal Adapters r=8, d_s=16, random init: no weights needed) and one batch; two
jitted train steps built as cma_jax.train builds them: `cma` differentiates w.r.t. the adapters
only, `full` w.r.t. every parameter (the adapters too: same model). The steps run alternately and
the medians are compared. Memory: XLA's compiled-program analysis per step (arguments +
temporaries + outputs - donated aliases). Finally the adapter run checkpoint (params + Adam
moments + iterator state) is saved with cma_jax.checkpoint and its size reported.

The helpers here (`bench_config`, `make_batch`, `build`, `compile_step`) also build the JAX side
of benchmarks/bench_vs_pytorch.py (the comparison with the PyTorch original, remat, accumulation
and compile times).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from cma_jax import accelerators  # noqa: E402
from cma_jax import checkpoint as ckpt_lib  # noqa: E402
from cma_jax import config as config_lib  # noqa: E402
from cma_jax import loader  # noqa: E402
from cma_jax import optim  # noqa: E402
from cma_jax import run as run_lib  # noqa: E402
from cma_jax import train as train_lib  # noqa: E402
from cma_jax.models import state  # noqa: E402
from cma_jax.models.summary import count  # noqa: E402


def mb(n: float) -> str:
    return f"{n / 2 ** 20:,.0f} MB"


def bench_config(preset="vit_b32", videos=4, frames=4, words=32, dtype="float32", head="text_conditioned",
                 clip=None):
    """A validated config for a random-init model of `preset` (`clip`: CLIPConfig field overrides)."""
    config = config_lib.base_config()
    config.model.preset, config.model.dtype, config.model.head = preset, dtype, head
    for k, v in (clip or {}).items():
        config.model.clip[k] = v
    config.train.batch_size = videos
    config.data.num_frames, config.data.max_words = frames, words
    run_lib.check(config)
    return config


def make_batch(config, seed=0) -> dict:
    """One batch of the batch contract (numpy): random uint8 frames, random words ending in end-of-text."""
    cfg = loader.clip_config(config)
    b, t, words = config.train.batch_size, config.data.num_frames, config.data.max_words
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.vocab_size - 1, (b, words)).astype(np.int32)
    ids[:, -1] = cfg.vocab_size - 1  # end-of-text: the largest id
    res = cfg.image_resolution
    return {"frames": rng.integers(0, 256, (b, t, res, res, 3), dtype=np.uint8),
            "frame_mask": np.ones((b, t), bool), "text_ids": ids, "text_mask": np.ones((b, words), np.int32)}


def build(config, remat: str = "none", abstract: bool = False):
    """The config's model with random weights (seed config.seed) and CLIP remat setting `remat`.

    remat is a compute setting (same weights for every value); `abstract` builds shapes only.
    """
    clip_cfg = dataclasses.replace(loader.clip_config(config), remat=remat)

    def make():
        return state.new_model(clip_cfg, loader.method(config), head=config.model.head,
                               tau=config.model.tau, seed=config.seed)
    return nnx.eval_shape(make) if abstract else make()


# ----------------------------------------------------------------------------- MFU
def matmul_rate(dtype: str = "float32", n: int = 2048, rounds: int = 7) -> float:
    """XLA's matmul rate on this device, FLOP/s: the median of `rounds` jitted [n, n] @ [n, n] products."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / float(np.median(times))


def peak_rate(dtype: str = "float32") -> tuple[float, str]:
    """(FLOP/s, what it is) an achieved rate is shared of: the chip's bf16 peak (cma_jax.accelerators), or on a
    CPU (or a chip not in the table) XLA's matmul rate in `dtype` measured now, in the same run."""
    chip = accelerators.chip_of(jax.devices()[0])
    if chip is not None:
        return chip.bf16_flops, f"the {chip.name}'s bf16 peak {chip.bf16_flops / 1e12:.0f} TFLOP/s"
    rate = matmul_rate(dtype)
    return rate, f"this {jax.devices()[0].platform.upper()}'s XLA {dtype} matmul rate {rate / 1e9:.0f} GFLOP/s"


def mfu(flops: float | None, seconds: float, peak: float) -> str:
    """'X GFLOP/step, Y GFLOP/s = Z % of the peak' for a step of `flops` taking `seconds`."""
    if not flops:
        return "FLOPs unknown"
    rate = flops / seconds
    return f"{flops / 1e9:,.1f} GFLOP/step, {rate / 1e9:,.1f} GFLOP/s = {100 * rate / peak:.0f} %"


def step_flops(fn, args, compiled) -> float:
    """XLA's FLOPs of one compiled step; the GPU compiler counts none: then those of `fn` compiled for the CPU."""
    cost = compiled.cost_analysis()
    if cost:
        return float(cost["flops"])
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), args)
    return float(fn.lower(*abstract).compile().cost_analysis()["flops"])


@dataclasses.dataclass
class Step:
    """A compiled train step and what it runs on (`state` is None for compile-only steps)."""
    compiled: object
    state: object
    frozen: object
    compile_s: float
    peak_bytes: int  # XLA: arguments + temporaries + outputs - donated aliases
    temp_bytes: int
    trainable: int
    flops: float  # XLA's count for one step

    def __call__(self, batch):
        self.state, metrics = self.compiled(self.state, self.frozen, batch)
        return metrics


def compile_step(model, config, method: str, batch, grad_accum_steps: int = 1, abstract: bool = False) -> Step:
    """cma_jax.train's step for `method` ('cma' or 'full'), jitted with the state donated, compiled.

    With `abstract` (a model from `build(..., abstract=True)` and a batch of ShapeDtypeStructs) it
    is only compiled: memory analysis and compile time without allocating the model.
    """
    graphdef, params, rngs, frozen = optim.split(model, method)
    if not abstract:
        params, rngs = jax.tree.map(jnp.copy, (params, rngs))  # donated: keep the model's own arrays
    tx, lr = optim.make_optimizer(config.train, params, 1000)
    state = optim.TrainState(params=params, opt_state=jax.eval_shape(tx.init, params) if abstract else tx.init(params),
                             rngs=rngs, step=jax.ShapeDtypeStruct((), jnp.int32) if abstract else jnp.int32(0))
    fn = jax.jit(train_lib.make_train_step(graphdef, tx, lr, grad_accum_steps), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = fn.lower(state, frozen, batch).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)
    return Step(compiled, None if abstract else state, frozen, seconds, peak, mem.temp_size_in_bytes, count(params),
                step_flops(fn, (state, frozen, batch), compiled))


def abstract_batch(config) -> dict:
    """ShapeDtypeStructs of `make_batch(config)` (for compile-only steps)."""
    cfg = loader.clip_config(config)
    b, t, words, res = config.train.batch_size, config.data.num_frames, config.data.max_words, cfg.image_resolution
    return {"frames": jax.ShapeDtypeStruct((b, t, res, res, 3), jnp.uint8),
            "frame_mask": jax.ShapeDtypeStruct((b, t), jnp.bool_),
            "text_ids": jax.ShapeDtypeStruct((b, words), jnp.int32),
            "text_mask": jax.ShapeDtypeStruct((b, words), jnp.int32)}


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def shape_args(description: str) -> argparse.ArgumentParser:
    """The step shape both benchmarks take: backbone preset, videos x frames per batch, words."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", default="vit_b32")
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--words", type=int, default=32)
    return p


def main(argv=None):
    p = shape_args(__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)

    config = bench_config(args.preset, args.videos, args.frames, args.words, args.dtype)
    model = build(config)
    batch = jax.tree.map(jnp.asarray, make_batch(config))
    steps = {}
    for method in ("cma", "full"):
        steps[method] = compile_step(model, config, method, batch)
        jax.block_until_ready(steps[method](batch))  # warm-up
        print(f"{method}: compiled in {steps[method].compile_s:.1f} s, {steps[method].trainable:,} trainable params")

    times = {"cma": [], "full": []}
    for _ in range(args.rounds):
        for method in ("cma", "full"):
            t0 = time.perf_counter()
            jax.block_until_ready(steps[method](batch))
            times[method].append(time.perf_counter() - t0)

    med = {k: float(np.median(v)) for k, v in times.items()}
    peak, peak_label = peak_rate(args.dtype)
    total = count(nnx.state(model, nnx.Param))
    print(f"\nmodel {args.preset} ({total:,} params), batch {args.videos} videos x {args.frames} frames, "
          f"{args.words} words, {args.dtype}, {jax.devices()[0].platform} x{jax.device_count()}, "
          f"{args.rounds} alternating rounds")
    for method in ("cma", "full"):
        s = steps[method]
        print(f"  {method:4s}: median step {med[method] * 1e3:8.1f} ms  trainable {s.trainable:,} "
              f"({100 * s.trainable / total:.3f} %)  XLA peak {mb(s.peak_bytes)} (temporaries {mb(s.temp_bytes)})")
        print(f"        MFU: {mfu(s.flops, med[method], peak)}")
    print(f"  MFU: each step's FLOPs (XLA's cost analysis) per median step time, as a share of {peak_label}")
    # Each round times both steps back to back, so its ratio is robust to slow drifts in machine load.
    rounds = [c / f for c, f in zip(times["cma"], times["full"])]
    print(f"  step-time ratio cma/full: {float(np.median(rounds)):.3f} (median of per-round ratios)  target <= 0.70")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ckpt_lib.RunCheckpointer(tmp)
        ckpt.save(args.rounds + 1, steps["cma"].state, {"next_batch": args.rounds + 1}, ckpt_lib.run_meta(model),
                  force=True)
        ckpt.wait()
        size = _dir_bytes(os.path.join(tmp, "checkpoints"))
        ckpt.close()
    print(f"  {args.preset} adapter run checkpoint: {mb(size)} (params + Adam moments + iterator state; "
          f"target < 10 MB)")
    return float(np.median(rounds)), size


if __name__ == "__main__":
    main()
