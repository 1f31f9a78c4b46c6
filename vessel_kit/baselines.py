"""Classical vessel-segmentation baselines: a smoothed-intensity threshold and Frangi vesselness.

They set the bar a trained model has to clear on volumes unlike its training data. Each baseline
turns a (Z, Y, X) volume into a score map in [0, 1] and thresholds it; ``fit_*`` tunes its few
parameters on labelled training volumes only, maximising the mean surface Dice (tolerance 0, the
competition metric), and ``predict_*`` applies the fitted parameters to a new volume.

* Threshold: 3D gaussian smoothing (``sigma`` in voxels, ``synth.render.blur``), the percentile
  window ``BASELINE_NORMALIZATION`` (p0.5-p99.5) of the smoothed volume, inverted for dark
  vessels, then ``> threshold``. The window keeps both tails: the models' default p10 floor
  clips a dark vessel to the level of the darkest tenth of the tissue when no dark medium
  surrounds the organ (a fitted threshold then scores ~0.02 instead of ~0.4 on such a volume).
* Frangi: the same percentile window, ``skimage.filters.frangi`` (3D) at sigmas = vessel
  radii in µm / voxel size, ``black_ridges`` for dark vessels, then ``> threshold``. It needs
  scikit-image (``pip install vessel_kit[baselines]``), imported on first use; the threshold
  baseline needs only numpy and OpenCV. Frangi is slow (a Hessian and its eigenvalues per voxel
  and sigma), so ``fit_frangi`` tunes on central crops of at most ``max_voxels`` voxels.

Thresholds are searched coarse to fine; ties go to the lower threshold and the first candidate in
the order given, so a fit is deterministic.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .metric import surface_dice
from .normalize import Normalization
from .synth.render import blur
from .values import is_finite_real

POLARITIES = ("bright", "dark")
THRESHOLD_SIGMAS = (0.5, 1.0, 2.0)  # voxels
THRESHOLD_GRID = tuple(float(t) for t in np.round(np.linspace(0.01, 0.99, 99), 4))
BASELINE_NORMALIZATION = Normalization("percentile", low=0.5, high=99.5)
FRANGI_RADII_UM = ((50.0,), (50.0, 100.0))  # candidate radius sets, µm
FRANGI_GRID = tuple(float(t) for t in np.round(np.geomspace(1e-3, 0.5, 37), 6))
FRANGI_FIT_VOXELS = 2**20
INSTALL_HINT = "pip install vessel_kit[baselines]"

__all__ = [
    "BASELINE_NORMALIZATION",
    "FRANGI_GRID",
    "FRANGI_RADII_UM",
    "POLARITIES",
    "THRESHOLD_GRID",
    "THRESHOLD_SIGMAS",
    "FrangiBaseline",
    "ThresholdBaseline",
    "fit_frangi",
    "fit_threshold",
    "frangi_map",
    "intensity_map",
    "predict_frangi",
    "predict_threshold",
]


@dataclass(frozen=True)
class ThresholdBaseline:
    """A fitted smoothed-intensity threshold: gaussian ``sigma`` (voxels), vessel ``polarity``
    ("bright" or "dark"), ``threshold`` on the normalised map, and ``train_score``, the mean
    surface Dice it reached on its training volumes."""

    sigma: float
    polarity: str
    threshold: float
    train_score: float = math.nan

    def __post_init__(self) -> None:
        _check_sigma(self.sigma, "sigma")
        _check_polarity(self.polarity, "polarity")
        _check_threshold(self.threshold, "threshold")


@dataclass(frozen=True)
class FrangiBaseline:
    """A fitted Frangi baseline: vessel ``radii_um`` (one Frangi scale each), ``polarity``,
    ``threshold`` on the vesselness, and the mean surface Dice on its training volumes."""

    radii_um: tuple[float, ...]
    polarity: str
    threshold: float
    train_score: float = math.nan

    def __post_init__(self) -> None:
        _check_radii(self.radii_um, "radii_um")
        _check_polarity(self.polarity, "polarity")
        _check_threshold(self.threshold, "threshold")


def fit_threshold(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    sigmas: Sequence[float] = THRESHOLD_SIGMAS,
    polarities: Sequence[str] = POLARITIES,
    thresholds: Sequence[float] = THRESHOLD_GRID,
) -> ThresholdBaseline:
    """The threshold baseline that maximises the mean surface Dice over the training volumes.

    Every (sigma, polarity) is tried, each with thresholds of the grid searched coarse to fine
    (``_best_threshold``). Raises ValueError for mismatched
    images/labels or an invalid (or empty) ``sigmas``, ``polarities`` or ``thresholds``.
    """
    _check_pairs(images, labels)
    for sigma in _non_empty(sigmas, "sigmas"):
        _check_sigma(sigma, "sigmas")
    candidates = [(sigma, polarity) for sigma in sigmas for polarity in _check_polarities(polarities)]
    (sigma, polarity), threshold, score = _search(
        candidates,
        lambda candidate: [intensity_map(image, *candidate) for image in images],
        labels,
        _check_thresholds(thresholds),
    )
    return ThresholdBaseline(float(sigma), polarity, threshold, score)


def predict_threshold(volume: np.ndarray, baseline: ThresholdBaseline) -> np.ndarray:
    """The (Z, Y, X) bool vessel mask of ``volume`` by a fitted threshold baseline."""
    return intensity_map(volume, baseline.sigma, baseline.polarity) > baseline.threshold


def fit_frangi(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    voxel_sizes_um: Sequence[float],
    *,
    radii_um: Sequence[Sequence[float]] = FRANGI_RADII_UM,
    polarities: Sequence[str] = POLARITIES,
    thresholds: Sequence[float] = FRANGI_GRID,
    max_voxels: int | None = FRANGI_FIT_VOXELS,
) -> FrangiBaseline:
    """The Frangi baseline that maximises the mean surface Dice over the training volumes.

    ``radii_um`` lists candidate radius sets; every (radius set, polarity) is tried, each with
    thresholds of the grid searched coarse to fine.
    Volumes larger than ``max_voxels`` are tuned on their central crop of about that many voxels
    (None: whole volumes). Raises ValueError for mismatched inputs or an invalid option, and
    ImportError without scikit-image.
    """
    _check_pairs(images, labels)
    if len(voxel_sizes_um) != len(images):
        raise ValueError(f"voxel_sizes_um needs one size per image ({len(images)}), got {len(voxel_sizes_um)}")
    for size in voxel_sizes_um:
        _check_positive(size, "voxel_sizes_um")
    for radii in _non_empty(radii_um, "radii_um"):
        _check_radii(radii, "radii_um")
    if max_voxels is not None and not (isinstance(max_voxels, numbers.Integral) and max_voxels >= 512):
        raise ValueError(f"max_voxels must be an int >= 512 or None, got {max_voxels!r}")
    _import_frangi()  # fail before any work
    crops = [_central_crop(image.shape, max_voxels) for image in images]
    images = [image[crop] for image, crop in zip(images, crops, strict=True)]
    labels = [label[crop] for label, crop in zip(labels, crops, strict=True)]
    candidates = [(tuple(map(float, radii)), polarity) for radii in radii_um for polarity in _check_polarities(polarities)]
    (radii, polarity), threshold, score = _search(
        candidates,
        lambda candidate: [
            frangi_map(image, candidate[0], size, candidate[1])
            for image, size in zip(images, voxel_sizes_um, strict=True)
        ],
        labels,
        _check_thresholds(thresholds),
    )
    return FrangiBaseline(radii, polarity, threshold, score)


def predict_frangi(volume: np.ndarray, baseline: FrangiBaseline, voxel_size_um: float) -> np.ndarray:
    """The (Z, Y, X) bool vessel mask of ``volume`` (at ``voxel_size_um``) by a fitted Frangi
    baseline; its radii become sigmas at this voxel size."""
    return frangi_map(volume, baseline.radii_um, voxel_size_um, baseline.polarity) > baseline.threshold


def intensity_map(volume: np.ndarray, sigma: float, polarity: str) -> np.ndarray:
    """Smoothed intensity as float32 in [0, 1], vessels high: gaussian smoothing (``sigma``
    voxels), the percentile window of the smoothed volume, inverted for dark vessels."""
    _check_sigma(sigma, "sigma")
    _check_polarity(polarity, "polarity")
    smoothed = blur(np.asarray(_check_volume(volume), dtype=np.float32), sigma)
    normalization = BASELINE_NORMALIZATION
    mapped = normalization.apply(smoothed, normalization.window(smoothed))
    return np.subtract(1.0, mapped, out=mapped) if polarity == "dark" else mapped


def frangi_map(
    volume: np.ndarray, radii_um: Sequence[float], voxel_size_um: float, polarity: str
) -> np.ndarray:
    """Frangi vesselness (float32, in [0, 1]) of the percentile-normalised volume at sigmas =
    ``radii_um`` / ``voxel_size_um`` voxels, for bright or dark vessels."""
    _check_radii(radii_um, "radii_um")
    _check_positive(voxel_size_um, "voxel_size_um")
    _check_polarity(polarity, "polarity")
    frangi = _import_frangi()
    normalization = BASELINE_NORMALIZATION
    volume = _check_volume(volume)
    normalised = normalization.apply(volume, normalization.window(volume))
    sigmas = [radius / voxel_size_um for radius in radii_um]
    return frangi(normalised, sigmas=sigmas, black_ridges=polarity == "dark").astype(np.float32, copy=False)


# --- search ---------------------------------------------------------------------------------------


def _search(
    candidates: list[tuple],
    score_maps: Callable[[tuple], list[np.ndarray]],
    labels: Sequence[np.ndarray],
    thresholds: Sequence[float],
) -> tuple[tuple, float, float]:
    """(candidate, threshold, mean surface Dice) of the best candidate and threshold; each
    candidate's score maps (one per volume) are computed once."""
    best = (candidates[0], thresholds[0], -math.inf)
    for candidate in candidates:
        maps = score_maps(candidate)
        threshold, score = _best_threshold(lambda t: _mean_surface_dice(maps, labels, t), thresholds)
        if score > best[2]:
            best = (candidate, threshold, score)
    return best


def _best_threshold(score: Callable[[float], float], thresholds: Sequence[float]) -> tuple[float, float]:
    """(threshold, score) of the best of ``thresholds`` (in increasing order), coarse to fine:
    every ~sqrt(n)-th value first, then every value between the best one's coarse neighbours.

    About 3 sqrt(n) evaluations instead of n; it assumes the score rises and falls once. Grids
    of fewer than 4 values are searched exhaustively.
    """
    thresholds = sorted(thresholds)
    stride = max(1, math.isqrt(len(thresholds)))
    coarse = list(range(0, len(thresholds), stride))
    scores = {index: score(thresholds[index]) for index in coarse}
    peak = max(coarse, key=lambda index: (scores[index], -index))
    for index in range(max(0, peak - stride + 1), min(len(thresholds), peak + stride)):
        if index not in scores:
            scores[index] = score(thresholds[index])
    best = max(scores, key=lambda index: (scores[index], -index))
    return thresholds[best], scores[best]


def _mean_surface_dice(maps: Sequence[np.ndarray], labels: Sequence[np.ndarray], threshold: float) -> float:
    """The mean surface Dice of ``map > threshold`` against the labels, over the volumes."""
    return float(np.mean([surface_dice(label, m > threshold) for m, label in zip(maps, labels, strict=True)]))


def _central_crop(shape: tuple[int, ...], max_voxels: int | None) -> tuple[slice, ...]:
    """The centred (Z, Y, X) box of about ``max_voxels`` voxels, the same aspect as ``shape``."""
    size = math.prod(shape)
    if max_voxels is None or size <= max_voxels:
        return tuple(slice(None) for _ in shape)
    factor = (max_voxels / size) ** (1 / 3)
    sides = [max(1, min(side, round(side * factor))) for side in shape]
    return tuple(slice((side - kept) // 2, (side - kept) // 2 + kept) for side, kept in zip(shape, sides, strict=True))


def _import_frangi() -> Callable:
    """``skimage.filters.frangi``, or an ImportError saying how to install it."""
    try:
        from skimage.filters import frangi
    except ImportError as error:
        raise ImportError(f"the Frangi baseline needs scikit-image: {INSTALL_HINT}") from error
    return frangi


# --- validation -----------------------------------------------------------------------------------


def _check_pairs(images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> None:
    """At least one training volume, each with a label volume of its shape."""
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"images and labels must be equally long and non-empty, got {len(images)} and {len(labels)}")
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        _check_volume(image)
        if np.shape(label) != np.shape(image):
            raise ValueError(f"labels[{index}] has shape {np.shape(label)}, images[{index}] {np.shape(image)}")


def _check_volume(volume: np.ndarray) -> np.ndarray:
    if getattr(volume, "ndim", None) != 3 or volume.size == 0:
        raise ValueError(f"expected a non-empty (Z, Y, X) volume, got shape {getattr(volume, 'shape', None)}")
    return volume


def _non_empty(values: Sequence, option: str) -> Sequence:
    if isinstance(values, str) or len(values) == 0:
        raise ValueError(f"{option} must be a non-empty sequence, got {values!r}")
    return values


def _check_polarities(polarities: Sequence[str]) -> Sequence[str]:
    for polarity in _non_empty(polarities, "polarities"):
        _check_polarity(polarity, "polarities")
    return polarities


def _check_polarity(polarity: str, option: str) -> None:
    if polarity not in POLARITIES:
        raise ValueError(f"{option} must be one of {POLARITIES}, got {polarity!r}")


def _check_thresholds(thresholds: Sequence[float]) -> list[float]:
    for threshold in _non_empty(thresholds, "thresholds"):
        _check_threshold(threshold, "thresholds")
    return [float(t) for t in thresholds]


def _check_threshold(threshold: float, option: str) -> None:
    if not (is_finite_real(threshold) and 0 <= threshold < 1):
        raise ValueError(f"{option} must be numbers in [0, 1), got {threshold!r}")


def _check_sigma(sigma: float, option: str) -> None:
    if not (is_finite_real(sigma) and sigma >= 0):
        raise ValueError(f"{option} must be numbers >= 0 (voxels), got {sigma!r}")


def _check_radii(radii: Sequence[float], option: str) -> None:
    if isinstance(radii, str) or not isinstance(radii, Sequence) or len(radii) == 0:
        raise ValueError(f"{option} must be non-empty sequences of radii in µm, got {radii!r}")
    for radius in radii:
        _check_positive(radius, option)


def _check_positive(value: float, option: str) -> None:
    if not (is_finite_real(value) and value > 0):
        raise ValueError(f"{option} must be positive numbers, got {value!r}")
