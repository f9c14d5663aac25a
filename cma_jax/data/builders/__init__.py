"""TFDS builders of the video-text and image-text benchmarks; `REGISTRY` maps a dataset name to its builder."""

from cma_jax.data.builders.activitynet import ActivityNet
from cma_jax.data.builders.base import Entry, VideoTextBuilder, VideoTextConfig
from cma_jax.data.builders.didemo import DiDeMo
from cma_jax.data.builders.flickr30k import Flickr30k
from cma_jax.data.builders.mscoco import MsCoco
from cma_jax.data.builders.msrvtt import MsrVtt
from cma_jax.data.builders.msvd import Msvd
from cma_jax.data.builders.reader import VideoTextSource, ensure_built, open_source
from cma_jax.data.builders.registry import REGISTRY, get_builder, resolve_config
from cma_jax.data.builders.synthetic import Synthetic, SyntheticImages
from cma_jax.data.builders.vatex import Vatex

REGISTRY.update({
    'msrvtt': MsrVtt,
    'msvd': Msvd,
    'vatex': Vatex,
    'activitynet': ActivityNet,
    'didemo': DiDeMo,
    'flickr30k': Flickr30k,  # text-image
    'mscoco': MsCoco,  # text-image
    'synthetic': Synthetic,  # generated, no files needed
    'synthetic_images': SyntheticImages,  # the same scenes as images, two captions each
})

__all__ = ['REGISTRY', 'Entry', 'VideoTextBuilder', 'VideoTextConfig', 'VideoTextSource', 'ensure_built',
           'get_builder', 'open_source', 'resolve_config']
