"""Trilinear resampling of (Z, Y, X) volumes, streamed one output slice at a time.

Used when a volume's voxel size differs from the model's (kidney_6: 63.08 µm vs 50 µm training):
the volume is resampled to the model's resolution, predicted, and the logits resampled back —
without a second full-size float copy. Trilinear = linear along z (blending two input slices)
after bilinear in-plane (``cv2.resize``, INTER_LINEAR); both use pixel-centre alignment
(PyTorch's ``align_corners=False``), edges clamped.
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np

__all__ = ["resample_volume", "resampled_slices", "scaled_shape"]


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
    if volume.ndim != 3 or len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"resampling needs a (Z, Y, X) volume and a 3-int shape, got {volume.shape} -> {tuple(shape)}")
    dtype = np.dtype(dtype or volume.dtype)
    depth, (out_depth, out_height, out_width) = volume.shape[0], shape
    cache: dict[int, np.ndarray] = {}

    def plane(z: int) -> np.ndarray:
        if z not in cache:
            if len(cache) >= 2:
                cache.pop(min(cache))
            cache[z] = cv2.resize(volume[z].astype(np.float32), (out_width, out_height), interpolation=cv2.INTER_LINEAR)
        return cache[z]

    for k in range(out_depth):
        source = min(max((k + 0.5) * depth / out_depth - 0.5, 0.0), depth - 1)
        low = int(source)
        high = min(low + 1, depth - 1)
        fraction = np.float32(source - low)
        blended = plane(low) if fraction == 0 else plane(low) * (1 - fraction) + plane(high) * fraction
        yield _cast(blended, dtype)


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)
