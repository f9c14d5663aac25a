"""MSVD: multi-caption train / test (670 test videos, all their captions).

`--config=configs/msvd.py[:vit_b16]`; the paper's settings, see `cma_jax.config.dataset_config`.
"""

from cma_jax import config as config_lib


def get_config(arg: str | None = None):
    return config_lib.dataset_config("msvd", arg, reduction_dim=16, share_dim=16)
