"""Vessel polarity: predict scans whose vessels are darker than their tissue.

The models this library trains learn vessels that are mostly brighter than the tissue around them
(the hipct kidneys mix both signs, the other families are mostly bright). On a scan whose vessels
are all dark they find nothing at all (0 voxels on the outside probe's ``dark_easy``), while
the same model on the mirrored scan finds them nearly as well as the best intensity cut.
So a prediction can run on the mirrored intensities:

- ``"as_given"``: the scan as read;
- ``"inverted"``: the mirrored scan (``mirrored``), for scans known to show dark vessels;
- ``"auto"``: the scan as read, and only when its mask (after small components go) is almost
  empty (under ``AUTO_MIN_FRACTION`` of the voxels) the mirrored scan too, whose mask is kept if
  it holds more voxels and is itself a plausible vessel mask (``plausible_mask``: neither almost
  empty nor over ``AUTO_MAX_FRACTION`` of the volume, which is background: the mirrored pass of
  a scan without vessels). It costs nothing where vessels are found, so a scan of mixed polarity
  (whose mirrored pass marks several times the true voxels) is left as read. The mask, not the
  voxels above the threshold, decides: on a scan of dark vessels the demo's model puts 1.4 % of
  the voxels above its threshold, all in specks that the component filter removes.

``"auto"`` compares whole-volume masks, so block-wise runs, which see one block at a time, take
``"as_given"`` or ``"inverted"``; ``InferConfig.polarity`` None means "auto" for whole volumes and
"as_given" block by block.
"""

from __future__ import annotations

import numpy as np

from .regions import Region
from .sources import VolumeSource

__all__ = ["AUTO_MAX_FRACTION", "AUTO_MIN_FRACTION", "POLARITIES", "InvertedSource", "count_voxels",
           "finds_almost_nothing", "keeps_mirrored", "mirrored", "plausible_mask"]

POLARITIES = ("as_given", "inverted", "auto")

# "Almost empty": under 1 in 10,000 voxels. The demo model's masks hold 0.3-0.4 % of the demo's
# kidneys (0.55-0.61 % are vessels) and none of the outside probe's dark-vessel volume.
AUTO_MIN_FRACTION = 1e-4
# A mirrored mask over a tenth of the volume is background, not vessels (vessels fill 0.35-1.4 % of
# the synthetic and probe volumes, ~1 % of the Kaggle kidneys' dense labels).
AUTO_MAX_FRACTION = 0.1


def mirrored(values: np.ndarray) -> np.ndarray:
    """``values`` with the intensity scale turned over: ``~x`` for integers (``65535 - x`` for
    uint16: the same range, reversed), ``1 - x`` for floats. Normalisation windows are percentiles
    (or the dtype's range), so the mirrored scan's window is the mirror of the scan's."""
    values = np.asarray(values)
    if values.dtype.kind in "ui":
        return np.invert(values)
    return np.subtract(1, values, dtype=values.dtype)


class InvertedSource:
    """A ``VolumeSource`` that reads ``source`` mirrored (``mirrored``); shape, dtype, voxel size
    and slice ids are the source's."""

    def __init__(self, source: VolumeSource) -> None:
        self.source = source
        self.shape = source.shape
        self.dtype = source.dtype
        self.voxel_size_um = source.voxel_size_um
        self.slice_ids = source.slice_ids

    def read(self, region: Region) -> np.ndarray:
        return mirrored(self.source.read(region))

    def __repr__(self) -> str:
        return f"InvertedSource({self.source!r})"


def finds_almost_nothing(mask_voxels: int, volume_voxels: int) -> bool:
    """Whether a mask of ``mask_voxels`` in a volume of ``volume_voxels`` is almost empty (under
    ``AUTO_MIN_FRACTION``): the case where ``"auto"`` also tries the mirrored scan."""
    return mask_voxels < AUTO_MIN_FRACTION * volume_voxels


def plausible_mask(mask_voxels: int, volume_voxels: int) -> bool:
    """Whether a mirrored pass's mask may be kept: not almost empty, and at most
    ``AUTO_MAX_FRACTION`` of the volume."""
    return not finds_almost_nothing(mask_voxels, volume_voxels) and mask_voxels <= AUTO_MAX_FRACTION * volume_voxels


def keeps_mirrored(found: int, mirrored_found: int, volume_voxels: int) -> bool:
    """Whether ``"auto"`` keeps the mirrored pass's mask (``mirrored_found`` voxels) over the
    almost empty one as read (``found``): it must hold more voxels and be ``plausible_mask``."""
    return mirrored_found > found and plausible_mask(mirrored_found, volume_voxels)


def count_voxels(mask: np.ndarray, *, slab: int = 16) -> int:
    """The True voxels of a (Z, Y, X) bool ``mask``, counted ``slab`` Z slices at a time (a
    memmap is never read whole)."""
    return sum(int(np.count_nonzero(mask[z:z + slab])) for z in range(0, mask.shape[0], slab))
