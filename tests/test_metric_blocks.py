"""Block-wise surface Dice equals the whole-volume score; RLE rows stream from lazy masks."""

from __future__ import annotations

import numpy as np
import pytest

from vessel_kit.metric import surface_dice
from vessel_kit.metric_blocks import surface_dice_blocks
from vessel_kit.rle import SubmissionWriter, rle_encode, rle_rows
from vessel_kit.sources import iter_slices


class Recorded:
    """A numpy mask that records the boxes read from it (a stand-in for a chunked store)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype, self.boxes = array, array.shape, array.dtype, []

    def __getitem__(self, box):
        self.boxes.append(box)
        return self.array[box]


def _random_pair(shape, seed=0, density=0.3):
    rng = np.random.default_rng(seed)
    truth = rng.random(shape) < density
    return truth, truth ^ (rng.random(shape) < 0.1)


def _structured_pair(shape=(37, 45, 29)):
    """A tube and a ball, and a prediction shifted by a voxel with an extra blob and a gap."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    truth = ((y - 20) ** 2 + (x - 12) ** 2 < 36) | ((z - 25) ** 2 + (y - 30) ** 2 + (x - 20) ** 2 < 49)
    pred = np.roll(truth, 1, axis=2)
    pred[5:9, 2:6, 2:6] = True
    pred[14:16] = False
    return truth, pred


@pytest.mark.parametrize("shape", [(13, 17, 11), (30, 41, 29), (1, 5, 7), (2, 1, 3)])
@pytest.mark.parametrize("block", [2, 3, 5, (4, 6, 5), 128])
def test_random_masks_score_as_the_whole_volume(shape, block):
    truth, pred = _random_pair(shape)
    expected = surface_dice(truth, pred)
    assert abs(surface_dice_blocks(truth, pred, block=block) - expected) < 1e-12


def test_blocks_of_one_voxel_score_as_the_whole_volume():
    truth, pred = _random_pair((6, 7, 5), seed=3)
    assert surface_dice_blocks(truth, pred, block=1) == surface_dice(truth, pred)


@pytest.mark.parametrize("block", [(7, 9, 8), (16, 16, 16), (37, 45, 29), (2, 50, 3)])
def test_structured_masks_score_as_the_whole_volume(block):
    truth, pred = _structured_pair()
    expected = surface_dice(truth, pred)
    assert 0.3 < expected < 0.95
    assert surface_dice_blocks(truth, pred, block=block, workers=2) == expected
    assert surface_dice_blocks(truth, truth, block=block) == 1.0
    assert surface_dice_blocks(truth, np.zeros_like(pred), block=block) == 0.0


def test_the_deepmind_cubes_case():
    truth = np.zeros((100, 100, 100), np.uint8)
    pred = truth.copy()
    truth[:50] = 1
    pred[:51] = 1
    assert surface_dice_blocks(truth, pred, block=(30, 64, 64)) == pytest.approx(0.750877, abs=1e-6)


def test_each_block_reads_itself_and_a_one_voxel_halo():
    truth, pred = _random_pair((20, 24, 18), seed=1)
    lazy_truth, lazy_pred = Recorded(truth.astype(np.uint8)), Recorded(pred)
    score = surface_dice_blocks(lazy_truth, lazy_pred, block=8, workers=1)
    assert score == surface_dice(truth, pred)
    assert len(lazy_truth.boxes) == len(lazy_pred.boxes) == 3 * 3 * 3
    for box in lazy_truth.boxes:
        assert all(s.stop - s.start <= 9 for s in box)  # a block of 8 and its halo, never more
    starts = sorted({box[0].start for box in lazy_truth.boxes})
    assert starts == [0, 7, 15]


def test_zarr_dask_and_sources_score_lazily():
    zarr = pytest.importorskip("zarr", minversion="3")
    da = pytest.importorskip("dask.array")
    from vessel_kit.sources import ArraySource

    truth, pred = _structured_pair()
    expected = surface_dice(truth, pred)
    stored = zarr.create_array(zarr.storage.MemoryStore(), data=truth.astype(np.uint8), chunks=(8, 8, 8))
    lazy = da.from_array(pred, chunks=(8, 8, 8))
    assert surface_dice_blocks(stored, lazy, block=16) == expected
    assert surface_dice_blocks(ArraySource(stored), lazy, block=(8, 16, 24)) == expected


def test_bad_inputs_are_named():
    truth, pred = _random_pair((4, 5, 6))
    with pytest.raises(ValueError, match=r"shapes differ: \(4, 5, 6\) vs \(4, 5, 5\)"):
        surface_dice_blocks(truth, pred[..., :5])
    with pytest.raises(ValueError, match="prediction must be a bool or integer mask, got dtype float32"):
        surface_dice_blocks(truth, pred.astype(np.float32))
    with pytest.raises(ValueError, match=r"truth must be a non-empty \(Z, Y, X\) mask, got shape \(5, 6\)"):
        surface_dice_blocks(truth[0], pred[0])
    with pytest.raises(ValueError, match=r"block must be a positive int or 3 positive ints \(Z, Y, X\), got \(8, 8\)"):
        surface_dice_blocks(truth, pred, block=(8, 8))


# -- RLE rows streamed from lazy masks -----------------------------------------------------------


def test_rle_rows_of_a_zarr_mask_equal_the_in_memory_encoder(tmp_path):
    zarr = pytest.importorskip("zarr", minversion="3")
    mask = _random_pair((19, 23, 31), seed=2, density=0.05)[0]
    mask[3] = False  # an empty slice: "1 0"
    stored = zarr.create_array(str(tmp_path / "mask.zarr"), data=mask.astype(np.uint8), chunks=(8, 16, 16))
    expected = [rle_encode(plane) for plane in mask]
    assert expected[3] == "1 0"
    assert list(rle_rows(stored)) == expected == list(rle_rows(mask))
    stems = [f"{z:04d}" for z in range(19)]
    with SubmissionWriter(tmp_path / "lazy.csv") as writer:
        writer.add_volume("kidney_9", stems, stored)
    with SubmissionWriter(tmp_path / "memory.csv") as writer:
        writer.add_volume("kidney_9", stems, mask)
    assert (tmp_path / "lazy.csv").read_text() == (tmp_path / "memory.csv").read_text()


def test_slices_are_read_in_chunk_aligned_slabs_within_the_byte_limit():
    mask = Recorded(np.arange(20 * 4 * 5).reshape(20, 4, 5) % 3 == 0)
    mask.chunks = (8, 4, 5)
    planes = list(iter_slices(mask))
    assert [(b[0].start, b[0].stop) for b in mask.boxes] == [(0, 8), (8, 16), (16, 20)]  # each chunk once
    np.testing.assert_array_equal(np.stack(planes), mask.array)
    mask.boxes.clear()
    list(iter_slices(mask, max_bytes=3 * 4 * 5))  # 3 planes of bool at a time, never across a chunk
    assert [(b[0].start, b[0].stop) for b in mask.boxes] == [(0, 3), (3, 6), (6, 8), (8, 11), (11, 14), (14, 16),
                                                             (16, 19), (19, 20)]
