"""The paper's efficiency figure, measured: every method's train step against full fine-tuning.

    python benchmarks/bench_methods.py [--preset vit_b32] [--videos 4] [--frames 4] [--words 32] [--rounds 5]
                                      [--methods cma,vpt,...] [--dtype float32] [--smoke]

One random-init backbone of `--preset` (no weights needed) shared by every method's model, one
batch, and each method's train step built as cma_jax.train builds it (gradients w.r.t. what the
method trains only, AdamW + clipping, state donated), at the method's default hyper-parameters
(the paper's counts). The steps run in alternating rounds (every method once per round, the order
rotated), so each method's time relative to full fine-tuning is the median of per-round ratios,
robust to slow drifts in the machine's load. Memory: XLA's compiled-program analysis per step
(arguments + temporaries + outputs - donated aliases), whose ratio to full fine-tuning does not
depend on the load. `--smoke` runs everything on a tiny CLIP (seconds).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench_train_step import bench_config, compile_step, make_batch, mb, peak_rate, shape_args  # noqa: E402
from cma_jax import config as config_lib  # noqa: E402
from cma_jax import loader
from cma_jax.models import peft, state  # noqa: E402
from cma_jax.models.summary import count  # noqa: E402

SMOKE_CLIP = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                  context_length=16, vocab_size=100, text_width=64, text_heads=2, text_layers=2)
# The defaults are sized for ViT-B; on the smoke CLIP (width 64) the wide ones are scaled down.
SMOKE_FIELDS = {"st_adapter": {"reduction_dim": 32}, "vop": {"hidden": 32}, "adapter_attn": {"reduction_dim": 8},
                "adaptformer": {"reduction_dim": 8}}


def main(argv=None):
    p = shape_args(__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--methods", default=",".join(m for m in peft.METHODS if m != "zero_shot"),
                   help="comma-separated methods to time (full is always included: the reference)")
    p.add_argument("--smoke", action="store_true", help="a tiny CLIP: checks the script, measures nothing")
    args = p.parse_args(argv)
    names = ["full"] + [m for m in args.methods.split(",") if m and m != "full"]
    for m in names:
        peft.get(m)  # an unknown name stops here, before minutes of compiling

    words = min(args.words, SMOKE_CLIP["context_length"]) if args.smoke else args.words
    config = bench_config(args.preset, args.videos, args.frames, words, args.dtype,
                          clip=SMOKE_CLIP if args.smoke else None)
    clip_cfg = loader.clip_config(config)
    backbone = state.backbone_state(state.new_model(clip_cfg, None, seed=0))  # shared by every model
    batch = jax.tree.map(jnp.asarray, make_batch(config))
    steps, total = {}, {}
    for name in names:
        method = peft.make(name, SMOKE_FIELDS.get(name) if args.smoke else None)
        model = state.new_model(clip_cfg, method, head=config.model.head, tau=config.model.tau, backbone=backbone)
        steps[name] = compile_step(model, config, method, batch)
        total[name] = count(nnx.state(model, nnx.Param))
        jax.block_until_ready(steps[name](batch))  # warm-up
        print(f"{name}: compiled in {steps[name].compile_s:.1f} s, {steps[name].trainable:,} trained params, "
              f"XLA peak {mb(steps[name].peak_bytes)}", flush=True)

    times = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no method always runs first
        for name in order:
            t0 = time.perf_counter()
            jax.block_until_ready(steps[name](batch))
            times[name].append(time.perf_counter() - t0)

    full_t, full_peak = times["full"], steps["full"].peak_bytes
    peak, peak_label = peak_rate(args.dtype)
    shape = "smoke CLIP" if args.smoke else args.preset
    print(f"\n{shape} ({total['full']:,} params), batch {args.videos} videos x {args.frames} frames, "
          f"{args.words} words, {args.dtype}, {jax.devices()[0].platform} x{jax.device_count()}, "
          f"{args.rounds} alternating rounds, load average {os.getloadavg()[0]:.1f}")
    print(f"MFU: each step's FLOPs (XLA's cost analysis) per median step time, as a share of {peak_label}")
    print("| method | trained params | step time | time / full | XLA peak | peak / full | GFLOP / step | MFU | compile |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        s = steps[name]
        ratios = [t / f for t, f in zip(times[name], full_t)]
        print(f"| {peft.get(name).label} (`{name}`) | {s.trainable:,} | {1e3 * np.median(times[name]):,.0f} ms | "
              f"{np.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | {mb(s.peak_bytes)} | "
              f"{s.peak_bytes / full_peak:.2f} | {s.flops / 1e9:,.1f} | "
              f"{100 * s.flops / np.median(times[name]) / peak:.0f} % | {s.compile_s:.0f} s |")


if __name__ == "__main__":
    main()
