"""Shared fixtures: the real competition files in ../shared/data/real and the metric oracle."""

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
