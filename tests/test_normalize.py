"""Normalization modes, percentile estimation on a subsample, config round-trip and errors."""

from __future__ import annotations

import numpy as np
import pytest

from vessel_kit.normalize import Normalization


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    return rng.normal(27000, 3000, size=(40, 300, 280)).clip(0, 65535).astype(np.uint16)


def test_unit_scales_by_dtype_max(volume):
    norm = Normalization("unit")
    window = norm.window(volume)
    assert window == (0.0, 65535.0)
    out = norm.apply(volume[0], window)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, volume[0] / 65535.0, rtol=1e-6)
    assert norm.window(volume.astype(np.uint8)) == (0.0, 255.0)


def test_percentile_window_matches_exact_percentiles(volume):
    norm = Normalization("percentile", low=10.0, high=99.8, max_samples=200_000)
    lo, hi = norm.window(volume)
    exact_lo, exact_hi = np.percentile(volume, [10.0, 99.8])
    # Estimated on ~200k of 3.4M voxels: within a small fraction of the intensity spread.
    assert abs(lo - exact_lo) < 0.02 * (exact_hi - exact_lo)
    assert abs(hi - exact_hi) < 0.02 * (exact_hi - exact_lo)
    out = norm.apply(volume, (lo, hi))
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.mean(out == 0.0) == pytest.approx(0.10, abs=0.01)


def test_percentile_on_a_memmap_and_constant_volume(tmp_path, volume):
    path = tmp_path / "v.npy"
    np.save(path, volume)
    mapped = np.load(path, mmap_mode="r")
    norm = Normalization("percentile")
    assert norm.window(mapped) == norm.window(volume)
    constant = np.full((3, 8, 8), 1000, np.uint16)
    out = norm.apply(constant, norm.window(constant))
    assert np.isfinite(out).all() and (out == 0).all()


def test_zscore_is_per_tile(volume):
    norm = Normalization("zscore")
    assert norm.window(volume) is None
    tile = norm.apply(volume[0, :64, :64])
    assert tile.mean() == pytest.approx(0.0, abs=1e-4)
    assert tile.std() == pytest.approx(1.0, abs=1e-4)
    assert np.isfinite(norm.apply(np.zeros((4, 4), np.uint16))).all()


def test_round_trip_and_errors(volume):
    norm = Normalization("percentile", low=5.0, high=99.0)
    assert Normalization.from_dict(norm.to_dict()) == norm
    with pytest.raises(ValueError, match="mode must be one of \\('unit', 'percentile', 'zscore', 'clip_zscore'\\), got 'minmax'"):
        Normalization("minmax")
    with pytest.raises(ValueError, match="0 <= low < high <= 100"):
        Normalization(low=99.0, high=10.0)
    with pytest.raises(ValueError, match="unknown normalization fields \\['gamma'\\]"):
        Normalization.from_dict({"mode": "unit", "gamma": 2})
    with pytest.raises(ValueError, match="needs the volume's window"):
        Normalization("percentile").apply(volume[0])
    with pytest.raises(ValueError, match="non-empty"):
        Normalization().window(np.zeros((0, 3, 3), np.uint16))
    with pytest.raises(ValueError, match="numeric image volume, got dtype bool"):
        Normalization().window(np.zeros((2, 3, 3), bool))


def test_window_reads_through_any_source(tmp_path, volume):
    from vessel_kit.sources import ArraySource, TiffStackSource
    from vessel_kit.volume import write_volume

    small = volume[:12, :40, :30]
    write_volume(small, tmp_path / "images")
    norm = Normalization("percentile", max_samples=5_000)
    expected = norm.window(small)
    assert norm.window(ArraySource(small)) == expected
    assert norm.window(TiffStackSource(tmp_path / "images")) == expected
    assert norm.window(str(tmp_path / "images")) == expected
    assert norm.window(small[3]) == norm.window(small[3:4])  # a single (Y, X) image
    assert Normalization("unit").window(TiffStackSource(tmp_path / "images")) == (0.0, 65535.0)


def test_clip_zscore_clips_to_the_volume_window_then_standardises_each_tile(volume):
    norm = Normalization("clip_zscore", low=0.1, high=99.9)
    lo, hi = norm.window(volume)
    assert (lo, hi) == Normalization("percentile", low=0.1, high=99.9).window(volume)
    tile = volume[0, :64, :64].copy()
    tile[0, 0], tile[0, 1] = 65535, 0  # saturated outliers: clipped to the window, not kept
    out = norm.apply(tile, (lo, hi))
    clipped = np.clip(tile.astype(np.float64), lo, hi)
    expected = (clipped - clipped.mean()) / clipped.std()
    np.testing.assert_allclose(out, expected, atol=1e-4)
    assert out.dtype == np.float32
    assert out.mean() == pytest.approx(0.0, abs=1e-4) and out.std() == pytest.approx(1.0, abs=1e-4)
    assert norm.value_range is None and Normalization("percentile").value_range == (0.0, 1.0)
    with pytest.raises(ValueError, match="needs the volume's window"):
        norm.apply(tile)


def test_clip_zscore_round_trips_and_checks_its_percentiles():
    norm = Normalization("clip_zscore", low=0.1, high=99.9)
    assert Normalization.from_dict(norm.to_dict()) == norm
    with pytest.raises(ValueError, match="low=99.9, high=0.1"):
        Normalization("clip_zscore", low=99.9, high=0.1)
    with pytest.raises(ValueError, match="high=101"):
        Normalization("clip_zscore", low=0.1, high=101)
