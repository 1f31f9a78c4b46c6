"""Validation cases resampled to other voxel sizes, and the calibrated threshold they give."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vessel_kit.calibration import THRESHOLD_GRID, best_threshold_row, threshold_scores
from vessel_kit.data import TrainVolume
from vessel_kit.normalize import Normalization
from vessel_kit.validation import calibrated_record, validate, validation_cases, validation_logits


def tube_volume(voxel_size_um: float | None = 50.0) -> TrainVolume:
    images = np.full((24, 48, 48), 1000, np.uint16)
    target = np.zeros(images.shape, bool)
    zz, yy, xx = np.indices(images.shape)
    target[(yy - 24) ** 2 + (xx - 20) ** 2 <= 36] = True  # a tube of radius 6 along z
    images[target] = 3000
    return TrainVolume("tube", images, target, voxel_size_um=voxel_size_um)


def test_cases_resample_to_other_voxel_sizes_only():
    volume = tube_volume()
    cases = validation_cases([volume], [50.5, 63.08])  # 50.5 is within the 2 % tolerance: not resampled
    assert [c.name for c in cases] == ["tube", "tube@63.08um"]
    coarse = cases[1]
    assert coarse.images.shape == (19, 38, 38) and coarse.voxel_size_um == 63.08
    # The same anatomy sampled more coarsely: the tube's share of the volume stays put.
    assert coarse.truth.mean() == pytest.approx(volume.target.mean(), rel=0.1)
    assert validation_cases([tube_volume(None)], [63.08])[0].name == "tube"  # unknown size: as it is


class Intensity(torch.nn.Module):
    """Logits from intensity: confident-negative background, under-confident vessels."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(-4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias + 3.0 * x[:, 1:2]  # vessels (x = 1) get logit -1: probability 0.27


def test_validate_calibrates_over_both_resolutions():
    cases = validation_cases([tube_volume()], [63.08])
    common = dict(in_chans=3, normalization=Normalization("percentile", low=0.0, high=100.0),
                  model_voxel_size_um=50.0, device=torch.device("cpu"))
    record = validate(Intensity(), cases, **common)
    assert record["val_threshold"] < 0.27
    assert record["val_surface_dice_tube"] > 0.9 and record["val_surface_dice_tube@63.08um"] > 0.6
    assert record["val_surface_dice"] == pytest.approx(
        (record["val_surface_dice_tube"] + record["val_surface_dice_tube@63.08um"]) / 2)
    fixed = validate(Intensity(), cases, threshold=0.5, **common)
    assert fixed["val_threshold"] == 0.5 and fixed["val_surface_dice"] == 0.0


def test_logits_predicted_once_recalibrate_as_validate_does():
    """``validate`` is ``validation_logits`` then ``calibrated_record``: logits predicted once
    give the same record, and can be recut with other options (a benchmark of calibration rules)."""
    cases = validation_cases([tube_volume()], [63.08])
    common = dict(normalization=Normalization("percentile", low=0.0, high=100.0), model_voxel_size_um=50.0,
                  device=torch.device("cpu"))
    logits = validation_logits(Intensity(), cases, in_chans=3, **common)
    assert [volume.shape for volume in logits] == [case.truth.shape for case in cases]
    record = calibrated_record(logits, cases, model_voxel_size_um=50.0, component_sizes=(0, 10))
    assert record == validate(Intensity(), cases, in_chans=3, component_sizes=(0, 10), **common)
    assert calibrated_record(logits, cases, model_voxel_size_um=50.0, threshold=0.5)["val_surface_dice"] == 0.0
    # the rule reaches the threshold: the median of the two cases' own cuts, a grid value
    scores = threshold_scores(logits, [case.truth for case in cases])
    median = calibrated_record(logits, cases, model_voxel_size_um=50.0, calibration_rule="case_median")
    assert median["val_threshold"] == THRESHOLD_GRID[best_threshold_row(scores, THRESHOLD_GRID, rule="case_median")]
    assert validate(Intensity(), cases, in_chans=3, calibration_rule="case_median", **common) == median
    with pytest.raises(ValueError, match="one logit volume per validation case, got 1 for 2"):
        calibrated_record(logits[:1], cases, model_voxel_size_um=50.0)
