"""MSCOCO (Karpathy split): train on the 113,287 train + restval images' ~567k pairs, test on the 5K test images.

`--config=configs/mscoco.py[:vit_b16]`; the settings and why: `cma_jax.config.image_text_config`, docs/image_text.md.
"""

from cma_jax import config as config_lib


def get_config(arg: str | None = None):
    return config_lib.image_text_config("mscoco", arg)
