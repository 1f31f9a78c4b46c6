"""Vessel polarity: predict scans whose vessels are darker than their tissue.

The models this library trains learn vessels that are mostly brighter than the tissue around them
(the hipct kidneys mix both signs, the other families are mostly bright). On a scan whose vessels
are all dark they find nothing at all (0 voxels on the outside probe's ``dark_easy``), while
the same model on the mirrored scan finds them nearly as well as the best intensity cut.
So a prediction can run on the mirrored intensities:

- ``"as_given"``: the scan as read;
- ``"inverted"``: the mirrored scan (``mirrored``), for scans known to show dark vessels;
- ``"auto"``: the scan as read, and the mirrored scan too only when the mask as read finds
  almost nothing (``asks_for_mirrored``): it is almost empty (under ``AUTO_MIN_FRACTION`` of the
  voxels), or it is sparse (under ``AUTO_SPARSE_FRACTION``) and speckled (under
  ``AUTO_SPECKLE_SHARE`` of the voxels above the threshold survive the component filter). On a
  scan of dark vessels a bright-vessel model puts ~0.5-1.4 % of the voxels above its threshold,
  nearly all in specks the component filter removes (0-3 % kept), while a sparse but real mask
  keeps most of them (a sparse mixed-polarity hipct draw: 29-50 %). The mirrored mask is kept
  (``keeps_mirrored``) if it holds more voxels, is itself a plausible vessel mask
  (``plausible_mask``: neither almost empty nor over ``AUTO_MAX_FRACTION`` of the volume, which
  is background: the mirrored pass of a scan without vessels), and keeps at least
  ``AUTO_SHARE_GAIN`` times the share of its above-threshold voxels. It costs nothing where
  vessels are found, so a scan of mixed polarity (whose mirrored pass marks several times the
  true voxels) is left as read.

``"auto"`` compares whole-volume masks, so block-wise runs, which see one block at a time, take
``"as_given"`` or ``"inverted"``; ``InferConfig.polarity`` None means "auto" for whole volumes and
"as_given" block by block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .regions import Region
from .sources import VolumeSource

__all__ = ["AUTO_MAX_FRACTION", "AUTO_MIN_FRACTION", "AUTO_SHARE_GAIN", "AUTO_SPARSE_FRACTION", "AUTO_SPECKLE_SHARE",
           "POLARITIES", "InvertedSource", "MaskCount", "asks_for_mirrored", "count_voxels", "finds_almost_nothing",
           "keeps_mirrored", "mirrored", "plausible_mask"]

POLARITIES = ("as_given", "inverted", "auto")

# "Almost empty": under 1 in 10,000 voxels. The demo model's masks hold 0.3-0.4 % of the demo's
# kidneys (0.55-0.61 % are vessels) and none of the outside probe's dark-vessel volume.
AUTO_MIN_FRACTION = 1e-4
# "Sparse and speckled": under 1 in 1,000 voxels, of which under a fifth of the voxels above the
# threshold survive the component filter. Set on the outside probe and two draws of each synthetic
# family (stop 32: dark vessels as read keep 0-3 %, the sparsest real masks 29-50 %, a sparse wall
# scan 9-16 %), checked on fresh draws, their inversions and other checkpoints (stop 33:
# benchmarks/README.md, "Polarity 'auto' on speckle").
AUTO_SPARSE_FRACTION = 1e-3
AUTO_SPECKLE_SHARE = 0.2
# A mirrored mask replaces a speckled one only if it keeps at least twice its share: a sparse scan
# whose two passes are both speckle stays as read.
AUTO_SHARE_GAIN = 2.0
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


@dataclass(frozen=True)
class MaskCount:
    """What ``"auto"`` knows of one pass's mask: its voxels (``kept``), the voxels above the
    threshold before the component filter (``above``) and the volume's voxels (``volume``)."""

    kept: int
    above: int
    volume: int

    @property
    def kept_share(self) -> float:
        """The share of the voxels above the threshold that the component filter kept (1 with no filter
        at work, 0 for nothing above the threshold)."""
        return self.kept / self.above if self.above else 0.0

    def described(self) -> str:
        """The count in words, for warnings: "12 voxels (3 % of the 400 above the threshold)"."""
        return f"{self.kept} voxels ({self.kept_share:.0%} of the {self.above} above the threshold)"


def finds_almost_nothing(mask_voxels: int, volume_voxels: int) -> bool:
    """Whether a mask of ``mask_voxels`` in a volume of ``volume_voxels`` is almost empty (under
    ``AUTO_MIN_FRACTION``)."""
    return mask_voxels < AUTO_MIN_FRACTION * volume_voxels


def asks_for_mirrored(as_read: MaskCount) -> bool:
    """Whether ``"auto"`` also predicts the mirrored scan: the mask as read is almost empty, or
    sparse (under ``AUTO_SPARSE_FRACTION``) and speckled (under ``AUTO_SPECKLE_SHARE`` kept)."""
    if finds_almost_nothing(as_read.kept, as_read.volume):
        return True
    return as_read.kept < AUTO_SPARSE_FRACTION * as_read.volume and as_read.kept_share < AUTO_SPECKLE_SHARE


def plausible_mask(mask_voxels: int, volume_voxels: int) -> bool:
    """Whether a mirrored pass's mask may be kept: not almost empty, and at most
    ``AUTO_MAX_FRACTION`` of the volume."""
    return not finds_almost_nothing(mask_voxels, volume_voxels) and mask_voxels <= AUTO_MAX_FRACTION * volume_voxels


def keeps_mirrored(as_read: MaskCount, mirrored_pass: MaskCount) -> bool:
    """Whether ``"auto"`` keeps the mirrored pass's mask over the one as read (which
    ``asks_for_mirrored``): it must hold more voxels, be ``plausible_mask`` and keep at least
    ``AUTO_SHARE_GAIN`` times the share of its voxels above the threshold."""
    return (mirrored_pass.kept > as_read.kept and plausible_mask(mirrored_pass.kept, mirrored_pass.volume)
            and mirrored_pass.kept_share >= AUTO_SHARE_GAIN * as_read.kept_share)


def count_voxels(mask: np.ndarray, *, slab: int = 16) -> int:
    """The True voxels of a (Z, Y, X) bool ``mask``, counted ``slab`` Z slices at a time (a
    memmap is never read whole)."""
    return sum(int(np.count_nonzero(mask[z:z + slab])) for z in range(0, mask.shape[0], slab))
