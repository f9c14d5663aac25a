"""Entry point: `python -m cma_jax.main --config=configs/msrvtt.py[:vit_b16] --workdir=DIR [--config.x=y]`.

config.mode: train | eval | train_and_eval (cma_jax.train.train_and_evaluate); the demo has its own
entry point (`python -m cma_jax.demo`). Multi-process runs: `--distributed` calls
`jax.distributed.initialize()` with auto-detection (TPU pods, SLURM); the local launcher passes
`--coordinator_address --num_processes --process_id` explicitly.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cma_jax import config as config_lib
from cma_jax import console, sharding, train
from cma_jax import run as run_lib

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/msrvtt.py or configs/msrvtt.py:vit_b16.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder (checkpoints, TensorBoard, results); may be gs://. "
                    "Default: runs/<data.name>_<method>.")
flags.DEFINE_bool("print_config", False, "Print every field of the config (the file with its --config.* overrides) "
                  "with its value and meaning, and exit.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with cluster auto-detection "
                  "(Cloud TPU pods, SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-process runs).")
FLAGS = flags.FLAGS


def init_distributed() -> None:
    """Join the multi-process job when asked to (flags); a no-op for single-process runs."""
    if FLAGS.num_processes is not None and FLAGS.num_processes > 1:
        # CPU processes need a collectives backend to talk to each other (no effect on TPU/GPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()


def default_workdir(config) -> str:
    return os.path.join("runs", f"{config.data.name}_{config.method}")


def run(config, workdir: str, overridden=()):
    """Resolve the config once into a run value and run it (what `main` does after flag parsing).

    `overridden`: the dotted fields set on the command line (a method field the method does not use
    is an error).
    """
    sharding.select_partitioner(config, jax.device_count())
    logging.info("process %d/%d, %d devices (%s); workdir %s", jax.process_index(), jax.process_count(),
                 jax.device_count(), jax.devices()[0].platform, workdir)
    resolved = run_lib.resolve(config, workdir, overridden=overridden)
    try:
        return train.train_and_evaluate(resolved)
    finally:
        resolved.close()


def check_overrides(argv) -> None:
    """Fail early, naming the field and the closest real ones, on `--config.<field>=` overrides no config has."""
    problem = config_lib.unknown_override(argv[1:])
    if problem:
        sys.exit(f"error: {problem}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.print_config:
        print(config_lib.describe(FLAGS.config))
        return
    console.setup(verbose=FLAGS.verbosity >= 1)
    init_distributed()
    config = FLAGS.config
    workdir = FLAGS.workdir or default_workdir(config)
    try:
        run(config, workdir, overridden=tuple(config_flags.get_override_values(FLAGS["config"])))
    except Exception as e:  # bad input or a full disk: one line, exit 1; a bug keeps its traceback
        console.print_error_or_raise(e, workdir)
        sys.exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    check_overrides(sys.argv)
    app.run(main, flags_parser=console.parse_flags)
