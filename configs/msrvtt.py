"""MSR-VTT: train on every caption of the 9k videos, test on the 1k-A (JSFusion) pairs.

`--config=configs/msrvtt.py[:vit_b16]`; the paper's settings, see `cma_jax.config.dataset_config`.
"""

from cma_jax import config as config_lib


def get_config(arg: str | None = None):
    return config_lib.dataset_config("msrvtt", arg, reduction_dim=8, share_dim=16)
