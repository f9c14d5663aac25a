"""Two JAX processes on localhost (CPU, gloo) through launch/local.py (and cma_jax.main's flags) match one process."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from cma_jax import run as run_lib
from cma_jax import train as train_lib
from cma_jax.models.peft.adapter import AdapterParam
from tiny import SyntheticBatches, get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_local_launcher_dry_run_lists_every_process():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes=3", "--port=1234",
                          "--devices_per_process=2", "--dry_run", "--", "python", "-m", "cma_jax.main",
                          "--config=configs/msrvtt.py"], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert line.startswith("XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu python -m")
        assert line.endswith(f"--coordinator_address=localhost:1234 --num_processes=3 --process_id={i}")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
    workdir = str(tmp_path / "mp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes=2", "--",
                           sys.executable, os.path.join(ROOT, "tests", "tiny.py"), f"--workdir={workdir}"], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]

    config = get_config()
    model, history = train_lib.train(run_lib.resolve(config, str(tmp_path / "single")), train_iter=SyntheticBatches(config))
    ref = {jax.tree_util.keystr(p): np.asarray(v)
           for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(model, AdapterParam))[0]}
    for i in range(2):
        with open(os.path.join(workdir, f"history_process{i}.json")) as f:
            hist = json.load(f)
        np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in history], rtol=1e-5)
        got = np.load(os.path.join(workdir, f"adapters_process{i}.npz"))
        assert set(got.files) == set(ref)
        for k, v in ref.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-6, err_msg=f"process {i} {k}")


def _sh(*args):
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm.sh"])
def test_shell_launchers_parse_and_pass_shellcheck(script):
    path = os.path.join(ROOT, "launch", script)
    assert _sh("-n", path).returncode == 0
    import shutil
    if shutil.which("shellcheck"):  # CI images without it still run bash -n above
        p = subprocess.run(["shellcheck", path], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout


def test_tpu_pod_dry_run_runs_the_same_command_on_every_worker():
    p = _sh(os.path.join(ROOT, "launch", "tpu_pod.sh"), "--tpu=pod1", "--zone=us-central2-b", "--create",
            "--accelerator=v4-32", "--setup", "--repo=https://example.com/cma_jax.git", "--branch=main", "--dry_run",
            "--", "--config=configs/msrvtt.py:vit_b16", "--workdir=gs://bucket/runs/msrvtt")
    assert p.returncode == 0, p.stderr
    create, setup, run = p.stdout.strip().splitlines()
    assert create.startswith("gcloud compute tpus tpu-vm create pod1 --zone=us-central2-b --accelerator-type=v4-32")
    assert "--worker=all" in setup and "git\\ clone" in setup and "jax\\[tpu\\]" in setup
    assert run.startswith("gcloud compute tpus tpu-vm ssh pod1 --zone=us-central2-b --worker=all --command=")
    assert "python3\\ -m\\ cma_jax.main\\ --distributed\\ --config=configs/msrvtt.py:vit_b16\\ " \
           "--workdir=gs://bucket/runs/msrvtt" in run
    bad = _sh(os.path.join(ROOT, "launch", "tpu_pod.sh"), "--tpu=pod1", "--zone=z", "--dry_run", "--",
              "--config=configs/msrvtt.py", "--workdir=/local/dir")
    assert bad.returncode == 2 and "gs://" in bad.stderr


# jax's SLURM auto-detection makes task i of a node drive the node's GPU i (local_device_ids =
# [SLURM_LOCALID]): per=gpu tasks must all see the node's GPUs (not --gpus-per-task=1, where task i>0
# sees one GPU numbered 0: invalid device ordinal), and per=node must name every GPU itself.
@pytest.mark.parametrize("per, tasks", [("gpu", "--ntasks-per-node=4\n#SBATCH --gpus-per-node=4"),
                                        ("node", "--ntasks-per-node=1\n#SBATCH --gpus-per-node=4")])
def test_slurm_dry_run_prints_the_batch_script(per, tasks):
    p = _sh(os.path.join(ROOT, "launch", "slurm.sh"), "--nodes=2", "--gpus_per_node=4", f"--per={per}",
            "--partition=a100", "--dry_run", "--", "--config=configs/msrvtt.py", "--workdir=/shared/runs/x")
    assert p.returncode == 0, p.stderr
    script = p.stdout
    assert "#SBATCH --nodes=2\n#SBATCH " + tasks in script and "#SBATCH --partition=a100" in script
    assert script.strip().endswith("srun python -m cma_jax.main --distributed --config=configs/msrvtt.py "
                                   "--workdir=/shared/runs/x")
    assert "--gpus-per-task" not in script
    assert ("export JAX_LOCAL_DEVICE_IDS=0,1,2,3\n" in script) == (per == "node")
    assert _sh("-n", "-c", script).returncode == 0  # the generated script itself parses
    bad = _sh(os.path.join(ROOT, "launch", "slurm.sh"), "--per=socket", "--dry_run", "--", "--config=x")
    assert bad.returncode == 2 and "--per must be gpu or node" in bad.stderr


def test_local_launcher_ctrl_c_lets_processes_save(tmp_path):
    """Ctrl-C reaches every process (one process group): the launcher must wait for their interrupt saves."""
    import signal
    import time
    child = ("import sys, time\n"
             "try:\n    time.sleep(60)\n"
             "except KeyboardInterrupt:\n"
             "    time.sleep(1.5)  # the save-on-interrupt\n"
             f"    open({str(tmp_path)!r} + '/saved_' + sys.argv[-1].split('=')[1], 'w').close()\n"
             "    raise SystemExit(130)\n")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes=2", "--",
                             sys.executable, "-c", child], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(3)  # both processes started
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    out, _ = proc.communicate(timeout=60)
    assert sorted(os.listdir(tmp_path)) == ["saved_0", "saved_1"], out
    assert proc.returncode == 130
