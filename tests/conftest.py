"""Shared fixtures: the real competition files in ../shared/data/real, the metric oracle, and
random-weight checkpoints for inference tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real slices shipped beside the repo; their absence is an error, not a skip."""
    if not REAL_DATA.is_dir():
        raise FileNotFoundError(f"real test data missing: expected {REAL_DATA} (shared/ beside the repo)")
    return REAL_DATA


@pytest.fixture(scope="session")
def random_unet():
    """``save(path, *, in_chans=3, voxel_size_um=50.0, tile_size=64, **model_kwargs) -> path``: a
    U-Net (ResNet-18 encoder, percentile normalisation) checkpoint with random weights drawn after
    ``torch.manual_seed(0)``, so a test's expected masks are reproducible."""

    def save(path: Path, *, in_chans: int = 3, voxel_size_um: float = 50.0, tile_size: int = 64, **model_kwargs) -> Path:
        import torch

        from vessel_kit.models import ModelConfig, build_model, save_checkpoint

        torch.manual_seed(0)
        config = ModelConfig(arch="unet", encoder="resnet18", in_chans=in_chans, voxel_size_um=voxel_size_um,
                             tile_size=tile_size, model_kwargs=model_kwargs)
        return save_checkpoint(path, build_model("unet", "resnet18", in_chans=in_chans, **model_kwargs), config)

    return save


@pytest.fixture(scope="session")
def oracle_surface_dice():
    """surface-distance's surface Dice at tolerance 0: the test oracle.

    surface-distance still uses ``np.Inf`` (removed in numpy 2) when a mask has no border;
    restore the alias so its empty-mask path runs.
    """
    from surface_distance import metrics

    if not hasattr(np, "Inf"):
        np.Inf = np.inf

    def oracle(truth: np.ndarray, pred: np.ndarray) -> float:
        distances = metrics.compute_surface_distances(truth.astype(bool), pred.astype(bool), (1, 1, 1))
        return float(metrics.compute_surface_dice_at_tolerance(distances, 0.0))

    return oracle


@pytest.fixture
def interrupt_training_at(monkeypatch):
    """``interrupt_training_at(epoch)``: training raises KeyboardInterrupt when it reaches that
    epoch, until the returned ``resume()`` restores the real epoch loop."""
    import vessel_kit.training as train_module

    real_epoch = train_module._train_epoch

    def arm(epoch: int):
        def interrupted(*args, **kwargs):
            if args[-1] == epoch:  # the epoch argument
                raise KeyboardInterrupt
            return real_epoch(*args, **kwargs)

        monkeypatch.setattr(train_module, "_train_epoch", interrupted)
        return lambda: monkeypatch.setattr(train_module, "_train_epoch", real_epoch)

    return arm
