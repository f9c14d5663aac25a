"""Flickr30K (Karpathy split): train on the 29,000 images' 145,000 (image, caption) pairs, test on the 1K test images.

`--config=configs/flickr30k.py[:vit_b16]`; the settings and why: `cma_jax.config.image_text_config`, docs/image_text.md.
"""

from cma_jax import config as config_lib


def get_config(arg: str | None = None):
    return config_lib.image_text_config("flickr30k", arg)
