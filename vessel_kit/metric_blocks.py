"""Exact surface Dice of two volumes of any size, computed block by block.

``metric.surface_dice`` scores slice pairs over whole planes. Here the grid of 2x2x2 cubes (one
more than the voxels along each axis: the masks are zero-padded as the scorer does) is cut into
blocks; each block reads its voxels plus a one-voxel halo before it (the cubes it shares with the
previous block) from both masks, and counts its border cubes by (truth area class, prediction
area class) with ``metric``'s own quad codes and area table. The counts are integers, so their
sum over blocks is exactly the whole-volume count, and the score is identical to
``metric.surface_dice`` whatever the block size: only the memory is bounded (one block of each
mask per worker).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .metric import _N_CLASSES, _cube_pair_counts, _slice_codes, _surface_dice_from_counts
from .sources import read_box

__all__ = ["surface_dice_blocks", "surface_pair_counts"]


def surface_dice_blocks(
    truth: Any,
    pred: Any,
    *,
    block: int | Sequence[int] = (128, 128, 128),
    workers: int | None = None,
    progress: bool = False,
) -> float:
    """Surface Dice at tolerance 0 of two lazy (Z, Y, X) masks (numpy, memmap, zarr, dask or a
    ``VolumeSource``; nonzero = foreground), equal to ``metric.surface_dice`` on the whole
    arrays, reading one ``block`` of each at a time (see the module doc).

    Args:
        block: the block side, or (Z, Y, X) sides; align it to the masks' chunks for speed.
        workers: threads scoring blocks in parallel (default: the CPU count, at most 8).
        progress: show a tqdm bar of blocks.

    Raises:
        ValueError: masks of other shapes, not 3D, empty, not bool/integer, or a bad block.
    """
    return _surface_dice_from_counts(surface_pair_counts(truth, pred, block=block, workers=workers, progress=progress))


def surface_pair_counts(
    truth: Any,
    pred: Any,
    *,
    block: int | Sequence[int] = (128, 128, 128),
    workers: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """The (truth class, prediction class) border-cube counts of the whole volume pair, summed
    over blocks: add the counts of separately scored parts, then score the sum."""
    shape = _check_masks(truth, pred)
    sides = _block_sides(block)
    # Cube c along an axis of n voxels joins voxels c-1 and c: cubes 0..n. Blocks of cubes follow
    # the voxel blocks [s, s + b); the last one also takes cube n (the padding after the volume).
    spans = [[(s, min(s + b, n)) for s in range(0, n, b)] for n, b in zip(shape, sides)]
    spans = [axis[:-1] + [(axis[-1][0], n + 1)] for axis, n in zip(spans, shape)]
    blocks = list(product(*spans))
    workers = max(1, min(workers or min(os.cpu_count() or 1, 8), len(blocks)))

    def count(cubes: tuple[tuple[int, int], ...]) -> np.ndarray:
        return _block_counts(truth, pred, cubes, shape)

    total = np.zeros((_N_CLASSES, _N_CLASSES), dtype=np.int64)
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(blocks), desc="surface dice", unit="block",
                                                               disable=not progress) as bar:
        for counts in pool.map(count, blocks):
            total += counts
            bar.update()
    return total


def _block_counts(truth: Any, pred: Any, cubes: tuple[tuple[int, int], ...], shape: tuple[int, int, int]) -> np.ndarray:
    """Border-cube pair counts of the cubes ``[c0, c1)`` per axis: read voxels ``[c0 - 1, c1)``
    (inside the volume; outside is the zero padding) of both masks and pair their slices."""
    box = tuple(slice(max(c0 - 1, 0), min(c1, n)) for (c0, c1), n in zip(cubes, shape))
    truth_box, pred_box = read_box(truth, box), read_box(pred, box)
    (z0, z1), (y0, y1), (x0, x1) = cubes
    # _slice_codes' quad row q joins rows start + q - 1 and start + q of the box (zero beyond it).
    rows = slice(y0 - box[1].start, y1 - box[1].start)
    cols = slice(x0 - box[2].start, x1 - box[2].start)
    height, width = truth_box.shape[1:]
    empty = np.zeros((3, (y1 - y0) * (x1 - x0)), dtype=np.uint8)

    def codes(z: int) -> np.ndarray:
        if not 0 <= z < shape[0]:
            return empty
        k = z - box[0].start
        full = _slice_codes(truth_box[k], pred_box[k]).reshape(3, height + 1, width + 1)
        return full[:, rows, cols].reshape(3, -1)

    counts = np.zeros((_N_CLASSES, _N_CLASSES), dtype=np.int64)
    previous = codes(z0 - 1)
    for z in range(z0, z1):
        current = codes(z)
        counts += _cube_pair_counts(previous, current)
        previous = current
    return counts


def _check_masks(truth: Any, pred: Any) -> tuple[int, int, int]:
    for name, mask in (("truth", truth), ("prediction", pred)):
        if not (hasattr(mask, "shape") and hasattr(mask, "dtype")):
            raise ValueError(f"{name} must be an array-like or VolumeSource with shape and dtype, got {type(mask).__name__}")
        if len(mask.shape) != 3 or 0 in tuple(mask.shape):
            raise ValueError(f"{name} must be a non-empty (Z, Y, X) mask, got shape {tuple(mask.shape)}")
        if np.dtype(mask.dtype).kind not in "bui":
            raise ValueError(f"{name} must be a bool or integer mask, got dtype {mask.dtype}")
    if tuple(truth.shape) != tuple(pred.shape):
        raise ValueError(f"truth and prediction shapes differ: {tuple(truth.shape)} vs {tuple(pred.shape)}")
    return tuple(int(n) for n in truth.shape)  # type: ignore[return-value]


def _block_sides(block: int | Sequence[int]) -> tuple[int, int, int]:
    sides = (block,) * 3 if isinstance(block, (int, np.integer)) else tuple(block)
    if len(sides) != 3 or not all(isinstance(b, (int, np.integer)) and b >= 1 for b in sides):
        raise ValueError(f"block must be a positive int or 3 positive ints (Z, Y, X), got {block!r}")
    return tuple(int(b) for b in sides)  # type: ignore[return-value]
