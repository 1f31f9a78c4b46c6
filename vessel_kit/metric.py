"""The competition metric: surface Dice at tolerance 0, streamed slice by slice; plain Dice.

Surface Dice at tolerance 0 (DeepMind ``surface-distance`` surfel areas, as the official scorer
computes it): every 2x2x2 cube of voxels has an 8-bit neighbourhood code; codes other than
0 (outside) and 255 (inside) are border cubes and carry a surface area from a fixed table. A
border cube counts as matched when both masks have a border cube at the same place, and

    surface Dice = (matched area of truth + matched area of prediction) / (total area of both).

Masks are zero-padded by one voxel on every side, as the scorer does. The cube between slices
z-1 and z only needs those two slices, so memory beyond the inputs stays O(one slice).

Speed: each slice is reduced once to a 4-bit code per 2x2 pixel neighbourhood ("quad code"); a
cube's code is ``prev_quad << 4 | quad``; only cubes that either mask touches are looked up. Chunks
of slices run in parallel threads (numpy releases the GIL). ``benchmarks/bench_metric.py`` measures
it against ``surface-distance``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .rle import duplicated_ids, is_ascii_int, read_submission, read_table, rle_decode, volume_of

SOLUTION_COLUMNS = ("id", "rle", "width", "height", "image", "slice")

__all__ = [
    "SURFACE_AREA",
    "SurfaceDiceAccumulator",
    "dice",
    "score_submission",
    "surface_dice",
]

# Surface area of each 2x2x2 neighbourhood code at unit spacing, bit 7 = (z0, y0, x0) ... bit 0 =
# (z1, y1, x1) as in surface-distance's ENCODE_NEIGHBOURHOOD_3D_KERNEL. The table takes 13 exact
# values; _AREA_SYMBOLS gives each code's value as an index into _AREA_VALUES. It reproduces
# surface-distance's create_table_neighbour_code_to_surface_area((1, 1, 1)) (DeepMind, Apache-2.0)
# to within one ulp (tests/test_metric.py checks it).
_R2, _R3 = np.sqrt(2.0), np.sqrt(3.0)
_AREA_VALUES = np.array([
    0.0, _R3 / 8, _R3 / 4, 3 * _R3 / 8, _R2 / 2, _R3 / 2, _R2 / 2 + _R3 / 8,
    1.0, 0.5 + 3 * _R3 / 8, 3 * _R3 / 4, 0.5 + _R3 / 2, _R2, _R2 / 2 + _R3 / 2,
])
_AREA_SYMBOLS = (
    "011414281248488714282839266c6ca81248266c23896ac848876ca86ac8b664"
    "1226486c236a89c8486c87a86ab6c864236a6ab635a3a36289c8c864a3626221"
    "1226263a468c8c98263a3a536ba6a632468c6ba68a78c6848c98a632c6846221"
    "466b8ca68ac678848ca69832c66284218ac6c662938282417884842182414110"
)
_AREA_CLASS = np.array([int(symbol, 16) for symbol in _AREA_SYMBOLS], dtype=np.uint8)
SURFACE_AREA = _AREA_VALUES[_AREA_CLASS]
_N_CLASSES = len(_AREA_VALUES)
_QUAD_KERNEL = np.array([[8, 4], [2, 1]], dtype=np.float32)
# Area of a (truth class, prediction class) cube pair, in total and where both are border cubes.
_PAIR_AREA = _AREA_VALUES[:, None] + _AREA_VALUES[None, :]
_MATCHED_PAIR_AREA = _PAIR_AREA * ((_AREA_VALUES[:, None] > 0) & (_AREA_VALUES[None, :] > 0))


class SurfaceDiceAccumulator:
    """Streaming surface Dice: feed (truth, prediction) slice pairs in order, read ``result()``.

    Holds only the previous slice's quad codes, so a whole kidney can be scored from an RLE file
    or a generator without ever holding a volume. Border cubes are counted by (truth area class,
    prediction area class) in integers and turned into areas only at the end, so the result does
    not depend on summation order or chunking, and identical masks give exactly 1.0.
    """

    def __init__(self) -> None:
        self.pair_counts = np.zeros((_N_CLASSES, _N_CLASSES), dtype=np.int64)
        self._previous: np.ndarray | None = None
        self._shape: tuple[int, int] | None = None

    def update(self, truth_slice: np.ndarray, pred_slice: np.ndarray) -> None:
        """Add the next slice of both masks (2D, bool or integer with nonzero = foreground)."""
        codes = self._quads(truth_slice, pred_slice)
        self._add_cubes(self._previous_or_empty(), codes)
        self._previous = codes

    def prime(self, truth_slice: np.ndarray, pred_slice: np.ndarray) -> None:
        """Set the slice before the first ``update`` without scoring it (for chunked scoring)."""
        self._previous = self._quads(truth_slice, pred_slice)

    def result(self) -> float:
        """Surface Dice of everything fed so far, closing the stack with an empty slice.

        Both masks empty -> 0.0, as the official scorer (0 / max(0, 1e-8)).
        """
        return _surface_dice_from_counts(self.closed_counts())

    def closed_counts(self) -> np.ndarray:
        """``pair_counts`` plus the cubes between the last slice and the zero padding after it."""
        if self._previous is None:
            return self.pair_counts.copy()
        return self.pair_counts + _cube_pair_counts(self._previous, np.zeros_like(self._previous))

    def _quads(self, truth_slice: np.ndarray, pred_slice: np.ndarray) -> np.ndarray:
        truth_slice, pred_slice = np.asarray(truth_slice), np.asarray(pred_slice)
        if truth_slice.ndim != 2 or truth_slice.shape != pred_slice.shape:
            raise ValueError(
                f"slices must be 2D and of equal shape, got truth {truth_slice.shape} and "
                f"prediction {pred_slice.shape}"
            )
        if self._shape is not None and truth_slice.shape != self._shape:
            raise ValueError(f"slice shape changed from {self._shape} to {truth_slice.shape}")
        self._shape = truth_slice.shape
        return _slice_codes(truth_slice, pred_slice)

    def _previous_or_empty(self) -> np.ndarray:
        if self._previous is not None:
            return self._previous
        height, width = self._shape
        return np.zeros((3, (height + 1) * (width + 1)), dtype=np.uint8)

    def _add_cubes(self, previous: np.ndarray, current: np.ndarray) -> None:
        self.pair_counts += _cube_pair_counts(previous, current)


def surface_dice(truth: np.ndarray, pred: np.ndarray, *, workers: int | None = None) -> float:
    """Surface Dice at tolerance 0 between two (Z, Y, X) masks, as the competition scores a volume.

    Masks may be bool or integer (nonzero = foreground), arrays or memmaps. Identical non-empty
    masks give 1.0; an empty prediction against a non-empty truth gives 0.0; two empty masks give
    0.0 (the official scorer's convention). ``workers`` threads score chunks of slices in parallel
    (default: the CPU count, at most 8).
    """
    _check_pair(truth, pred)
    depth = truth.shape[0]
    workers = max(1, min(workers or min(os.cpu_count() or 1, 8), depth))
    bounds = np.linspace(0, depth, workers + 1).round().astype(int)

    def count_chunk(start: int, stop: int) -> np.ndarray:
        accumulator = SurfaceDiceAccumulator()
        if start > 0:
            accumulator.prime(truth[start - 1], pred[start - 1])
        for z in range(start, stop):
            accumulator.update(truth[z], pred[z])
        return accumulator.closed_counts() if stop == depth else accumulator.pair_counts

    with ThreadPoolExecutor(max_workers=workers) as pool:
        counts = sum(pool.map(count_chunk, bounds[:-1], bounds[1:]))
    return _surface_dice_from_counts(counts)


def dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Volumetric Dice 2|T∩P| / (|T| + |P|) of two masks (nonzero = foreground).

    Two empty masks give 1.0 (nothing to find, nothing found). Counted slice by slice, so no
    full-size temporary is made.
    """
    _check_pair(truth, pred, ndims=(2, 3))
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.ndim == 2:
        truth, pred = truth[None], pred[None]
    intersection = total = 0
    for truth_slice, pred_slice in zip(truth, pred, strict=True):
        truth_slice, pred_slice = truth_slice != 0, pred_slice != 0
        intersection += int(np.count_nonzero(truth_slice & pred_slice))
        total += int(np.count_nonzero(truth_slice)) + int(np.count_nonzero(pred_slice))
    return 1.0 if total == 0 else 2.0 * intersection / total


def score_submission(
    solution_csv: str | os.PathLike,
    submission_csv: str | os.PathLike,
    *,
    progress: bool = True,
) -> dict[str, float]:
    """Score a submission as Kaggle does: surface Dice per volume, then the mean over volumes.

    The solution has columns id, rle, width, height, image (volume name), slice (index); it is
    checked by ``read_solution``. Each row of both files is decoded once, slice by slice, in slice
    order. Returns ``{volume: score, ..., "mean": mean}``.

    Rules for the submission (ValueError naming the file and a few ids, unless said otherwise):
    every id of the solution must be there, also when a whole volume is missing (Kaggle refuses a
    submission that lacks ids); no id may occur twice; an id ``<volume>_<stem>`` of a volume of the
    solution must be one of the solution's ids; rows of volumes the solution does not have at all
    are ignored, with a warning naming those volumes. An invalid RLE is an error naming its file
    (the submission, or the solution) and the id.
    """
    in_solution, in_submission = f"solution file {solution_csv}", f"submission file {submission_csv}"
    solution = read_solution(solution_csv)
    predicted = _predictions(read_submission(submission_csv), solution, in_submission)
    scores: dict[str, float] = {}
    bar = tqdm(total=len(solution), desc="score", unit="slice", delay=2, disable=not progress)
    for volume, rows in solution.groupby("image", sort=False):
        accumulator = SurfaceDiceAccumulator()
        for row_id, truth_rle, height, width in rows[["id", "rle", "height", "width"]].itertuples(index=False):
            truth = decode_row(truth_rle, (height, width), in_solution, row_id)
            pred = decode_row(predicted[row_id], (height, width), in_submission, row_id)
            accumulator.update(truth, pred)
            bar.update()
        scores[str(volume)] = accumulator.result()
    bar.close()
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


def read_solution(path: str | os.PathLike) -> pd.DataFrame:
    """A solution CSV (id, rle, width, height, image, slice), checked and sorted by volume and slice.

    width, height and slice become ints. Rows may come in any order, but a ValueError naming the
    file and the id or volume is raised for: no rows at all, a width or height that is not a positive integer, a
    slice that is not a non-negative one (ASCII digits), an id twice, an id that is not
    ``<image>_<stem>``, and within a volume: slice numbers with a gap or a repeat, slice numbers
    that do not follow the ids' numeric stems (``int(stem) - slice`` must be the same on every row),
    or more than one slice size.
    """
    solution = read_table(path, SOLUTION_COLUMNS, "solution")
    if solution.empty:
        raise ValueError(f"solution file {path} has no rows")
    for column, smallest in (("width", 1), ("height", 1), ("slice", 0)):
        solution[column] = _integer_column(solution, column, smallest, path)
    solution = solution.sort_values(["image", "slice"], kind="stable")
    for volume, rows in solution.groupby("image", sort=False):
        _check_solution_volume(rows, str(volume), path)
    duplicated = duplicated_ids(solution)
    if duplicated:
        raise ValueError(f"solution file {path}: ids occur more than once, e.g. {duplicated[:3]}")
    return solution


def _predictions(submission: pd.DataFrame, solution: pd.DataFrame, where: str) -> dict[str, str]:
    """``{id: rle}`` of the submission's rows, checked against the solution's ids (see ``score_submission``)."""
    duplicated = duplicated_ids(submission)
    if duplicated:
        raise ValueError(f"{where}: {len(duplicated)} ids occur more than once, e.g. {duplicated[:3]}")
    predicted = dict(zip(submission["id"], submission["rle"], strict=True))
    volumes = solution["image"].unique().tolist()
    unknown = sorted(set(predicted) - set(solution["id"]))
    extra = [row_id for row_id in unknown if volume_of(row_id, volumes) is not None]
    if extra:
        raise ValueError(f"{where}: {len(extra)} ids are not in the solution, e.g. {extra[:3]}")
    has_row = solution["id"].isin(predicted.keys())
    if not has_row.all():
        missing = solution.loc[~has_row, "id"].tolist()
        absent = sorted(set(volumes) - set(solution.loc[has_row, "image"]))
        whole = f"; volumes without any row: {absent}" if absent else ""
        raise ValueError(f"{where}: {len(missing)} solution ids are missing, e.g. {missing[:3]}{whole}")
    if unknown:  # all of volumes the solution does not have
        ignored = sorted({row_id.rsplit("_", 1)[0] for row_id in unknown})
        warnings.warn(f"{where}: volumes {ignored} are not in the solution; their rows are ignored", stacklevel=3)
    return predicted


def decode_row(rle: str, shape: tuple[int, int], where: str, row_id: str) -> np.ndarray:
    """``rle_decode``, its ValueError naming ``where`` (the file) and the id of the row."""
    try:
        return rle_decode(rle, shape)
    except ValueError as error:
        raise ValueError(f"{where}: id {row_id!r}: {error}") from error


def _integer_column(solution: pd.DataFrame, column: str, smallest: int, path: str | os.PathLike) -> pd.Series:
    """A column of integer strings as int64; ValueError naming the first row that is not >= ``smallest``."""
    text = solution[column]
    values = text.where(text.map(is_ascii_int).astype(bool), "-1").astype(np.int64)
    bad = values < smallest
    if bad.any():
        first = bad.idxmax()
        raise ValueError(
            f"solution file {path}: id {solution.at[first, 'id']!r}: {column} {text[first]!r} is not an "
            f"integer >= {smallest}"
        )
    return values


def _check_solution_volume(rows: pd.DataFrame, volume: str, path: str | os.PathLike) -> None:
    """One volume's rows (sorted by slice): consecutive slices, ids that agree with them, one size."""
    ids, slices = rows["id"].tolist(), rows["slice"].to_numpy()
    where = f"solution file {path}: volume {volume!r}"
    steps = np.diff(slices)
    if (steps != 1).any():
        k = int(np.argmax(steps != 1))
        a, b = int(slices[k]), int(slices[k + 1])
        if a == b:
            raise ValueError(f"{where} has slice {a} twice (ids {ids[k]!r} and {ids[k + 1]!r})")
        raise ValueError(f"{where} lacks slice {a + 1}: its slice numbers jump from {a} ({ids[k]!r}) to {b} ({ids[k + 1]!r})")
    _check_ids_follow_slices(ids, slices, volume, where)
    sizes = rows[["height", "width"]].to_numpy()
    differs = (sizes != sizes[0]).any(axis=1)
    if differs.any():
        k = int(np.argmax(differs))
        raise ValueError(
            f"{where} mixes slice sizes (height x width): {ids[0]!r} is {sizes[0, 0]}x{sizes[0, 1]}, "
            f"{ids[k]!r} is {sizes[k, 0]}x{sizes[k, 1]}"
        )


def _check_ids_follow_slices(ids: list[str], slices: np.ndarray, volume: str, where: str) -> None:
    """Every id is ``<volume>_<stem>``; where all stems are numbers, ``stem - slice`` is constant."""
    prefix = f"{volume}_"
    wrong = next((row_id for row_id in ids if not row_id.startswith(prefix)), None)
    if wrong is not None:
        raise ValueError(f"{where}: id {wrong!r} is not {prefix}<stem>")
    stems = [row_id[len(prefix):] for row_id in ids]
    if not all(map(is_ascii_int, stems)):
        return  # ids that are not numbered say nothing about the slice order
    offsets = np.array(stems, dtype=np.int64) - slices
    if (offsets != offsets[0]).any():
        k = int(np.argmax(offsets != offsets[0]))
        raise ValueError(
            f"{where}: slice numbers do not follow the ids: {ids[0]!r} is slice {int(slices[0])} but "
            f"{ids[k]!r} is slice {int(slices[k])}"
        )


def _slice_codes(truth_slice: np.ndarray, pred_slice: np.ndarray) -> np.ndarray:
    """Quad codes of one slice of both masks, stacked with their union: (3, (H+1)*(W+1)) uint8.

    Row 0 is the truth's, row 1 the prediction's, row 2 is 1 where either mask touches the
    neighbourhood, else 0 — kept 0/1 so that ``(a[2] | b[2]).view(bool)`` is a valid bool array
    and numpy's fast bool path finds the touched cubes of a slice pair.
    """
    height, width = truth_slice.shape
    codes = np.empty((3, (height + 1) * (width + 1)), dtype=np.uint8)
    padded = np.zeros((height + 1, width + 1), dtype=np.uint8)
    for row, mask in enumerate((truth_slice, pred_slice)):
        _quad_codes(mask, padded, codes[row].reshape(height + 1, width + 1))
    np.bitwise_or(codes[0], codes[1], out=codes[2])
    np.not_equal(codes[2], 0, out=codes[2].view(np.bool_))
    return codes


def _quad_codes(mask: np.ndarray, padded: np.ndarray, out: np.ndarray) -> None:
    """Write the 4-bit code of every 2x2 neighbourhood of the zero-padded slice into ``out``.

    Bit 3 = (y0, x0), bit 2 = (y0, x1), bit 1 = (y1, x0), bit 0 = (y1, x1). ``padded`` is a
    (H+1, W+1) scratch buffer whose first row and column must be zero; the padding after the
    last row and column is OpenCV's constant-zero border. One ``cv2.filter2D`` pass (anchor at
    the kernel's top-left) is ~4x faster than the equivalent numpy shifts.
    """
    inner = padded[1:, 1:]
    if mask.dtype == np.bool_:
        inner[...] = mask.view(np.uint8)
    else:
        np.not_equal(mask, 0, out=inner.view(np.bool_))
    cv2.filter2D(padded, cv2.CV_8U, _QUAD_KERNEL, dst=out, anchor=(0, 0), borderType=cv2.BORDER_CONSTANT)


def _cube_pair_counts(previous: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Counts of touched cubes between two slices by (truth area class, prediction area class)."""
    touched = np.flatnonzero((previous[2] | current[2]).view(np.bool_))
    if touched.size == 0:
        return np.zeros((_N_CLASSES, _N_CLASSES), dtype=np.int64)
    truth_codes = previous[0, touched] << 4
    truth_codes |= current[0, touched]
    pred_codes = previous[1, touched] << 4
    pred_codes |= current[1, touched]
    pair_index = _AREA_CLASS[truth_codes].astype(np.intp) * _N_CLASSES + _AREA_CLASS[pred_codes]
    return np.bincount(pair_index, minlength=_N_CLASSES**2).reshape(_N_CLASSES, _N_CLASSES)


def _surface_dice_from_counts(pair_counts: np.ndarray) -> float:
    numerator = float((pair_counts * _MATCHED_PAIR_AREA).sum())
    denominator = float((pair_counts * _PAIR_AREA).sum())
    return numerator / max(denominator, 1e-8)


def _check_pair(truth: np.ndarray, pred: np.ndarray, ndims: Iterable[int] = (3,)) -> None:
    for name, mask in (("truth", truth), ("prediction", pred)):
        if not hasattr(mask, "ndim") or not hasattr(mask, "dtype"):
            raise ValueError(f"{name} must be a numpy array, got {type(mask).__name__}")
        if mask.ndim not in tuple(ndims):
            raise ValueError(f"{name} must be a (Z, Y, X) mask, got shape {mask.shape}")
        if mask.dtype.kind not in "bui":
            raise ValueError(f"{name} must be a bool or integer mask, got dtype {mask.dtype}")
    if truth.shape != pred.shape:
        raise ValueError(f"truth and prediction shapes differ: {truth.shape} vs {pred.shape}")
    if truth.size == 0:
        raise ValueError(f"masks are empty arrays (shape {truth.shape})")
