"""Threshold calibration on validation logits, and the threshold a checkpoint carries into inference."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from vessel_kit.calibration import calibrate_threshold, threshold_scores
from vessel_kit.infer import infer_volume, load_ensemble
from vessel_kit.metric import surface_dice
from vessel_kit.models import ModelConfig, build_model_from_config, read_checkpoint_metadata, save_checkpoint
from vessel_kit.normalize import Normalization


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
