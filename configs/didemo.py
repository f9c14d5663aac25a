"""DiDeMo, paragraph-to-video: the paper's settings (r=8, d_s=8).

Usage: `--config=configs/didemo.py` or `--config=configs/didemo.py:vit_b16` for another backbone preset;
any field can be overridden with `--config.<field>=<value>` (see configs/common.py).
Baselines: `--config.method=full` (CLIP4Clip full fine-tuning), `--config.method=zero_shot
--config.mode=eval`, uni-modal adapters `--config.adapter.share_dim=0`.
"""

from configs import common


def get_config(arg: str | None = None):
    """The didemo config; `arg` is the backbone preset (default vit_b32)."""
    config = common.base_config()
    config.model.preset = arg or "vit_b32"
    config.data.name = "didemo"
    config.data.eval_split = "test"
    config.data.num_frames = 64
    config.data.max_words = 64
    config.train.epochs = 5
    config.adapter.reduction_dim = 8
    config.adapter.share_dim = 8
    return config
