"""Run checkpoints (Orbax): trainable params, optimizer state, RNG state, data-iterator state, meta.

A run checkpoint never holds the frozen backbone: for method=cma `params` is the adapter tree only
(for method=full it is every weight, which is that baseline's point). Layout, one folder per step:

    WORKDIR/checkpoints/<step>/{params, opt_state, rngs, data, meta}

Orbax writes each step into a temporary folder and renames it when complete, so a save that is
interrupted never replaces or corrupts the previous checkpoint; the manager keeps the last N.
`data` holds each process's iterator state (`process_<i>-of-<n>.json`); `meta` records the
architecture, adapter shape and method so that restoring into another model fails with a message.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from cma_jax.models.adapter import AdapterConfig

CHECKPOINT_DIR = "checkpoints"


# ----------------------------------------------------------------------------- iterator state item
class DataStateHandler(ocp.CheckpointHandler):
    """One JSON file per process with that process's data-iterator state (any JSON value)."""

    def _file(self, directory) -> epath.Path:
        return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory, args: "DataStateSave"):
        self._file(directory).write_text(json.dumps(args.state))

    def restore(self, directory, args: "DataStateRestore | None" = None):
        f = self._file(directory)
        if not f.exists():
            found = sorted(p.name for p in epath.Path(directory).iterdir())
            raise ValueError(f"{directory}: no data-iterator state for this process ({f.name}); found {found}. "
                             "Resume with the same number of processes as the run that saved it.")
        return json.loads(f.read_text())

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: object


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def encode_iterator_state(state):
    """grain states are dicts (DatasetIterator) or bytes (DataLoader): make them JSON values."""
    if isinstance(state, bytes):
        return {"__bytes__": state.decode()}
    return state


def decode_iterator_state(state):
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return state["__bytes__"].encode()
    return state


# ----------------------------------------------------------------------------- meta
def run_meta(model, config) -> dict:
    """What a run checkpoint must match to be restored into `model`."""
    clip = model.clip
    adapter = clip.adapter_config
    return {
        "clip": dataclasses.asdict(dataclasses.replace(clip.config, dtype="float32")),
        "adapter": dataclasses.asdict(adapter) if adapter is not None else None,
        "method": config.method,
        "train_logit_scale": bool(config.model.train_logit_scale),
    }


def _check_meta(saved: dict, wanted: dict, where: str) -> None:
    diffs = []
    for key in ("method", "train_logit_scale"):
        if saved.get(key) != wanted[key]:
            diffs.append(f"{key}: checkpoint {saved.get(key)!r}, config {wanted[key]!r}")
    for section in ("clip", "adapter"):
        s, w = saved.get(section), wanted[section]
        if (s is None) != (w is None):
            diffs.append(f"{section}: checkpoint {s}, config {w}")
        elif s is not None:
            diffs += [f"{section}.{k}: checkpoint {s.get(k)!r}, config {w[k]!r}"
                      for k in w if k not in ("dtype", "dropout", "init_std") and s.get(k) != w[k]]
    if diffs:
        raise ValueError(f"run checkpoint {where} does not match this model/config:\n  " + "\n  ".join(diffs))


# ----------------------------------------------------------------------------- manager
def checkpoint_dir(path: str) -> str:
    """A workdir or its checkpoints/ folder -> the checkpoints/ folder."""
    path = os.fspath(path)
    if os.path.basename(os.path.normpath(path)) == CHECKPOINT_DIR:
        return path
    return os.path.join(path, CHECKPOINT_DIR)


class RunCheckpointer:
    """Saves and restores run checkpoints in WORKDIR/checkpoints (keeps the last `keep`)."""

    def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
        directory = checkpoint_dir(workdir)
        if "://" not in directory:  # gs:// etc. stay URLs (abspath would make them 'CWD/gs:/...')
            directory = os.path.abspath(directory)
        self.directory = directory
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state, meta: dict, force: bool = False) -> bool:
        """Save `state` ({params, opt_state, rngs}), the iterator state (JSON value) and meta."""
        items = dict(params=ocp.args.StandardSave(state["params"]),
                     opt_state=ocp.args.StandardSave(state["opt_state"]),
                     data=DataStateSave(encode_iterator_state(data_state)),
                     meta=ocp.args.JsonSave(meta))
        if jax.tree.leaves(state["rngs"]):
            items["rngs"] = ocp.args.StandardSave(state["rngs"])
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: dict, meta: dict):
        """-> (state, data_state); `abstract_state` gives structure, shapes and shardings."""
        saved_meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        _check_meta(saved_meta, meta, f"{self.directory}/{step}")
        items = dict(params=ocp.args.StandardRestore(abstract_state["params"]),
                     opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
                     data=DataStateRestore())
        if jax.tree.leaves(abstract_state["rngs"]):
            items["rngs"] = ocp.args.StandardRestore(abstract_state["rngs"])
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = {"params": out["params"], "opt_state": out["opt_state"],
                 "rngs": out["rngs"] if "rngs" in items else abstract_state["rngs"]}
        return state, decode_iterator_state(out["data"])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def abstract(tree, shardings=None):
    """ShapeDtypeStructs (with shardings when given) for a tree of arrays."""
    if shardings is None:
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------- loading for eval / search
def load_adapters(path: str, model, step: int | None = None) -> int | None:
    """Load the trained parameters of a run checkpoint (or a `convert.save_adapters` folder) into `model`.

    `path`: a workdir, its checkpoints/ folder, or an adapter folder written by cma_jax.convert.
    `model`: a RetrievalModel built with the same architecture / adapter shape (its backbone already
    loaded). Updates the model in place; returns the checkpoint step (None for converted adapters).
    Raises ValueError with the differences when the checkpoint was made for another model.
    """
    from cma_jax import partition

    if _is_converted(path):
        return _load_converted_adapters(path, model)
    ckpt, directory, step, saved = _open_run(path, step)
    # The two config fields partition.trainable_filter reads, as the saving run had them.
    cfg = ml_collections.ConfigDict({"method": saved.get("method"),
                                     "model": {"train_logit_scale": saved.get("train_logit_scale", False)}})
    _check_meta(saved, run_meta(model, cfg), f"{directory}/{step}")
    params = nnx.state(model, partition.trainable_filter(cfg))
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract(params))))["params"]
    nnx.update(model, restored)
    ckpt.close()
    return step


def saved_adapter_config(path: str) -> AdapterConfig | None:
    """The adapter shape of a run checkpoint or converted adapter folder (None: trained without adapters)."""
    from cma_jax import convert

    if _is_converted(path):
        return convert.load_adapters(path)[1]
    ckpt, _, _, saved = _open_run(path)
    ckpt.close()
    return AdapterConfig(**saved["adapter"]) if saved.get("adapter") else None


def _is_converted(path: str) -> bool:
    """An adapter folder written by cma_jax.convert (and not a run workdir)."""
    from cma_jax import convert

    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, convert.ADAPTER_CONFIG_FILE)) and not os.path.isdir(checkpoint_dir(path))


def _open_run(path: str, step: int | None = None):
    """(read-only checkpointer, its directory, step (default latest), that step's metadata) of a run."""
    directory = checkpoint_dir(os.fspath(path))
    if not epath.Path(directory).is_dir():  # local or gs://
        raise FileNotFoundError(f"{path}: no run checkpoint here (expected {directory}/<step>/), and neither "
                                "an adapter folder written by cma_jax.convert")
    ckpt = RunCheckpointer(directory, read_only=True)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory}: contains no finished checkpoint")
    saved = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return ckpt, directory, step, saved


def _load_converted_adapters(path: str, model) -> None:
    from cma_jax import convert

    clip_cfg, adapter_cfg, tree = convert.load_adapters(path)
    have_clip = dataclasses.replace(model.clip.config, dtype="float32")
    if dataclasses.replace(clip_cfg, dtype="float32") != have_clip or adapter_cfg != model.clip.adapter_config:
        raise ValueError(f"adapters in {path} were made for {clip_cfg} / {adapter_cfg}, "
                         f"but the model is {have_clip} / {model.clip.adapter_config}")
    convert.apply_state(model, tree)
    return None
