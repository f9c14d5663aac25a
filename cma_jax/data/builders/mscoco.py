"""MSCOCO on Karpathy's split: 113,287 (train + restval) / 5,000 / 5,000 images, every caption (five, some more).

Without a manual_dir the public files are downloaded (URLS): Karpathy's `caption_datasets.zip` (holding
dataset_coco.json) and COCO's `train2014.zip` and `val2014.zip` (Karpathy's val, test and restval images come
from val2014). TFDS checks them against checksums.tsv beside this file once it lists them; their sizes and
SHA256 are not recorded in this repository yet (no network when they were added): record them with
`python -m cma_jax.data.builders mscoco --register_checksums`.
"""

from cma_jax.data.builders import karpathy

# Point these elsewhere (a mirror, a test server) before building; same archives, same layout.
URLS = {
    "annotations": "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
    "train2014": "http://images.cocodataset.org/zips/train2014.zip",
    "val2014": "http://images.cocodataset.org/zips/val2014.zip",
}


class MsCoco(karpathy.KarpathyBuilder):
    """MSCOCO text-image retrieval (Karpathy split; test = the 5K test images, 25,010 captions)."""

    name = "mscoco"
    CAPTION_FILE = "dataset_coco.json"
    EXPECTED_IMAGES = {"train": 113287, "val": 5000, "test": 5000}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
manual_dir/
  dataset_coco.json                (Karpathy's split: {"images": [{"filepath", "filename", "split",
                                    "sentences": [{"raw"}, ...]}, ...]}; in caption_datasets.zip)
  train2014/COCO_train2014_*.jpg   (COCO's train2014.zip)
  val2014/COCO_val2014_*.jpg       (COCO's val2014.zip; images are found by file name anywhere below manual_dir)
(Without a manual_dir the builder downloads all three.)
"""

    def download_urls(self):
        return dict(URLS)
