"""Trilinear resampling of (Z, Y, X) volumes, whole (streamed one output slice at a time) or one
box at a time, with the same arithmetic.

Used when a volume's voxel size differs from the model's (kidney_6: 63.08 µm vs 50 µm training):
the volume is resampled to the model's resolution, predicted, and the logits resampled back —
without a second full-size float copy. Trilinear = linear along X, then Y, then Z, each with
pixel-centre alignment (PyTorch's ``align_corners=False``), edges clamped: output index k of a
side of n_out reads source coordinate ``clamp((k + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)``.

The taps (source indices and float32 fractions) of each output index depend only on the two side
lengths, so a box of the output computed from the matching box of the input (``resample_region``,
``ResampledSource``) is bit-identical to the same box of the whole result: what block-wise
inference needs. (``cv2.resize`` on a sub-image is not: its taps follow the sub-image's size.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .regions import Region, check_region

__all__ = ["ResampledSource", "resample_region", "resample_volume", "resampled_slices", "scaled_shape", "source_span"]


def scaled_shape(shape: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """``shape`` multiplied by ``factor`` and rounded, each side at least 1."""
    if not factor > 0:
        raise ValueError(f"scale factor must be > 0, got {factor}")
    return tuple(max(1, round(side * factor)) for side in shape)


def resample_volume(
    volume: np.ndarray,
    shape: tuple[int, int, int],
    *,
    dtype: np.dtype | type | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``volume`` resampled trilinearly to ``shape`` (dtype: the volume's unless given; integer
    outputs are rounded and clipped). Memory beyond input and output: two resized slices."""
    dtype = np.dtype(dtype or volume.dtype)
    if out is None:
        out = np.empty(tuple(shape), dtype=dtype)
    elif out.shape != tuple(shape):
        raise ValueError(f"out has shape {out.shape}, need {tuple(shape)}")
    for k, plane in enumerate(resampled_slices(volume, shape, dtype=dtype)):
        out[k] = plane
    return out


def resampled_slices(
    volume: np.ndarray, shape: tuple[int, int, int], *, dtype: np.dtype | type | None = None
) -> Iterator[np.ndarray]:
    """The slices of ``volume`` resampled to ``shape``, one (Y, X) slice at a time."""
    _check_shapes(volume.shape, shape)
    dtype = np.dtype(dtype or volume.dtype)
    taps = [_Taps.make(n_in, n_out) for n_in, n_out in zip(volume.shape, shape, strict=True)]
    cache: dict[int, np.ndarray] = {}

    def plane(z: int) -> np.ndarray:
        if z not in cache:
            if len(cache) >= 2:
                cache.pop(min(cache))
            cache[z] = taps[1].apply(taps[2].apply(volume[z].astype(np.float32), axis=1), axis=0)
        return cache[z]

    for k in range(shape[0]):
        yield _cast(taps[0].blend(plane(taps[0].low[k]), plane(taps[0].high[k]), k), dtype)


def resample_region(
    read: Callable[[Region], np.ndarray], in_shape: Sequence[int], out_shape: Sequence[int], region: Sequence[slice],
    *, dtype: np.dtype | type,
) -> np.ndarray:
    """The box ``region`` of the input (of ``in_shape``, read a box at a time by ``read``)
    resampled to ``out_shape``: bit-identical to that box of ``resample_volume``. Reads only
    ``source_span`` of the region."""
    taps = _cropped_taps(in_shape, out_shape, region)
    box = np.asarray(read(tuple(slice(t.first, t.last + 1) for t in taps))).astype(np.float32)
    planes = taps[1].apply(taps[2].apply(box, axis=2), axis=1)
    out = np.empty(tuple(len(t.fraction) for t in taps), np.dtype(dtype))
    for k in range(len(out)):
        out[k] = _cast(taps[0].blend(planes[taps[0].low[k]], planes[taps[0].high[k]], k), out.dtype)
    return out


def source_span(in_shape: Sequence[int], out_shape: Sequence[int], region: Sequence[slice]) -> Region:
    """The box of the input that the box ``region`` of the resampled output reads."""
    return tuple(slice(t.first, t.last + 1) for t in _cropped_taps(in_shape, out_shape, region))


class ResampledSource:
    """A ``VolumeSource`` resampled to ``shape`` on demand: ``read(region)`` reads only the box of
    ``source`` that the region needs, and equals that box of the whole resampled volume.

    Example::

        model_res = ResampledSource(source, scaled_shape(source.shape, 63.08 / 50))
        block = model_res.read((slice(0, 64), slice(128, 256), slice(0, 128)))
    """

    def __init__(self, source, shape: tuple[int, int, int]) -> None:
        _check_shapes(source.shape, shape)
        self.source = source
        self.shape = tuple(int(side) for side in shape)
        self.dtype = source.dtype
        self.voxel_size_um = None
        self.slice_ids = None
        self.chunks = None

    def read(self, region: Region) -> np.ndarray:
        return resample_region(self.source.read, self.source.shape, self.shape, region, dtype=self.dtype)

    def __repr__(self) -> str:
        return f"ResampledSource({self.source!r} -> {self.shape})"


@dataclass(frozen=True)
class _Taps:
    """Linear interpolation along one side: output index k (from ``offset``) blends input
    ``low[k]`` (weight ``1 - fraction[k]``) and ``high[k]`` (weight ``fraction[k]``), input indices
    counted from ``first``."""

    low: np.ndarray
    high: np.ndarray
    fraction: np.ndarray
    first: int = 0
    last: int = 0

    @classmethod
    def make(cls, n_in: int, n_out: int) -> _Taps:
        k = np.arange(n_out, dtype=np.float64)
        source = np.clip((k + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
        low = source.astype(np.int64)
        high = np.minimum(low + 1, n_in - 1)
        return cls(low, high, (source - low).astype(np.float32), 0, int(high[-1]))

    def crop(self, span: slice) -> _Taps:
        """The taps of outputs ``span``, their input indices counted from the first one read."""
        low, high = self.low[span], self.high[span]
        first = int(low[0])
        return _Taps(low - first, high - first, self.fraction[span], first, int(high[-1]))

    def blend(self, low: np.ndarray, high: np.ndarray, k: int) -> np.ndarray:
        """Output k from its two (already gathered) inputs, float32."""
        fraction = self.fraction[k]
        return low * (1 - fraction) + high * fraction

    def apply(self, values: np.ndarray, axis: int) -> np.ndarray:
        """``values`` interpolated along ``axis`` (float32 in, float32 out)."""
        shape = [1] * values.ndim
        shape[axis] = len(self.fraction)
        fraction = self.fraction.reshape(shape)
        return np.take(values, self.low, axis=axis) * (1 - fraction) + np.take(values, self.high, axis=axis) * fraction


def _cropped_taps(in_shape: Sequence[int], out_shape: Sequence[int], region: Sequence[slice]) -> list[_Taps]:
    """The taps of the box ``region`` of the output, per axis."""
    _check_shapes(tuple(in_shape), tuple(out_shape))
    region = check_region(region, out_shape)
    return [_Taps.make(n_in, n_out).crop(span) for n_in, n_out, span in zip(in_shape, out_shape, region, strict=True)]


def _check_shapes(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
    if len(in_shape) != 3 or len(out_shape) != 3 or min(out_shape) < 1 or min(in_shape) < 1:
        raise ValueError(f"resampling needs a (Z, Y, X) volume and a 3-int shape, got {tuple(in_shape)} -> {tuple(out_shape)}")


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)
