"""VATEX (English captions; 1,500-video test split of CLIP4Clip/HBI): the paper's settings (r=16, d_s=64).

Usage: `--config=configs/vatex.py` or `--config=configs/vatex.py:vit_b16` for another backbone preset;
any field can be overridden with `--config.<field>=<value>` (see configs/common.py).
Baselines: `--config.method=full` (CLIP4Clip full fine-tuning), `--config.method=zero_shot
--config.mode=eval`, uni-modal adapters `--config.adapter.share_dim=0`.
"""

from configs import common


def get_config(arg: str | None = None):
    """The vatex config; `arg` is the backbone preset (default vit_b32)."""
    config = common.base_config()
    config.model.preset = arg or "vit_b32"
    config.data.name = "vatex"
    config.data.eval_split = "test"
    config.data.num_frames = 12
    config.data.max_words = 32
    config.train.epochs = 5
    config.adapter.reduction_dim = 16
    config.adapter.share_dim = 64
    return config
