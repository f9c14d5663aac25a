"""Which builder a dataset name means, and which of its configs a config name means (`9k-336px`, ...).

`REGISTRY` maps a dataset name to its builder class; `cma_jax/data/builders/__init__.py` fills it, so that this
module imports no builder (the builders import the base, the reader imports this: no circle).
"""

from __future__ import annotations

import dataclasses
import os
import re

import tensorflow_datasets as tfds
from etils import epath

REGISTRY: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {}

_SUFFIX = re.compile(r"^(?:(?P<px>\d+)px|(?P<fps>\d+(?:\.\d+)?)fps|q(?P<q>\d+))$")


def resolve_config(builder_cls, builder_config):
    """A config object from a name: a predefined config, optionally with `-<N>px`, `-<F>fps`,
    `-q<Q>` suffixes overriding resolution, fps and JPEG quality (e.g. '9k-336px')."""
    if isinstance(builder_config, tfds.core.BuilderConfig):
        return builder_config
    predefined = {c.name: c for c in builder_cls.BUILDER_CONFIGS}
    name = builder_config or builder_cls.BUILDER_CONFIGS[0].name
    base, *suffixes = name.split("-")
    if base not in predefined:
        raise ValueError(
            f"{builder_cls.name}: unknown config {name!r}; expected one of "
            f"{sorted(predefined)} optionally followed by -<N>px, -<F>fps, -q<Q>"
        )
    if not suffixes:
        return predefined[base]
    overrides = {}
    for suffix in suffixes:
        m = _SUFFIX.match(suffix)
        if not m:
            raise ValueError(
                f"{builder_cls.name}: bad config suffix {suffix!r} in {name!r}; "
                "expected <N>px, <F>fps or q<Q>"
            )
        if m["px"]:
            overrides["resolution"] = int(m["px"])
        elif m["fps"]:
            overrides["fps"] = float(m["fps"])
        else:
            overrides["jpeg_quality"] = int(m["q"])
    return dataclasses.replace(predefined[base], name=name, **overrides)


def get_builder(name: str, data_dir: epath.PathLike, builder_config=None, **kwargs):
    """The registered builder `name` for `data_dir`, with the config `builder_config` names (default: its first)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(REGISTRY)}")
    cls = REGISTRY[name]
    config = resolve_config(cls, builder_config)
    if any(config is c for c in cls.BUILDER_CONFIGS):
        # By name: TFDS rejects a copy of a predefined config object, which is what unpickling the
        # builder (grain worker processes) would pass back.
        config = config.name
    # expanduser: `--data_dir=~/...` reaches us unexpanded (no shell expands `~` after `=`).
    return cls(data_dir=os.path.expanduser(os.fspath(data_dir)), config=config, **kwargs)
