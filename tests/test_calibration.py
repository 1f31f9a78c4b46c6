"""Output calibration on validation logits (threshold, then smallest component kept), and what a checkpoint carries into inference."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from vessel_kit.calibration import (COMPONENT_SIZE_GRID, calibrate_min_component_size, calibrate_threshold,
                                    scaled_component_size, threshold_scores)
from vessel_kit.infer import infer_volume, load_ensemble
from vessel_kit.metric import surface_dice
from vessel_kit.models import ModelConfig, build_model_from_config, read_checkpoint_metadata, save_checkpoint
from vessel_kit.normalize import Normalization
from vessel_kit.validation import ValidationCase, validate


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_calibration_finds_the_cut_of_under_confident_logits():
    truth = np.zeros((8, 24, 24), bool)
    truth[2:6, 8:16, 8:16] = True
    # The vessel gets probability 0.2, the background 0.01: only cuts below 0.2 find it.
    logits = np.where(truth, logit(0.2), logit(0.01)).astype(np.float16)
    threshold, score = calibrate_threshold([logits], [truth])
    assert 0.01 < threshold < 0.2 and score == 1.0
    scores = threshold_scores([logits], [truth], grid=(0.5,))
    assert scores[0, 0] == surface_dice(truth, np.zeros_like(truth)) == 0.0


def test_calibration_maximises_the_mean_over_volumes_and_checks_shapes():
    truth = np.zeros((6, 20, 20), bool)
    truth[1:5, 5:12, 5:12] = True
    sure = np.where(truth, logit(0.9), logit(0.01)).astype(np.float16)
    faint = np.where(truth, logit(0.3), logit(0.01)).astype(np.float16)
    threshold, score = calibrate_threshold([sure, faint], [truth, truth])
    assert 0.01 < threshold < 0.3 and score == 1.0
    with pytest.raises(ValueError, match="logits .* and truth .* differ in shape"):
        calibrate_threshold([sure[:3]], [truth])
    with pytest.raises(ValueError, match="grid must hold probabilities"):
        calibrate_threshold([sure], [truth], grid=(0.5, 1.0))


def test_a_tolerance_takes_the_lowest_cut_and_smallest_size_that_validation_cannot_rank_below_the_best():
    from vessel_kit.calibration import best_threshold_row

    grid = (0.05, 0.1, 0.3, 0.5, 0.7)
    scores = np.array([[0.50], [0.595], [0.60], [0.598], [0.40]])
    assert best_threshold_row(scores, grid) == 2  # the best: 0.3
    assert best_threshold_row(scores, grid, tolerance=0.01) == 1  # 0.1 is within 0.01 of it, 0.05 is not
    assert best_threshold_row(scores, grid, tolerance=0.2) == 0
    # a scan whose vessels come out fainter than on validation keeps them at the lower cut
    truth = np.zeros((6, 20, 20), bool)
    truth[1:5, 5:12, 5:12] = True
    sure = np.where(truth, logit(0.9), logit(0.01)).astype(np.float16)
    assert calibrate_threshold([sure], [truth])[0] == 0.5  # every cut from 0.02 to 0.9 scores 1.0: nearest 0.5
    low, score = calibrate_threshold([sure], [truth], tolerance=0.01)
    assert low == 0.02 and score == 1.0
    # component sizes: without tolerance the one best size, with it the smallest near it
    truth, mask = speckled()
    assert calibrate_min_component_size([mask], [truth])[0] == 10
    size, scores = calibrate_min_component_size([mask], [truth], tolerance=0.5)
    assert size == 0 and scores[0, 0] >= 0.5  # keeping the specks costs less than 0.5
    for bad in (-0.1, 1.0, float("nan"), True):
        with pytest.raises(ValueError, match="calibration tolerance"):
            best_threshold_row(scores, COMPONENT_SIZE_GRID, tolerance=bad)
        with pytest.raises(ValueError, match="calibration tolerance"):
            calibrate_min_component_size([mask], [truth], tolerance=bad)


def test_the_case_median_rule_gives_each_case_one_vote():
    """A confident case with large score swings sets the mean rule's cut; the case-median rule
    takes the median of the cases' own cuts (with a tolerance, each case's lowest near its best)."""
    from vessel_kit.calibration import best_threshold_row

    grid = (0.05, 0.1, 0.3, 0.5, 0.7)
    confident = [0.20, 0.30, 0.50, 0.795, 0.83]  # its best, also within 0.01: 0.7
    barely_found = [0.10, 0.09, 0.08, 0.06, 0.05]  # best: 0.05
    faint = [0.30, 0.32, 0.315, 0.30, 0.29]  # best: 0.1
    scores = np.array([confident, barely_found, faint]).T
    assert grid[best_threshold_row(scores, grid)] == 0.7
    assert grid[best_threshold_row(scores, grid, rule="case_median")] == 0.1
    assert grid[best_threshold_row(scores, grid, tolerance=0.01, rule="case_median")] == 0.1
    # two cases (cuts 0.7 and 0.05): the median probability 0.375, nearest in logit 0.3
    assert grid[best_threshold_row(scores[:, :2], grid, tolerance=0.01, rule="case_median")] == 0.3
    with pytest.raises(ValueError, match="calibration rule must be one of \\['mean', 'case_median'\\], got 'median'"):
        best_threshold_row(scores, grid, rule="median")


class Affine(torch.nn.Module):
    """A "model" whose logit is logit(0.05) on background (0) and logit(0.3) on vessel (1) pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.low = torch.nn.Parameter(torch.tensor(logit(0.05)))
        self.high = torch.nn.Parameter(torch.tensor(logit(0.3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low + (self.high - self.low) * x[:, :1]


def checkpoint(tmp_path, threshold, name="m.safetensors"):
    config = ModelConfig(arch="unet", encoder="resnet18", in_chans=1, normalization=Normalization("unit"), tile_size=32)
    model = build_model_from_config(config)
    return save_checkpoint(tmp_path / name, model, config, threshold=threshold)


def test_checkpoint_carries_its_threshold_and_old_ones_load_with_a_warning(tmp_path):
    assert read_checkpoint_metadata(checkpoint(tmp_path, 0.15))["threshold"] == 0.15
    ensemble = load_ensemble([checkpoint(tmp_path, 0.1, "a.safetensors"), checkpoint(tmp_path, 0.3, "b.safetensors")],
                             weights=[3, 1])
    assert ensemble.threshold == pytest.approx(0.15)
    old = checkpoint(tmp_path, None, "old.safetensors")
    assert read_checkpoint_metadata(old)["threshold"] is None
    with pytest.warns(UserWarning, match="no calibrated threshold .* counts as 0.5"):
        assert load_ensemble(old).threshold == 0.5
    with pytest.raises(ValueError, match="threshold must be a probability"):
        checkpoint(tmp_path, 1.5)


def test_inference_uses_the_calibrated_threshold_unless_told_otherwise():
    volume = np.zeros((4, 32, 32), np.float32)
    volume[:, 10:20, 10:20] = 1.0
    ensemble = load_ensemble(Affine(), in_chans=1, normalization=Normalization("unit"))
    ensemble.threshold = 0.2
    common = dict(axes=("xy",), tta="none", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a module carries no threshold: no warning
        calibrated = infer_volume(volume, ensemble, **common)
    assert calibrated.sum() == 4 * 10 * 10
    assert infer_volume(volume, ensemble, threshold=0.5, **common).sum() == 0


# --- the smallest component kept ----------------------------------------------------------------


def speckled(shape=(10, 40, 40), seed=0):
    """(truth: one 6x10x10 box, mask: the box plus 12 one-voxel specks away from it)."""
    truth = np.zeros(shape, bool)
    truth[2:8, 5:15, 5:15] = True
    mask = truth.copy()
    rng = np.random.default_rng(seed)
    for z, y, x in zip(rng.integers(0, shape[0], 12), rng.integers(20, shape[1], 12), rng.integers(20, shape[2], 12)):
        mask[z, y, x] = True
    return truth, mask


def test_component_calibration_removes_speckle_and_keeps_small_true_vessels():
    truth, mask = speckled()
    size, scores = calibrate_min_component_size([mask], [truth])
    assert scores.shape == (len(COMPONENT_SIZE_GRID), 1)
    assert size == 10  # the smallest size that drops every speck; 1000 would drop the 600-voxel box too
    assert scores[COMPONENT_SIZE_GRID.index(10), 0] == 1.0 > scores[0, 0]
    assert scores[COMPONENT_SIZE_GRID.index(1000), 0] == 0.0
    # true vessels as small as the specks: removing anything costs, so nothing is removed
    assert calibrate_min_component_size([mask], [mask])[0] == 0


def test_component_sizes_count_model_voxels_and_scale_to_the_volume():
    assert scaled_component_size(100, 0.5) == 50
    assert scaled_component_size(10, 0.01) == 2  # a size > 1 never becomes "keep all"
    assert scaled_component_size(0, 8.0) == 0 and scaled_component_size(1, 8.0) == 1
    truth, mask = speckled()
    # a mask 8x coarser than the model counts 1000 model voxels as 125 of its own: the box stays
    size, scores = calibrate_min_component_size([mask], [truth], voxel_ratios=[1 / 8], grid=(0, 1000))
    assert size == 1000 and scores[1, 0] == 1.0
    with pytest.raises(ValueError, match="as many masks as truths and voxel ratios"):
        calibrate_min_component_size([mask], [truth], voxel_ratios=[1.0, 1.0])
    for bad in ((0, -5), (), (0, True), [10.0]):
        with pytest.raises(ValueError, match="component sizes must be a non-empty list of ints >= 0"):
            calibrate_min_component_size([mask], [truth], grid=bad)
    with pytest.raises(ValueError, match="voxel ratios must be > 0"):
        calibrate_min_component_size([mask], [truth], voxel_ratios=[0.0])


def test_validation_calibrates_the_smallest_component_at_its_threshold():
    truth, mask = speckled()
    case = ValidationCase("speckled", mask.astype(np.float32), truth, None)
    record = validate(Affine(), [case], in_chans=1, normalization=Normalization("unit"), model_voxel_size_um=None,
                      device=torch.device("cpu"), component_sizes=COMPONENT_SIZE_GRID)
    assert record["val_min_component_size"] == 10
    assert record["val_surface_dice_cleaned"] == record["val_surface_dice_cleaned_speckled"] == 1.0
    assert record["val_surface_dice"] < 1.0  # the specks cost before they are removed
    assert "val_min_component_size" not in validate(Affine(), [case], in_chans=1, normalization=Normalization("unit"),
                                                    model_voxel_size_um=None, device=torch.device("cpu"))


def test_checkpoint_carries_its_smallest_component_and_an_ensemble_keeps_the_least_removal(tmp_path):
    config = ModelConfig(arch="unet", encoder="resnet18", in_chans=1, normalization=Normalization("unit"), tile_size=32)
    model = build_model_from_config(config)
    paths = [save_checkpoint(tmp_path / f"{size}.safetensors", model, config, threshold=0.5, min_component_size=size)
             for size in (30, 100, None)]
    assert [read_checkpoint_metadata(path)["min_component_size"] for path in paths] == [30, 100, None]
    assert load_ensemble(paths).min_component_size == 30
    assert load_ensemble(paths[1:]).min_component_size == 100
    assert load_ensemble(paths[2]).min_component_size is None
    assert load_ensemble(paths, weights=[0, 1, 1]).min_component_size == 100  # a weightless member has no say
    with pytest.raises(ValueError, match="min_component_size must be an int >= 0"):
        save_checkpoint(tmp_path / "bad.safetensors", model, config, min_component_size=-1)


def test_inference_removes_components_under_the_calibrated_size_scaled_to_the_volume():
    truth, mask = speckled((12, 48, 48))
    volume = mask.astype(np.float32)
    volume[8:11, 40:43, 4:7] = 1.0  # a 27-voxel blob: under 80 voxels, over 10
    ensemble = load_ensemble(Affine(), in_chans=1, normalization=Normalization("unit"))
    ensemble.threshold, ensemble.min_component_size, ensemble.voxel_size_um = 0.2, 80, 50.0
    common = dict(axes=("xy",), tta="none", progress=False)
    kept = infer_volume(volume, ensemble, min_component_size=0, voxel_size_um=50.0, **common)
    assert kept.sum() > truth.sum()  # the specks pass the threshold
    at_50 = infer_volume(volume, ensemble, voxel_size_um=50.0, **common)
    assert np.array_equal(at_50, infer_volume(volume, ensemble, min_component_size=80, voxel_size_um=50.0, **common))
    assert np.array_equal(at_50, truth)
    # at 100 µm the volume is predicted at 2x its size, where 80 model voxels are 10 of its own
    at_100 = infer_volume(volume, ensemble, voxel_size_um=100.0, **common)
    assert np.array_equal(at_100, infer_volume(volume, ensemble, min_component_size=10, voxel_size_um=100.0, **common))
    assert not np.array_equal(at_100, infer_volume(volume, ensemble, min_component_size=80, voxel_size_um=100.0, **common))
