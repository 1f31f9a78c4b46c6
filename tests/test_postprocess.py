"""remove_small_components against scipy.ndimage.label with the same connectivity."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from vessel_kit.postprocess import (
    hull_gate,
    hysteresis_threshold,
    neighbourhood_structure,
    order_keys,
    remove_small_components,
    top_fraction_key,
)

# 8-connected within a slice, face-connected across slices.
STRUCTURE = np.zeros((3, 3, 3), bool)
STRUCTURE[1] = True
STRUCTURE[0, 1, 1] = STRUCTURE[2, 1, 1] = True


def reference(mask, min_size):
    labels, _ = ndimage.label(mask, structure=STRUCTURE)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("min_size", [2, 5, 30])
def test_matches_scipy(seed, min_size):
    rng = np.random.default_rng(seed)
    mask = rng.random((12, 30, 25)) < 0.25
    np.testing.assert_array_equal(remove_small_components(mask, min_size), reference(mask, min_size))


def test_components_joined_through_several_slices_and_in_place():
    mask = np.zeros((5, 6, 6), bool)
    mask[0:5, 1, 1] = True  # a 5-voxel column: kept at min_size 5
    mask[2, 4, 4] = True  # a lone voxel: removed
    mask[0, 4, 0] = mask[1, 4, 0] = True  # a 2-voxel column: removed
    expected = reference(mask, 5)
    assert expected.sum() == 5
    assert remove_small_components(mask, 5, out=mask) is mask
    np.testing.assert_array_equal(mask, expected)


def test_errors_and_trivial_sizes():
    mask = np.random.default_rng(3).random((3, 4, 5)) < 0.5
    np.testing.assert_array_equal(remove_small_components(mask, 0), mask)
    with pytest.raises(ValueError, match="bool array"):
        remove_small_components(mask.astype(np.uint8), 3)
    with pytest.raises(ValueError, match="min_size must be >= 0"):
        remove_small_components(mask, -1)


def hysteresis_reference(scores, high, low):
    labels, _ = ndimage.label(scores > low, structure=STRUCTURE)
    seeded = np.zeros(labels.max() + 1, bool)
    seeded[labels[scores > high]] = True
    seeded[0] = False
    return seeded[labels]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hysteresis_matches_scipy(seed):
    scores = np.random.default_rng(seed).random((10, 28, 24)).astype(np.float16)
    expected = hysteresis_reference(scores, 0.97, 0.6)
    assert 0 < expected.sum() < (scores > 0.6).sum()  # some low components have no seed
    np.testing.assert_array_equal(hysteresis_threshold(scores, scores.shape, 0.97, 0.6), expected)
    slices = hysteresis_threshold(lambda: iter(scores), scores.shape, 0.97, 0.6)  # streamed input
    np.testing.assert_array_equal(slices, expected)


def test_hysteresis_grows_through_slices_from_a_seed():
    scores = np.zeros((6, 5, 5), np.float32)
    scores[:, 2, 2] = 0.5  # a faint column through every slice...
    scores[3, 2, 2] = 0.9  # ...with one sure voxel
    scores[1, 0, 0] = 0.5  # a faint voxel with no seed
    mask = hysteresis_threshold(scores, scores.shape, 0.8, 0.4)
    assert mask[:, 2, 2].all() and mask.sum() == 6
    with pytest.raises(ValueError, match="low < high"):
        hysteresis_threshold(scores, scores.shape, 0.4, 0.8)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("seed", [0, 1])
def test_3d_connectivities_match_scipy(connectivity, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((10, 24, 20)) < 0.2
    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    labels, _ = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, rank))
    sizes = np.bincount(labels.ravel())
    keep = sizes >= 6
    keep[0] = False
    np.testing.assert_array_equal(remove_small_components(mask, 6, connectivity=connectivity), keep[labels])


def test_neighbourhood_structures_are_the_connectivities_of_the_streamed_rules():
    np.testing.assert_array_equal(neighbourhood_structure(None), STRUCTURE)
    for connectivity, rank in ((6, 1), (18, 2), (26, 3)):
        np.testing.assert_array_equal(neighbourhood_structure(connectivity), ndimage.generate_binary_structure(3, rank))
    with pytest.raises(ValueError, match=r"connectivity must be one of \(None, 6, 18, 26\), got 10"):
        neighbourhood_structure(10)


def test_top_fraction_key_keeps_exactly_the_top_voxels_ties_whole():
    values = np.array([-3.0, -0.5, 0.0, 0.25, 0.25, 2.0, 7.0, 7.0], dtype=np.float16)
    assert list(np.argsort(order_keys(values), kind="stable")) == list(np.argsort(values, kind="stable"))
    pieces = [values[:3], values[3:]]  # read in pieces, as slices or blocks
    assert order_keys(values)[order_keys(values) >= top_fraction_key(pieces, len(values), 0.25)].size == 2
    assert (order_keys(values) >= top_fraction_key(pieces, len(values), 0.3)).sum() == 3  # ceil(2.4) voxels
    assert (order_keys(values) >= top_fraction_key(pieces, len(values), 0.5)).sum() == 5  # 4 asked: both 0.25 kept
    assert top_fraction_key(pieces, len(values), 0.0) == 65536  # nothing kept


def test_diagonal_neighbours_across_slices_join_only_with_26():
    mask = np.zeros((2, 5, 5), bool)
    mask[0, 1, 1] = mask[1, 2, 2] = True  # touching at a corner across the slices
    assert not remove_small_components(mask, 2).any()  # default: face-connected across slices
    assert not remove_small_components(mask, 2, connectivity=18).any()
    np.testing.assert_array_equal(remove_small_components(mask, 2, connectivity=26), mask)
    with pytest.raises(ValueError, match="connectivity must be one of"):
        remove_small_components(mask, 2, connectivity=8)


def test_hull_gate_keeps_the_mask_within_a_ball_of_the_other():
    other = np.zeros((9, 15, 15), bool)
    other[4, 7, 7] = True
    mask = np.ones(other.shape, bool)
    gated = hull_gate(mask, other, 3)
    z, y, x = np.indices(other.shape)
    np.testing.assert_array_equal(gated, (z - 4) ** 2 + (y - 7) ** 2 + (x - 7) ** 2 <= 9)
    np.testing.assert_array_equal(hull_gate(mask, other, 0), other)
    out = mask.copy()
    assert hull_gate(out, other, 2, out=out) is out and out.sum() == np.sum((z - 4) ** 2 + (y - 7) ** 2 + (x - 7) ** 2 <= 4)
    with pytest.raises(ValueError, match="dilation must be a non-negative int"):
        hull_gate(mask, other, -1)
    with pytest.raises(ValueError, match="other has shape"):
        hull_gate(mask, other[:3], 1)
