"""TFDS builders of the video-text benchmarks; `REGISTRY` maps a dataset name to its builder."""

from cma_jax.data.builders.activitynet import ActivityNet
from cma_jax.data.builders.base import VideoTextBuilder, VideoTextConfig, get_builder, open_source
from cma_jax.data.builders.didemo import DiDeMo
from cma_jax.data.builders.msrvtt import MsrVtt
from cma_jax.data.builders.msvd import Msvd
from cma_jax.data.builders.synthetic import Synthetic
from cma_jax.data.builders.vatex import Vatex

REGISTRY: dict[str, type[VideoTextBuilder]] = {
    'msrvtt': MsrVtt,
    'msvd': Msvd,
    'vatex': Vatex,
    'activitynet': ActivityNet,
    'didemo': DiDeMo,
    'synthetic': Synthetic,  # generated, no files needed
}

__all__ = ['REGISTRY', 'VideoTextBuilder', 'VideoTextConfig', 'get_builder', 'open_source']
