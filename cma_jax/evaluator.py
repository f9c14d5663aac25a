"""The evaluator of a run: one evaluation split, built once (builder check, data source, tokenizer) and run with
the current model many times, as big_vision's evaluators are; `cma_jax.train.train_and_evaluate` and the demo
use it. The encoding, scoring and reports are `cma_jax.evaluate.evaluate`.
"""

from __future__ import annotations

import logging

from cma_jax import evaluate, loader
from cma_jax.data import pipeline


class Evaluator:
    """One evaluation split of a run, built once and run with the current model many times (big_vision's
    evaluators): the builder check, the data source and the tokenizer are made here; `.run(model, step)` encodes,
    scores and reports. Used by `cma_jax.train.train_and_evaluate` (periodic and final evaluations) and the demo.
    """

    def __init__(self, run, split: str | None = None):
        c = run.config
        self.split = split or c.data.eval_split
        self.block_size, self.dsl, self.mesh = c.eval.block_size, c.eval.dsl, run.mesh
        tokenizer = loader.require_tokenizer(run)
        self.batches = pipeline.eval_batches_from_config(c, tokenizer, split=self.split)
        # QB-Norm's query banks: another split's captions and videos (made once, encoded at every evaluation)
        self.bank = pipeline.eval_batches_from_config(c, tokenizer, split=c.eval.qbnorm) if c.eval.qbnorm else None
        self.qbnorm = {"qbnorm_k": c.eval.qbnorm_k, "qbnorm_beta": c.eval.qbnorm_beta}

    @property
    def num_videos(self) -> int:
        return self.batches.num_videos

    def run(self, model, step: int | None = None, *, workdir: str | None = None, writer=None,
            name: str | None = None) -> dict:
        """`evaluate` of `model` on this split (reports named `name`, default the split, to workdir / writer)."""
        b = self.batches
        return evaluate.evaluate(model, b.texts, b.videos, block_size=self.block_size, dsl=self.dsl,
                                 workdir=workdir, writer=writer, step=step, mesh=self.mesh, name=name or self.split,
                                 num_batches=(b.num_text_batches, b.num_video_batches), media=b.media,
                                 bank=self.bank, **self.qbnorm)


def trained_model(run):
    """The model mode=eval evaluates -> (model, step): the run's backbone plus, unless the method trains nothing
    (zero-shot), the trained parameters of config.adapter_checkpoint (or the workdir's latest run checkpoint)."""
    config = run.config
    adapters = (config.adapter_checkpoint or run.workdir) if run.method.trains else None
    model, step = loader.from_run(run, adapters=adapters)
    if adapters is not None:
        logging.info("evaluating the trained parameters of %s (step %s)", adapters, step)
    else:
        logging.info("evaluating zero-shot (backbone %s, no adapters)", config.backbone)
    return model, step


def evaluate_from_config(run, model=None, *, step: int | None = None) -> dict:
    """One evaluation of a `cma_jax.run.Run` on config.data.eval_split, results to run.workdir and run.writer
    (model None: `trained_model`). Repeated evaluations build an `Evaluator` once instead."""
    if model is None:
        model, loaded = trained_model(run)
        step = loaded if step is None else step
    return Evaluator(run).run(model, step, workdir=run.workdir, writer=run.writer)
