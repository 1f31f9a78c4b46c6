"""Run-length encoding and submission files, in the competition's exact convention.

The convention: a 2D mask is flattened row-major (C order); the RLE is the space-separated list of
1-indexed ``start length`` pairs of its foreground runs; an empty mask is written ``1 0`` (an empty
string breaks the Kaggle scorer). Submissions are CSV files with the header ``id,rle`` and one row
per slice, ``id`` being ``<volume>_<file stem>``.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType

import numpy as np
import pandas as pd

from .atomic import atomic_output
from .sources import iter_slices

EMPTY_RLE = "1 0"
SUBMISSION_COLUMNS = ("id", "rle")
# Integers in RLEs and CSVs have at most this many digits: below 10**18, so a start plus a length
# never overflows int64.
MAX_DIGITS = 18

__all__ = [
    "EMPTY_RLE",
    "SubmissionWriter",
    "parse_rle",
    "rle_decode",
    "rle_encode",
    "rle_rows",
    "slice_id",
    "validate_submission",
    "write_submission",
]


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2D mask (nonzero = foreground) as the competition's RLE string."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2D mask, got shape {mask.shape}")
    flat = mask.reshape(-1)
    if flat.dtype != np.bool_:
        flat = flat != 0
    # Run boundaries are where the padded mask changes value; +1 makes them 1-indexed.
    padded = np.zeros(flat.size + 2, dtype=np.bool_)
    padded[1:-1] = flat
    edges = np.flatnonzero(padded[1:] != padded[:-1]) + 1
    if edges.size == 0:
        return EMPTY_RLE
    edges[1::2] -= edges[::2]
    return " ".join(edges.astype(str).tolist())


def rle_rows(mask: object) -> Iterator[str]:
    """The RLE of every Z slice of a (Z, Y, X) mask, in order: numpy, memmap, or a lazy zarr, dask
    or ``VolumeSource`` mask read a slab of slices at a time (``sources.iter_slices``), so a mask
    in an OME-Zarr store is never loaded whole."""
    slices = mask if isinstance(mask, np.ndarray) else iter_slices(mask)
    return (rle_encode(plane) for plane in slices)


def parse_rle(rle: str, shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Parse and check an RLE string; return (0-indexed starts, lengths) as int64 arrays.

    Raises ValueError for anything the scorer would misread: a non-string or empty value, tokens
    that are not non-negative integers in ASCII digits (or have more than ``MAX_DIGITS`` digits),
    an odd token count, starts below 1, zero-length runs (other than the empty mask ``1 0``), runs
    that overlap or are out of order and, when the slice ``shape`` (height, width) is given, a run
    that passes the end of the slice.
    """
    if not isinstance(rle, str):
        raise ValueError(f"RLE must be a string, got {type(rle).__name__} {rle!r}")
    tokens = rle.split()
    if not tokens:
        raise ValueError(f"empty RLE string; an empty mask is written {EMPTY_RLE!r}")
    if len(tokens) % 2:
        raise ValueError(f"RLE has an odd number of values ({len(tokens)}): {_clip(rle)}")
    _check_tokens(tokens, rle)
    pairs = np.array(tokens, dtype=np.int64).reshape(-1, 2)
    starts, lengths = pairs[:, 0] - 1, pairs[:, 1]
    if pairs.shape[0] == 1 and lengths[0] == 0 and starts[0] == 0:
        starts, lengths = starts[:0], lengths[:0]
    elif starts.min() < 0:
        raise ValueError(f"RLE start 0 found; starts are 1-indexed: {_clip(rle)}")
    elif lengths.min() < 1:
        raise ValueError(f"RLE has a zero-length run: {_clip(rle)}")
    elif np.any(starts[1:] < starts[:-1] + lengths[:-1]):
        raise ValueError(f"RLE runs overlap or are not in increasing order: {_clip(rle)}")
    if shape is not None:
        _check_fits(starts, lengths, shape)
    return starts, lengths


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode an RLE string into a bool mask of ``shape`` (height, width)."""
    height, width = _slice_shape(shape, "a slice shape")
    starts, lengths = parse_rle(rle, (height, width))
    # Mark run starts +1 and run ends -1, then a cumulative sum fills the runs.
    marks = np.zeros(height * width + 1, dtype=np.int8)
    marks[starts] = 1
    marks[starts + lengths] -= 1  # ends are unique; a touching run's start and end cancel
    return np.cumsum(marks[:-1], dtype=np.int8).astype(np.bool_).reshape(height, width)


def slice_id(volume: str, stem: str) -> str:
    """The submission id of one slice: ``<volume>_<file stem>``, e.g. ``kidney_5_0000``."""
    return f"{volume}_{stem}"


class SubmissionWriter:
    """Stream a submission CSV one slice at a time, atomically.

    Rows go to a temporary file next to ``path``; it replaces ``path`` only when the ``with``
    block ends without an error, so an interrupted run never leaves a half-written submission.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._ids: set[str] = set()
        self._stack = ExitStack()
        self._writer = None

    def __enter__(self) -> SubmissionWriter:
        with ExitStack() as stack:
            tmp = stack.enter_context(atomic_output(self.path))
            file = stack.enter_context(open(tmp, "w", newline=""))
            self._writer = csv.writer(file, lineterminator="\n")
            self._writer.writerow(SUBMISSION_COLUMNS)
            self._stack = stack.pop_all()
        return self

    def add_slice(self, row_id: str, mask: np.ndarray) -> None:
        """Append one slice's row; ids must be unique."""
        self.add_row(row_id, rle_encode(mask))

    def add_row(self, row_id: str, rle: str) -> None:
        """Append a row with an already encoded RLE; ids must be unique."""
        if self._writer is None:
            raise RuntimeError("SubmissionWriter must be used as a context manager")
        if row_id in self._ids:
            raise ValueError(f"duplicate submission id {row_id!r}")
        if "\r" in row_id or "\n" in row_id:  # csv leaves a lone "\r" unquoted: it would split the row
            raise ValueError(f"submission id {row_id!r} contains a line break")
        self._ids.add(row_id)
        self._writer.writerow((row_id, rle))

    def add_volume(self, volume: str, stems: Sequence[str], masks: Iterable[np.ndarray]) -> None:
        """Append every slice of a volume; ``masks`` may be a (Z, Y, X) array (numpy, or lazy: zarr,
        dask, a ``VolumeSource``, read a slab at a time) or an iterable of 2D masks."""
        lazy = hasattr(masks, "shape") and not isinstance(masks, np.ndarray)
        count = 0
        for stem, rle in zip(stems, rle_rows(masks) if lazy else map(rle_encode, masks), strict=False):
            self.add_row(slice_id(volume, stem), rle)
            count += 1
        if count != len(stems):
            raise ValueError(
                f"volume {volume!r}: {len(stems)} slice stems but {count} masks were given"
            )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._writer = None
        self._stack.__exit__(exc_type, exc, tb)  # closes the file, then renames or removes it


def write_submission(
    predictions: Mapping[str, tuple[Sequence[str], Iterable[np.ndarray]]],
    path: str | os.PathLike,
) -> Path:
    """Write a submission from ``{volume: (stems, masks)}``, streaming one slice at a time.

    ``masks`` may be a (Z, Y, X) array (memmaps included) or any iterable of 2D masks, so a whole
    kidney never needs a second in-memory copy. Rows follow the given slice order.
    """
    with SubmissionWriter(path) as writer:
        for volume, (stems, masks) in predictions.items():
            writer.add_volume(volume, stems, masks)
    return Path(path)


def validate_submission(
    path: str | os.PathLike,
    sample_submission: str | os.PathLike,
    *,
    shapes: Mapping[str, tuple[int, int]] | None = None,
) -> None:
    """Check a submission against the sample submission; raise ValueError listing every problem.

    Checks: columns ``id`` and ``rle``; the same ids, each once; every RLE is well formed
    (``parse_rle``: ASCII integers, positive starts and lengths, runs sorted and not overlapping).
    The sample submission holds no slice sizes; where ``shapes`` maps a volume name to its
    (height, width), the RLEs of that volume must also end within the slice, as ``score`` checks.
    """
    submission = read_submission(path)
    expected = read_table(sample_submission, SUBMISSION_COLUMNS, "sample submission")
    sizes = {volume: _slice_shape(shape, f"shapes[{volume!r}]") for volume, shape in (shapes or {}).items()}
    problems = []
    duplicated = duplicated_ids(submission)
    if duplicated:
        problems.append(f"{len(duplicated)} duplicated ids, e.g. {_examples(duplicated)}")
    missing = sorted(set(expected["id"]) - set(submission["id"]))
    extra = sorted(set(submission["id"]) - set(expected["id"]))
    if missing:
        problems.append(f"{len(missing)} ids of the sample submission are missing, e.g. {_examples(missing)}")
    if extra:
        problems.append(f"{len(extra)} ids are not in the sample submission, e.g. {_examples(extra)}")
    bad_rles = list(_bad_rles(submission, sizes))
    if bad_rles:
        problems.append(f"{len(bad_rles)} invalid RLEs, e.g. " + "; ".join(bad_rles[:3]))
    if problems:
        raise ValueError(f"invalid submission {path}: " + " | ".join(problems))


def read_submission(path: str | os.PathLike) -> pd.DataFrame:
    """Read an ``id,rle`` CSV as strings (empty RLE cells stay empty strings, not NaN)."""
    return read_table(path, SUBMISSION_COLUMNS, "submission")


def read_table(path: str | os.PathLike, columns: Sequence[str], kind: str) -> pd.DataFrame:
    """Read a CSV as strings; it must have (at least) ``columns``. Errors name the ``kind`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file {path} does not exist")
    try:
        with warnings.catch_warnings():
            # A row with one field too many is a ParserWarning (index_col=False keeps pandas from
            # silently taking the first column for an index); make it an error.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{kind} file {path} is empty; expected the columns {','.join(columns)}") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError) as error:
        raise ValueError(f"{kind} file {path} is not a readable CSV: {error}") from None
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(
            f"{kind} file {path}: header {','.join(map(str, frame.columns))!r} lacks {','.join(missing)}; "
            f"expected the columns {','.join(columns)}"
        )
    return frame


def duplicated_ids(frame: pd.DataFrame) -> list[str]:
    """The ids that occur more than once in a table's ``id`` column, each named once."""
    return frame["id"][frame["id"].duplicated()].unique().tolist()


def volume_of(row_id: str, volumes: Collection[str]) -> str | None:
    """The volume of ``volumes`` whose slices ``row_id`` names (``<volume>_<stem>``), or None.

    The longest name wins, so ``kidney_1_dense_0001`` is not taken for a slice of ``kidney_1``.
    """
    matches = [volume for volume in volumes if row_id.startswith(f"{volume}_")]
    return max(matches, key=len, default=None)


def _bad_rles(submission: pd.DataFrame, shapes: Mapping[str, tuple[int, int]]) -> Iterator[str]:
    for row_id, rle in zip(submission["id"], submission["rle"], strict=True):
        volume = volume_of(row_id, shapes)
        try:
            parse_rle(rle, None if volume is None else shapes[volume])
        except ValueError as error:
            yield f"{row_id}: {error}"


def is_ascii_int(text: str) -> bool:
    """A non-negative integer in ASCII digits, at most ``MAX_DIGITS`` of them.

    Python's ``int()`` and ``str.isdigit()`` also take other scripts' digits ('٣') and ``isdigit``
    superscripts ('²'); the scorer's parser may not, so only ASCII digits count.
    """
    return text.isascii() and text.isdigit() and len(text) <= MAX_DIGITS


def _check_tokens(tokens: list[str], rle: str) -> None:
    """Every token ``is_ascii_int``; the common valid case costs a few C-level passes."""
    joined = "".join(tokens)
    if joined.isascii() and joined.isdigit() and max(map(len, tokens)) <= MAX_DIGITS:
        return
    bad = next(token for token in tokens if not is_ascii_int(token))
    if bad.isascii() and bad.isdigit():
        raise ValueError(f"RLE value {_clip(bad, 24)} is too large (over {MAX_DIGITS} digits): {_clip(rle)}")
    raise ValueError(f"RLE value {_clip(bad, 24)} is not a non-negative integer in ASCII digits: {_clip(rle)}")


def _check_fits(starts: np.ndarray, lengths: np.ndarray, shape: tuple[int, int]) -> None:
    """No run passes the end of a slice of ``shape`` (runs are sorted: the last one ends last)."""
    height, width = _slice_shape(shape, "a slice shape")
    if starts.size and int(starts[-1] + lengths[-1]) > height * width:
        raise ValueError(
            f"RLE run ends at pixel {int(starts[-1] + lengths[-1])}, beyond the "
            f"{height}x{width}={height * width} pixels of the mask"
        )


def _slice_shape(shape: tuple[int, int], name: str) -> tuple[int, int]:
    """``shape`` as (height, width) Python ints; a ValueError naming ``name`` unless it is two
    positive integers."""
    if isinstance(shape, Sequence | np.ndarray) and len(shape) == 2 and all(map(_is_positive_int, shape)):
        return int(shape[0]), int(shape[1])
    raise ValueError(f"{name} must be two positive integers (height, width), got {shape!r}")


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0


def _clip(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _examples(items: Sequence[str], count: int = 3) -> str:
    return ", ".join(repr(i) for i in items[:count])
