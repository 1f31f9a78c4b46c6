"""remove_small_components against scipy.ndimage.label with the same connectivity."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from vessel_kit.postprocess import remove_small_components

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
