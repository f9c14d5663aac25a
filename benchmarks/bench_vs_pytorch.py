"""cma_jax vs the PyTorch original, side by side: train-step time and peak memory; remat, accumulation, compile.

    python benchmarks/bench_vs_pytorch.py             # ViT-B/32 shape, fp32, 4 videos x 4 frames, 32 words
    python benchmarks/bench_vs_pytorch.py --sections speed --rounds 9
    python benchmarks/bench_vs_pytorch.py --smoke     # tiny shapes, every section: a two-minute check

speed: one random-init model (Cross-Modal Adapters r=8, d_s=16) and one batch. The JAX steps are
cma_jax.train's (jitted, state donated); the PyTorch model is tests/torch_reference.py (OpenAI's
CLIP code with the original repo's stacked adapters) loaded with the same weights through
cma_jax.convert.to_cma, trained with torch.optim.AdamW (foreach) and the same clipping. `cma`
trains the adapters only (PyTorch: requires_grad=False on the rest), `full` every weight (the
adapters too: same model); logit_scale stays frozen in both. The first losses of the two
frameworks are printed side by side (same model, same batch: they must agree). Then the four
steps run in turn (JAX cma, PyTorch cma, JAX full, PyTorch full) for --rounds rounds with a short
pause between steps (so one framework's idle threads do not spin into the other's step); ratios are
medians of per-round ratios, robust to slow drifts in machine load. On a machine shared with other
jobs, PyTorch's OpenMP threads spin-wait for each other while descheduled and its steps slow down
several-fold (ViT-B/32 adapter step 16 s instead of 3.4 s at load 4.5 on 2 cores); run with
OMP_WAIT_POLICY=PASSIVE there, or better on a quiet machine.
Peak memory: JAX, XLA's compiled-program analysis (arguments + temporaries + outputs - donated
aliases); PyTorch, torch.profiler's memory timeline of one step (tensors alive when the step
starts: weights, optimizer state, batch; plus the largest growth during it). Both count tensor
bytes, not allocator or process overhead.
remat: the adapter step for each CLIPConfig.remat value: XLA peak memory and step time.
accum: exact contrastive accumulation (train.grad_accum_steps = k, cma_jax.gradcache): XLA peak
memory of a --accum_videos x --accum_frames step (compiled only, never run) for each k, and the
step time at a batch small enough to run here.
compile: lower + compile time of the cma and full steps for each of --compile_presets (not run).
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench_train_step import (abstract_batch, bench_config, build, compile_step, make_batch, mb,  # noqa: E402
                              mfu, peak_rate, shape_args)
from cma_jax.convert import to_cma  # noqa: E402
from cma_jax.models import state  # noqa: E402
from cma_jax.models.clip import REMAT_POLICIES  # noqa: E402
from cma_jax.models.peft.adapter import AdapterParam  # noqa: E402

METHODS = ("cma", "full")
TARGETS = {"jax/torch cma": 0.8, "jax/torch full": 0.9, "cma/full time": 0.70, "cma/full XLA memory": 0.45}
SMOKE_CLIP = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                  context_length=16, vocab_size=100, text_width=64, text_heads=2, text_layers=2)


# ----------------------------------------------------------------------------- the PyTorch side
def torch_reference(model, config):
    """The PyTorch original with `model`'s weights, in the original repo's layout."""
    import torch
    from torch_reference import RetrievalReference

    cfg, adapter = model.clip.config, model.clip.method  # a Cross-Modal Adapter
    ref = RetrievalReference(cfg, adapter.reduction_dim, adapter.share_dim, head=config.model.head,
                             tau=config.model.tau)
    adapters = nnx.to_pure_dict(nnx.state(model.clip, AdapterParam))
    sd = {k: torch.from_numpy(np.array(v)) for k, v in to_cma(adapters, cfg, state.backbone_state(model)).items()}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"clip.input_resolution", "clip.context_length", "clip.vocab_size"}, \
        (missing, unexpected)
    return ref


class TorchStep:
    """One PyTorch train step: forward, backward, global-norm clipping, AdamW (decay on matrices only)."""

    def __init__(self, ref, method, train):
        import torch

        self.ref = ref
        named = [(n, p) for n, p in ref.named_parameters()
                 if n != "clip.logit_scale" and (method == "full" or "adapter" in n)]
        keep = {id(p) for _, p in named}
        for p in ref.parameters():
            p.requires_grad_(id(p) in keep)
        self.params = [p for _, p in named]
        groups = []
        for head in (True, False):
            for decay in (True, False):
                ps = [p for n, p in named if ("adapter" in n) == head and (p.ndim >= 2) == decay]
                if ps:
                    groups.append({"params": ps, "lr": train.lr if head else train.backbone_lr,
                                   "weight_decay": train.weight_decay if decay else 0.0})
        self.opt = torch.optim.AdamW(groups, betas=(train.b1, train.b2), eps=train.eps, foreach=True)
        self.grad_clip = train.grad_clip

    def __call__(self, batch) -> float:
        import torch

        self.opt.zero_grad(set_to_none=True)
        loss = self.ref(batch["frames"], batch["frame_mask"], batch["text_ids"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        return loss.item()


def torch_peak_bytes(step, batch) -> int:
    """Tensor bytes alive at the start of one step plus their largest growth during it (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(batch)
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action in (Action.PREEXISTING, Action.CREATE):
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------- helpers
def timed(fn, rounds: int, pause: float) -> dict[str, list[float]]:
    """{name: [seconds per round]} for the callables in `fn`, run in turn each round."""
    times = {name: [] for name in fn}
    for _ in range(rounds):
        for name, f in fn.items():
            time.sleep(pause)
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times, a, b) -> float:
    """Median over rounds of time[a] / time[b]."""
    return float(np.median([x / y for x, y in zip(times[a], times[b])]))


def med_ms(times, name) -> str:
    return f"{np.median(times[name]) * 1e3:8,.0f} ms"


def verdict(name, value) -> str:
    ok = "met" if value <= TARGETS[name] else "NOT met"
    return f"  {name:22s} {value:6.3f}  (target <= {TARGETS[name]:.2f})  {ok}"


def torch_matmul_rate(n: int = 2048, rounds: int = 7) -> float:
    """torch's float32 [n, n] @ [n, n] rate on this CPU, FLOP/s (median of `rounds`)."""
    import torch

    a = torch.ones(n, n)
    a @ a
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / float(np.median(times))


# ----------------------------------------------------------------------------- sections
def speed(args, clip):
    import torch

    config = bench_config(args.preset, args.videos, args.frames, args.words, head=args.head, clip=clip)
    model = build(config)
    batch = make_batch(config)
    jbatch = jax.tree.map(jnp.asarray, batch)
    tbatch = {k: torch.from_numpy(v) for k, v in batch.items()}
    jax_steps = {m: compile_step(model, config, m, jbatch) for m in METHODS}
    torch_steps = {m: TorchStep(torch_reference(model, config), m, config.train) for m in METHODS}
    first = {}  # the first step of each: same weights, same batch
    for m in METHODS:
        first[m] = (float(jax_steps[m](jbatch)["loss"]), torch_steps[m](tbatch))
    fn = {}
    for m in METHODS:
        fn[f"jax {m}"] = lambda m=m: jax.block_until_ready(jax_steps[m](jbatch))
        fn[f"torch {m}"] = lambda m=m: torch_steps[m](tbatch)
    fn = {k: fn[k] for k in ("jax cma", "torch cma", "jax full", "torch full")}
    times = timed(fn, args.rounds, args.pause)
    torch_mem = {m: torch_peak_bytes(torch_steps[m], tbatch) for m in METHODS}

    print(f"\n== speed: {args.preset}{' (smoke shapes)' if clip else ''}, {args.videos} videos x {args.frames} frames, "
          f"{args.words} words, float32, head {args.head}; jax {jax.__version__} on {jax.devices()[0].platform} "
          f"x{jax.device_count()}, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"{args.rounds} rounds")
    for m in METHODS:
        rel = abs(first[m][0] - first[m][1]) / abs(first[m][1])
        print(f"  first loss, {m:4s}: cma_jax {first[m][0]:.6f}  PyTorch {first[m][1]:.6f}  (rel diff {rel:.1e})")
    print(f"  {'step':18s} {'cma_jax':>11s} {'PyTorch':>11s}  cma_jax/PyTorch   XLA peak   PyTorch peak")
    for m, label in (("cma", "adapters (cma)"), ("full", "full fine-tuning")):
        print(f"  {label:18s} {med_ms(times, f'jax {m}')} {med_ms(times, f'torch {m}')}  "
              f"{ratio(times, f'jax {m}', f'torch {m}'):10.3f}       {mb(jax_steps[m].peak_bytes):>9s}  "
              f"{mb(torch_mem[m]):>9s}")
    print(f"  {'adapters / full':18s} {ratio(times, 'jax cma', 'jax full'):11.3f} "
          f"{ratio(times, 'torch cma', 'torch full'):11.3f}                   "
          f"{jax_steps['cma'].peak_bytes / jax_steps['full'].peak_bytes:9.3f}  "
          f"{torch_mem['cma'] / torch_mem['full']:9.3f}")
    print("  all rounds (ms): " + "; ".join(f"{k}: {', '.join(f'{t * 1e3:.0f}' for t in v)}" for k, v in times.items()))
    peak, peak_label = peak_rate("float32")
    torch_rate = torch_matmul_rate()
    print(f"  MFU (the step's FLOPs by XLA's cost analysis, the same model for both): cma_jax as a share of "
          f"{peak_label}, PyTorch of torch's float32 matmul rate {torch_rate / 1e9:.0f} GFLOP/s, both measured now")
    for m in METHODS:
        f = jax_steps[m].flops
        print(f"  {m:4s}: cma_jax {mfu(f, np.median(times[f'jax {m}']), peak)}; "
              f"PyTorch {mfu(f, np.median(times[f'torch {m}']), torch_rate)}")
    print("  targets:")
    print(verdict("jax/torch cma", ratio(times, "jax cma", "torch cma")))
    print(verdict("jax/torch full", ratio(times, "jax full", "torch full")))
    print(verdict("cma/full time", ratio(times, "jax cma", "jax full")))
    print(verdict("cma/full XLA memory", jax_steps["cma"].peak_bytes / jax_steps["full"].peak_bytes))


def remat(args, clip):
    config = bench_config(args.preset, args.videos, args.frames, args.words, head=args.head, clip=clip)
    batch = jax.tree.map(jnp.asarray, make_batch(config))
    steps, full_peak = {}, {}
    for r in REMAT_POLICIES:
        model = build(config, remat=r)
        steps[r] = compile_step(model, config, "cma", batch)
        jax.block_until_ready(steps[r](batch))
        full_peak[r] = compile_step(build(config, remat=r, abstract=True), config, "full", abstract_batch(config),
                                    abstract=True).peak_bytes
    times = timed({r: (lambda r=r: jax.block_until_ready(steps[r](batch))) for r in steps}, args.rounds, args.pause)
    print(f"\n== remat (CLIPConfig.remat), adapter step, same shapes; {args.rounds} rounds")
    print(f"  {'remat':6s} {'step':>11s} {'vs none':>8s} {'XLA peak':>10s} {'temporaries':>12s} "
          f"{'full step peak':>15s}")
    for r, s in steps.items():
        print(f"  {r:6s} {med_ms(times, r)} {ratio(times, r, 'none'):8.3f} {mb(s.peak_bytes):>10s} "
              f"{mb(s.temp_bytes):>12s} {mb(full_peak[r]):>15s}")


def accum(args, clip):
    big = bench_config(args.preset, args.accum_videos, args.accum_frames, args.words, head=args.head, clip=clip)
    model = build(big, abstract=True)
    print(f"\n== exact accumulation (cma_jax.gradcache), adapter step: XLA peak at {args.accum_videos} videos x "
          f"{args.accum_frames} frames (compiled, not run)")
    one = None
    for k in [1] + args.accum_k:
        s = compile_step(model, big, "cma", abstract_batch(big), grad_accum_steps=k, abstract=True)
        one = one or s.peak_bytes
        print(f"  k={k:<3d} XLA peak {mb(s.peak_bytes):>10s} ({s.peak_bytes / one:.3f} of one-shot), "
              f"temporaries {mb(s.temp_bytes):>10s}")
    small = bench_config(args.preset, args.accum_time_videos, args.frames, args.words, head=args.head, clip=clip)
    model = build(small)
    batch = jax.tree.map(jnp.asarray, make_batch(small))
    steps = {}
    for k in [1] + args.accum_time_k:
        steps[k] = compile_step(model, small, "cma", batch, grad_accum_steps=k)
        jax.block_until_ready(steps[k](batch))
    times = timed({k: (lambda k=k: jax.block_until_ready(steps[k](batch))) for k in steps}, args.rounds, args.pause)
    print(f"  step time at {args.accum_time_videos} videos x {args.frames} frames ({args.rounds} rounds):")
    for k in steps:
        print(f"  k={k:<3d} {med_ms(times, k)}  {ratio(times, k, 1):.3f} of one-shot  "
              f"XLA peak {mb(steps[k].peak_bytes)}")


def compile_times(args, clip):
    print(f"\n== compile time of the train step (lower + compile, {args.videos} videos x {args.frames} frames, "
          f"{args.words} words; not run)")
    for preset in args.compile_presets:
        config = bench_config(preset, args.videos, args.frames, args.words, head=args.head, clip=clip)
        model = build(config, abstract=True)
        for m in METHODS:
            s = compile_step(model, config, m, abstract_batch(config), abstract=True)
            print(f"  {preset:8s} {m:4s} {s.compile_s:6.1f} s   XLA peak {mb(s.peak_bytes)}")


SECTIONS = {"speed": speed, "remat": remat, "accum": accum, "compile": compile_times}


def main(argv=None):
    p = shape_args(__doc__.split("\n")[0])
    p.add_argument("--head", default="text_conditioned")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pause", type=float, default=0.2, help="seconds of idle before each timed step")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    p.add_argument("--accum_videos", type=int, default=128)
    p.add_argument("--accum_frames", type=int, default=12)
    p.add_argument("--accum_k", default="4,8,16")
    p.add_argument("--accum_time_videos", type=int, default=8)
    p.add_argument("--accum_time_k", default="2,4")
    p.add_argument("--compile_presets", default="vit_b32,vit_l14")
    p.add_argument("--smoke", action="store_true", help="tiny CLIP shapes and batches (a quick check that it runs)")
    args = p.parse_args(argv)
    args.accum_k = [int(k) for k in args.accum_k.split(",")]
    args.accum_time_k = [int(k) for k in args.accum_time_k.split(",")]
    args.compile_presets = args.compile_presets.split(",")
    clip = None
    if args.smoke:
        clip = SMOKE_CLIP
        args.videos, args.frames, args.words, args.rounds, args.pause = 4, 2, 8, 2, 0.0
        args.accum_videos, args.accum_frames, args.accum_k = 8, 2, [2, 4]
        args.accum_time_videos, args.accum_time_k, args.compile_presets = 4, [2], ["vit_b32"]
    for name in args.sections.split(","):
        SECTIONS[name](args, clip)


if __name__ == "__main__":
    main()
