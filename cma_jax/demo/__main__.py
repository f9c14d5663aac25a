"""`python -m cma_jax.demo [--config=configs/demo.py[:quick|:sweep]] [--workdir=DIR]`: the demo's flags."""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from cma_jax import console, demo, sharding
from cma_jax import run as run_lib
from cma_jax.demo.stages import demo_config

config_flags.DEFINE_config_file("config", None, "Demo config file, e.g. configs/demo.py:quick or :sweep "
                                "(default: the full demo, cma_jax.demo.stages.demo_config).", lock_config=True)
flags.DEFINE_string("workdir", "runs/demo", "Folder for the demo's data, runs and results.")
FLAGS = flags.FLAGS


def _cache_compiled_steps(workdir: str) -> None:
    """Persistent XLA cache in the workdir (unless one is set): seeds after the first reuse the compiled steps."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir), "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup(verbose=FLAGS.verbosity >= 1)
    config = FLAGS.config if FLAGS.config is not None else demo_config()
    try:
        run_lib.check(config, jax.device_count())
        sharding.select_partitioner(config, jax.device_count())
        _cache_compiled_steps(FLAGS.workdir)
        demo.run(config, FLAGS.workdir)
    except Exception as e:  # bad input or a full disk: one line, exit 1; a bug keeps its traceback
        console.print_error_or_raise(e, FLAGS.workdir)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=console.parse_flags)
