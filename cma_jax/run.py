"""The run value: what an entry point resolves once from a config and passes down.

`resolve(config, workdir)` checks the config and builds, once each, the method, the CLIP architecture, the
backbone (downloaded / converted / read once), the tokenizer, the mesh and the TensorBoard writer. Training,
evaluation, the demo, the benchmarks and the compile command take them from the `Run`; below the entry points
nothing builds them again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh

from cma_jax import config as config_lib
from cma_jax import loader, sharding, tb
from cma_jax.models import clip as clip_lib
from cma_jax.models import peft
from cma_jax.models.clip import CLIPConfig


@dataclasses.dataclass(frozen=True)
class Run:
    """A config resolved: `clip` is the backbone's architecture with the config's compute settings;
    `tokenizer` None means neither config.data.tokenizer nor the backbone has one; `writer` is None without a
    workdir and on processes other than 0."""

    config: Any  # ml_collections.ConfigDict, validated
    workdir: str | None
    method: peft.Method
    backbone: loader.Backbone
    tokenizer: str | None
    mesh: Mesh
    writer: tb.Writer | None

    @property
    def clip(self) -> CLIPConfig:
        return self.backbone.clip

    def close(self) -> None:
        """Close the TensorBoard writer (the entry point does, when the run is over)."""
        if self.writer is not None:
            self.writer.close()


def check(config, num_devices: int | None = None, overridden=()) -> tuple[peft.Method, CLIPConfig]:
    """Every start-up check that needs no download (ValueError naming the field) -> (method, the config's CLIP).

    The schema (`config.validate`), the method's own fields, the CLIP fields, and, when the architecture is
    known before any download (backbone 'random' or a preset name), the checks against it.
    """
    config_lib.validate(config, num_devices, overridden)
    method = loader.method(config)  # the method's declaration checks its own fields
    if not (method.trains or config.mode == "eval"):
        raise ValueError(f"config.mode: method={config.method} has nothing to train; use mode=eval "
                         f"(got mode={config.mode!r})")
    clip = loader.clip_config(config)  # CLIPConfig checks its own fields (dtype, remat, ...)
    if config.backbone in ("", "random") or config.backbone in clip_lib.PRESETS:
        named = config.backbone in clip_lib.PRESETS and config.backbone != config.model.preset
        config_lib.check_architecture(config, method, clip_lib.preset(config.backbone) if named else clip)
    return method, clip


def resolve(config, workdir: str | None = None, *, backbone: loader.Backbone | None = None, overridden=()) -> Run:
    """The run value of `config` in `workdir` (None: no TensorBoard writer), checked for all of jax's devices.

    backbone: one the entry point resolved already (the demo shares one between its runs, or pre-trains on
    `Backbone.random` on purpose); by default config.backbone is resolved here.
    """
    method, clip = check(config, jax.device_count(), overridden)
    if backbone is None:
        backbone = loader.backbone_from_config(config, clip)
    if backbone.folder is not None:
        config_lib.check_architecture(config, method, backbone.clip)
    writer = tb.open_writer(workdir) if workdir is not None else None
    return Run(config=config, workdir=workdir, method=method, backbone=backbone,
               tokenizer=loader.tokenizer(config, backbone), mesh=sharding.make_mesh(config), writer=writer)
