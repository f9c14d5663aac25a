"""The self-contained demo: synthetic data, a small CLIP pre-trained here, then CMA vs baselines.

    python -m cma_jax.main --config=configs/demo.py              # ~10 min on 2 CPU cores
    python -m cma_jax.main --config=configs/demo.py:quick        # the same path in ~1 min (CI)

The top-level fields describe the adaptation runs (the Cross-Modal Adapter on the synthetic `adapt`
variant); `cma_jax.demo` derives every stage's config from them (see `cma_jax.demo.stage_config`).
The demo's own knobs live in `config.extra`:
  extra.pretrain.*      pre-training of the small CLIP from scratch (all weights, `pretrain` variant)
  extra.methods         which rows the table gets (zero_shot, uni, cma, full)
  extra.uni_lr          learning rate of uni-modal adapters (d_s = 0)
  extra.full_lr         learning rate of full fine-tuning (every weight)
  extra.eval_val        also evaluate every method on the val split (written, not tabulated)
The hyper-parameters were chosen on the val split and the training curves, never on test.
"""

from cma_jax import config as config_lib
from cma_jax.data.builders import synthetic


def get_config(arg: str | None = None):
    """arg: '' (the full demo) or 'quick' (tiny data, few steps: the CI variant)."""
    if arg not in (None, "", "quick"):
        raise ValueError(f"configs/demo.py: unknown variant {arg!r}; expected '' or 'quick'")
    quick = arg == "quick"
    c = config_lib.base_config()
    c.entry = "cma_jax.demo:run"
    c.mode = "train_and_eval"
    c.method = "cma"
    c.seed = 0

    # A small CLIP for 32x32 frames: 2 layers per tower, width 64 (~0.2 M parameters).
    c.model.preset = "vit_b32"
    width = 32 if quick else 64
    c.model.clip.embed_dim = width
    c.model.clip.image_resolution = 32
    c.model.clip.vision_patch_size = 8
    c.model.clip.vision_width = width
    c.model.clip.vision_layers = 2
    c.model.clip.text_width = width
    c.model.clip.text_heads = 2
    c.model.clip.text_layers = 2
    c.model.clip.context_length = 16
    c.model.clip.vocab_size = len(synthetic.VOCABULARY) + 3  # words + unk, start, end (WordTokenizer)
    c.model.head = "text_conditioned"

    # r = 16 (chosen on val: R@1 67 vs 60 for r = 8 at 300 steps); d_s = 16 as the paper (on val
    # d_s = 16 / 32 / 0 gave t2v R@1 67.2 / 63.0 / 66.8: the sharing is neutral on this task).
    c.adapter.reduction_dim = 8 if quick else 16
    c.adapter.share_dim = 16

    c.data.name = "synthetic"
    c.data.builder_config = "adapt_mini" if quick else "adapt"
    c.data.data_dir = ""  # '' = WORKDIR/data
    c.data.tokenizer = ""  # '' = the synthetic vocabulary file the demo writes beside the data
    c.data.num_frames = 4
    c.data.max_words = 16
    c.data.eval_split = "test"

    c.train.batch_size = 32 if quick else 64
    c.train.num_steps = 20 if quick else 300
    c.train.lr = 1e-2  # adapters; chosen on val (1e-2 beat 3e-3 clearly at 300 steps, 3e-2 no better)
    c.train.weight_decay = 0.01
    c.train.log_every_steps = 50
    c.train.save_every_steps = 100
    c.train.keep_checkpoints = 1

    c.eval.batch_size = 128

    c.extra.pretrain = dict(
        builder_config="pretrain_mini" if quick else "pretrain",
        num_steps=30 if quick else 600,
        batch_size=64 if quick else 128,
        num_frames=1,  # image-text pre-training, as CLIP's
        lr=1e-3,
        weight_decay=0.01,
    )
    c.extra.methods = ("zero_shot", "uni", "cma", "full")
    c.extra.uni_lr = 1e-2
    c.extra.full_lr = 1e-3
    c.extra.eval_val = False
    return c
