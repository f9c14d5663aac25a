"""Mesh construction, parameter and batch shardings, global arrays from per-process data, and back.

The only place that builds meshes and places trees and batches (training, evaluation, the API), and
that puts batches on the mesh ahead of the step that takes them (`Prefetcher`).

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism whose devices also hold a slice
of every large parameter), `model` (tensor parallelism over MLP / attention widths). The batch is
split over ("data", "fsdp"); parameters are sharded by a shape rule (no names): the last dimension
over `model` when divisible, then the largest remaining dimension divisible by the fsdp size over
`fsdp`. XLA's SPMD partitioner inserts the collectives (axes are `Auto`).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
# Parameters smaller than this stay replicated: sharding them costs more in collectives than it saves.
MIN_SHARD_SIZE = 2 ** 14


def mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, model) sizes with data=-1 resolved; raises naming the field when impossible."""
    d, f, m = config.mesh.data, config.mesh.fsdp, config.mesh.model
    for name, v in (("mesh.fsdp", f), ("mesh.model", m)):
        if v < 1:
            raise ValueError(f"config.{name} must be >= 1, got {v}")
    if d == -1:
        if num_devices % (f * m):
            raise ValueError(f"config.mesh: fsdp*model = {f * m} does not divide the {num_devices} devices")
        d = num_devices // (f * m)
    if d < 1 or d * f * m != num_devices:
        raise ValueError(f"config.mesh: data*fsdp*model = {d}*{f}*{m} must equal the number of devices "
                         f"({num_devices}); set config.mesh.data=-1 to use the rest")
    return d, f, m


def needs_gspmd(shape: tuple[int, ...]) -> bool:
    """Whether a (data, fsdp, model) mesh must use the GSPMD partitioner: all three axes > 1.

    XLA's SPMD partitioner (jax 0.10.2) miscompiles a dot's backward on such meshes: a cotangent is
    collective-permuted into another batch order, then contracted with the operand in the original
    order (tests/test_shardy.py reduces it to plain jax; the README has the upstream report). With
    Shardy's propagation our train step hits it; with GSPMD's it does not. Other meshes use Shardy.
    """
    return len(shape) == 3 and all(s > 1 for s in shape)


def select_partitioner(config, num_devices: int) -> None:
    """At process start (cma_jax.main, the demo): GSPMD only for the meshes that need it, else Shardy."""
    jax.config.update("jax_use_shardy_partitioner", not needs_gspmd(mesh_shape(config, num_devices)))


def make_mesh(config, devices=None) -> Mesh:
    """A (data, fsdp, model) mesh over `devices` (default: all global devices) from config.mesh.

    `devices` may span hosts (a pod) or be a topology's compile-only devices (cma_jax.accelerators),
    TPU v4 / v5p ones with one device per chip (megacore) or per core.

    Refuses a mesh that would silently get wrong gradients under the current partitioner
    (`needs_gspmd`): call `select_partitioner` first, as the entry points do.
    """
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(config, len(devices))
    if needs_gspmd(shape) and jax.config.jax_use_shardy_partitioner:
        raise ValueError(f"config.mesh: a {'x'.join(map(str, shape))} mesh (data, fsdp and model all > 1) needs "
                         "the GSPMD partitioner because of an XLA bug (see cma_jax.sharding.needs_gspmd); call "
                         "cma_jax.sharding.select_partitioner(config, jax.device_count()) at start-up")
    axis_types = (AxisType.Auto,) * len(AXES)
    if len({getattr(d, "core_on_chip", 0) for d in devices}) > 1:
        # TPU v4 / v5p cores addressed one by one (not megacore: e.g. a topology's compile-only devices),
        # which jax's physical layout refuses: chips in coordinate order, a chip's cores side by side.
        ordered = sorted(devices, key=lambda d: (d.process_index, tuple(d.coords), d.core_on_chip))
        return Mesh(np.array(ordered).reshape(shape), AXES, axis_types=axis_types)
    return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)


def local_data_mesh() -> Mesh | None:
    """A data-parallel mesh over this process's devices (None with one device): for inference."""
    devices = jax.local_devices()
    if len(devices) == 1:
        return None
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def data_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh's axes that split the batch."""
    return tuple(a for a in mesh.axis_names if a in BATCH_AXES)


def data_size(mesh: Mesh | None) -> int:
    """How many ways the batch is split (1 without a mesh)."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in data_axes(mesh)]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, P(data_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
    """The partition spec the shape rule gives one parameter (see the module docstring)."""
    spec = [None] * len(shape)
    if int(np.prod(shape, dtype=np.int64)) < MIN_SHARD_SIZE or not shape:
        return P(*spec)
    m, f = mesh.shape["model"], mesh.shape["fsdp"]
    if m > 1 and shape[-1] % m == 0:
        spec[-1] = "model"
    if f > 1:
        free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % f == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = "fsdp"
    return P(*spec)


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for every array leaf of `tree` (params, optimizer state, ...) by the shape rule."""
    def one(x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, param_spec(tuple(shape), mesh))
    return jax.tree.map(one, tree)


def shard_tree(tree, shardings):
    """Place a host or single-device tree onto the mesh with the given shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def place_on_mesh(tree, mesh: Mesh | None):
    """Leaves not yet on `mesh` (e.g. a freshly built model) are replicated onto it; sharded leaves stay."""
    if mesh is None:
        return tree
    rep = replicated(mesh)

    def place(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return x
        return jax.device_put(x, rep)
    return jax.tree.map(place, tree)


def global_array(local: np.ndarray, mesh: Mesh | None):
    """This process's rows -> a global array split over the data axes (a plain device array without a mesh)."""
    if mesh is None:
        return jax.numpy.asarray(local)
    return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(local))


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) jax array -> the full numpy array on every process."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Per-process numpy batch -> global jax arrays sharded over the data axes.

    Each process passes its own rows (global batch / process count); the global batch is their
    concatenation in process order.
    """
    return {k: global_array(v, mesh) for k, v in local_batch.items()}


class Prefetcher:
    """Global batches put on the mesh by a background thread, `depth` ahead of the step that takes them.

    Yields (global batch, the host iterator's `get_state()` right after that batch, or None if it has
    none): the state that resumes exactly after it, whatever was read ahead. Reads at most `count`
    batches (None: no limit), so a run reads no batch it will not train on. An exception of the host
    iterator is raised by the `next` that reaches its batch. `close()` stops the thread (the host
    iterator is the caller's to close, after it).
    """

    _DONE = object()

    def __init__(self, it: Iterator[dict], mesh: Mesh, count: int | None = None, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._fill, args=(it, mesh, count), daemon=True,
                                        name="device-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, it, mesh, count):
        n = 0
        while count is None or n < count:
            try:
                local = next(it)
                state = it.get_state() if hasattr(it, "get_state") else None
                item: Any = (global_batch(local, mesh), state)
            except BaseException as e:  # noqa: BLE001 (re-raised in the consumer, StopIteration included)
                item = e
            if not self._put(item) or isinstance(item, BaseException):
                return
            n += 1
        self._put(self._DONE)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict, Any]:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is self._DONE or isinstance(item, BaseException):
            self._finished = True
            if isinstance(item, BaseException):
                raise item
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
