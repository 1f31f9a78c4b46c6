"""Sliding windows over an N-D region (a 2D plane or a 3D block): where windows go, how they
are weighted, and what normalises the blend.

Windows are spread evenly so the last one ends exactly at the border (nnU-Net's placement:
``range(0, L - tile + 1, step)`` would miss the trailing rows), and they form a regular grid: the
Cartesian product of one list of starts per dimension. Each window's logits are weighted by a
separable gaussian importance map (the outer product of one 1D gaussian per dimension, sigma =
side / 8, each floored so no weight is 0 — a zero weight at a corner would divide by zero). On a
regular grid the summed weight of all windows is then separable too: the outer product of one 1D
sum per dimension (``window_normaliser``), so no count volume is ever accumulated, in 2D or 3D.

Example::

    starts = [window_starts(side, 64, 32) for side in (100, 80)]
    importance = gaussian_importance((64, 64))
    normaliser = window_normaliser((100, 80), (64, 64), starts)   # (100, 80), all > 0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce

import numpy as np

__all__ = ["gaussian_importance", "gaussian_profile", "window_normaliser", "window_starts", "window_sums"]


def window_starts(length: int, tile: int, step: int) -> list[int]:
    """Starts of windows of size ``tile`` covering [0, length), at most ``step`` apart.

    A side no longer than the tile gets one window at 0 (the region is padded to the tile).
    """
    if tile < 1 or step < 1:
        raise ValueError(f"tile and step must be >= 1, got tile={tile}, step={step}")
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / step) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def gaussian_profile(side: int, sigma_scale: float = 1 / 8) -> np.ndarray:
    """The 1D float64 gaussian of one window side: centred, max 1, sigma = side * sigma_scale,
    its smallest values raised to the smallest positive one (never 0)."""
    sigma = max(side * sigma_scale, 1e-3)
    centre = (side - 1) / 2
    profile = np.exp(-0.5 * ((np.arange(side) - centre) / sigma) ** 2)
    profile /= profile.max()
    positive = profile[profile > 0]
    profile[profile <= 0] = positive.min()
    return profile


def gaussian_importance(tile_shape: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """The float32 importance map of a window of ``tile_shape`` (any rank): the outer product of
    ``gaussian_profile`` per side, max 1, never 0."""
    profiles = [gaussian_profile(int(side), sigma_scale) for side in tile_shape]
    return reduce(np.multiply.outer, profiles).astype(np.float32)


def window_sums(
    shape: Sequence[int], tile_shape: Sequence[int], starts: Sequence[Sequence[int]], *, gaussian: bool = True,
    sigma_scale: float = 1 / 8,
) -> list[np.ndarray]:
    """Per dimension, the 1D float64 sum of the window profiles placed at ``starts`` over a side
    of ``shape`` (``gaussian=False``: flat windows, i.e. counts); their outer product is the
    normaliser."""
    if not len(shape) == len(tile_shape) == len(starts):
        raise ValueError(f"shape {tuple(shape)}, tile_shape {tuple(tile_shape)} and starts need one entry per dimension")
    sums = []
    for length, tile, dim_starts in zip(shape, tile_shape, starts, strict=True):
        profile = gaussian_profile(tile, sigma_scale) if gaussian else np.ones(tile)
        total = np.zeros(max(length, tile))
        for start in dim_starts:
            total[start : start + tile] += profile
        sums.append(total[:length])
    return sums


def window_normaliser(
    shape: Sequence[int], tile_shape: Sequence[int], starts: Sequence[Sequence[int]], *, gaussian: bool = True,
    sigma_scale: float = 1 / 8,
) -> np.ndarray:
    """Summed importance of the grid of windows at every voxel of a region of ``shape``, float32,
    all > 0: the outer product of ``window_sums``."""
    return reduce(np.multiply.outer, window_sums(shape, tile_shape, starts, gaussian=gaussian, sigma_scale=sigma_scale)).astype(np.float32)
