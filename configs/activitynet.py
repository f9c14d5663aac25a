"""ActivityNet Captions, paragraph-to-video (val1 as test): the paper's settings (r=16, d_s=512).

Usage: `--config=configs/activitynet.py` or `--config=configs/activitynet.py:vit_b16` for another backbone preset;
any field can be overridden with `--config.<field>=<value>` (see configs/common.py).
Baselines: `--config.method=full` (CLIP4Clip full fine-tuning), `--config.method=zero_shot
--config.mode=eval`, uni-modal adapters `--config.adapter.share_dim=0`.
"""

from configs import common


def get_config(arg: str | None = None):
    """The activitynet config; `arg` is the backbone preset (default vit_b32)."""
    config = common.base_config()
    config.model.preset = arg or "vit_b32"
    config.data.name = "activitynet"
    config.data.eval_split = "val1"
    config.data.num_frames = 64
    config.data.max_words = 64
    config.train.epochs = 20
    config.adapter.reduction_dim = 16
    config.adapter.share_dim = 512
    return config
