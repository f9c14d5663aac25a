"""Accelerator chips and slice topologies: the one table of chips (peak rate, HBM), and the compile-only
devices of a named topology (`v5e-8`, `v4-32`, `8xH100`) for planning a run on a machine without them.

TPU devices come from libtpu (`pip install -e '.[tpu]'`), GPU devices from the CUDA plugin
(`'.[cuda]'`) with a target description built from the table; neither needs the hardware. The
numbers of each chip are the vendor's published ones (sources beside them); docs/accelerators.md
says how cma_jax.compile uses them.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: dense bf16 peak, HBM capacity and bandwidth, chips on one host."""

    name: str
    platform: str  # "tpu" | "cuda"
    bf16_flops: float  # FLOP/s, dense (no structured sparsity)
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    chips_per_host: int
    source: str
    # CUDA only: what XLA's GPU compiler needs to know of the device (its GpuDeviceInfo).
    sm_count: int = 0
    compute_capability: tuple[int, int] = (0, 0)
    clock_ghz: float = 0.0
    l2_bytes: int = 0
    shared_memory_per_sm: int = 0
    fp32_units_per_sm: int = 0


CHIPS = {
    "v4": Chip("v4", "tpu", 275e12, 32 * GiB, 1200e9, 4,
               "cloud.google.com/tpu/docs/v4: 275 TFLOPS bf16, 32 GiB HBM2, 1200 GB/s; 4 chips per host"),
    "v5e": Chip("v5e", "tpu", 197e12, 16 * GiB, 819e9, 8,
                "cloud.google.com/tpu/docs/v5e: 197 TFLOPS bf16, 16 GiB HBM2e, 819 GB/s; 8 chips on a v5e-8 host, "
                "4 per host in larger slices"),
    "v5p": Chip("v5p", "tpu", 459e12, 95 * GiB, 2765e9, 4,
                "cloud.google.com/tpu/docs/v5p: 459 TFLOPS bf16, 95 GiB HBM2e, 2765 GB/s; 4 chips per host"),
    "v6e": Chip("v6e", "tpu", 918e12, 32 * GiB, 1640e9, 8,
                "cloud.google.com/tpu/docs/v6e: 918 TFLOPS bf16, 32 GiB HBM, 1640 GB/s; 8 chips on a v6e-8 host, "
                "4 per host in larger slices"),
    "H100": Chip("H100", "cuda", 989e12, 80 * 10 ** 9, 3.35e12, 8,
                 "NVIDIA H100 SXM5 datasheet: 989 TFLOPS bf16 dense (1979 with sparsity), 80 GB HBM3, 3.35 TB/s; "
                 "132 SMs at up to 1.98 GHz, compute capability 9.0, 50 MB L2, 228 KiB shared memory per SM; "
                 "8 per HGX host",
                 sm_count=132, compute_capability=(9, 0), clock_ghz=1.98, l2_bytes=50 * 2 ** 20,
                 shared_memory_per_sm=228 * 1024, fp32_units_per_sm=128),
    "A100": Chip("A100", "cuda", 312e12, 80 * 10 ** 9, 2039e9, 8,
                 "NVIDIA A100 SXM4 80GB datasheet: 312 TFLOPS bf16 dense (624 with sparsity), 80 GB HBM2e, "
                 "2039 GB/s; 108 SMs at up to 1.41 GHz, compute capability 8.0, 40 MB L2, 164 KiB shared memory "
                 "per SM; 8 per HGX host",
                 sm_count=108, compute_capability=(8, 0), clock_ghz=1.41, l2_bytes=40 * 2 ** 20,
                 shared_memory_per_sm=164 * 1024, fp32_units_per_sm=64),
    "H200": Chip("H200", "cuda", 989e12, 141 * 10 ** 9, 4.8e12, 8,
                 "NVIDIA H200 SXM datasheet: 989 TFLOPS bf16 dense (1979 with sparsity), 141 GB HBM3e, 4.8 TB/s; "
                 "the H100's 132 SMs; 8 per HGX host",
                 sm_count=132, compute_capability=(9, 0), clock_ghz=1.98, l2_bytes=50 * 2 ** 20,
                 shared_memory_per_sm=228 * 1024, fp32_units_per_sm=128),
}
# jax's device_kind -> the table's chip (TPU runtimes' names; NVIDIA's product strings contain the model).
_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
          "TPU v6 lite": "v6e", "TPU v6e": "v6e"}

# Chip grids by chip count: v5e / v6e slices are 2D, v4 / v5p 3D (Cloud TPU's accelerator types).
_GRID_2D = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1), 16: (4, 4, 1), 32: (4, 8, 1), 64: (8, 8, 1),
            128: (8, 16, 1), 256: (16, 16, 1)}
_GRID_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
            256: (4, 8, 8), 512: (8, 8, 8)}
# v4 / v5p accelerator types count TensorCores, two per chip, run as one device per chip (megacore).
_CORES_PER_CHIP = {"v4": 2, "v5p": 2}
_TPU_NAME = re.compile(r"^(v4|v5e|v5p|v6e)-(\d+)$")
_GPU_NAME = re.compile(r"^(\d+)x(H100|H200|A100)$")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named slice: its chip, how many chips, how many hosts (one process each)."""

    name: str
    chip: Chip
    num_chips: int
    num_hosts: int
    grid: tuple[int, ...]  # TPU chip grid (x, y, z); GPUs: (1, hosts, chips per host)

    @property
    def chips_per_host(self) -> int:
        return self.num_chips // self.num_hosts


def topology(name: str) -> Topology:
    """`v5e-8` (or `v5litepod-8`), `v5e-16`, `v4-32`, `v5p-8`, `v6e-8`, `8xH100`, `16xA100`, ... -> Topology
    (ValueError otherwise)."""
    m = _TPU_NAME.match(name.replace("v5litepod-", "v5e-"))  # Cloud TPU's accelerator type for v5e
    if m:
        kind, n = m.group(1), int(m.group(2))
        chips = n // _CORES_PER_CHIP.get(kind, 1)
        grids = _GRID_3D if kind in _CORES_PER_CHIP else _GRID_2D
        if n % _CORES_PER_CHIP.get(kind, 1) or chips not in grids:
            counts = sorted(c * _CORES_PER_CHIP.get(kind, 1) for c in grids)
            raise ValueError(f"--topology={name}: {kind} slices come as {kind}-N with N in {counts}")
        chip = CHIPS[kind]
        hosts = 1 if chips <= chip.chips_per_host else chips // 4
        return Topology(name, chip, chips, hosts, grids[chips])
    m = _GPU_NAME.match(name)
    if m:
        n, chip = int(m.group(1)), CHIPS[m.group(2)]
        if n < 1 or (n > chip.chips_per_host and n % chip.chips_per_host):
            raise ValueError(f"--topology={name}: up to {chip.chips_per_host} GPUs on one host, or a multiple of "
                             f"{chip.chips_per_host} over several")
        hosts = max(1, n // chip.chips_per_host)
        return Topology(name, chip, n, hosts, (1, hosts, n // hosts))
    raise ValueError(f"--topology={name!r}: expected a TPU slice (v4-8, v5e-8, v5p-8, v6e-8, ... v4-32, v5e-16) or "
                     "GPUs as NxH100 / NxH200 / NxA100 (8xH100)")


def chip_of(device) -> Chip | None:
    """The table's chip of a jax device (None for CPUs and chips not in the table)."""
    kind = device.device_kind
    if kind in _KINDS:
        return CHIPS[_KINDS[kind]]
    return next((c for name, c in CHIPS.items() if c.platform == "cuda" and name in kind), None)


def tpu_chips_attached() -> bool:
    """Whether this machine has TPU chips (the device files libtpu opens)."""
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def libtpu_without_chips() -> None:
    """Settings for libtpu on a machine without TPU chips (compiling for a topology); none on a TPU VM.

    libtpu asks the Cloud TPU metadata server for the accelerator type and worker hostnames and warns on
    stderr at every JAX start-up when there is none, and it lets one process at a time load it (a lock
    file). Without a chip attached nothing uses these values and nothing is shared. Call before JAX
    initialises its backends.
    """
    if tpu_chips_attached():
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def gpu_target_config(chip: Chip) -> str:
    """The GpuTargetConfig text proto XLA's GPU compiler takes in place of a real device, from the table."""
    major, minor = chip.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {chip.shared_memory_per_sm}
  shared_memory_per_block_optin: {chip.shared_memory_per_sm - 1024}
  threads_per_core_limit: 2048
  core_count: {chip.sm_count}
  fpus_per_core: {chip.fp32_units_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bandwidth)}
  l2_cache_size: {chip.l2_bytes}
  clock_rate_ghz: {chip.clock_ghz}
  device_memory_size: {chip.hbm_bytes}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 1 }}
device_description_str: "NVIDIA {chip.name}"
"""


def devices(topo: Topology) -> list:
    """The compile-only devices of `topo` (no hardware needed): libtpu for TPUs, the CUDA plugin for GPUs.

    RuntimeError naming the extra to install when the plugin is missing.
    """
    from jax.experimental import topologies

    if topo.chip.platform == "tpu":
        try:
            import libtpu  # noqa: F401 - only to say what is missing
        except ImportError:
            raise RuntimeError(f"--topology={topo.name} needs libtpu to compile for TPUs: "
                               "pip install -e '.[tpu]'") from None
        libtpu_without_chips()
        x, y, z = topo.grid
        kwargs = {"chip_config_name": "megacore"} if topo.chip.name in _CORES_PER_CHIP else {}
        if topo.num_hosts == 1:
            kwargs["chips_per_host_bounds"] = topo.grid
        else:
            kwargs["chips_per_host_bounds"] = (2, 2, 1)
        name = f"{topo.chip.name}:{x}x{y}" + (f"x{z}" if topo.chip.name in _CORES_PER_CHIP else "")
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs).devices)
    # The CUDA plugin checks the installed CUDA libraries against a GPU at start-up (cuInit), which fails
    # without one and keeps it from registering: skip the check, there is no GPU to run on.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    try:
        desc = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(topo.chip),
                                            topology="x".join(map(str, topo.grid)))
    except Exception as e:  # noqa: BLE001 - the plugin's own error says little: name the fix
        raise RuntimeError(f"--topology={topo.name} needs the CUDA plugin to compile for GPUs "
                           f"(pip install -e '.[cuda]'): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                           ) from None
    return list(desc.devices)


def roofline_seconds(flops: float, hbm_bytes: float, chip: Chip) -> float:
    """Lower bound of a step's time on one chip: its FLOPs at the bf16 peak or its HBM traffic at full bandwidth."""
    return max(flops / chip.bf16_flops, hbm_bytes / chip.hbm_bandwidth)

