"""DiDeMo, paragraph-to-video retrieval (a video's descriptions joined).

`--config=configs/didemo.py[:vit_b16]`; the paper's settings, see `cma_jax.config.dataset_config`.
"""

from cma_jax import config as config_lib


def get_config(arg: str | None = None):
    return config_lib.dataset_config("didemo", arg, reduction_dim=8, share_dim=8, num_frames=64, max_words=64)
