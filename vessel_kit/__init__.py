"""vessel_kit: blood-vessel segmentation of 3D HiP-CT kidney scans (SenNet + HOA).

The public API, re-exported explicitly. Arrays are (Z, Y, X) = (slice, row, column) everywhere.
"""

from .layout import KNOWN_VOXEL_SIZES_UM, VolumeInfo, find_volumes
from .metric import SurfaceDiceAccumulator, dice, score_submission, surface_dice
from .normalize import NORMALIZATION_MODES, Normalization
from .rle import (
    EMPTY_RLE,
    SubmissionWriter,
    parse_rle,
    rle_decode,
    rle_encode,
    slice_id,
    validate_submission,
    write_submission,
)
from .volume import read_labels, read_slice_header, read_volume, slice_files, slice_ids, write_volume

__version__ = "0.1.0"

__all__ = [
    "EMPTY_RLE",
    "KNOWN_VOXEL_SIZES_UM",
    "NORMALIZATION_MODES",
    "Normalization",
    "SubmissionWriter",
    "SurfaceDiceAccumulator",
    "VolumeInfo",
    "__version__",
    "dice",
    "find_volumes",
    "parse_rle",
    "read_labels",
    "read_slice_header",
    "read_volume",
    "rle_decode",
    "rle_encode",
    "score_submission",
    "slice_files",
    "slice_id",
    "slice_ids",
    "surface_dice",
    "validate_submission",
    "write_submission",
    "write_volume",
]
