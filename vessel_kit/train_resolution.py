"""Training at the test resolution: a training volume resampled once to another voxel size.

The 2nd-place pipeline trained on the 50 µm volumes downsampled to the private test's 63.08 µm,
so the network never has to generalise across scales. ``at_voxel_size`` resamples images
(trilinear), labels (bool: linear then cut at 0.5; soft labels linearly) and the valid mask
(linear then cut at 0.5) once, slice by slice; with a ``cache_dir`` the results are ``.npy``
memmaps written there (``data.cached_array``, as ``data.cache_volume`` caches the TIFF slices) and
only mapped on later runs.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from .data import TrainVolume, cached_array
from .infer import RESCALE_TOLERANCE
from .resample import resample_volume, resampled_slices, scaled_shape

__all__ = ["at_voxel_size"]


def at_voxel_size(volume: TrainVolume, voxel_size_um: float, *, cache_dir: str | os.PathLike | None = None) -> TrainVolume:
    """``volume`` resampled to ``voxel_size_um`` (itself when within ``RESCALE_TOLERANCE``).

    Example::

        volume = at_voxel_size(volume, 63.08, cache_dir="cache")  # kidney_1_dense at the test resolution
    """
    if not voxel_size_um > 0:
        raise ValueError(f"target_voxel_size_um must be a positive voxel size in µm, got {voxel_size_um}")
    own = volume.voxel_size_um
    if own is None:
        raise ValueError(f"target_voxel_size_um: volume {volume.name!r} has no known voxel size to resample from")
    if abs(voxel_size_um / own - 1.0) <= RESCALE_TOLERANCE:
        return volume
    shape = scaled_shape(volume.images.shape, own / voxel_size_um)
    folder = None if cache_dir is None else Path(cache_dir)

    def resampled(kind: str, array: np.ndarray) -> np.ndarray:
        """``array`` at ``shape``: a bool mask linearly then cut at 0.5, anything else as its dtype."""
        def fill(out: np.ndarray) -> None:
            if array.dtype != np.bool_:
                resample_volume(array, shape, out=out)
                return
            for z, plane in enumerate(resampled_slices(array, shape, dtype=np.float32)):
                out[z] = plane >= 0.5

        if folder is None:
            out = np.empty(shape, dtype=array.dtype)
            fill(out)
            return out
        return cached_array(folder / f"{volume.name}@{voxel_size_um:g}um_{kind}.npy", shape, array.dtype, fill)

    valid = volume.valid
    return dataclasses.replace(
        volume,
        images=resampled("images", volume.images),
        target=resampled("target", volume.target),
        valid=None if valid is None else resampled("valid", valid if valid.dtype == np.bool_ else valid != 0),
        voxel_size_um=float(voxel_size_um),
    )
