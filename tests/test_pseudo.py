"""densify_label: sparse labels densified to a vessel fraction with the model's probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from vessel_kit.pseudo import densify_label
from vessel_kit.volume import write_volume


@pytest.fixture
def sparse():
    """A (6, 20, 30) uint8 0/255 label with 60 vessel voxels and uint8 probabilities."""
    rng = np.random.default_rng(0)
    label = np.zeros((6, 20, 30), np.uint8)
    label.reshape(-1)[rng.choice(label.size, 60, replace=False)] = 255
    probability = rng.integers(1, 256, label.shape).astype(np.uint8)
    return label, probability


def test_reaches_the_fraction_keeps_the_annotation_and_adds_the_most_probable(tmp_path, sparse):
    label, probability = sparse
    result = densify_label(label, probability, tmp_path / "dense.npy", target_fraction=0.1, progress=False)
    dense = np.load(result.path)
    assert dense.dtype == np.uint8 and set(np.unique(dense)) <= {0, 255}
    assert (dense == 255).sum() == round(0.1 * label.size)  # exact: within one histogram bin and better
    assert result.fraction == pytest.approx(0.1, abs=1 / label.size)
    assert result.annotated_fraction == pytest.approx(60 / label.size)
    assert (dense[label == 255] == 255).all()
    unlabelled = label == 0
    added, left = probability[unlabelled & (dense == 255)], probability[unlabelled & (dense == 0)]
    assert added.min() >= result.cut >= left.max()
    assert result.added == (dense == 255).sum() - 60


def test_ties_at_the_cut_are_spread_evenly_to_the_exact_count(tmp_path):
    label = np.zeros((10, 10, 10), np.uint8)
    label[0, 0, :4] = 255
    probability = np.full(label.shape, 77, np.uint8)  # every unlabelled voxel ties
    result = densify_label(label, probability, tmp_path / "d.npy", target_fraction=0.2, progress=False)
    dense = np.load(result.path) == 255
    assert dense.sum() == 200 and result.cut == 77
    per_slice = (dense & (label == 0)).sum(axis=(1, 2))
    share = (label == 0).sum(axis=(1, 2)) * 196 / 996  # 196 of the 996 tied voxels, in proportion
    assert np.abs(per_slice - share).max() <= 1  # spread over the slices, not the first ones filled


def test_coverage_sets_the_target_and_float_probabilities_match_uint8(tmp_path, sparse):
    label, probability = sparse
    from_levels = densify_label(label, probability, tmp_path / "a.npy", coverage=0.65, progress=False)
    assert from_levels.fraction == pytest.approx(60 / label.size / 0.65, abs=1 / label.size)
    from_floats = densify_label(label.astype(bool), probability.astype(np.float32) / 255, tmp_path / "b.npy",
                                coverage=0.65, progress=False)
    np.testing.assert_array_equal(np.load(from_floats.path), np.load(from_levels.path))


def test_reads_tiff_folders_and_memmaps(tmp_path, sparse):
    label, probability = sparse
    write_volume(label, tmp_path / "labels")
    np.save(tmp_path / "p.npy", probability)
    result = densify_label(tmp_path / "labels", np.load(tmp_path / "p.npy", mmap_mode="r"), tmp_path / "d.npy",
                           target_fraction=0.05, progress=False)
    expected = densify_label(label, probability, tmp_path / "e.npy", target_fraction=0.05, progress=False)
    np.testing.assert_array_equal(np.load(result.path), np.load(expected.path))


@pytest.mark.parametrize(("options", "match"), [
    ({"target_fraction": 0.001}, r"target_fraction must be above the sparse label's vessel fraction \(0.0166667"),
    ({"target_fraction": 60 / 3600}, "target_fraction must be above"),
    ({"target_fraction": 1.5}, "at most 1, got 1.5"),
    ({}, "give one of target_fraction"),
    ({"target_fraction": 0.1, "coverage": 0.5}, "give one of target_fraction"),
    ({"coverage": 1.0}, r"coverage must be in \(0, 1\)"),
])
def test_bad_targets_are_named(tmp_path, sparse, options, match):
    label, probability = sparse
    with pytest.raises(ValueError, match=match):
        densify_label(label, probability, tmp_path / "d.npy", progress=False, **options)
    assert not (tmp_path / "d.npy").exists()


def test_bad_inputs_are_named(tmp_path, sparse):
    label, probability = sparse
    with pytest.raises(ValueError, match=r"shape \(6, 20, 30\) and probability shape \(6, 20, 29\)"):
        densify_label(label, probability[..., :29], tmp_path / "d.npy", target_fraction=0.1)
    with pytest.raises(ValueError, match="got dtype int64"):
        densify_label(label, probability.astype(np.int64), tmp_path / "d.npy", target_fraction=0.1)
    with pytest.raises(ValueError, match="no vessel voxel"):
        densify_label(np.zeros_like(label), probability, tmp_path / "d.npy", target_fraction=0.1, progress=False)
    probability[...] = 0  # the model sees no vessel anywhere: nothing to add
    with pytest.raises(ValueError, match="only 0 unlabelled voxels have a probability above 0"):
        densify_label(label, probability, tmp_path / "d.npy", target_fraction=0.1, progress=False)
