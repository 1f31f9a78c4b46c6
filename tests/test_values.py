"""The shared option-value checks: bools are never numbers, non-finite reals never sizes or rates."""

import math

import numpy as np
import pytest

from vessel_kit.values import is_finite_real, is_int


@pytest.mark.parametrize("value", [0, 3, -2, 0.5, np.float32(0.25), np.int64(7)])
def test_finite_reals_pass(value):
    assert is_finite_real(value)


@pytest.mark.parametrize("value", [True, False, math.nan, math.inf, -math.inf, "1", None, [1]])
def test_bools_strings_and_non_finite_are_not_finite_reals(value):
    assert not is_finite_real(value)


@pytest.mark.parametrize("value", [0, 5, -3])
def test_python_ints_pass(value):
    assert is_int(value)


@pytest.mark.parametrize("value", [True, False, 1.0, np.int64(2), "3", None])
def test_bools_floats_and_numpy_ints_are_not_ints(value):
    assert not is_int(value)
