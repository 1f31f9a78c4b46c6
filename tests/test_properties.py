"""Property-based tests (hypothesis): RLE and submission-file round trips, and surface Dice against
the oracle (PyPI surface-distance) on random small masks."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vessel_kit.metric import surface_dice
from vessel_kit.rle import EMPTY_RLE, parse_rle, read_submission, rle_decode, rle_encode, write_submission

FAST = settings(max_examples=80, deadline=None)

sides = st.integers(1, 12)
masks_2d = st.tuples(sides, sides).flatmap(lambda shape: arrays(np.bool_, shape))


@st.composite
def mask_pairs_3d(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Two bool masks of one random shape up to 6 x 12 x 12 (hypothesis favours empty and full ones)."""
    shape = (draw(st.integers(1, 6)), draw(sides), draw(sides))
    return draw(arrays(np.bool_, shape)), draw(arrays(np.bool_, shape))


@st.composite
def predictions(draw: st.DrawFn) -> dict[str, tuple[list[str], list[np.ndarray]]]:
    """``{volume: (stems, masks)}`` as ``write_submission`` takes it: odd volume names (commas,
    quotes, spaces, control characters, non-ASCII; line breaks are refused, see test_rle), 4- or
    5-digit stems, one random slice shape per volume."""
    names = draw(st.lists(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"), min_size=1, max_size=8),
                          min_size=1, max_size=3, unique=True))
    volumes = {}
    for name in names:
        stems = draw(st.lists(st.from_regex(r"[0-9]{4,5}", fullmatch=True), min_size=1, max_size=4, unique=True))
        shape = draw(st.tuples(sides, sides))
        volumes[name] = (stems, [draw(arrays(np.bool_, shape)) for _ in stems])
    return volumes


@FAST
@given(masks_2d)
@example(np.zeros((3, 4), bool))
@example(np.ones((3, 4), bool))
@example(np.ones((1, 1), bool))
def test_rle_round_trip(mask):
    rle = rle_encode(mask)
    np.testing.assert_array_equal(rle_decode(rle, mask.shape), mask)
    assert parse_rle(rle, mask.shape)[1].sum() == mask.sum()  # well formed, fits the slice
    assert (rle == EMPTY_RLE) == (not mask.any())
    assert rle_encode(rle_decode(rle, mask.shape)) == rle


@FAST
@given(predictions())
def test_submission_round_trip(volumes):
    with tempfile.TemporaryDirectory() as folder:
        path = write_submission(volumes, Path(folder) / "submission.csv")
        frame = read_submission(path)
    expected = [(f"{name}_{stem}", rle_encode(mask)) for name, (stems, masks) in volumes.items()
                for stem, mask in zip(stems, masks, strict=True)]
    assert list(frame.columns) == ["id", "rle"]
    assert list(zip(frame["id"], frame["rle"], strict=True)) == expected


def _one_voxel(shape: tuple[int, int, int], at: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[at] = True
    return mask


@FAST
@given(pair=mask_pairs_3d())
@example(pair=(_one_voxel((1, 1, 1), (0, 0, 0)), _one_voxel((1, 1, 1), (0, 0, 0))))
@example(pair=(_one_voxel((2, 3, 4), (1, 2, 3)), np.zeros((2, 3, 4), bool)))
@example(pair=(_one_voxel((3, 5, 5), (1, 2, 2)), _one_voxel((3, 5, 5), (1, 2, 3))))  # neighbours: share 3 border cubes
def test_surface_dice_equals_oracle(pair, oracle_surface_dice):
    truth, pred = pair
    assume(truth.any() or pred.any())  # both empty: the oracle gives nan; see the test below
    assert abs(surface_dice(truth, pred) - oracle_surface_dice(truth, pred)) < 1e-6


@FAST
@given(mask_pairs_3d(), st.integers(1, 4))
def test_surface_dice_is_symmetric_and_independent_of_threads(pair, workers):
    truth, pred = pair
    score = surface_dice(truth, pred, workers=1)
    assert surface_dice(truth, pred, workers=workers) == score  # integer counts: exactly equal
    assert abs(surface_dice(pred, truth) - score) < 1e-12  # the same areas, summed in another order
    assert surface_dice(truth, truth) == (1.0 if truth.any() else 0.0)


@FAST
@given(st.tuples(st.integers(1, 6), sides, sides))
def test_surface_dice_of_two_empty_masks_is_zero(shape):
    # The official scorer's convention, 0 / max(0, 1e-8); surface-distance itself gives nan here.
    empty = np.zeros(shape, bool)
    assert surface_dice(empty, empty) == 0.0
