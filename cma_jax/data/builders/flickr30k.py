"""Flickr30K on Karpathy's split: 29,000 / 1,014 / 1,000 images (train / val / test), five captions each.

Its images are given out through a request form, so building needs a manual_dir (layout:
`Flickr30k.MANUAL_DOWNLOAD_INSTRUCTIONS`).
"""

from cma_jax.data.builders import karpathy


class Flickr30k(karpathy.KarpathyBuilder):
    """Flickr30K text-image retrieval (Karpathy split; test = the 1K test images, 5,000 captions)."""

    name = "flickr30k"
    CAPTION_FILE = "dataset_flickr30k.json"
    EXPECTED_IMAGES = {"train": 29000, "val": 1014, "test": 1000}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
manual_dir/
  dataset_flickr30k.json           (Karpathy's split: {"images": [{"filename", "split", "sentences": [{"raw"}, ...]},
                                    ...]}; in caption_datasets.zip from cs.stanford.edu/people/karpathy/deepimagesent/)
  flickr30k-images/<filename>      (the images, e.g. 1000092795.jpg, anywhere below manual_dir: from
                                    flickr30k-images.tar, given out after the form at
                                    https://shannon.cs.illinois.edu/DenotationGraph/)
"""
