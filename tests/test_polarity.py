"""Vessel polarity (``polarity.py``, ``InferConfig.polarity``): the mirrored scan, and "auto", which
tries it only when the scan as read gives almost nothing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vessel_kit import InferConfig, Normalization, Predictor, infer_volume
from vessel_kit.deadline import DeadlineWarning
from vessel_kit.polarity import (AUTO_MIN_FRACTION, AUTO_SPARSE_FRACTION, AUTO_SPECKLE_SHARE, InvertedSource, MaskCount,
                                  asks_for_mirrored, count_voxels, finds_almost_nothing, keeps_mirrored, mirrored,
                                  plausible_mask)
from vessel_kit.sources import ArraySource

SHAPE = (24, 48, 48)
OPTIONS = dict(tta="none", axes=("xy", "xz", "yz"), tile_size=None, min_plane_side=8, progress=False,
               min_component_size=0, threshold=0.5)


class BrightBlobLogits(torch.nn.Module):
    """A detector of bright vessels only: positive where the 3x3 mean of the normalised centre
    plane is above 0.7 (a bright tube under the percentile window), strongly negative on noise and
    on anything dark."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1]
        return 20.0 * (F.avg_pool2d(centre, 3, stride=1, padding=1, count_include_pad=False) - 0.7)


class PointwiseLogits(torch.nn.Module):
    """Logits = 10 x the normalised intensity - 5: a voxel is in the mask where it is bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 10.0 - 5.0


def tubes(radius: float) -> np.ndarray:
    """Two straight tubes of ``radius``: one along Z, one along X."""
    z, y, x = np.indices(SHAPE)
    return ((y - 16) ** 2 + (x - 16) ** 2 <= radius**2) | ((z - 12) ** 2 + (y - 34) ** 2 <= radius**2)


def tube_volume(sign: float) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 image, bool labels): the tubes of radius 3 in noisy tissue (30000 +- 1500), 20000
    darker (``sign`` -1) or brighter (+1) than it."""
    labels = tubes(3)
    image = np.random.default_rng(0).normal(30000.0, 1500.0, SHAPE) + sign * 20000.0 * labels
    return np.clip(image, 0, 65535).astype(np.uint16), labels


def predictor(**options) -> Predictor:
    return Predictor(BrightBlobLogits(), InferConfig(**{**OPTIONS, **options}), in_chans=1,
                     normalization=Normalization("percentile"))


def infer(image: np.ndarray, **options) -> np.ndarray:
    return infer_volume(image, BrightBlobLogits(), in_chans=1, normalization=Normalization("percentile"),
                        **{**OPTIONS, **options})


def counted_passes(run: Predictor, monkeypatch) -> list:
    """The sources ``run.logits`` is called with, recorded as it runs."""
    sources = []
    logits = run.logits

    def spy(volume, **kwargs):
        sources.append(volume)
        return logits(volume, **kwargs)

    monkeypatch.setattr(run, "logits", spy)
    return sources


@pytest.mark.parametrize("dtype, value, expected", [
    (np.uint16, 1000, 64535), (np.uint8, 5, 250), (np.int16, -32768, 32767), (np.float32, 0.25, 0.75),
])
def test_mirrored_turns_the_intensity_scale_over_in_the_same_dtype(dtype, value, expected):
    out = mirrored(np.array([value], dtype))
    assert out.dtype == np.dtype(dtype) and out[0] == expected


def test_inverted_source_reads_mirrored_boxes_of_its_source():
    image = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    source = InvertedSource(ArraySource(image, voxel_size_um=63.08))
    box = (slice(1, 3), slice(0, 5), slice(2, 4))
    np.testing.assert_array_equal(source.read(box), 65535 - image[box])
    assert (source.shape, source.dtype, source.voxel_size_um) == ((4, 5, 6), np.dtype(np.uint16), 63.08)


def test_almost_nothing_is_under_the_fraction_of_the_volume():
    assert finds_almost_nothing(0, 10**6) and finds_almost_nothing(int(AUTO_MIN_FRACTION * 10**6) - 1, 10**6)
    assert not finds_almost_nothing(int(AUTO_MIN_FRACTION * 10**6), 10**6)
    mask = np.zeros((40, 4, 4), bool)
    mask[::3, 0, 0] = True
    assert count_voxels(mask) == 14 and count_voxels(mask, slab=7) == 14


def test_auto_asks_for_the_mirrored_pass_on_an_empty_or_a_sparse_speckled_mask():
    volume = 10**6
    sparse = int(AUTO_SPARSE_FRACTION * volume) - 1
    speckled_above = int(sparse / AUTO_SPECKLE_SHARE) + 100  # under AUTO_SPECKLE_SHARE of them kept
    assert asks_for_mirrored(MaskCount(0, 0, volume)) and asks_for_mirrored(MaskCount(50, 50, volume))
    assert asks_for_mirrored(MaskCount(sparse, speckled_above, volume))
    assert not asks_for_mirrored(MaskCount(sparse, sparse, volume))  # sparse but coherent: a real, sparse mask
    assert not asks_for_mirrored(MaskCount(int(AUTO_SPARSE_FRACTION * volume), 10**5, volume))  # speckled but not sparse
    assert MaskCount(30, 120, volume).kept_share == 0.25 and MaskCount(0, 0, volume).kept_share == 0.0


def test_auto_keeps_a_mirrored_mask_only_if_fuller_plausible_and_less_speckled():
    volume = 10**6
    speckle = MaskCount(500, 10_000, volume)  # 5 % kept
    assert keeps_mirrored(speckle, MaskCount(3000, 4000, volume))
    assert not keeps_mirrored(speckle, MaskCount(400, 400, volume))  # not fuller
    assert not keeps_mirrored(speckle, MaskCount(200_000, 200_000, volume))  # background, not vessels
    assert not keeps_mirrored(speckle, MaskCount(3000, 40_000, volume))  # as speckled: 7.5 % kept, under 2 x 5 %
    assert keeps_mirrored(MaskCount(0, 0, volume), MaskCount(3000, 60_000, volume))  # anything beats nothing


def speckled_dark_tubes(specks: int) -> np.ndarray:
    """Dark tubes (1000) in flat tissue (32768) with one bright 3x3x3 cube and ``specks`` isolated
    bright voxels (65535): as read, a detector of bright voxels finds the cube and the specks."""
    image = np.full(SHAPE, 32768, np.uint16)
    image[tubes(3)] = 1000
    image[2:5, 40:43, 40:43] = 65535
    spots = [(z, y, x) for z in range(0, 24, 2) for y in range(1, 48, 4) for x in range(24, 38, 3)]
    for z, y, x in spots[:specks]:
        image[z, y, x] = 65535
    return image


@pytest.mark.parametrize("specks, passes_run, mirrored_kept", [(150, 2, True), (0, 1, False)])
def test_auto_mirrors_a_sparse_mask_of_speckle_not_a_sparse_coherent_one(monkeypatch, specks, passes_run, mirrored_kept):
    """The cube alone (27 voxels, under AUTO_SPARSE_FRACTION) is a sparse but coherent mask: kept
    as read in one pass (a mixed-polarity scan). With 150 specks above the threshold that the
    component filter removes, it is speckle: the mirrored pass, which finds the tubes, is used."""
    image = speckled_dark_tubes(specks)
    run = Predictor(PointwiseLogits(), InferConfig(**{**OPTIONS, "threshold": 0.99, "min_component_size": 10}),
                    in_chans=1, normalization=Normalization("unit"))
    passes = counted_passes(run, monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mask = run.predict(image)
    assert len(passes) == passes_run
    if mirrored_kept:
        assert mask[tubes(2)].all() and not mask[2:5, 40:43, 40:43].any()
        assert "27 voxels (15% of the 177 above the threshold)" in str(caught[0].message)
    else:
        assert count_voxels(mask) == 27 and not caught


def test_dark_vessels_are_found_mirrored_and_auto_takes_that_pass(monkeypatch):
    image, labels = tube_volume(-1.0)
    as_given = infer(image, polarity="as_given")
    assert not as_given.any()  # the bright-vessel model sees nothing in a scan of dark vessels
    inverted = infer(image, polarity="inverted")
    assert inverted[tubes(2)].all() and not inverted[~tubes(4)].any()  # the tubes' cores, nothing away from them

    run = predictor()  # polarity None: "auto" on a whole volume
    passes = counted_passes(run, monkeypatch)
    expected = r"as read finds almost nothing \(0 voxels \(0% of the 0 above the threshold\)\).*the mirrored one is used"
    with pytest.warns(UserWarning, match=expected):
        np.testing.assert_array_equal(run.predict(image), inverted)
    assert [type(source) for source in passes] == [ArraySource, InvertedSource]


def test_auto_keeps_the_scan_as_read_in_one_pass_when_it_finds_vessels(monkeypatch):
    image, _ = tube_volume(+1.0)
    run = predictor(polarity="auto")
    passes = counted_passes(run, monkeypatch)
    mask = run.predict(image)
    assert len(passes) == 1 and mask[tubes(2)].all() and not mask[~tubes(4)].any()
    # a mirrored pass that finds no more than the first is not taken either
    dark_noise = np.random.default_rng(1).normal(30000.0, 1500.0, SHAPE).astype(np.uint16)
    passes.clear()
    assert not run.predict(dark_noise).any() and len(passes) == 2


def test_auto_does_not_take_a_mirrored_mask_of_background(monkeypatch):
    """A scan without vessels (one bright voxel): its mirrored pass marks nearly everything, which
    is background, so the almost empty mask as read is kept, without a warning."""
    scan = np.zeros(SHAPE, np.uint16)
    scan[12, 24, 24] = 65535
    run = Predictor(PointwiseLogits(), InferConfig(**OPTIONS), in_chans=1, normalization=Normalization("unit"))
    passes = counted_passes(run, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert count_voxels(run.predict(scan)) == 1 and len(passes) == 2
    assert not plausible_mask(SHAPE[0] * SHAPE[1] * SHAPE[2] - 1, scan.size) and plausible_mask(500, scan.size)


def test_a_mirrored_pass_past_the_deadline_leaves_the_mask_as_read(monkeypatch):
    image, _ = tube_volume(-1.0)
    run = predictor()
    logits = run.logits

    def out_of_time(volume, **kwargs):
        if isinstance(volume, InvertedSource):
            raise TimeoutError("past the deadline")
        return logits(volume, **kwargs)

    monkeypatch.setattr(run, "logits", out_of_time)
    with pytest.warns(DeadlineWarning, match="left no time to predict its mirrored intensities"):
        assert not run.predict(image).any()


@pytest.mark.filterwarnings("ignore:the mask of")
def test_return_logits_are_those_of_the_chosen_pass():
    image, _ = tube_volume(-1.0)
    auto = infer(image, return_logits=True)
    mirrored_logits = infer(mirrored(image), return_logits=True, polarity="as_given")
    np.testing.assert_array_equal(auto, mirrored_logits)


def test_an_unknown_polarity_is_refused_by_name():
    with pytest.raises(ValueError, match=r"inference option polarity='dark': must be one of \('as_given', 'inverted', 'auto'\)"):
        InferConfig(polarity="dark")
