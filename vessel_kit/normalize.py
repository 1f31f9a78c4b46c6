"""Intensity normalisation shared by training and inference.

A ``Normalization`` is a small frozen config stored in every checkpoint, so inference feeds a model
exactly what it was trained on. Per-volume statistics (the percentile window) are computed once
per volume by ``window`` from a bounded sample read through the volume's source (``sources.py``):
at most ``SAMPLE_BLOCKS`` blocks, each one chunk of a chunked volume (one Z slice otherwise), read
once and strided down to ``max_samples`` voxels in all — fast on a 2.7 G-voxel kidney, a memmap,
a TIFF folder or a zarr volume. ``apply`` then maps any slice or tile of that volume to float32.

Modes:
    unit        x / dtype max (x / 65535 for uint16), no per-volume statistics.
    percentile  clip to the volume's [low, high] percentiles, then scale to [0, 1]
                (the 4th place used p10-p99.8).
    zscore      per-tile (x - mean) / std.
    clip_zscore clip to the volume's [low, high] percentiles, then per-tile (x - mean) / std
                (the 3rd place used p0.1-p99.9): the window is volume-wide as in "percentile",
                so a few saturated voxels cannot stretch a tile's statistics, and the z-score is
                per tile as in "zscore".

"Per tile" means per array given to ``apply``: a training crop (all its channels together), or
at inference the stack of neighbouring planes a tile is cut from.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .sources import VolumeSource, as_source

NORMALIZATION_MODES = ("unit", "percentile", "zscore", "clip_zscore")
SAMPLE_BLOCKS = 64  # the percentile sample reads at most this many blocks (chunks, or Z slices) ...
SAMPLE_READ_VOXELS = 2**28  # ... and at most ~this many voxels in all (each block at most this)
Window = tuple[float, float]

__all__ = ["NORMALIZATION_MODES", "Normalization"]


@dataclass(frozen=True)
class Normalization:
    """How raw intensities become model input.

    ``low``/``high`` are percentiles (0-100) used by the "percentile" and "clip_zscore" modes;
    ``max_samples`` bounds the voxels sampled to estimate them.

    Example:
        >>> norm = Normalization("percentile", low=10.0, high=99.8)
        >>> volume = np.arange(4 * 50 * 50, dtype=np.uint16).reshape(4, 50, 50)
        >>> window = norm.window(volume)  # or a VolumeSource, a TIFF folder, a zarr array
        >>> out = norm.apply(volume, window)
        >>> out.dtype, float(out.min()), float(out.max())
        (dtype('float32'), 0.0, 1.0)
    """

    mode: str = "percentile"
    low: float = 10.0
    high: float = 99.8
    max_samples: int = 4_000_000

    def __post_init__(self) -> None:
        if self.mode not in NORMALIZATION_MODES:
            raise ValueError(f"normalization mode must be one of {NORMALIZATION_MODES}, got {self.mode!r}")
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got low={self.low}, high={self.high}")
        if self.max_samples < 1000:
            raise ValueError(f"max_samples must be >= 1000, got {self.max_samples}")

    def window(self, volume: VolumeSource | Any) -> Window | None:
        """The per-volume intensity window (lo, hi) to pass to ``apply``; None for zscore
        (clip_zscore's is the percentile window it clips to).

        ``volume`` is a ``VolumeSource`` or anything ``sources.as_source`` takes (an array-like, a
        TIFF folder), or a single (Y, X) image; only the bounded sample is read from it.
        """
        source = _as_volume_source(volume)
        if self.mode == "zscore":
            return None
        if self.mode == "unit":
            top = float(np.iinfo(source.dtype).max) if source.dtype.kind in "ui" else 1.0
            return 0.0, top
        sample = _sample(source, self.max_samples)
        lo, hi = np.percentile(sample, [self.low, self.high])
        return float(lo), float(hi)

    def apply(self, x: np.ndarray, window: Window | None = None) -> np.ndarray:
        """Normalise a slice, tile or stack to float32 with this volume's ``window``."""
        x = np.asarray(x)
        if self.mode == "zscore":
            return _zscore(x.astype(np.float32))
        if window is None:
            raise ValueError(f"normalization mode {self.mode!r} needs the volume's window (call .window(volume) first)")
        lo, hi = window
        out = x.astype(np.float32)
        if self.mode == "clip_zscore":
            return _zscore(np.clip(out, lo, hi, out=out))
        out -= lo
        out *= 1.0 / max(hi - lo, 1e-6)
        return np.clip(out, 0.0, 1.0, out=out)

    @property
    def value_range(self) -> tuple[float, float] | None:
        """The range ``apply``'s output spans: (0, 1), or None for the z-scored modes (unbounded)."""
        return None if self.mode in ("zscore", "clip_zscore") else (0.0, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Normalization:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown normalization fields {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**values)


def _zscore(out: np.ndarray) -> np.ndarray:
    """``out`` (float32) standardised in place to mean 0 and std 1 (a flat array: to 0)."""
    out -= out.mean()
    out /= max(float(out.std()), 1e-6)
    return out


def _as_volume_source(volume: Any) -> VolumeSource:
    """``volume`` as a source; a (Y, X) image becomes a one-slice volume."""
    if getattr(volume, "ndim", None) == 2:
        volume = np.asarray(volume)[None]
    return as_source(volume)


def _sample(source: VolumeSource, max_samples: int) -> np.ndarray:
    """An evenly spread, strided sample of ~``max_samples`` voxels, each block of it read once.

    The volume is cut into blocks of its source's ``chunks`` (one Z slice when it has none), halved
    while larger than ``SAMPLE_READ_VOXELS``. Up to ``SAMPLE_BLOCKS`` blocks, evenly spaced along
    each axis, are read and strided alike on their non-flat axes. Without chunks this is the classic
    sample: 64 evenly spaced Z slices, each strided in Y and X.
    """
    block = _block_shape(source)
    grid = [math.ceil(n / b) for n, b in zip(source.shape, block)]
    counts = _spread(grid, min(SAMPLE_BLOCKS, max(1, SAMPLE_READ_VOXELS // math.prod(block))))
    per_block = max(1, max_samples // math.prod(counts))
    picks = [np.linspace(0, g - 1, c).round().astype(int) for g, c in zip(grid, counts)]
    parts = []
    for index in itertools.product(*picks):
        region = tuple(slice(i * b, min(n, (i + 1) * b)) for i, b, n in zip(index, block, source.shape))
        data = source.read(region)
        long_axes = [extent > 1 for extent in data.shape]
        stride = max(1, math.ceil((data.size / per_block) ** (1 / max(1, sum(long_axes)))))
        parts.append(data[tuple(slice(None, None, stride if long else 1) for long in long_axes)].ravel())
    return np.concatenate(parts)


def _block_shape(source: VolumeSource) -> tuple[int, int, int]:
    """The sample's read unit: the source's chunks (a Z slice without), within the volume and the cap."""
    chunks = getattr(source, "chunks", None) or (1, *source.shape[1:])
    block = [min(c, n) for c, n in zip(chunks, source.shape)]
    while math.prod(block) > SAMPLE_READ_VOXELS:
        axis = int(np.argmax(block))
        block[axis] = math.ceil(block[axis] / 2)
    return tuple(block)  # type: ignore[return-value]


def _spread(grid: list[int], budget: int) -> list[int]:
    """Blocks to sample per axis (at most ``grid``, product at most ``budget``), kept proportional
    to ``grid`` by growing the most sparsely sampled axis first."""
    counts = [1, 1, 1]
    while True:
        axis = max(range(3), key=lambda a: grid[a] / counts[a])
        grown = counts[:axis] + [counts[axis] + 1] + counts[axis + 1 :]
        if grown[axis] > grid[axis] or math.prod(grown) > budget:
            return counts
        counts = grown
