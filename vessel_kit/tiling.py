"""Sliding windows over a 2D plane: where windows go, how they are weighted, what normalises.

Windows are spread evenly so the last one ends exactly at the border (nnU-Net's placement:
``range(0, L - tile + 1, step)`` would miss the trailing rows). Each window's logits are weighted
by a gaussian importance map (sigma = tile / 8, floored so no weight is 0 — a zero weight at a
plane corner would divide by zero) and divided by the summed weights. The sum is the same on
every slice of an axis, so one (H, W) normaliser serves the whole axis.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["gaussian_importance", "plane_normaliser", "window_starts"]


def window_starts(length: int, tile: int, step: int) -> list[int]:
    """Starts of windows of size ``tile`` covering [0, length), at most ``step`` apart.

    A side no longer than the tile gets one window at 0 (the plane is padded to the tile).
    """
    if tile < 1 or step < 1:
        raise ValueError(f"tile and step must be >= 1, got tile={tile}, step={step}")
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / step) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def gaussian_importance(tile_shape: tuple[int, int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """A (T_h, T_w) float32 gaussian centred on the tile, max 1, sigma = side * sigma_scale,
    with its smallest values raised to the smallest positive one (never 0)."""
    axes = []
    for side in tile_shape:
        sigma = max(side * sigma_scale, 1e-3)
        centre = (side - 1) / 2
        axes.append(np.exp(-0.5 * ((np.arange(side) - centre) / sigma) ** 2))
    importance = np.outer(axes[0], axes[1]).astype(np.float32)
    importance /= importance.max()
    positive = importance[importance > 0]
    importance[importance <= 0] = positive.min()
    return importance


def plane_normaliser(
    plane_shape: tuple[int, int], tile_shape: tuple[int, int], starts: tuple[list[int], list[int]], importance: np.ndarray
) -> np.ndarray:
    """Summed importance of all windows at every pixel of the plane, (H, W) float32, all > 0."""
    height, width = plane_shape
    padded = np.zeros((max(height, tile_shape[0]), max(width, tile_shape[1])), dtype=np.float32)
    for y in starts[0]:
        for x in starts[1]:
            padded[y : y + tile_shape[0], x : x + tile_shape[1]] += importance
    return padded[:height, :width]
