"""A tiny training setup shared by the training / sharding / checkpoint / multi-host tests.

`tiny_config()` is a full config (cma_jax/config.py) for a 2-layer width-32 CLIP on 32x32 frames
(random backbone); `SyntheticBatches` is a deterministic in-memory iterator of per-process batches with
the grain-like get_state/set_state protocol (batch i depends only on (seed, i)).

As a program (`python tests/tiny.py --workdir=DIR [--coordinator_address ... --process_id N]`, the
flags of cma_jax.main), it trains the tiny config on SyntheticBatches in this process's share of a
multi-process job and saves the adapters: what the multi-host tests launch.
"""

import numpy as np

from cma_jax import config as config_lib
from cma_jax import loader
from cma_jax import run as run_lib

TINY_CLIP = dict(embed_dim=16, image_resolution=32, vision_layers=2, vision_width=32, vision_patch_size=8,
                 context_length=8, vocab_size=64, text_width=32, text_heads=2, text_layers=2)


# Every method's hyper-parameters scaled to the tiny CLIP (width 32, 2 layers); the rest are its defaults.
TINY_METHOD_FIELDS = {
    "coop": {"num_tokens": 2}, "vpt": {"num_tokens": 2}, "vl_prompt": {"vision_tokens": 2, "text_tokens": 1},
    "maple": {"num_tokens": 1, "depth": 2},
    "vop": {"text_tokens": 1, "vision_tokens": 3, "generated_tokens": 2, "hidden": 8},
    "adapter_attn": {"reduction_dim": 4}, "adaptformer": {"reduction_dim": 4}, "st_adapter": {"reduction_dim": 4},
    "unimodal": {"reduction_dim": 4},
}


def tiny_method_config(method: str, **train):
    """tiny_config() training `method` with its TINY_METHOD_FIELDS (prompt tokens cut long captions: 8 words)."""
    from cma_jax.models import peft

    c = tiny_config(**train)
    c.method = method
    cls = peft.get(method)
    for k, v in TINY_METHOD_FIELDS.get(method, {}).items():
        c[cls.section][k] = v
    if not loader.method(c).trains:
        c.mode = "eval"
    return c


def tiny_config(**train):
    c = config_lib.base_config()
    c.mode = "train"
    c.backbone = "random"
    for k, v in TINY_CLIP.items():
        c.model.clip[k] = v
    c.adapter.reduction_dim = 4
    c.adapter.share_dim = 8
    c.data.num_frames = 2
    c.data.max_words = 8
    c.train.batch_size = 8
    c.train.num_steps = 4
    c.train.lr = 1e-2
    c.train.warmup_fraction = 0.25
    c.train.log_every_steps = 1
    c.train.save_every_steps = 2
    c.train.progress_bar = False
    for k, v in train.items():
        c.train[k] = v
    return c


class SyntheticBatches:
    """Global batch i = f(seed, i); this process yields its rows (process p of n: rows p*B/n ...)."""

    def __init__(self, config, seed=0, process_index=0, process_count=1, fail_at=None, exc=KeyboardInterrupt):
        self.b = config.train.batch_size
        self.t = config.data.num_frames
        self.l = config.data.max_words
        self.res = config.model.clip.image_resolution
        self.vocab = config.model.clip.vocab_size
        self.seed, self.p, self.n = seed, process_index, process_count
        self.i = 0
        self.fail_at, self.exc = fail_at, exc  # raise exc when batch `fail_at` is requested

    def global_batch(self, i):
        rng = np.random.default_rng((self.seed, i))
        ids = rng.integers(1, self.vocab - 1, (self.b, self.l)).astype(np.int32)
        ids[:, -1] = self.vocab - 1  # end-of-text: the largest id
        return {
            "frames": rng.integers(0, 256, (self.b, self.t, self.res, self.res, 3), dtype=np.uint8),
            "frame_mask": np.ones((self.b, self.t), bool),
            "text_ids": ids,
            "text_mask": np.ones((self.b, self.l), np.int32),
        }

    def __iter__(self):
        return self

    def __next__(self):
        if self.fail_at is not None and self.i == self.fail_at:
            raise self.exc("simulated interruption")
        g = self.global_batch(self.i)
        self.i += 1
        k = self.b // self.n
        return {key: v[self.p * k:(self.p + 1) * k] for key, v in g.items()}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def get_config(arg=None):
    """The tiny config saving every 2 steps (what the multi-host test runs)."""
    return tiny_config(save_every_steps=2)


def train_synthetic(config, workdir):
    """Train on SyntheticBatches (this process's rows); save the adapters and history per process."""
    import json
    import os

    import jax
    from flax import nnx

    from cma_jax import train as train_lib
    from cma_jax.models.peft.adapter import AdapterParam

    it = SyntheticBatches(config, process_index=jax.process_index(), process_count=jax.process_count())
    model, history = train_lib.train(run_lib.resolve(config, workdir), train_iter=it)
    flat = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(model, AdapterParam))[0]}
    np.savez(os.path.join(workdir, f"adapters_process{jax.process_index()}.npz"), **flat)
    with open(os.path.join(workdir, f"history_process{jax.process_index()}.json"), "w") as f:
        json.dump(history, f)


if __name__ == "__main__":
    from absl import app

    from cma_jax import main as main_lib  # its flags: --workdir and the multi-process ones

    def _main(argv):
        main_lib.init_distributed()
        train_synthetic(get_config(), main_lib.FLAGS.workdir)

    app.run(_main)
