"""The Flickr30K and MSCOCO presets: valid, one frame, CLIP's context, the adapter size of the paper's table."""

import pytest

from cma_jax import config as config_lib
from cma_jax import run as run_lib
from configs import flickr30k, mscoco


@pytest.mark.parametrize("module, name", [(flickr30k, "flickr30k"), (mscoco, "mscoco")])
def test_image_text_presets(module, name):
    c = module.get_config()
    run_lib.check(c)
    assert (c.data.name, c.data.num_frames, c.data.max_words, c.model.head) == (name, 1, 77, "meanp")
    assert (c.adapter.reduction_dim, c.adapter.share_dim, c.backbone) == (8, 16, "ViT-B/32")
    assert (c.data.train_split, c.data.eval_split, c.train.batch_size, c.train.lr) == ("train", "test", 128, 1e-5)
    b16 = module.get_config("vit_b16")
    run_lib.check(b16)
    assert (b16.model.preset, b16.backbone) == ("vit_b16", "ViT-B/16")


@pytest.mark.parametrize("module", [flickr30k, mscoco])
@pytest.mark.parametrize("method", config_lib.METHODS)
def test_every_method_is_a_valid_image_text_config(module, method):
    c = module.get_config()
    c.method = method
    if method == "zero_shot":
        c.mode = "eval"
    run_lib.check(c)
