"""Classical baselines: polarity found, scores above zero, determinism, option errors, and the
optional scikit-image dependency."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from vessel_kit import baselines
from vessel_kit.baselines import (
    FrangiBaseline,
    ThresholdBaseline,
    fit_frangi,
    fit_threshold,
    predict_frangi,
    predict_threshold,
)
from vessel_kit.metric import surface_dice
from vessel_kit.synth.render import blur

SHAPE = (24, 64, 64)


def tubes(seed: int, polarity: str = "bright", shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 image, bool labels): 6 straight tubes of radius 2-3.5 voxels along random axes in
    smooth textured, noisy tissue; the tubes 3000 levels brighter (or darker) than the tissue."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    labels = np.zeros(shape, dtype=bool)
    for _ in range(6):
        axis = rng.integers(3)
        others = [a for a in range(3) if a != axis]
        centre = [rng.uniform(0.2, 0.8) * shape[a] for a in others]
        distance2 = sum((grid[a] - c) ** 2 for a, c in zip(others, centre))
        labels |= distance2 <= rng.uniform(2.0, 3.5) ** 2
    texture = blur(rng.standard_normal(shape, dtype=np.float32), 6.0)
    image = 27_000 + 800 * texture / texture.std() + 500 * rng.standard_normal(shape)
    image += (3_000 if polarity == "bright" else -3_000) * labels
    return np.clip(image, 0, 65535).astype(np.uint16), labels


@pytest.fixture(scope="module")
def bright():
    return [tubes(seed) for seed in (0, 1)]


def test_threshold_finds_bright_vessels_and_scores_on_a_new_volume(bright):
    fitted = fit_threshold([image for image, _ in bright], [labels for _, labels in bright])
    assert fitted.polarity == "bright"
    assert fitted.train_score > 0.6
    image, labels = tubes(7)
    assert surface_dice(labels, predict_threshold(image, fitted)) > 0.6


def test_threshold_finds_dark_vessels():
    image, labels = tubes(3, "dark")
    fitted = fit_threshold([image], [labels], sigmas=(1.0,))
    assert fitted.polarity == "dark"
    assert fitted.train_score > 0.4


def test_threshold_fit_is_deterministic_and_the_best_of_its_grid(bright):
    images, labels = [image for image, _ in bright], [label for _, label in bright]
    options = dict(sigmas=(0.0, 1.0), thresholds=(0.3, 0.55, 0.8))  # < 4 values: searched exhaustively
    fitted = fit_threshold(images, labels, **options)
    assert fit_threshold(images, labels, **options) == fitted
    for sigma in options["sigmas"]:
        for threshold in options["thresholds"]:
            other = ThresholdBaseline(sigma, "bright", threshold)
            score = np.mean([surface_dice(t, predict_threshold(i, other)) for i, t in zip(images, labels)])
            assert score <= fitted.train_score + 1e-12


def test_threshold_search_finds_a_single_peak_with_few_evaluations():
    grid = [float(t) for t in np.linspace(0.0, 0.96, 49)]
    for peak in (0.0, 0.34, 0.62, 0.96):
        calls = []

        def score(threshold: float) -> float:
            calls.append(threshold)
            return -abs(threshold - peak)

        threshold, best = baselines._best_threshold(score, grid)
        assert threshold == pytest.approx(peak) and best == pytest.approx(0.0)
        assert len(calls) <= 3 * 7 and len(set(calls)) == len(calls)


def test_threshold_finds_dark_vessels_inside_tissue_without_a_dark_medium():
    # Dark tubes (1 % of the voxels) in textured tissue that fills the field of view: a p10 floor
    # would clip them together with the darkest tenth of the tissue; the baseline's window keeps them.
    rng = np.random.default_rng(3)
    z, y, x = np.ogrid[:24, :64, :64]
    label = ((y - 20) ** 2 + (x - 30) ** 2 <= 9) | ((y - 44) ** 2 + (z - 12) ** 2 <= 9)
    tissue = rng.normal(size=label.shape)
    image = (30000 + 800 * (tissue - 4.0 * label)).astype(np.uint16)
    fitted = baselines.fit_threshold([image], [label], sigmas=(1.0,))
    assert fitted.polarity == "dark"
    assert surface_dice(label, baselines.predict_threshold(image, fitted)) > 0.6


def test_intensity_map_is_the_normalised_smoothed_volume_and_dark_inverts_it(bright):
    image, _ = bright[0]
    plain = baselines.intensity_map(image, 0.0, "bright")
    lo, hi = np.percentile(image, [0.5, 99.5])
    assert plain.dtype == np.float32 and plain.min() == 0.0 and plain.max() == 1.0
    np.testing.assert_allclose(plain, np.clip((image - lo) / (hi - lo), 0, 1), atol=0.02)
    smoothed = baselines.intensity_map(image, 2.0, "bright")
    assert np.abs(np.diff(smoothed, axis=2)).mean() < 0.5 * np.abs(np.diff(plain, axis=2)).mean()
    np.testing.assert_allclose(baselines.intensity_map(image, 2.0, "dark"), 1.0 - smoothed, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"polarities": ("up",)}, "polarities"),
        ({"polarities": ()}, "polarities"),
        ({"sigmas": (-1.0,)}, "sigmas"),
        ({"thresholds": (1.5,)}, "thresholds"),
        ({"thresholds": []}, "thresholds"),
    ],
)
def test_bad_threshold_options_name_the_option(bright, options, named):
    image, labels = bright[0]
    with pytest.raises(ValueError, match=named):
        fit_threshold([image], [labels], **options)


def test_bad_inputs_and_parameters_raise(bright):
    image, labels = bright[0]
    with pytest.raises(ValueError, match="equally long"):
        fit_threshold([image], [])
    with pytest.raises(ValueError, match=r"labels\[0\] has shape"):
        fit_threshold([image], [labels[:-1]])
    with pytest.raises(ValueError, match="polarity"):
        ThresholdBaseline(1.0, "up", 0.5)
    with pytest.raises(ValueError, match="sigma"):
        ThresholdBaseline(float("nan"), "bright", 0.5)
    with pytest.raises(ValueError, match="radii_um"):
        FrangiBaseline((), "bright", 0.1)
    with pytest.raises(ValueError, match="voxel_sizes_um"):
        fit_frangi([image], [labels], [50.0, 50.0])
    with pytest.raises(ValueError, match="radii_um"):
        fit_frangi([image], [labels], [50.0], radii_um=((0.0,),))
    with pytest.raises(ValueError, match="max_voxels"):
        fit_frangi([image], [labels], [50.0], max_voxels=10)


def test_frangi_finds_bright_vessels_and_scores_on_a_new_volume(bright):
    pytest.importorskip("skimage")
    images, labels = [image for image, _ in bright], [label for _, label in bright]
    fitted = fit_frangi(images, labels, [100.0, 100.0], radii_um=((200.0,),), max_voxels=None)
    assert fitted.polarity == "bright" and fitted.radii_um == (200.0,)
    assert fitted.train_score > 0.45
    assert fit_frangi(images, labels, [100.0, 100.0], radii_um=((200.0,),), max_voxels=None) == fitted
    image, truth = tubes(7)
    assert surface_dice(truth, predict_frangi(image, fitted, 100.0)) > 0.5


def test_frangi_fits_on_a_central_crop(bright):
    pytest.importorskip("skimage")
    images, labels = [image for image, _ in bright], [label for _, label in bright]
    cropped = fit_frangi(images, labels, [100.0, 100.0], radii_um=((200.0,),), polarities=("bright",),
                         max_voxels=12 * 32 * 32)
    whole = fit_frangi([image[6:18, 16:48, 16:48] for image in images],
                       [label[6:18, 16:48, 16:48] for label in labels], [100.0, 100.0],
                       radii_um=((200.0,),), polarities=("bright",), max_voxels=None)
    assert cropped == whole


def test_threshold_works_without_scikit_image_and_frangi_says_how_to_install(monkeypatch, bright):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.filters", None)
    module = importlib.reload(baselines)
    try:
        image, labels = bright[0]
        assert module.fit_threshold([image], [labels], sigmas=(1.0,)).polarity == "bright"
        with pytest.raises(ImportError, match=r"pip install vessel_kit\[baselines\]"):
            module.fit_frangi([image], [labels], [50.0])
        with pytest.raises(ImportError, match=r"pip install vessel_kit\[baselines\]"):
            module.predict_frangi(image, module.FrangiBaseline((50.0,), "bright", 0.1), 50.0)
    finally:
        monkeypatch.undo()
        importlib.reload(baselines)
