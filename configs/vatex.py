"""VATEX: 25,991 / 1,500 / 1,500 videos with 10 English captions each.

`--config=configs/vatex.py[:vit_b16]`; the paper's settings, see `cma_jax.config.dataset_config`.
"""

from cma_jax import config as config_lib


def get_config(arg: str | None = None):
    return config_lib.dataset_config("vatex", arg, reduction_dim=16, share_dim=64)
