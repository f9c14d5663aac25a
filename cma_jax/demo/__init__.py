"""The end-to-end demo: synthetic data -> a small CLIP pre-trained here -> CMA vs baselines, with error bars.

    python -m cma_jax.demo [--config=configs/demo.py[:quick|:sweep]] [--workdir=DIR]   (default: the table)

Stages (`stages`), each reused from the workdir when already done (so an interrupted run resumes, and a
finished one only prints its results again):
  1. build the synthetic `pretrain` and `adapt` datasets (TFDS builder, cma_jax.data.builders.synthetic)
     and write the word vocabulary beside them;
  2. pre-train a small CLIP from scratch on `pretrain` (every weight trains: the stand-in for CLIP's
     web-scale image-text pre-training) and save it as a read-only backbone checkpoint, once;
  3. the table (`table`): from that backbone, train on `adapt` with cma_jax.train, `extra.seeds` times each
     (seeds vary adapter init and data order): uni-modal adapters (d_s = 0), the Cross-Modal Adapter, full
     fine-tuning; evaluate them and zero-shot on the `adapt` test split and write `results.md` (mean ±
     std over seeds), `results.json` (every seed's numbers too) and `curves.png`.
     Or, with `configs/demo.py:sweep`, the training-set-size sweep (`sweep`).

Workdir layout: data/ (TFDS + synthetic_vocab.txt), pretrain/ (its run), backbone/, xla_cache/,
runs/<method>/seed<S>/, results.{md,json}, curves.png; the sweep: sweep/<method>/n<N>/seed<S>/,
sweep.{md,json,png}.
"""

from __future__ import annotations

import os
import time

from cma_jax.demo import lr_search, stages, sweep, table
from cma_jax.demo.stages import METHODS, say

TASKS = {"table": table, "sweep": sweep, "lr_search": lr_search}


def run(config, workdir: str) -> dict:
    """The demo: every stage, then the table (or the sweep, extra.task = 'sweep', or the learning-rate search
    of the baselines, 'lr_search') -> results dict."""
    t_start = time.time()
    workdir = os.path.abspath(workdir)
    data_dir = os.path.abspath(config.data.data_dir) if config.data.data_dir else os.path.join(workdir, "data")
    unknown = [m for m in config.extra.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"config.extra.methods: unknown {unknown}; expected some of {list(METHODS)}")
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
