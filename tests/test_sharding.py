"""Sharding: the shape rule, and the same training result on 1 device and on 8 devices in several meshes."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from cma_jax import run as run_lib
from cma_jax import sharding as shd
from cma_jax import train as train_lib
from cma_jax.models.peft.adapter import AdapterParam
from cma_jax import config as config_lib
from tiny import SyntheticBatches, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (data, fsdp, model, grad_accum_steps)
MESHES = [(8, 1, 1, 1), (2, 4, 1, 1), (1, 2, 4, 1), (2, 2, 2, 2)]


class _FakeMesh:
    def __init__(self, **shape):
        self.shape = shape


def test_param_spec_rule():
    mesh = _FakeMesh(data=1, fsdp=4, model=2)
    assert shd.param_spec((768, 3072), mesh) == jax.sharding.PartitionSpec("fsdp", "model")
    assert shd.param_spec((3072, 768), mesh) == jax.sharding.PartitionSpec("fsdp", "model")
    assert shd.param_spec((49408, 512), mesh) == jax.sharding.PartitionSpec("fsdp", "model")
    assert shd.param_spec((50, 770), mesh) == jax.sharding.PartitionSpec(None, "model")  # 50 % 4 != 0
    assert shd.param_spec((768,), mesh) == jax.sharding.PartitionSpec(None)  # small: replicated
    assert shd.param_spec((), mesh) == jax.sharding.PartitionSpec()


def test_gspmd_only_for_meshes_with_three_split_axes():
    assert shd.needs_gspmd((2, 2, 2)) and not shd.needs_gspmd((2, 4, 1)) and not shd.needs_gspmd((8, 1, 1))
    c = config_lib.base_config()
    shd.select_partitioner(c, 1)
    assert jax.config.jax_use_shardy_partitioner  # the default partitioner everywhere else


def test_mesh_shape_resolution_and_errors():
    c = config_lib.base_config()
    c.mesh.fsdp = 2
    assert shd.mesh_shape(c, 8) == (4, 2, 1)
    c.mesh.data = 3
    with pytest.raises(ValueError, match="config.mesh"):
        shd.mesh_shape(c, 8)


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from flax import nnx
    sys.path[:0] = [{root!r}, {tests!r}]
    from cma_jax import run as run_lib, sharding as shd, train as train_lib
    from cma_jax.models.peft.adapter import AdapterParam
    from tiny import SyntheticBatches, tiny_config
    shd.MIN_SHARD_SIZE = 0  # shard even the tiny model's parameters
    assert jax.device_count() == 8
    out = {{}}
    for d, f, m, k in {meshes!r}:
        c = tiny_config(save_every_steps=100, grad_accum_steps=k)
        c.mesh.data, c.mesh.fsdp, c.mesh.model = d, f, m
        shd.select_partitioner(c, jax.device_count())  # what cma_jax.main does at start-up
        model, hist = train_lib.train(run_lib.resolve(c, {workdir!r} + f"/{{d}}_{{f}}_{{m}}_{{k}}"), train_iter=SyntheticBatches(c))
        kernel = model.clip.visual.transformer.resblocks[0].mlp.c_fc.kernel[...]
        adapter = model.clip.visual.transformer.resblocks[0].mlp_adapter.down_kernel[...]
        out[f"{{d}}_{{f}}_{{m}}_{{k}}"] = dict(
            loss=[h["loss"] for h in hist],
            spec=[str(kernel.sharding.spec), str(adapter.sharding.spec)],
            adapters={{jax.tree_util.keystr(p): np.asarray(v).tolist()
                      for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(model, AdapterParam))[0]}})
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_same_result_on_one_and_eight_devices(tmp_path):
    refs = {}  # grad_accum_steps -> (losses, adapters) on this process's single device
    for k in sorted({mesh[3] for mesh in MESHES}):
        config = tiny_config(save_every_steps=100, grad_accum_steps=k)
        model, hist = train_lib.train(run_lib.resolve(config, str(tmp_path / f"ref{k}")), train_iter=SyntheticBatches(config))
        refs[k] = ([h["loss"] for h in hist],
                   {jax.tree_util.keystr(p): np.asarray(v)
                    for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(model, AdapterParam))[0]})

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), meshes=MESHES, workdir=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert set(results) == {"_".join(map(str, mesh)) for mesh in MESHES}
    # parameters really are distributed: fsdp and model axes appear in the specs
    assert "fsdp" in results["2_4_1_1"]["spec"][0] and "model" in results["1_2_4_1"]["spec"][0]
    for name, r in results.items():
        ref_loss, ref = refs[int(name.split("_")[-1])]
        np.testing.assert_allclose(r["loss"], ref_loss, rtol=1e-5, atol=1e-5, err_msg=name)
        for k, v in ref.items():
            np.testing.assert_allclose(np.asarray(r["adapters"][k]), v, rtol=1e-4, atol=1e-5, err_msg=f"{name} {k}")
