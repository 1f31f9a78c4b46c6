"""vessel_kit: blood-vessel segmentation of 3D HiP-CT kidney scans (SenNet + HOA).

The public API, re-exported explicitly. Arrays are (Z, Y, X) = (slice, row, column) everywhere.
I/O, RLE and the metric import eagerly (numpy only); the deep-learning parts (torch, smp, timm,
albumentations, ~2 s to import) load on first use, so scoring and file work stay fast to start.
"""

from importlib import import_module

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

# Name -> submodule, imported on first access (PEP 562).
_LAZY = {
    "CropConfig": "data",
    "CropDataset": "data",
    "TrainVolume": "data",
    "cache_volume": "data",
    "Ensemble": "infer",
    "infer_volume": "infer",
    "load_ensemble": "infer",
    "build_loss": "losses",
    "ModelConfig": "models",
    "ModelEMA": "models",
    "build_model": "models",
    "load_checkpoint": "models",
    "save_checkpoint": "models",
    "remove_small_components": "postprocess",
    "make_pseudo_labels": "pseudo",
    "predict_submission": "submit",
    "write_empty_submission": "submit",
    "usable_devices": "devices",
    "Bundle": "bundle",
    "read_bundle": "bundle",
    "qc_report": "qc",
    "make_synthetic_dataset": "synth",
    "make_synthetic_volume": "synth",
    "TrainConfig": "training",
    "train": "training",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vessel_kit' has no attribute {name!r}")


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
    *sorted(_LAZY),
]
