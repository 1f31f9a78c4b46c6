"""Window planning: how a (Z, Y, X) volume is cut into the windows a model sees.

Two strategies, one per model rank, both plans of frozen dataclasses the engine runs:

- ``plan_planes`` (2D and 2.5D models): one ``PlanePass`` per axis; every plane along the axis
  is cut into (H, W) tiles, the model sees ``in_chans`` neighbouring planes as channels.
- ``plan_patches`` (3D models): one ``PatchPass``; the volume is cut into (D, H, W) patches.

Both place windows on a regular grid (``tiling.window_starts``) weighted by a separable gaussian,
so the normaliser is an outer product of 1D sums (``tiling.window_normaliser``). A window side of
None means the whole extent, padded up to the models' stride (and, for planes, to at least
``min_whole_side``: a plane thinner than the model's training crop is otherwise mostly border).

Example::

    passes = plan_planes((64, 256, 256), {"xy": 0.5, "yz": 0.5}, tile=128, overlap=0.5, stride=32)
    patch_pass = plan_patches((64, 256, 256), tile=(32, 96, 96), overlap=0.5, stride=16)
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

from .axes import SLICE_AXIS
from .tiling import gaussian_importance, window_starts, window_sums

__all__ = ["PatchPass", "PlanePass", "Reach", "plan_patches", "plan_planes"]


@dataclass(frozen=True)
class _Grid:
    """A regular grid of windows over a region: window shape, starts per dimension, the
    importance map of one window, and per dimension the 1D sum of the windows' weights (their
    outer product is the normaliser; it is never stored for a whole volume)."""

    region_shape: tuple[int, ...]
    window_shape: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]
    importance: np.ndarray
    sums: tuple[np.ndarray, ...]

    def normaliser(self, region: tuple[slice, ...] | None = None) -> np.ndarray:
        """The summed window weights over ``region`` (default: the whole region), float32."""
        region = region or tuple(slice(0, side) for side in self.region_shape)
        return reduce(np.multiply.outer, [total[part] for total, part in zip(self.sums, region, strict=True)]).astype(np.float32)

    @classmethod
    def make(cls, region_shape: Sequence[int], window: Sequence[int | None], overlap: float, stride: int,
             square: bool = False, min_whole_side: int = 0) -> _Grid:
        """Windows of ``window`` (None sides: the whole side, at least ``min_whole_side``, padded
        to ``stride``; flat weights when every side is whole) over ``region_shape``; ``square``
        makes whole-side windows square in their last two dims (for rot90 TTA)."""
        whole = all(side is None for side in window)
        shape = [_round_up(max(length, min_whole_side), stride) if side is None else int(side)
                 for length, side in zip(region_shape, window, strict=True)]
        if square and whole:
            shape[-2:] = [max(shape[-2:])] * 2
        shape = tuple(shape)
        steps = [max(1, int(side * (1 - overlap))) for side in shape]
        starts = tuple(tuple(window_starts(length, side, step)) for length, side, step in zip(region_shape, shape, steps, strict=True))
        importance = np.ones(shape, np.float32) if whole else gaussian_importance(shape)
        sums = tuple(window_sums(tuple(region_shape), shape, starts, gaussian=not whole))
        return cls(tuple(region_shape), shape, starts, importance, sums)

    @property
    def corners(self) -> list[tuple[int, ...]]:
        """The windows' start corners, in C order (last dimension fastest)."""
        return list(itertools.product(*self.starts))

    def reaching(self, region: tuple[slice, ...]) -> Reach:
        """The windows that overlap ``region`` (a box of the grid's region), and the box they
        span: what a block-wise run of ``region`` must predict and read."""
        starts = [tuple(start for start in dim if start < part.stop and start + side > part.start)
                  for dim, part, side in zip(self.starts, region, self.window_shape, strict=True)]
        if not all(starts):
            raise ValueError(f"region {region} lies outside the grid's region {self.region_shape}")
        origin = tuple(dim[0] for dim in starts)
        extent = tuple(dim[-1] + side - dim[0] for dim, side in zip(starts, self.window_shape, strict=True))
        span = tuple(slice(low, min(low + size, length)) for low, size, length in zip(origin, extent, self.region_shape, strict=True))
        return Reach(list(itertools.product(*starts)), span, extent)


@dataclass(frozen=True)
class Reach:
    """The windows of a grid that reach a region: their ``corners`` (C order), the ``span`` of
    the grid's region they cover (what is read) and its ``extent`` (the span before clipping to
    the region: a window may be larger than the region, which is then padded)."""

    corners: list[tuple[int, ...]]
    span: tuple[slice, ...]
    extent: tuple[int, ...]

    @property
    def origin(self) -> tuple[int, ...]:
        return tuple(part.start for part in self.span)


@dataclass(frozen=True)
class PlanePass:
    """Every plane along ``axis`` ("xy": planes along Z, ...), tiled by ``grid``, its blended
    logits added into the accumulator times ``weight``.

    Example::

        (xy,) = plan_planes((64, 256, 256), {"xy": 1.0}, tile=128, overlap=0.5, stride=32)
        xy.tile_count  # 64 planes x 3 x 3 tiles
    """

    axis: str
    weight: float
    planes: int
    grid: _Grid

    @property
    def tile_count(self) -> int:
        return self.planes * len(self.grid.corners)


@dataclass(frozen=True)
class PatchPass:
    """The whole volume cut into 3D patches by ``grid``; ``weight`` as for a plane pass.

    Example::

        patches = plan_patches((64, 256, 256), tile=(32, 128, 128), overlap=0.5, stride=16)
        patches.grid.starts  # ((0, 16, 32), (0, 64, 128), (0, 64, 128))
    """

    weight: float
    grid: _Grid

    @property
    def tile_count(self) -> int:
        return len(self.grid.corners)


def plan_planes(
    shape: tuple[int, int, int], axis_weights: Mapping[str, float], *, tile: int | Sequence[int] | None,
    overlap: float, stride: int, square: bool = False, min_whole_side: int | None = None,
) -> list[PlanePass]:
    """One pass per axis of ``axis_weights`` over a volume of ``shape``; ``tile`` is the tile
    side (or (H, W)); None: whole planes, each side padded up to at least ``min_whole_side``."""
    tile_shape = _sides(tile, 2)
    passes = []
    for axis, weight in axis_weights.items():
        slice_axis = SLICE_AXIS[axis]
        plane_shape = tuple(side for index, side in enumerate(shape) if index != slice_axis)
        grid = _Grid.make(plane_shape, tile_shape, overlap, stride, square=square, min_whole_side=min_whole_side or 0)
        passes.append(PlanePass(axis, weight, shape[slice_axis], grid))
    return passes


def plan_patches(
    shape: tuple[int, int, int], *, tile: int | Sequence[int] | None, overlap: float, stride: int,
    square: bool = False, weight: float = 1.0,
) -> PatchPass:
    """The patch pass over a volume of ``shape``, its logits added times ``weight``; ``tile`` is
    the patch side (or (D, H, W)); None: the whole volume as one patch. A patch larger than the
    volume is fine: the volume is padded up to it."""
    return PatchPass(weight, _Grid.make(shape, _sides(tile, 3), overlap, stride, square=square))


def _sides(tile: int | Sequence[int] | None, rank: int) -> tuple[int | None, ...]:
    """A window side per dimension from an int, a sequence of ``rank`` ints, or None."""
    if tile is None or isinstance(tile, int):
        return (tile,) * rank
    sides = tuple(int(side) for side in tile)
    if len(sides) != rank:
        raise ValueError(f"tile_size {tuple(tile)} has {len(sides)} sides; these windows need {rank}")
    return sides


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
