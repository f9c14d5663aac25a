"""cma_jax.accelerators (the chips, named topologies) and sharding.make_mesh over a topology's devices."""

import pytest

import plugins
from cma_jax import accelerators


def test_topology_names_give_chips_and_hosts():
    cases = {"v5e-8": ("v5e", 8, 1), "v5e-16": ("v5e", 16, 4), "v4-32": ("v4", 16, 4), "v5p-8": ("v5p", 4, 1),
             "v5p-16": ("v5p", 8, 2), "v6e-8": ("v6e", 8, 1), "8xH100": ("H100", 8, 1), "16xA100": ("A100", 16, 2)}
    for name, (chip, chips, hosts) in cases.items():
        t = accelerators.topology(name)
        assert (t.chip.name, t.num_chips, t.num_hosts) == (chip, chips, hosts), name
    for bad in ("v5e-12", "v4-6", "12xH100", "tpu"):
        with pytest.raises(ValueError, match="--topology="):
            accelerators.topology(bad)


def test_every_chip_names_its_source_and_roofline_takes_the_slower_bound():
    for chip in accelerators.CHIPS.values():
        assert chip.source and chip.bf16_flops > 1e14 and chip.hbm_bytes >= 16 * 2 ** 30
    v5e = accelerators.CHIPS["v5e"]
    assert accelerators.roofline_seconds(197e12, 0, v5e) == pytest.approx(1.0)
    assert accelerators.roofline_seconds(1.0, 819e9 * 2, v5e) == pytest.approx(2.0)


MESHES = r"""
import json
from jax.experimental import topologies
from cma_jax import accelerators, sharding
from tiny import tiny_config

accelerators.libtpu_without_chips()
c = tiny_config(); c.mesh.fsdp = 2
out = {}
# v4 cores one by one (8 devices on 4 chips), v4-32 megacore over 4 hosts, v5e-16 over 4 hosts, v5p-16 over 2
per_core = topologies.get_topology_desc(platform="tpu", topology_name="v4:2x2x1").devices
named = {n: accelerators.devices(accelerators.topology(n)) for n in ("v4-32", "v5e-16", "v5p-16")}
for name, devs in {"v4-8 per core": per_core, **named}.items():
    m = sharding.make_mesh(c, devs)
    out[name] = [dict(m.shape), len(set(m.devices.flat)), len({d.process_index for d in m.devices.flat})]
print("RESULT", json.dumps(out))
"""


def test_make_mesh_over_tpu_topologies_megacore_per_core_and_multi_host():
    out = plugins.result(plugins.run_python(MESHES, plugins.env(plugins.TPU)))
    assert out == {"v4-8 per core": [{"data": 4, "fsdp": 2, "model": 1}, 8, 1],
                   "v4-32": [{"data": 8, "fsdp": 2, "model": 1}, 16, 4],
                   "v5e-16": [{"data": 8, "fsdp": 2, "model": 1}, 16, 4],
                   "v5p-16": [{"data": 4, "fsdp": 2, "model": 1}, 8, 2]}
