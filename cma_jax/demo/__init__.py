"""The end-to-end demo: synthetic data -> a small CLIP pre-trained here -> CMA vs baselines, with error bars.

    python -m cma_jax.demo [--config=configs/demo.py[:quick|:sweep]] [--workdir=DIR]   (default: the table)

`run` builds the synthetic `pretrain` and `adapt` datasets (`stages`), pre-trains a small CLIP from scratch
on `pretrain` (once, kept as a read-only backbone), and from that backbone runs the config's task: the
table of methods with seeds (`table`), the training-set-size sweep (`sweep`) or the baselines'
learning-rate search (`lr_search`). Each stage is reused from the workdir when already done, so an
interrupted run resumes and a finished one only prints its results again. docs/demo.md has what it shows
and the workdir's layout.
"""

from __future__ import annotations

import os
import time

from cma_jax.demo import lr_search, stages, sweep, table
from cma_jax.demo.stages import rows, say

TASKS = {"table": table, "sweep": sweep, "lr_search": lr_search}


def run(config, workdir: str) -> dict:
    """The demo: every stage, then the table (or the sweep, extra.task = 'sweep', or the learning-rate search
    of the baselines, 'lr_search') -> results dict."""
    t_start = time.time()
    workdir = os.path.abspath(workdir)
    data_dir = os.path.abspath(config.data.data_dir) if config.data.data_dir else os.path.join(workdir, "data")
    unknown = [m for m in config.extra.methods if m not in rows()]
    if unknown:
        raise ValueError(f"config.extra.methods: unknown {unknown}; expected some of {list(rows())}")
    if config.extra.task not in TASKS:
        raise ValueError(f"config.extra.task: unknown {config.extra.task!r}; expected one of {tuple(TASKS)}")
    is_sweep = config.extra.task == "sweep"
    stages.seeds(config)  # checks extra.seeds before anything runs
    os.makedirs(workdir, exist_ok=True)
    try:
        say(f"[1/3] synthetic datasets -> {data_dir}")
        stages.prepare_data(data_dir, [config.extra.pretrain.builder_config, config.data.builder_config,
                                       *(sweep.builder_configs(config) if is_sweep else ())])
        say(f"[2/3] pre-training a small CLIP from scratch -> {workdir}/backbone")
        backbone, pre = stages.pretrain(config, workdir, data_dir)
        return TASKS[config.extra.task].run(config, workdir, data_dir, backbone, pre, t_start)
    except KeyboardInterrupt:
        say(f"\ninterrupted: finished stages and the last checkpoint are kept in {workdir}; "
            "run the same command again to resume")
        raise SystemExit(130) from None  # the shell's code for Ctrl-C, without a traceback
