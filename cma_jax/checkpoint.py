"""Every Orbax format of the project, read and written here only: backbone folders, run checkpoints (trained
parameters, optimizer, RNG and data-iterator state, metadata; never the frozen backbone), adapter folders
(a run checkpoint's layout with params and metadata only); docs/training.md ("Checkpoint formats") lays them out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath
from flax import nnx

from cma_jax import optim, paths
from cma_jax.errors import CheckpointError, CheckpointMismatch
from cma_jax.files import write_dir_atomic
from cma_jax.models import peft
from cma_jax.models.clip import CLIPConfig
from cma_jax.trees import flatten, unflatten

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- iterator state item
class DataStateHandler(ocp.CheckpointHandler):
    """One JSON file per process with that process's data-iterator state (any JSON value).

    Not grain's own handler (`grain.checkpoint.CheckpointHandler`): that one saves `item.get_state()` of the
    live iterator at save time and restores by `set_state` + `start_prefetch` on a live grain iterator. The
    loop saves the state it recorded for the step being saved (on an interrupt, the interrupted step's,
    while the live iterator may be a batch ahead), and iterators without grain's protocol are resumed by
    skipping batches (cma_jax.train). The file is grain's: `process_<i>-of-<n>.json`.
    """

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
DATA_FIELDS = ("num_frames", "fps", "max_words")  # what encoding a video / caption needs to match training


def run_meta(model, train_logit_scale: bool = False, data=None, training: dict | None = None) -> dict:
    """What a run checkpoint must match to be restored into `model`: its architecture and method.

    `data` (config.data) is recorded so that evaluation and search default to the frames and words the
    model was trained with; `training` records the settings that a resumed run must keep
    (`cma_jax.config.training_settings`).
    """
    clip = model.clip
    meta = {
        "clip": _arch(clip.config),
        "method": clip.method.name,
        "method_config": clip.method.to_dict(),
        "train_logit_scale": bool(train_logit_scale),
        "data": {k: data[k] for k in DATA_FIELDS} if data is not None else None,
    }
    if training is not None:
        meta["training"] = dict(training)
    return meta


def method_of(meta: dict) -> peft.Method:
    """The method a checkpoint's metadata records (checkpoints of cma_jax before the method layer: `adapter`)."""
    if "method_config" in meta:
        return peft.make(meta["method"], meta["method_config"])
    if meta.get("adapter"):
        return peft.make("cma", meta["adapter"])
    return peft.make(meta.get("method") or "zero_shot")


def differences(saved: dict, current: dict, names=("saved", "now"), ignore=()) -> list[str]:
    """'key: saved X, now Y' for every key of two flat dicts that differs (the one config-difference printer)."""
    a, b = names
    return [f"{k}: {a} {saved.get(k)!r}, {b} {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if k not in ignore and saved.get(k) != current.get(k)]


def _check_training(saved: dict, wanted: dict, where: str) -> None:
    """Refuse to resume a run under another training configuration, naming the fields that differ."""
    s, w = saved.get("training"), wanted.get("training")
    if s is None or w is None:
        return
    diffs = ["config." + d for d in differences({k: s.get(k) for k in w}, w, ("checkpoint", "now"))]
    if diffs:
        raise CheckpointMismatch(
            f"{where} was saved by a run with another training configuration:\n  " + "\n  ".join(diffs) +
            "\n  resume with the same settings, use another --workdir, or pass "
            "--config.train.allow_config_change=True to continue with the new ones")


def _arch(cfg: CLIPConfig) -> dict:
    """The CLIPConfig fields that describe the weights (not how to compute with them)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in CLIPConfig.COMPUTE_FIELDS}


def model_differences(saved: dict, wanted: dict, names=("checkpoint", "config")) -> list[str]:
    """How two metadata records' models differ: method, architecture, the method's weight-defining fields."""
    saved_method, wanted_method = method_of(saved), method_of(wanted)
    top = {"method": saved_method.name, "train_logit_scale": saved.get("train_logit_scale", False)}
    now = {"method": wanted_method.name, "train_logit_scale": wanted.get("train_logit_scale", False)}
    diffs = differences(top, now, names)
    diffs += ["clip." + d for d in differences(saved.get("clip") or {}, wanted.get("clip") or {}, names)]
    if saved_method.name == wanted_method.name:
        diffs += [f"{wanted_method.section or wanted_method.name}.{d}"
                  for d in differences(saved_method.architecture(), wanted_method.architecture(), names)]
    return diffs


def _check_meta(saved: dict, wanted: dict, where: str) -> None:
    diffs = model_differences(saved, wanted)
    if diffs:
        raise CheckpointMismatch(f"run checkpoint {where} does not match this model/config:\n  " + "\n  ".join(diffs))


# ----------------------------------------------------------------------------- run checkpoints
def checkpoint_dir(path: str) -> str:
    """A workdir or its checkpoints/ folder -> the checkpoints/ folder."""
    path = os.fspath(path)
    if paths.path(path).name == paths.CHECKPOINTS:
        return path
    return os.fspath(paths.Workdir(path).checkpoints)


class RunCheckpointer:
    """Saves and restores run checkpoints in WORKDIR/checkpoints (keeps the last `keep`)."""

    def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
        self.directory = directory = os.fspath(paths.absolute(checkpoint_dir(workdir)))
        # The last `keep` steps, and always the one of lowest training loss: a run that slowly went bad
        # keeps its best-known-good state even after `keep` later saves.
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: -m["loss"], n=1,
                                          keep_checkpoints_without_metrics=False)])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: optim.TrainState, data_state, meta: dict, force: bool = False,
             loss: float | None = None) -> bool:
        """Save the train state's params, opt_state and rngs, the iterator state (JSON value) and meta;
        `loss` (the mean training loss since the last save) ranks it for keeping the best one."""
        parts = state.checkpointed()
        items = dict(params=ocp.args.StandardSave(parts["params"]),
                     opt_state=ocp.args.StandardSave(parts["opt_state"]),
                     data=DataStateSave(encode_iterator_state(data_state)),
                     meta=ocp.args.JsonSave(meta))
        if jax.tree.leaves(parts["rngs"]):
            items["rngs"] = ocp.args.StandardSave(parts["rngs"])
        metrics = {"loss": float(loss)} if loss is not None else None
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force, metrics=metrics)

    def read_meta(self, step: int) -> dict:
        """The metadata of one step (reads only that JSON item)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: optim.TrainState, meta: dict, allow_config_change: bool = False):
        """-> (train state at `step`, data_state); `abstract_state` gives structure, shapes and shardings."""
        saved = self.read_meta(step)
        _check_meta(saved, meta, f"{self.directory}/{step}")
        if not allow_config_change:
            _check_training(saved, meta, f"run checkpoint {self.directory}/{step}")
        parts = abstract_state.checkpointed()
        items = dict(params=ocp.args.StandardRestore(parts["params"]),
                     opt_state=ocp.args.StandardRestore(parts["opt_state"]),
                     data=DataStateRestore())
        if jax.tree.leaves(parts["rngs"]):
            items["rngs"] = ocp.args.StandardRestore(parts["rngs"])
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = abstract_state.replace(params=out["params"], opt_state=out["opt_state"],
                                       rngs=out["rngs"] if "rngs" in items else parts["rngs"])
        return state, decode_iterator_state(out["data"])

    def restore_latest(self, abstract_state: optim.TrainState, meta: dict, allow_config_change: bool = False):
        """-> (state, data_state, step) of the newest step that restores, or None when there is none.

        A step that cannot be read (truncated arrays, missing items, garbage metadata) is logged with
        its reason, moved aside to checkpoints_damaged/ (never deleted) and the previous one is tried;
        a sound checkpoint of another model or training config raises CheckpointMismatch instead.
        When every step is damaged this raises rather than start again from step 0.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        damaged = []
        for step in steps:
            try:
                state, data_state = self.restore(step, abstract_state, meta, allow_config_change)
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read a step means it is damaged
                reason = _reason(e)
                moved = self._move_aside(step)
                damaged.append(f"step {step} ({reason})")
                log.warning("checkpoint step %d in %s cannot be restored: %s; %s; trying the previous step",
                            step, self.directory, reason, f"moved it to {moved}" if moved else "left in place")
                continue
            if damaged:
                log.warning("resuming from step %d, the newest intact checkpoint (skipped: %s)", step, "; ".join(damaged))
            return state, data_state, step
        if damaged:
            raise CheckpointError(f"{self.directory}: no checkpoint could be restored: {'; '.join(damaged)}. They "
                                  f"were moved to {self._damaged_dir()}; "
                                  "delete that folder and the run starts from step 0, or restore a backup")
        return None

    def _damaged_dir(self) -> epath.Path:
        return paths.Workdir(paths.path(self.directory).parent).damaged

    def _move_aside(self, step: int) -> str | None:
        """Move a damaged step out of the manager's sight (process 0, local folders); its new path.

        A remote step stays in place: an object store renames a folder object by object, not at once.
        """
        if paths.is_remote(self.directory):
            return None
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"cma_jax_damaged_{step}")
        target = None
        if jax.process_index() == 0:
            aside = self._damaged_dir()
            aside.mkdir(parents=True, exist_ok=True)
            target = os.fspath(aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"cma_jax_damaged_{step}_moved")
        self.manager.reload()
        return target

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def abstract(tree, shardings=None):
    """ShapeDtypeStructs (with shardings when given) for a tree of arrays."""
    if shardings is None:
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _reason(e: Exception) -> str:
    """One line saying why a restore failed (tensorstore and Orbax errors can be kilobytes of spec)."""
    text = " ".join(str(e).split())
    text = text.split(" See full TensorStore details")[0]  # the rest is a kilobyte-long spec
    if isinstance(e, KeyError):
        text = f"missing item {text}"
    elif isinstance(e, json.JSONDecodeError):
        text = f"unreadable metadata ({text})"
    text = text or type(e).__name__
    return text if len(text) <= 200 else text[:200] + "..."


# ----------------------------------------------------------------------------- trained parameters
def _open_run(path: str, step: int | None = None):
    """(read-only checkpointer, step (default latest), that step's metadata) of a run or adapter folder."""
    path = os.fspath(path)
    directory = checkpoint_dir(path)
    if not paths.path(directory).is_dir():
        if (paths.path(path) / LEGACY_ADAPTER_CONFIG).is_file():
            raise CheckpointError(f"{path}: an adapter folder written by an older cma_jax; convert the original "
                                  "checkpoint again (python -m cma_jax.convert import SRC BACKBONE --adapters_out DIR)")
        raise FileNotFoundError(f"{path}: no run checkpoint here (expected {directory}/<step>/), and neither "
                                "an adapter folder written by cma_jax.convert")
    ckpt = RunCheckpointer(directory, read_only=True)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        ckpt.close()
        raise FileNotFoundError(f"{directory}: contains no finished checkpoint")
    return ckpt, step, ckpt.read_meta(step)


def load_adapters(path: str, model, step: int | None = None) -> int:
    """Load the trained parameters of a run checkpoint or adapter folder into `model` -> its step.

    `path`: a workdir, its checkpoints/ folder, or an adapter folder (`save_adapters`). `model`: a
    RetrievalModel of the same architecture / adapter shape (its backbone already loaded); updated in
    place. Raises ValueError with the differences when the checkpoint was made for another model.
    """
    ckpt, step, saved = _open_run(path, step)
    try:
        train_ls = saved.get("train_logit_scale", False)
        _check_meta(saved, run_meta(model, train_ls), f"{ckpt.directory}/{step}")
        params = nnx.state(model, optim.trainable_filter(model.clip.method, train_ls))
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(params))))["params"]
    finally:
        ckpt.close()
    nnx.update(model, restored)
    return step


def saved_meta(path: str) -> dict:
    """The metadata of the latest checkpoint of a run or adapter folder (reads only that JSON)."""
    ckpt, _, saved = _open_run(path)
    ckpt.close()
    return saved


def saved_method(path: str) -> peft.Method:
    """The method (with its hyper-parameters) of a run checkpoint or adapter folder."""
    return method_of(saved_meta(path))


def saved_data_config(path: str) -> dict | None:
    """{num_frames, fps, max_words} the run was trained with; None when not recorded."""
    return saved_meta(path).get("data")


def save_adapters(path: str, model, overwrite: bool = False) -> None:
    """Save what `model`'s method trains as an adapter folder (the run layout, step 0), atomically."""
    if not model.clip.method.trains:
        raise ValueError(f"method {model.clip.method.name} has no trained parameters to save")
    meta = run_meta(model)
    params = nnx.state(model, optim.trainable_filter(model.clip.method))

    def write(tmp: str):
        ckpt = RunCheckpointer(tmp)
        ckpt.manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                     meta=ocp.args.JsonSave(meta)), force=True)
        ckpt.wait()
        ckpt.close()

    write_dir_atomic(path, write, overwrite)


# ----------------------------------------------------------------------------- backbone folders
CONFIG_FILE = "clip_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
LEGACY_ADAPTER_CONFIG = "adapter_config.json"  # adapter folders of cma_jax before the run layout


def save_backbone(path: str, clip_cfg: CLIPConfig, state: dict, tokenizer_files=(), overwrite: bool = False):
    """Save a backbone pure dict as a read-only Orbax checkpoint folder, atomically.

    Layout: `clip_config.json`, `params/` (Orbax), `tokenizer/` (when tokenizer files are given).
    Refuses to replace an existing `path` unless `overwrite`.
    """
    def write(tmp: str):
        os.makedirs(tmp)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(_arch(clip_cfg), f, indent=2, sort_keys=True)
        if tokenizer_files:
            os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
            for file in tokenizer_files:
                shutil.copy2(file, os.path.join(tmp, TOKENIZER_DIR, os.path.basename(file)))
        flat = {k: np.asarray(v, np.float32) for k, v in flatten(state).items()}
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), flat)
        for root, _, names in os.walk(tmp):  # read-only: a run never writes a backbone
            for n in names:
                os.chmod(os.path.join(root, n), 0o444)

    write_dir_atomic(path, write, overwrite)


def load_backbone_config(path: str) -> CLIPConfig:
    """The architecture of a backbone folder (reads only its clip_config.json)."""
    file = paths.absolute(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: not a cma_jax backbone folder (no {CONFIG_FILE} inside); convert "
                              "weights with `python -m cma_jax.convert import SRC OUT`")
    try:
        return CLIPConfig(**json.loads(file.read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: not a valid CLIP config ({e})") from None


def load_backbone(path: str, abstract_state: dict | None = None) -> tuple[CLIPConfig, dict]:
    """-> (CLIPConfig, backbone pure dict): `load_backbone_config` and `load_backbone_params`."""
    return load_backbone_config(path), load_backbone_params(path, abstract_state)


def load_backbone_params(path: str, abstract_state: dict | None = None) -> dict:
    """The backbone pure dict of a backbone folder. Pass `abstract_state` (a pure dict of
    jax.ShapeDtypeStruct with shardings) to restore straight into sharded arrays."""
    params = paths.absolute(path) / PARAMS_DIR
    if not params.is_dir():
        raise CheckpointError(f"{path}: not a cma_jax backbone folder (no {PARAMS_DIR}/ inside)")
    with ocp.StandardCheckpointer() as ckptr:
        if abstract_state is None:
            meta = ckptr.metadata(params).item_metadata
            abstract_flat = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in meta.items()}
        else:
            abstract_flat = flatten(abstract_state)
        flat = ckptr.restore(params, abstract_flat)
    return unflatten(flat)


def tokenizer_dir(path: str) -> str | None:
    """The tokenizer files saved beside a backbone (local or gs://), or None when the source had none."""
    d = paths.absolute(path) / TOKENIZER_DIR
    return os.fspath(d) if d.is_dir() else None
