"""vessel_kit: blood-vessel segmentation of 3D HiP-CT kidney scans (SenNet + HOA).

The public API, re-exported explicitly. Arrays are (Z, Y, X) = (slice, row, column) everywhere.
I/O (``volume``, ``layout``), normalisation, RLE and the metric import eagerly, with numpy,
pandas, tifffile, opencv and tqdm; the deep-learning parts (torch, smp, timm, albumentations,
~2 s to import: ``_LAZY`` below) load on first use, so scoring and file work stay fast to start.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .layout import KNOWN_VOXEL_SIZES_UM, VolumeInfo, find_volumes
from .metric import SurfaceDiceAccumulator, dice, score_submission, surface_dice
from .normalize import NORMALIZATION_MODES, Normalization
from .rle import (
    EMPTY_RLE,
    SubmissionWriter,
    parse_rle,
    rle_decode,
    rle_encode,
    rle_rows,
    slice_id,
    validate_submission,
    write_submission,
)
from .sources import ArraySource, TiffStackSource, VolumeSource, as_source
from .volume import read_labels, read_slice_header, read_volume, slice_files, slice_ids, write_volume

__version__ = "0.1.0"

# Name -> submodule, imported on first access (PEP 562).
_LAZY = {
    "CropConfig": "data",
    "CropDataset": "data",
    "TrainVolume": "data",
    "cache_volume": "data",
    "DeadlineWarning": "deadline",
    "Ensemble": "ensemble",
    "MixedEnsemble": "ensemble",
    "InferConfig": "infer_config",
    "LogitVolume": "predictor",
    "Predictor": "predictor",
    "infer_volume": "infer",
    "infer_blocks": "blocks",
    "load_ensemble": "ensemble",
    "build_loss": "losses",
    "ModelConfig": "models",
    "register_architecture": "models",
    "OptimConfig": "optim",
    "PatchConfig": "patches",
    "PatchDataset": "patches",
    "hull_gate": "postprocess",
    "list_recipes": "recipes",
    "list_infer_presets": "infer_config",
    "ModelEMA": "ema",
    "build_model": "models",
    "load_checkpoint": "models",
    "save_checkpoint": "models",
    "remove_small_components": "postprocess",
    "make_pseudo_labels": "pseudo",
    "densify_label": "pseudo",
    "open_volume": "ome_zarr",
    "require_voxel_size": "ome_zarr",
    "OutputStore": "ome_zarr_out",
    "create_output": "ome_zarr_out",
    "surface_dice_blocks": "metric_blocks",
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

if TYPE_CHECKING:  # what IDEs and type checkers see of the lazy names
    from .blocks import infer_blocks
    from .bundle import Bundle, read_bundle
    from .data import CropConfig, CropDataset, TrainVolume, cache_volume
    from .deadline import DeadlineWarning
    from .ema import ModelEMA
    from .devices import usable_devices
    from .ensemble import Ensemble, MixedEnsemble, load_ensemble
    from .infer import infer_volume
    from .infer_config import InferConfig, list_infer_presets
    from .losses import build_loss
    from .metric_blocks import surface_dice_blocks
    from .models import ModelConfig, build_model, load_checkpoint, register_architecture, save_checkpoint
    from .ome_zarr import open_volume, require_voxel_size
    from .ome_zarr_out import OutputStore, create_output
    from .optim import OptimConfig
    from .patches import PatchConfig, PatchDataset
    from .postprocess import hull_gate, remove_small_components
    from .recipes import list_recipes
    from .predictor import LogitVolume, Predictor
    from .pseudo import densify_label, make_pseudo_labels
    from .qc import qc_report
    from .submit import predict_submission, write_empty_submission
    from .synth import make_synthetic_dataset, make_synthetic_volume
    from .training import TrainConfig, train


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vessel_kit' has no attribute {name!r}")


__all__ = [
    "ArraySource",
    "EMPTY_RLE",
    "KNOWN_VOXEL_SIZES_UM",
    "NORMALIZATION_MODES",
    "Normalization",
    "SubmissionWriter",
    "SurfaceDiceAccumulator",
    "TiffStackSource",
    "VolumeSource",
    "VolumeInfo",
    "__version__",
    "as_source",
    "dice",
    "find_volumes",
    "parse_rle",
    "read_labels",
    "read_slice_header",
    "read_volume",
    "rle_decode",
    "rle_encode",
    "rle_rows",
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
