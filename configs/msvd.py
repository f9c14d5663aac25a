"""MSVD (1,200 train / 670 test videos, ~40 captions each): the paper's settings (r=16, d_s=16).

Usage: `--config=configs/msvd.py` or `--config=configs/msvd.py:vit_b16` for another backbone preset;
any field can be overridden with `--config.<field>=<value>` (see configs/common.py).
Baselines: `--config.method=full` (CLIP4Clip full fine-tuning), `--config.method=zero_shot
--config.mode=eval`, uni-modal adapters `--config.adapter.share_dim=0`.
"""

from configs import common


def get_config(arg: str | None = None):
    """The msvd config; `arg` is the backbone preset (default vit_b32)."""
    config = common.base_config()
    config.model.preset = arg or "vit_b32"
    config.data.name = "msvd"
    config.data.eval_split = "test"
    config.data.num_frames = 12
    config.data.max_words = 32
    config.train.epochs = 5
    config.adapter.reduction_dim = 16
    config.adapter.share_dim = 16
    return config
