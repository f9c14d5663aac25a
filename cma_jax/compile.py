"""Plan a run for TPUs or GPUs from any machine: `python -m cma_jax.compile --config=configs/msrvtt.py
--topology=v5e-8 [--fit] [--config.x=y]` compiles the train step and the evaluation encode step that
`cma_jax.main` runs, for the topology's chips, and reports per chip the HBM peak, FLOPs and bytes per
step, the roofline step time, the whole run's time, and the frames/s each host must feed.

The model is built abstractly (no weights, no data); the chips come from cma_jax.accelerators. A
configuration that does not fit stops with one line; `--fit` finds the cheapest change that fits
(`fit_search`). docs/accelerators.md has the table and what such a compile cannot tell.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from cma_jax import accelerators, console, evaluate, loader, optim, train
from cma_jax import config as config_lib
from cma_jax import run as run_lib
from cma_jax import sharding as shd
from cma_jax.errors import DoesNotFit
from cma_jax.run import Run

# XLA's GPU compiler without a GPU: Triton's GEMM tiling needs autotuning on the device ("Couldn't find
# output tile sizes" on a bf16[9600,768] dot), so deviceless compiles use cuBLAS's GEMMs, untuned.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 0}
# Training pairs per epoch of the datasets whose size is fixed (docs/data.md, docs/image_text.md).
TRAIN_PAIRS = {"msrvtt": 180_000, "flickr30k": 145_000}
GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Memory:
    """XLA's per-chip memory of one compiled program, in bytes."""

    arguments: int
    temporaries: int
    outputs: int
    aliased: int  # donated arguments reused as outputs

    @property
    def peak(self) -> int:
        return self.arguments + self.temporaries + self.outputs - self.aliased

    @classmethod
    def of(cls, compiled) -> "Memory":
        m = compiled.memory_analysis()
        return cls(m.argument_size_in_bytes, m.temp_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes)

    def line(self) -> str:
        return (f"{self.peak / GiB:.2f} GiB (arguments {self.arguments / GiB:.2f}, temporaries {self.temporaries / GiB:.2f}, "
                f"outputs {self.outputs / GiB:.2f}, donated {self.aliased / GiB:.2f})")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one compile for a topology found (per chip) and what it implies for the run."""

    topology: accelerators.Topology
    train: Memory
    eval: Memory | None
    flops: float  # per chip per step
    hbm_bytes: float | None  # per chip per step (None: the GPU compiler does not report it)
    flops_source: str
    compile_s: float
    batch_size: int
    num_frames: int
    num_steps: int | None

    @property
    def peak(self) -> int:
        return max(self.train.peak, self.eval.peak if self.eval else 0)

    @property
    def fits(self) -> bool:
        return self.peak <= self.topology.chip.hbm_bytes

    def step_seconds(self, mfu: float | None = None) -> float:
        """The roofline bound (mfu None), or the step time at a share `mfu` of the chip's bf16 peak."""
        chip = self.topology.chip
        if mfu is not None:
            return self.flops / (mfu * chip.bf16_flops)
        return accelerators.roofline_seconds(self.flops, self.hbm_bytes or 0, chip)

    def frames_per_host(self, seconds: float) -> float:
        """Frames per second each host's input pipeline must decode to keep a step of `seconds` fed."""
        return self.batch_size * self.num_frames / seconds / self.topology.num_hosts


# ----------------------------------------------------------------------------- the programs
def abstract_run(config, devices) -> Run:
    """The run value of a checked `config` on `devices`: an untrained backbone of the config's architecture
    (nothing is downloaded), its mesh through cma_jax.sharding."""
    return Run(config=config, workdir=None, method=loader.method(config),
               backbone=loader.Backbone.random(loader.clip_config(config)), tokenizer=None,
               mesh=shd.make_mesh(config, devices), writer=None)


def abstract_model(run: Run):
    """The run's model as shapes only (nnx.eval_shape): no weights are read or initialised."""
    return nnx.eval_shape(lambda: loader.from_run(run)[0])


def _with_sharding(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def train_batch(run: Run) -> dict:
    """ShapeDtypeStructs of one global training batch (the pipeline's batch contract)."""
    c = run.config
    b, t, words, res = c.train.batch_size, c.data.num_frames, c.data.max_words, run.clip.image_resolution
    return {"frames": jax.ShapeDtypeStruct((b, t, res, res, 3), jnp.uint8),
            "frame_mask": jax.ShapeDtypeStruct((b, t), jnp.bool_),
            "text_ids": jax.ShapeDtypeStruct((b, words), jnp.int32),
            "text_mask": jax.ShapeDtypeStruct((b, words), jnp.int32)}


def lower_train_step(run: Run, model, num_steps: int):
    """The train step cma_jax.train runs (`train.build_step`), lowered on abstract arguments."""
    graphdef, params, rngs, frozen = optim.split(model, run.method, bool(run.config.model.train_logit_scale))
    step_fn, _, _, tx, _ = train.build_step(run, graphdef, params, rngs, frozen, num_steps)
    state = optim.TrainState(params=params, opt_state=jax.eval_shape(tx.init, params), rngs=rngs,
                             step=jax.ShapeDtypeStruct((), jnp.int32))
    return step_fn.lower(state, frozen, train_batch(run))


def lower_eval_steps(run: Run, model) -> list:
    """cma_jax.evaluate's encode steps (captions, videos) lowered on one eval batch of abstract arguments."""
    graphdef, state = evaluate._split_eval(model)
    state = _with_sharding(state, shd.replicated(run.mesh))
    rows = shd.batch_sharding(run.mesh)
    c = run.config
    b, t, res = c.eval.batch_size, c.data.num_frames, run.clip.image_resolution
    ids = jax.ShapeDtypeStruct((b, c.data.max_words), jnp.int32, sharding=rows)
    frames = jax.ShapeDtypeStruct((b, t, res, res, 3), jnp.uint8, sharding=rows)
    mask = jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=rows)
    return [evaluate._encode_text.lower(graphdef, state, ids),
            evaluate._encode_frames.lower(graphdef, state, frames, mask)]


# ----------------------------------------------------------------------------- compile and measure
class OutOfMemory(Exception):
    """XLA refused to compile: the program needs more HBM than the chip leaves it (TPU compiles check)."""

    def __init__(self, needed: float, available: float, what: str):
        super().__init__(f"{what}: {needed / GiB:.2f} GiB, {available / GiB:.2f} GiB available")
        self.needed, self.available, self.what = needed, available, what


_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
# "the total memory required for HLO temporaries (61.41G) exceeds available HBM (15.75G)"
_OOM = re.compile(r"memory required for ([^(]+?) \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
# "Used 20.50G of 15.75G hbm."
_OOM_USED = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")


def _compile(lowered, platform: str):
    """lowered.compile() for the platform; OutOfMemory when XLA finds it does not fit the chip."""
    try:
        return lowered.compile(compiler_options=GPU_COMPILER_OPTIONS if platform == "cuda" else None)
    except Exception as e:  # noqa: BLE001 - XLA's errors have no type of their own: read the message
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        m = _OOM.search(text)
        if m:
            raise OutOfMemory(float(m[2]) * _UNITS[m[3]], float(m[4]) * _UNITS[m[5]], m[1]) from None
        m = _OOM_USED.search(text)
        if m:
            raise OutOfMemory(float(m[1]) * _UNITS[m[2]], float(m[3]) * _UNITS[m[4]], "the program") from None
        raise


def num_steps(config, train_pairs: int | None) -> int | None:
    """The run's optimizer steps: train.num_steps, or epochs over `train_pairs` (None when unknown)."""
    if config.train.num_steps > 0:
        return config.train.num_steps
    pairs = train_pairs or TRAIN_PAIRS.get(config.data.name)
    return int(config.train.epochs * (pairs // config.train.batch_size)) if pairs else None


def whole_step_flops(config, steps: int) -> float:
    """FLOPs of one whole train step (all chips together): XLA's count of the step compiled for one CPU device
    (the optimised program: it agrees with the TPU compiler's count, the unoptimised one is ~15 % lower)."""
    run = abstract_run(with_overrides(config, {"mesh.data": -1, "mesh.fsdp": 1, "mesh.model": 1}),
                       jax.devices("cpu")[:1])
    return float(lower_train_step(run, abstract_model(run), steps).compile().cost_analysis()["flops"])


def plan(config, topo: accelerators.Topology, devices, *, train_pairs: int | None = None,
         with_eval: bool = True, count_flops: bool = True) -> Plan:
    """Compile `config`'s train step (and eval encode steps) for `devices` of `topo` and measure them.

    `count_flops=False` skips the CPU compile that counts a GPU step's FLOPs (flops 0: the fit search
    needs the memory only)."""
    shd.select_partitioner(config, len(devices))
    run = abstract_run(config, devices)
    steps = num_steps(config, train_pairs)
    t0 = time.perf_counter()
    lowered = lower_train_step(run, abstract_model(run), steps or 1)
    compiled = _compile(lowered, topo.chip.platform)
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    if cost:  # TPU: the partitioned program's own count, per chip
        flops, hbm, source = float(cost["flops"]), float(cost["bytes accessed"]), "XLA cost analysis of this compile"
    else:  # the GPU compiler reports none: XLA's count of the same step for one CPU device, split over the chips
        flops = whole_step_flops(config, steps or 1) / len(devices) if count_flops else 0.0
        hbm = None
        source = "XLA's count of the same step compiled for one CPU device / chips (the GPU compiler reports none)"
    p = Plan(topo, Memory.of(compiled), None, flops, hbm, source, compile_s, config.train.batch_size,
             config.data.num_frames, steps)
    return with_eval_memory(p, run) if with_eval else p


def state_bytes(config) -> int:
    """Bytes of the model's weights and the optimizer state, all chips' shares together."""
    run = abstract_run(with_overrides(config, {"mesh.data": -1, "mesh.fsdp": 1, "mesh.model": 1}),
                       jax.devices("cpu")[:1])
    _, params, _, frozen = optim.split(abstract_model(run), run.method, bool(config.model.train_logit_scale))
    tx, _ = optim.make_optimizer(config.train, params, 1)
    leaves = jax.tree.leaves((params, frozen, jax.eval_shape(tx.init, params)))
    return sum(x.size * x.dtype.itemsize for x in leaves if hasattr(x, "dtype"))


def with_eval_memory(p: Plan, run: Run) -> Plan:
    """`p` with the HBM of the evaluation encode steps (the larger of captions' and videos')."""
    lowered = lower_eval_steps(run, abstract_model(run))
    memory = [Memory.of(_compile(low, p.topology.chip.platform)) for low in lowered]
    return dataclasses.replace(p, eval=max(memory, key=lambda m: m.peak))


# ----------------------------------------------------------------------------- fit search
# Relative step cost of each change (what it adds to a step of the unchanged config): `dots` recomputes
# the cheap elementwise work and attention, `block` a block's whole forward; gradient caching runs
# every micro-batch's forward twice; FSDP gathers the sharded weights at every step (communication only).
REMAT_COST = {"none": 1.0, "dots": 1.1, "block": 1.33}
ACCUM_COST = 1.33
FSDP_COST = 1.03


def candidates(config, num_devices: int) -> list[dict]:
    """Every (train.grad_accum_steps, model.remat, mesh.fsdp) the config allows, cheapest first."""
    data_ways = num_devices // config.mesh.model
    out = []
    for k, remat, fsdp in itertools.product([2 ** i for i in range(8)], REMAT_COST, [2 ** i for i in range(8)]):
        micro = config.train.batch_size // k
        if config.train.batch_size % k or fsdp > data_ways or data_ways % fsdp or micro % data_ways:
            continue
        cost = REMAT_COST[remat] * (ACCUM_COST * (1 + 0.01 * math.log2(k)) if k > 1 else 1.0) \
            * (FSDP_COST ** math.log2(fsdp))
        out.append((cost, {"train.grad_accum_steps": k, "model.remat": remat, "mesh.fsdp": fsdp}))
    return [c for _, c in sorted(out, key=lambda x: x[0])]


def with_overrides(config, overrides: dict):
    """A copy of `config` with dotted-field overrides."""
    c = config.copy_and_resolve_references()
    for name, value in overrides.items():
        section, field = name.split(".")
        c[section][field] = value
    return c


def fit_search(config, num_devices: int, hbm_bytes: int, memory) -> dict | None:
    """The cheapest change (the overrides that differ from `config`, which does not fit) whose `memory(config)`
    fits `hbm_bytes`.

    `memory(config) -> bytes per chip` is a compile in the command (`run`), anything in tests.
    None when nothing fits.
    """
    current = {"train.grad_accum_steps": config.train.grad_accum_steps, "model.remat": config.model.remat,
               "mesh.fsdp": config.mesh.fsdp}
    for change in candidates(config, num_devices):
        if change != current and memory(with_overrides(config, change)) <= hbm_bytes:
            return {k: v for k, v in change.items() if v != current[k]}
    return None


def override_flags(overrides: dict) -> str:
    return " ".join(f"--config.{k}={v}" for k, v in overrides.items())


# ----------------------------------------------------------------------------- report
def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def report(p: Plan, mfu: float, config) -> str:
    """The lines the command prints for a plan."""
    t, chip = p.topology, p.topology.chip
    bound = p.step_seconds()
    at_mfu = max(p.step_seconds(mfu), bound)  # an MFU whose step beats the HBM bound is out of reach: the bound
    unreachable = " (the HBM bound: that MFU is out of reach)" if p.step_seconds(mfu) < bound else ""
    lines = [
        f"{config.model.preset} {config.method} {config.model.dtype}, batch {p.batch_size} x {p.num_frames} frames, "
        f"on {t.name}: {t.num_chips} {chip.name} chips, {t.num_hosts} host(s), mesh "
        f"data/fsdp/model = {'x'.join(map(str, shd.mesh_shape(config, t.num_chips)))}",
        f"compile: {p.compile_s:.1f} s (train step)",
        f"HBM per chip: train step {p.train.line()}",
    ]
    if p.eval:
        lines.append(f"HBM per chip: eval encode step {p.eval.line()}")
    lines += [
        f"HBM per chip: peak {p.peak / GiB:.2f} GiB of the {chip.name}'s {chip.hbm_bytes / GiB:.2f} GiB: "
        + ("fits" if p.fits else "DOES NOT FIT"),
        f"per chip per step: {p.flops / 1e12:.3f} TFLOP"
        + (f", {p.hbm_bytes / GiB:.2f} GiB of HBM traffic" if p.hbm_bytes is not None else "")
        + f" ({p.flops_source})",
        f"step time: >= {bound * 1e3:.1f} ms (roofline: {chip.bf16_flops / 1e12:.0f} TFLOP/s bf16"
        + (f", {chip.hbm_bandwidth / 1e9:.0f} GB/s" if p.hbm_bytes is not None else "") + f"), "
        f"{at_mfu * 1e3:.1f} ms at {mfu:.0%} MFU{unreachable}",
    ]
    if p.num_steps:
        lines.append(f"run: {p.num_steps} steps: {_duration(p.num_steps * bound)} at the bound, "
                     f"{_duration(p.num_steps * at_mfu)} at {mfu:.0%} MFU")
    else:
        lines.append("run: the number of steps is unknown (set --train_pairs or --config.train.num_steps)")
    lines.append(f"input: {p.frames_per_host(at_mfu):,.0f} frames/s per host at {mfu:.0%} MFU "
                 f"({p.frames_per_host(bound):,.0f} at the bound), {t.num_hosts} host(s)")
    return "\n".join(lines)


def _advice(which: str) -> str:
    return ("run with --fit for the cheapest change (train.grad_accum_steps, model.remat, mesh.fsdp), or use a "
            "larger slice or a smaller train.batch_size" + (" / eval.batch_size" if which == "eval encode step" else ""))


def does_not_fit(p: Plan, config) -> DoesNotFit:
    chip = p.topology.chip
    which = "train step" if p.train.peak >= p.peak else "eval encode step"
    mem = p.train if which == "train step" else p.eval
    return DoesNotFit(f"{config.model.preset} {config.method} does not fit {p.topology.name}: its {which} needs "
                      f"{p.peak / GiB:.2f} GiB per chip (temporaries {mem.temporaries / GiB:.2f}), a {chip.name} has "
                      f"{chip.hbm_bytes / GiB:.2f} GiB; {_advice(which)}")


def refused(e: OutOfMemory, topo: accelerators.Topology, config) -> DoesNotFit:
    return DoesNotFit(f"{config.model.preset} {config.method} does not fit {topo.name}: XLA refuses its train step, "
                      f"{e.what} need {e.needed / GiB:.2f} GiB per chip, a {topo.chip.name} leaves "
                      f"{e.available / GiB:.2f} GiB of its {topo.chip.hbm_bytes / GiB:.2f} GiB; {_advice('train step')}")


# ----------------------------------------------------------------------------- command
def run(config, topology: str, *, fit: bool = False, mfu: float = 0.4, train_pairs: int | None = None,
        with_eval: bool = True, overridden=()) -> Plan:
    """What the command does after flag parsing: validate, compile, print the report; DoesNotFit when it does not."""
    topo = accelerators.topology(topology)
    run_lib.check(config, topo.num_chips, overridden)
    devices = accelerators.devices(topo)
    fields = ("train.grad_accum_steps", "model.remat", "mesh.fsdp")
    temporaries = {}  # by (grad_accum, remat) at mesh.fsdp=1
    try:
        p = plan(config, topo, devices, train_pairs=train_pairs, with_eval=with_eval)
        print(report(p, mfu, config), flush=True)
        if p.fits:
            return p
        problem, temps = does_not_fit(p, config), p.train.temporaries
    except OutOfMemory as e:
        problem, temps = refused(e, topo, config), e.needed if "temporaries" in e.what else 0
    if config.mesh.fsdp == 1:
        temporaries[(config.train.grad_accum_steps, config.model.remat)] = temps
    if not fit:
        raise problem
    print(f"{problem}\n--fit: searching train.grad_accum_steps, model.remat, mesh.fsdp for the cheapest change "
          "that fits", flush=True)

    tried = {}  # plans by their (grad_accum, remat, fsdp)
    # FSDP shards the weights, the optimizer state and their gradients, not the activations: a change of
    # mesh.fsdp alone is not compiled when the temporaries at mesh.fsdp=1, less twice the whole state, still
    # exceed the HBM.
    shardable = 2 * state_bytes(config)

    def memory(trial):
        k, remat, fsdp = (trial[f.split(".")[0]][f.split(".")[1]] for f in fields)
        flags_ = override_flags(dict(zip(fields, (k, remat, fsdp))))
        if fsdp > 1 and temporaries.get((k, remat), 0) - shardable > topo.chip.hbm_bytes:
            print(f"  {flags_}: skipped, FSDP cannot bring its temporaries at mesh.fsdp=1 under the HBM", flush=True)
            return math.inf
        try:
            tried[(k, remat, fsdp)] = p = plan(trial, topo, devices, train_pairs=train_pairs, with_eval=False,
                                               count_flops=False)
            peak, temps = p.train.peak, p.train.temporaries
            print(f"  {flags_}: {peak / GiB:.2f} GiB", flush=True)
        except OutOfMemory as e:
            peak, temps = math.inf, e.needed if "temporaries" in e.what else 0
            print(f"  {flags_}: refused by XLA ({e})", flush=True)
        if fsdp == 1:
            temporaries[(k, remat)] = temps
        return peak

    change = fit_search(config, topo.num_chips, topo.chip.hbm_bytes, memory)
    if change is None:
        raise DoesNotFit(f"{config.model.preset} {config.method} does not fit {topo.name} with any combination of "
                         "train.grad_accum_steps, model.remat and mesh.fsdp: use a larger slice or a smaller "
                         "train.batch_size")
    fitted_config = with_overrides(config, change)
    fitted = tried[tuple(fitted_config[f.split(".")[0]][f.split(".")[1]] for f in fields)]
    if not fitted.flops:
        fitted = dataclasses.replace(fitted, flops=whole_step_flops(fitted_config, fitted.num_steps or 1) / len(devices))
    if with_eval:
        fitted = with_eval_memory(fitted, abstract_run(fitted_config, devices))
    print(f"\nfits with: {override_flags(change)}\n" + report(fitted, mfu, fitted_config), flush=True)
    if not fitted.fits:
        raise does_not_fit(fitted, fitted_config)
    return fitted


def _define_flags() -> None:
    """The command's flags (defined only when run as a program: cma_jax.main defines --config too)."""
    config_flags.DEFINE_config_file("config", None, "Config file, as for cma_jax.main (configs/msrvtt.py[:vit_l14]).",
                                    lock_config=True)
    flags.DEFINE_string("topology", None, "TPU slice (v5e-8, v5e-16, v4-32, v5p-8, v6e-8, ...) or GPUs (8xH100, "
                        "8xA100, 16xH100).")
    flags.DEFINE_bool("fit", False, "If the config does not fit, search train.grad_accum_steps, model.remat and "
                      "mesh.fsdp for the cheapest change that does, and print it as the overrides to pass.")
    flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation the run time and input rate are also given at.")
    flags.DEFINE_integer("train_pairs", None, "Training (video, caption) pairs per epoch, for the run time "
                         f"(default known for {', '.join(TRAIN_PAIRS)}).")
    flags.DEFINE_bool("eval", True, "Also compile the evaluation encode steps.")


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup(verbose=FLAGS.verbosity >= 1)
    try:
        run(FLAGS.config, FLAGS.topology, fit=FLAGS.fit, mfu=FLAGS.mfu, train_pairs=FLAGS.train_pairs,
            with_eval=FLAGS.eval, overridden=tuple(config_flags.get_override_values(FLAGS["config"])))
    except (ValueError, RuntimeError) as e:  # bad input, a config that does not fit, a missing plugin: one line
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["config", "topology"])
    if config_lib.unknown_override(sys.argv[1:]):
        sys.exit(f"error: {config_lib.unknown_override(sys.argv[1:])}")
    app.run(main, flags_parser=console.parse_flags)
