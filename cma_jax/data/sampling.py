"""A clip of T frames from a video's stored frames: CLIP4Clip's uniform sampling and the zero padding to T (numpy
only: shared by the input pipeline and the inference API, which decode differently)."""

from __future__ import annotations

import numpy as np


def sample_frame_indices(num_stored: int, num_frames: int) -> np.ndarray:
    """CLIP4Clip's uniform sampling: linspace over the stored frames; all of them if not more than T."""
    if num_stored <= num_frames:
        return np.arange(num_stored)
    return np.linspace(0, num_stored - 1, num=num_frames, dtype=int)


def pad_clip(chosen: np.ndarray, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """[n <= T, H, W, 3] -> (frames [T,H,W,3] uint8 zero-padded, frame_mask [T] bool)."""
    frames = np.zeros((num_frames, *chosen.shape[1:]), np.uint8)
    frames[: len(chosen)] = chosen
    return frames, np.arange(num_frames) < len(chosen)
