"""Entry point: `python -m cma_jax.main --config=configs/msrvtt.py[:vit_b16] --workdir=DIR [--config.x=y]`.

config.mode: train | eval | train_and_eval (cma_jax.train.train_and_evaluate), or config.entry
('module:function') for programs such as the demo. Multi-process runs: `--distributed` calls
`jax.distributed.initialize()` with auto-detection (TPU pods, SLURM); the local launcher passes
`--coordinator_address --num_processes --process_id` explicitly.
"""

from __future__ import annotations

import importlib
import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/msrvtt.py or configs/msrvtt.py:vit_b16.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder (checkpoints, TensorBoard, results); may be gs://. "
                    "Default: runs/<data.name>_<method> (runs/demo for configs/demo.py).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with cluster auto-detection "
                  "(Cloud TPU pods, SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-process runs).")
FLAGS = flags.FLAGS


class _QuietOrbax(py_logging.Filter):
    """Orbax logs every save step at INFO; keep its warnings only."""

    def filter(self, record):
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


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
    if config.entry:  # a program such as the demo (cma_jax.demo:run -> runs/demo)
        return os.path.join("runs", config.entry.split(":", 1)[0].rsplit(".", 1)[-1])
    return os.path.join("runs", f"{config.data.name}_{config.method}")


def run(config, workdir: str):
    """Validate and run the config (what `main` does after flag parsing and distributed init)."""
    import jax

    from cma_jax import config as config_lib
    config_lib.validate(config, num_devices=jax.device_count())
    logging.info("process %d/%d, %d devices (%s); workdir %s", jax.process_index(), jax.process_count(),
                 jax.device_count(), jax.devices()[0].platform, workdir)
    if config.entry:
        module, fn = config.entry.split(":", 1)
        return getattr(importlib.import_module(module), fn)(config, workdir)
    from cma_jax import train
    return train.train_and_evaluate(config, workdir)


def check_overrides(argv) -> None:
    """Fail early, naming the field, on `--config.<field>=` overrides that no config has."""
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
                sys.exit(f"unknown config field config.{'.'.join(path[:i + 1])} in {arg!r} "
                         "(fields are defined in cma_jax/config.py)")
            node = node[key]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for handler in py_logging.getLogger().handlers:
        handler.addFilter(_QuietOrbax())
    init_distributed()
    config = FLAGS.config
    try:
        run(config, FLAGS.workdir or default_workdir(config))
    except (ValueError, OSError) as e:
        # Bad input (config value, missing or wrong file/checkpoint/dataset): one clear line, exit 1.
        # The traceback stays available at --verbosity=1.
        logging.debug("traceback", exc_info=True)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    check_overrides(sys.argv)
    app.run(main)
