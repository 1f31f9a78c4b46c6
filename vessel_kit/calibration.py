"""Output calibration: the probability cut, then the smallest 3D component kept, that maximise
surface Dice on validation volumes.

A model's logits are not calibrated to the competition metric: at a coarser voxel size (kidney_6,
63 µm) the fixed 0.5 cut under-segments (the demo's kidney_6: 0.27 at 0.5, 0.45 at 0.05).
Training therefore picks the cut on validation logits — at the training resolution and, when
asked, on the same volumes resampled to the test resolution — stores it in the checkpoint, and
inference uses it by default.

An undertrained or shifted model also marks speckle: small blobs of texture that pass the cut (on
scans unlike its training data, ~2-7x the true vessel voxels). ``calibrate_min_component_size``
then picks, at the chosen cut, the smallest component size to keep (``COMPONENT_SIZE_GRID``, 0:
keep all) that scores best on the same validation volumes. The size is counted in voxels of the
model's resolution, so a volume predicted at another voxel size scales it (``Predictor``).

A model under-segments scans unlike its validation volumes (the outside probe: 0.19-0.58x the
true vessel voxels at the calibrated cut), and a few small validation volumes cannot tell apart
cuts whose scores differ by less than their noise. ``tolerance`` > 0 therefore takes the lowest
cut, and then the smallest component size, whose mean validation score is within ``tolerance``
of the best: the choice that keeps more voxels among those validation cannot rank.

How the cases' scores make one cut is the ``rule`` (``CALIBRATION_RULES``):

* ``mean``: the cut with the best mean score over the cases (with ``tolerance``: the lowest
  within it). A case the model segments well and confidently has the largest score swings, so it
  sets the cut — for the look the model knows best, which is too high for scans it does not know.
* ``case_median``: each case's own cut (its best, or with ``tolerance`` its lowest within it of
  its best), then the grid cut nearest (in logit) the median of those: every case one vote, so
  the cases the model barely finds (which want low cuts) weigh as much as the one it knows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .metric import surface_dice
from .postprocess import remove_small_components
from .values import is_finite_real

# Candidate probabilities: dense at the low end, where thin and resampled vessels are decided.
# Candidate smallest components (voxels at the model's resolution): 0 keeps everything; 1000
# voxels is a 12-voxel cube, a few vessel segments.
COMPONENT_SIZE_GRID = (0, 10, 30, 100, 300, 1000)
CALIBRATION_RULES = ("mean", "case_median")
THRESHOLD_GRID = (0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)

__all__ = ["CALIBRATION_RULES", "COMPONENT_SIZE_GRID", "THRESHOLD_GRID", "best_threshold_row", "calibrate_min_component_size",
           "calibrate_threshold", "check_component_sizes", "check_rule", "check_tolerance", "logit", "scaled_component_size", "threshold_scores"]


def threshold_scores(
    logits: Sequence[np.ndarray], truths: Sequence[np.ndarray], grid: Sequence[float] = THRESHOLD_GRID
) -> np.ndarray:
    """(len(grid), len(logits)) surface Dice of each volume's ``logits > logit(p)`` for each p."""
    if len(logits) != len(truths) or not logits:
        raise ValueError(f"need as many logit volumes as truths (at least one), got {len(logits)} and {len(truths)}")
    for index, (volume, truth) in enumerate(zip(logits, truths, strict=True)):
        if volume.shape != truth.shape:
            raise ValueError(f"volume {index}: logits {volume.shape} and truth {truth.shape} differ in shape")
    if not grid or not all(0.0 < p < 1.0 for p in grid):
        raise ValueError(f"threshold grid must hold probabilities in (0, 1), got {list(grid)}")
    scores = np.empty((len(grid), len(logits)))
    for row, probability in enumerate(grid):
        cut = np.float16(logit(probability))
        for column, (volume, truth) in enumerate(zip(logits, truths, strict=True)):
            scores[row, column] = surface_dice(truth, volume > cut)
    return scores


def logit(probability: float) -> float:
    """The logit that a probability threshold cuts at: masks compare logits, never sigmoids."""
    return math.log(probability / (1 - probability))


def calibrate_threshold(
    logits: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    grid: Sequence[float] = THRESHOLD_GRID,
    *,
    tolerance: float = 0.0,
    rule: str = "mean",
) -> tuple[float, float]:
    """(threshold, mean surface Dice at it): the grid probability that ``rule`` chooses from the
    volumes' scores (``best_threshold_row``)."""
    scores = threshold_scores(logits, truths, grid)
    row = best_threshold_row(scores, grid, tolerance=tolerance, rule=rule)
    return float(grid[row]), float(scores[row].mean())


def best_threshold_row(scores: np.ndarray, grid: Sequence[float], *, tolerance: float = 0.0, rule: str = "mean") -> int:
    """The row of ``threshold_scores`` (one column per case) that ``rule`` chooses.

    ``mean``: the best mean score; ties go to the probability nearest 0.5 (the least committed
    choice); ``tolerance`` > 0: the lowest probability whose mean score is within ``tolerance`` of
    the best. ``case_median``: that choice made for each case alone, then the row nearest (in
    logit) the median of the cases' probabilities."""
    check_tolerance(tolerance)
    check_rule(rule)
    if rule == "case_median":
        cuts = [grid[best_threshold_row(scores[:, [case]], grid, tolerance=tolerance)] for case in range(scores.shape[1])]
        median = logit(float(np.median(cuts)))
        return min(range(len(grid)), key=lambda row: abs(logit(grid[row]) - median))
    means = scores.mean(axis=1)
    if tolerance > 0:
        return min(_near_best_rows(means, tolerance), key=lambda row: grid[row])
    return max(range(len(grid)), key=lambda row: (round(float(means[row]), 12), -abs(grid[row] - 0.5)))


def check_rule(rule: str, option: str = "calibration rule") -> None:
    """ValueError naming ``option`` and the valid rules unless ``rule`` is one of ``CALIBRATION_RULES``."""
    if rule not in CALIBRATION_RULES:
        raise ValueError(f"{option} must be one of {list(CALIBRATION_RULES)}, got {rule!r}")


def calibrate_min_component_size(
    masks: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    *,
    voxel_ratios: Sequence[float] | None = None,
    grid: Sequence[int] = COMPONENT_SIZE_GRID,
    connectivity: int | None = None,
    tolerance: float = 0.0,
) -> tuple[int, np.ndarray]:
    """(size, scores): the ``grid`` size whose removal of smaller 3D components from the thresholded
    ``masks`` gives the best mean surface Dice against ``truths`` (ties, or with ``tolerance`` > 0
    any size within it of the best: the smallest), and the (len(grid), len(masks)) scores.

    Sizes count voxels at the model's resolution; ``voxel_ratios`` (default 1) gives, per mask,
    its voxels per model voxel (e.g. (50 / 63.08)³ for a volume predicted at 63.08 µm by a 50 µm
    model), so each mask is cleaned as inference would clean it. ``connectivity`` as in
    ``postprocess.remove_small_components``.
    """
    ratios = [1.0] * len(masks) if voxel_ratios is None else [float(r) for r in voxel_ratios]
    if len(masks) != len(truths) or len(ratios) != len(masks) or not masks:
        raise ValueError(f"need as many masks as truths and voxel ratios (at least one), got {len(masks)}, "
                         f"{len(truths)} and {len(ratios)}")
    check_tolerance(tolerance)
    check_component_sizes(grid)
    if any(r <= 0 for r in ratios):
        raise ValueError(f"voxel ratios must be > 0, got {ratios}")
    scores = np.empty((len(grid), len(masks)))
    for row, size in enumerate(grid):
        for column, (mask, truth, ratio) in enumerate(zip(masks, truths, ratios, strict=True)):
            cleaned = remove_small_components(mask, scaled_component_size(int(size), ratio), connectivity=connectivity)
            scores[row, column] = surface_dice(truth, cleaned)
    return int(min(grid[row] for row in _near_best_rows(scores.mean(axis=1), tolerance))), scores


def check_component_sizes(sizes: Sequence[int], option: str = "component sizes") -> None:
    """ValueError naming ``option`` unless ``sizes`` is a non-empty sequence of ints >= 0."""
    if (isinstance(sizes, str | bytes) or not isinstance(sizes, Sequence) or not sizes
            or any(isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 0 for size in sizes)):
        raise ValueError(f"{option} must be a non-empty list of ints >= 0 (voxels; 0 keeps all), got {sizes!r}")


def check_tolerance(tolerance: float, option: str = "calibration tolerance") -> None:
    """ValueError naming ``option`` unless ``tolerance`` is a surface Dice difference in [0, 1)."""
    if not (is_finite_real(tolerance) and 0.0 <= tolerance < 1.0):
        raise ValueError(f"{option} must be a surface Dice difference in [0, 1), got {tolerance!r}")


def _near_best_rows(means: np.ndarray, tolerance: float) -> list[int]:
    """The rows whose mean score is within ``tolerance`` of the best (to 12 digits: float sums of
    equal scores can differ in the last bits)."""
    floor = round(float(means.max()) - tolerance, 12)
    return [row for row, mean in enumerate(means) if round(float(mean), 12) >= floor]


def scaled_component_size(size: int, voxel_ratio: float) -> int:
    """A component size counted at the model's resolution, in voxels of a volume with
    ``voxel_ratio`` voxels per model voxel (rounded; at least 2 when ``size`` > 1, since 1 keeps all)."""
    if size <= 1:
        return size
    return max(2, round(size * voxel_ratio))
