"""Entry point: `python -m cma_jax.main --config=configs/msrvtt.py[:vit_b16] --workdir=DIR [--config.x=y]`.

config.mode: train | eval | train_and_eval (cma_jax.train.train_and_evaluate); the demo has its own
entry point (`python -m cma_jax.demo`). Multi-process runs: `--distributed` calls
`jax.distributed.initialize()` with auto-detection (TPU pods, SLURM); the local launcher passes
`--coordinator_address --num_processes --process_id` explicitly.
"""

from __future__ import annotations

import difflib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cma_jax import console

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/msrvtt.py or configs/msrvtt.py:vit_b16.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder (checkpoints, TensorBoard, results); may be gs://. "
                    "Default: runs/<data.name>_<method>.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with cluster auto-detection "
                  "(Cloud TPU pods, SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-process runs).")
FLAGS = flags.FLAGS


def init_distributed() -> None:
    """Join the multi-process job when asked to (flags); a no-op for single-process runs."""
    import jax
    if FLAGS.num_processes is not None and FLAGS.num_processes > 1:
        # CPU processes need a collectives backend to talk to each other (no effect on TPU/GPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()


def default_workdir(config) -> str:
    return os.path.join("runs", f"{config.data.name}_{config.method}")


def run(config, workdir: str):
    """Validate and run the config (what `main` does after flag parsing and distributed init)."""
    import jax

    from cma_jax import config as config_lib
    config_lib.validate(config, num_devices=jax.device_count())
    logging.info("process %d/%d, %d devices (%s); workdir %s", jax.process_index(), jax.process_count(),
                 jax.device_count(), jax.devices()[0].platform, workdir)
    from cma_jax import train
    return train.train_and_evaluate(config, workdir)


def _abbreviates(short: str, name: str) -> bool:
    """'lr' for 'learning_rate' (or 'lerning_rate'), 'wd' for 'weight_decay': the initials of its words."""
    return len(short) > 1 and "_" in name and short == "".join(w[0] for w in name.split("_") if w)


def _field_names(node, prefix: str = "") -> list[str]:
    """Every dotted field name (not the sections) of a config."""
    out = []
    for key in node.keys():
        if hasattr(node[key], "keys") and key != "extra":
            out += _field_names(node[key], prefix + key + ".")
        else:
            out.append(prefix + key)
    return out


def suggest_fields(path: list[str], base) -> list[str]:
    """Field names close to the unknown dotted `path` (['train', 'lerning_rate'] -> ['train.lr']).

    First the keys of the section where the lookup failed (difflib, a prefix, or an abbreviation
    either way: lr <-> learning_rate; a misspelt section keeps the rest of the path) and fields
    anywhere with the same name (train.num_frames -> data.num_frames); failing those, close dotted names.
    """
    node, depth = base, 0
    while depth < len(path) - 1 and hasattr(node, "keys") and path[depth] in node:
        node, depth = node[path[depth]], depth + 1
    key = path[depth]
    prefix, rest = "".join(p + "." for p in path[:depth]), "".join("." + p for p in path[depth + 1:])
    fields = _field_names(base)
    found = []
    if hasattr(node, "keys"):
        keys = list(node.keys())
        close = [k for k in keys
                 if _abbreviates(key, k) or _abbreviates(k, key) or (len(key) > 2 and k.startswith(key))]
        close += difflib.get_close_matches(key, keys, n=3, cutoff=0.7)
        found += [prefix + k + rest for k in close]
    found += [f for f in fields if f.rsplit(".", 1)[-1] == path[-1]]
    found = [f for f in dict.fromkeys(found) if f in fields]
    return (found or difflib.get_close_matches(".".join(path), fields, n=3, cutoff=0.75))[:3]


def check_overrides(argv) -> None:
    """Fail early, naming the field and the closest real ones, on `--config.<field>=` overrides no config has."""
    from cma_jax import config as config_lib
    base = config_lib.base_config()
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        node = base
        for i, key in enumerate(path):
            if path[0] == "extra":
                break
            if not hasattr(node, "keys") or key not in node:
                unknown = path[:i + 1]
                renamed = getattr(config_lib, "RENAMED", {}).get(".".join(unknown))
                close = ["config." + c for c in ([renamed] if renamed else suggest_fields(path, base))]
                hint = (f"; did you mean {close[0]}?" if len(close) == 1 else
                        f"; did you mean one of {', '.join(close)}?" if close else "")
                sys.exit(f"error: unknown config field config.{'.'.join(unknown)} in {arg!r}{hint} "
                         "(every field is in cma_jax/config.py)")
            node = node[key]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup(verbose=FLAGS.verbosity >= 1)
    init_distributed()
    config = FLAGS.config
    workdir = FLAGS.workdir or default_workdir(config)
    try:
        run(config, workdir)
    except Exception as e:
        # Bad input (config value, missing or wrong file/checkpoint/dataset) or a full disk: one clear
        # line, exit 1. Anything else is a bug and keeps its traceback; --verbosity=1 logs them all.
        line = console.error_line(e, workdir)
        if line is None:
            raise
        logging.debug("traceback", exc_info=True)
        sys.exit(line)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    check_overrides(sys.argv)
    app.run(main)
