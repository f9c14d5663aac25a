"""cma_jax.compile: the fit search, the run's numbers, and real compiles of a tiny CLIP for TPU and GPU chips
(in subprocesses that can load libtpu / the CUDA plugin: tests/plugins.py)."""

import subprocess
import sys

import pytest

import plugins
from cma_jax import accelerators
from cma_jax import compile as compile_lib
from tiny import tiny_config


# ----------------------------------------------------------------------------- fit search
def test_fit_search_returns_the_cheapest_change_that_fits():
    config = tiny_config()  # batch 8 over 2 devices: grad_accum 1, 2, 4; fsdp 1, 2

    def memory(c):  # a fake memory function: remat and accumulation shrink the activations, fsdp nothing
        return 100 * {"none": 1.0, "dots": 0.7, "block": 0.4}[c.model.remat] / c.train.grad_accum_steps
    tried = []

    def counted(c):
        tried.append((c.train.grad_accum_steps, c.model.remat, c.mesh.fsdp))
        return memory(c)
    assert compile_lib.fit_search(config, 2, 60, counted) == {"model.remat": "block"}
    # cheapest first: fsdp, dots, dots+fsdp, then block fits (the unchanged config is known not to)
    assert tried == [(1, "none", 2), (1, "dots", 1), (1, "dots", 2), (1, "block", 1)]
    # block alone (40) and block + fsdp no longer fit; accumulating 2 (50) neither; 4 micro-batches (25) do
    assert compile_lib.fit_search(config, 2, 30, memory) == {"train.grad_accum_steps": 4}
    assert compile_lib.fit_search(config, 2, 1, memory) is None
    assert compile_lib.override_flags({"train.grad_accum_steps": 4, "model.remat": "block"}) == \
        "--config.train.grad_accum_steps=4 --config.model.remat=block"


def test_run_time_and_input_rate_follow_from_the_step():
    t = accelerators.topology("v5e-16")
    mem = compile_lib.Memory(1, 2, 3, 1)
    p = compile_lib.Plan(t, mem, None, flops=197e12, hbm_bytes=819e9 / 2, flops_source="test", compile_s=1.0,
                         batch_size=128, num_frames=12, num_steps=7030)
    assert mem.peak == 5
    assert p.step_seconds() == pytest.approx(1.0)  # compute-bound: 1 s at the peak, 0.5 s of HBM traffic
    assert p.step_seconds(0.4) == pytest.approx(2.5)
    assert p.frames_per_host(2.5) == pytest.approx(128 * 12 / 2.5 / 4)
    config = tiny_config(batch_size=128, epochs=5, num_steps=0)
    config.data.name = "msrvtt"
    assert compile_lib.num_steps(config, None) == 5 * (180_000 // 128)
    config.data.name = "somewhere"
    assert compile_lib.num_steps(config, None) is None and compile_lib.num_steps(config, 1280) == 50


# ----------------------------------------------------------------------------- real compiles
TPU_STEP = r"""
import json, jax
from cma_jax import accelerators
from cma_jax import compile as C
from tiny import tiny_config

c = tiny_config(); c.model.dtype = "bfloat16"
t = accelerators.topology("v5e-4")
p = C.plan(c, t, accelerators.devices(t))
r = C.abstract_run(c, jax.devices("cpu")[:1])
cpu = C.lower_train_step(r, C.abstract_model(r), 4).compile()
print("RESULT", json.dumps([p.flops, cpu.cost_analysis()["flops"], p.hbm_bytes, p.train.peak, p.eval.peak]))
"""


@pytest.mark.slow
def test_tiny_train_step_compiles_for_tpu_chips_with_the_cpu_compiles_flops():
    tpu_flops, cpu_flops, hbm, peak, eval_peak = plugins.result(plugins.run_python(TPU_STEP, plugins.env(plugins.TPU)))
    # 4 chips each run a quarter of the batch: together the CPU compile's whole-batch count, within 5 %
    assert tpu_flops * 4 == pytest.approx(cpu_flops, rel=0.05)
    assert hbm > 0 and 0 < peak < 2 ** 30 and 0 < eval_peak < 2 ** 30


GPU_STEP = r"""
import json
from cma_jax import accelerators
from cma_jax import compile as C
from tiny import tiny_config

c = tiny_config(); c.model.dtype = "bfloat16"
t = accelerators.topology("8xH100")
p = C.plan(c, t, accelerators.devices(t))
print("RESULT", json.dumps([p.flops, p.hbm_bytes, p.train.peak, p.eval.peak]))
"""
CPU_FLOPS = r"""
import jax
from cma_jax import compile as C
from tiny import tiny_config

c = tiny_config(); c.model.dtype = "bfloat16"
r = C.abstract_run(c, jax.devices()[:1])
low = C.lower_train_step(r, C.abstract_model(r), 4)
print("RESULT", low.compile().cost_analysis()["flops"])
"""


@pytest.mark.slow
def test_tiny_train_step_compiles_for_gpus_without_a_gpu():
    flops, hbm, peak, eval_peak = plugins.result(plugins.run_python(GPU_STEP, plugins.env(plugins.CUDA)))
    assert 0 < peak < 2 ** 30 and 0 < eval_peak < 2 ** 30 and hbm is None  # the GPU compiler counts no bytes
    # nor FLOPs: they are the CPU compile's of the same step, split over the 8 GPUs
    assert flops * 8 == pytest.approx(plugins.result(plugins.run_python(CPU_FLOPS, plugins.env())), rel=1e-6)


# ----------------------------------------------------------------------------- the pod launcher's compile check
FAKE_GCLOUD = """#!/bin/bash
echo "$*" >> "$GCLOUD_LOG"
if [[ "$*" == *"tpu-vm describe"* ]]; then echo v5litepod-16; fi
"""


def _pod(tmp_path, *main_flags):
    """launch/tpu_pod.sh on an existing slice with a fake gcloud (its calls logged) -> (process, gcloud calls)."""
    gcloud = tmp_path / "bin" / "gcloud"
    gcloud.parent.mkdir(exist_ok=True)
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    log = tmp_path / "gcloud.log"
    log.unlink(missing_ok=True)
    env = plugins.env(plugins.TPU)
    env.update(PATH=f"{gcloud.parent}:{env['PATH']}", GCLOUD_LOG=str(log), PYTHON=sys.executable)
    p = subprocess.run(["bash", "launch/tpu_pod.sh", "--tpu=pod1", "--zone=z", "--", "--config=tests/tiny.py",
                        "--workdir=gs://bucket/run", *main_flags], env=env, cwd=plugins.ROOT, capture_output=True,
                       text=True, timeout=600)
    return p, log.read_text().splitlines() if log.exists() else []


@pytest.mark.slow
def test_pod_launch_compiles_for_the_slice_before_starting_its_hosts(tmp_path):
    p, calls = _pod(tmp_path, "--config.train.batch_size=16")
    assert p.returncode == 0, p.stderr[-3000:]
    # the slice's type asked first, the step compiled for its 16 chips on 4 hosts, then every worker started
    assert "on v5litepod-16: 16 v5e chips, 4 host(s), mesh data/fsdp/model = 16x1x1" in p.stderr
    assert "fits" in p.stderr
    assert len(calls) == 2 and "tpu-vm describe pod1" in calls[0]
    assert calls[1].startswith("compute tpus tpu-vm ssh pod1 --zone=z --worker=all --command=cd cma_jax && "
                               "python3 -m cma_jax.main --distributed --config=tests/tiny.py")
    # a batch too big for the chips: the command's one line (and no libtpu discovery warnings), nothing started
    p, calls = _pod(tmp_path, "--config.train.batch_size=262144")
    assert p.returncode == 1
    said, error, stopped = p.stderr.strip().splitlines()
    assert said == "tpu_pod.sh: compiling the train step for v5litepod-16 first (cma_jax.compile)"
    # XLA's TPU compiler itself refuses the program (it leaves 15.75 GiB of a v5e's 16 for it)
    assert error.startswith("error: vit_b32 cma does not fit v5litepod-16: XLA refuses its train step, HLO "
                            "temporaries need "), error
    assert error.endswith("a v5e leaves 15.75 GiB of its 16.00 GiB; run with --fit for the cheapest change "
                          "(train.grad_accum_steps, model.remat, mesh.fsdp), or use a larger slice or a smaller "
                          "train.batch_size")
    assert stopped == "tpu_pod.sh: nothing was started: the run does not compile for v5litepod-16 (above)"
    assert len(calls) == 1 and "describe" in calls[0]
