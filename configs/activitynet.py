"""ActivityNet Captions, paragraph-to-video retrieval; test = val_1.

`--config=configs/activitynet.py[:vit_b16]`; the paper's settings, see `cma_jax.config.dataset_config`.
"""

from cma_jax import config as config_lib


def get_config(arg: str | None = None):
    return config_lib.dataset_config("activitynet", arg, reduction_dim=16, share_dim=512, num_frames=64,
                                     max_words=64, epochs=20)
