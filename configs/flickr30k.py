"""Flickr30K (Karpathy split): train on the 29,000 images' 145,000 (image, caption) pairs, test on the 1K test images.

`--config=configs/flickr30k.py[:vit_b16]`. The repository gives no image-text settings: r = 8, d_s = 16 (0.52 M
adapter parameters, the table's 0.5 M), lr / batch / schedule / 5 epochs as for MSR-VTT; T = 1 and the meanP head
(with one frame every head is CLIP's cosine); max_words = 77, CLIP's context, so no caption is cut. See
docs/image_text.md.
"""

from cma_jax import config as config_lib


def get_config(arg: str | None = None):
    config = config_lib.dataset_config("flickr30k", arg, reduction_dim=8, share_dim=16, num_frames=1, max_words=77)
    config.model.head = "meanp"
    return config
