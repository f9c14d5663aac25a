"""Adapter training vs full fine-tuning: step time, memory, and the run-checkpoint size (ViT-B/32).

    python benchmarks/bench_train_step.py [--preset vit_b32] [--videos 4] [--frames 4] [--words 32] [--rounds 7]

One model (ViT-B/32 shape with Cross-Modal Adapters r=8, d_s=16, random init: no weights needed)
and one batch; two jitted train steps built the way cma_jax.train builds them: `cma` differentiates
w.r.t. the adapters only, `full` w.r.t. every parameter. After compiling both, the steps run
alternately (cma, full, cma, ...) and the medians are compared. Memory: XLA's compiled-program
analysis per step (arguments + temporaries + outputs - donated aliases) and the process's peak RSS.
Finally the adapter run checkpoint (params + Adam moments + step + iterator state) is saved
with cma_jax.checkpoint to a temporary folder and its size reported.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from cma_jax import checkpoint as ckpt_lib  # noqa: E402
from cma_jax import partition  # noqa: E402
from cma_jax import train as train_lib  # noqa: E402
from cma_jax import config as config_lib  # noqa: E402


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MB"


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="vit_b32")
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--words", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)

    config = config_lib.base_config()
    config.model.preset, config.model.dtype = args.preset, args.dtype
    config.train.batch_size = args.videos
    config.data.num_frames, config.data.max_words = args.frames, args.words
    config_lib.validate(config)
    clip_cfg = config_lib.clip_config(config)
    model = train_lib.build_model(config)  # random init; same model for both methods
    rng = np.random.default_rng(0)
    ids = rng.integers(1, clip_cfg.vocab_size - 1, (args.videos, args.words)).astype(np.int32)
    ids[:, -1] = clip_cfg.vocab_size - 1
    res = clip_cfg.image_resolution
    batch = {"frames": jnp.asarray(rng.integers(0, 256, (args.videos, args.frames, res, res, 3), dtype=np.uint8)),
             "frame_mask": jnp.ones((args.videos, args.frames), bool),
             "text_ids": jnp.asarray(ids), "text_mask": jnp.ones((args.videos, args.words), jnp.int32)}

    steps, states, frozens, memory, counts = {}, {}, {}, {}, {}
    for method in ("cma", "full"):
        config.method = method  # "full": every nnx.Param trains (the adapters too: same model)
        graphdef, params, rngs, frozen = partition.split(model, config)
        params, rngs = jax.tree.map(jnp.copy, (params, rngs))  # donated below: keep the model's arrays
        tx, lr = partition.make_optimizer(config, params, 1000)
        fn = jax.jit(train_lib.make_train_step(graphdef, tx, lr, 1), donate_argnums=(0,))
        state = {"params": params, "opt_state": tx.init(params), "rngs": rngs, "step": jnp.int32(0)}
        t0 = time.perf_counter()
        compiled = fn.lower(state, frozen, batch).compile()
        mem = compiled.memory_analysis()
        memory[method] = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                          - mem.alias_size_in_bytes, mem.temp_size_in_bytes)
        state, m = compiled(state, frozen, batch)  # warm-up
        jax.block_until_ready(m)
        print(f"{method}: compiled + first step in {time.perf_counter() - t0:.1f} s, "
              f"{partition.count(params):,} trainable params")
        steps[method], states[method], frozens[method], counts[method] = compiled, state, frozen, partition.count(params)

    times = {"cma": [], "full": []}
    for _ in range(args.rounds):
        for method in ("cma", "full"):
            t0 = time.perf_counter()
            states[method], m = steps[method](states[method], frozens[method], batch)
            jax.block_until_ready((states[method], m))
            times[method].append(time.perf_counter() - t0)

    med = {k: float(np.median(v)) for k, v in times.items()}
    total = partition.count(nnx.state(model, nnx.Param))
    print(f"\nmodel {args.preset} ({total:,} params), batch {args.videos} videos x {args.frames} frames, "
          f"{args.words} words, {args.dtype}, {jax.devices()[0].platform} x{jax.device_count()}, "
          f"{args.rounds} alternating rounds")
    for method in ("cma", "full"):
        print(f"  {method:4s}: median step {med[method] * 1e3:8.1f} ms  (all: "
              f"{', '.join(f'{t * 1e3:.0f}' for t in times[method])})  trainable {counts[method]:,} "
              f"({100 * counts[method] / total:.3f} %)  XLA peak {_mb(memory[method][0])} "
              f"(temporaries {_mb(memory[method][1])})")
    # Each round times both steps back to back, so its ratio is robust to slow drifts in machine load.
    rounds = [c / f for c, f in zip(times["cma"], times["full"])]
    print(f"  step-time ratio cma/full: {med['cma'] / med['full']:.3f} (ratio of medians), "
          f"{float(np.median(rounds)):.3f} (median of per-round ratios: "
          f"{', '.join(f'{r:.2f}' for r in rounds)})  target <= 0.70")
    print(f"  process peak RSS (both steps): {_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}")

    config.method = "cma"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ckpt_lib.RunCheckpointer(tmp)
        ckpt.save(args.rounds + 1, states["cma"], {"next_batch": args.rounds + 1}, ckpt_lib.run_meta(model, config),
                  force=True)
        ckpt.wait()
        size = _dir_bytes(os.path.join(tmp, "checkpoints"))
        ckpt.close()
    print(f"  {args.preset} adapter run checkpoint: {_mb(size)} (params + Adam moments + step + iterator state; "
          f"target < 10 MB)")
    return float(np.median(rounds)), size


if __name__ == "__main__":
    main()
