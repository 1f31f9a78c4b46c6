"""Validation during training: surface Dice on held-out volumes, at their own voxel size and
resampled to other ones (a simulated private test), with the threshold calibrated on them.

The private test of the competition (kidney_6) was scanned at 63.08 µm, the training volumes at
50 µm. ``val_voxel_sizes_um: [63.08]`` resamples each validation volume (images trilinear,
labels linear then cut at 0.5) to that voxel size once; each epoch predicts it as inference
would (resampled back to the model's voxel size, logits resampled to the volume's), so the best
checkpoint and its threshold are chosen on both resolutions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .calibration import THRESHOLD_GRID, best_threshold_row, calibrate_min_component_size, logit, threshold_scores
from .data import TrainVolume, vessel_mask
from .infer import RESCALE_TOLERANCE, infer_volume
from .predictor import voxel_ratio
from .metric import dice
from .normalize import Normalization
from .resample import resample_volume, scaled_shape

__all__ = ["ValidationCase", "calibrated_record", "validate", "validation_cases", "validation_logits"]


@dataclass(frozen=True)
class ValidationCase:
    """One volume to validate on: ``name`` (with ``@<size>um`` when resampled), its images,
    its truth mask and its voxel size (None: unknown, taken as the model's)."""

    name: str
    images: np.ndarray
    truth: np.ndarray
    voxel_size_um: float | None


def validation_cases(volumes: Sequence[TrainVolume], voxel_sizes_um: Sequence[float] = ()) -> list[ValidationCase]:
    """Each volume as it is, plus resampled to each of ``voxel_sizes_um`` that differs from its
    own (volumes of unknown voxel size are not resampled)."""
    cases = []
    for volume in volumes:
        truth = np.asarray(vessel_mask(volume.target))
        cases.append(ValidationCase(volume.name, volume.images, truth, volume.voxel_size_um))
        own = volume.voxel_size_um
        for size in voxel_sizes_um:
            if own is None or abs(size / own - 1.0) <= RESCALE_TOLERANCE:
                continue
            shape = scaled_shape(volume.images.shape, own / size)
            images = resample_volume(volume.images, shape)
            resampled_truth = resample_volume(truth.view(np.uint8) * np.uint8(255), shape) >= 128
            cases.append(ValidationCase(f"{volume.name}@{size:g}um", images, resampled_truth, float(size)))
    return cases


def validate(
    model: torch.nn.Module,
    cases: Sequence[ValidationCase],
    *,
    in_chans: int,
    normalization: Normalization,
    model_voxel_size_um: float | None,
    device: torch.device,
    batch_size: int = 4,
    threshold: float | None = None,
    axes: Sequence[str] = ("xy",),
    tile_size: int | Sequence[int] | None = None,
    pad_planes_to: int | None = None,
    component_sizes: Sequence[int] | None = None,
    calibration_tolerance: float = 0.0,
    calibration_rule: str = "mean",
) -> dict[str, float]:
    """Surface Dice and Dice of whole-slice predictions along ``axes`` (no TTA): the cases'
    ``validation_logits`` scored by ``calibrated_record``. Every epoch uses xy alone (cheap, a
    lower bound of what more axes reach); training calibrates the final threshold on every axis,
    as inference averages them by default (averaged logits are less extreme than one axis', so a
    threshold found on xy alone would be too high). The options are those two functions'."""
    logits = validation_logits(model, cases, in_chans=in_chans, normalization=normalization,
                               model_voxel_size_um=model_voxel_size_um, device=device, batch_size=batch_size,
                               axes=axes, tile_size=tile_size, pad_planes_to=pad_planes_to)
    return calibrated_record(logits, cases, model_voxel_size_um=model_voxel_size_um, threshold=threshold,
                             component_sizes=component_sizes, calibration_tolerance=calibration_tolerance,
                             calibration_rule=calibration_rule)


def validation_logits(
    model: torch.nn.Module,
    cases: Sequence[ValidationCase],
    *,
    in_chans: int,
    normalization: Normalization,
    model_voxel_size_um: float | None,
    device: torch.device,
    batch_size: int = 4,
    axes: Sequence[str] = ("xy",),
    tile_size: int | Sequence[int] | None = None,
    pad_planes_to: int | None = None,
) -> list[np.ndarray]:
    """Each case's float16 logits, predicted as ``infer_volume`` would along ``axes`` without TTA.
    ``tile_size`` (None: whole planes, or the whole volume for a 3D model) is the window
    ``infer_volume`` predicts with, e.g. a 3D model's training patch; ``pad_planes_to`` pads
    whole planes up to at least that side (the training crop: the xz planes of a thin case are
    otherwise mostly border)."""
    return [
        infer_volume(
            case.images, model, axes=tuple(axes), tta="none", in_chans=in_chans, normalization=normalization,
            batch_size=batch_size, device=device, voxel_size_um=case.voxel_size_um,
            model_voxel_size_um=model_voxel_size_um, tile_size=tile_size, pad_planes_to=pad_planes_to,
            polarity="as_given", return_logits=True, progress=False,
        )
        for case in cases
    ]


def calibrated_record(
    logits: Sequence[np.ndarray],
    cases: Sequence[ValidationCase],
    *,
    model_voxel_size_um: float | None,
    threshold: float | None = None,
    component_sizes: Sequence[int] | None = None,
    calibration_tolerance: float = 0.0,
    calibration_rule: str = "mean",
) -> dict[str, float]:
    """The validation record of the cases' ``logits``: ``val_threshold`` (``threshold``, or None
    to calibrate it: the probability of ``calibration.THRESHOLD_GRID`` that ``calibration_rule``
    chooses from the cases' scores), the mean ``val_surface_dice`` and ``val_dice`` at it, and
    both per case (``val_surface_dice_<case>``).

    ``component_sizes`` (e.g. ``calibration.COMPONENT_SIZE_GRID``): also pick, at that threshold,
    the smallest component to keep (``calibrate_min_component_size``, counted at the model's
    resolution); the record then adds ``val_min_component_size`` and the mean and per-case surface
    Dice with it (``val_surface_dice_cleaned``, ``val_surface_dice_cleaned_<case>``).
    ``calibration_tolerance``: the lowest threshold, and smallest component size, within it of
    the best mean score instead of the best; ``calibration_rule``: how the cases' scores make the
    threshold (``calibration.best_threshold_row``; the component size is always chosen on the
    mean). Several rules can so be compared on logits predicted once.
    """
    if len(logits) != len(cases):
        raise ValueError(f"need one logit volume per validation case, got {len(logits)} for {len(cases)}")
    truths = [case.truth for case in cases]
    grid = THRESHOLD_GRID if threshold is None else (threshold,)
    scores = threshold_scores(logits, truths, grid)
    best = best_threshold_row(scores, grid, tolerance=calibration_tolerance, rule=calibration_rule)
    chosen = float(grid[best])
    cut = np.float16(logit(chosen))
    masks = [volume_logits > cut for volume_logits in logits]
    record = {"val_threshold": chosen}
    for case, score, mask in zip(cases, scores[best], masks, strict=True):
        record[f"val_surface_dice_{case.name}"] = float(score)
        record[f"val_dice_{case.name}"] = dice(case.truth, mask)
    record["val_surface_dice"] = float(scores[best].mean())
    record["val_dice"] = float(np.mean([record[f"val_dice_{case.name}"] for case in cases]))
    if component_sizes:
        ratios = [voxel_ratio(case.images.shape, case.voxel_size_um, model_voxel_size_um) for case in cases]
        size, size_scores = calibrate_min_component_size(masks, truths, voxel_ratios=ratios, grid=component_sizes,
                                                         tolerance=calibration_tolerance)
        cleaned = size_scores[list(component_sizes).index(size)]
        record["val_min_component_size"] = size
        record["val_surface_dice_cleaned"] = float(cleaned.mean())
        record.update({f"val_surface_dice_cleaned_{case.name}": float(score) for case, score in zip(cases, cleaned, strict=True)})
    return record
