"""MSCOCO (Karpathy split): train on the 113,287 train + restval images' ~567k pairs, test on the 5K test images.

`--config=configs/mscoco.py[:vit_b16]`. The repository gives no image-text settings: r = 8, d_s = 16 (0.52 M
adapter parameters, the table's 0.5 M), lr / batch / schedule / 5 epochs as for MSR-VTT; T = 1 and the meanP head
(with one frame every head is CLIP's cosine); max_words = 77, CLIP's context, so no caption is cut. See
docs/image_text.md.
"""

from cma_jax import config as config_lib


def get_config(arg: str | None = None):
    config = config_lib.dataset_config("mscoco", arg, reduction_dim=8, share_dim=16, num_frames=1, max_words=77)
    config.model.head = "meanp"
    return config
