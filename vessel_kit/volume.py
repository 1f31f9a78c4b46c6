"""TIFF slice stacks <-> (Z, Y, X) arrays.

The competition ships one uncompressed, single-strip, little-endian TIFF per slice. For those files
``read_volume`` reads the pixel bytes straight into the output array with ``os.preadv`` (no
intermediate copy, no decoder), in parallel threads; any other TIFF goes through tifffile's
decoder. ``benchmarks/bench_io.py`` measures it against a ``cv2.imread`` loop.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
from tqdm.auto import tqdm

from .atomic import atomic_output

PathLike = str | os.PathLike
SliceSource = PathLike | Sequence[PathLike]
SliceSelection = slice | Sequence[int] | None

TIFF_SUFFIXES = (".tif", ".tiff")
LABEL_VALUES = (0, 1, 255)

__all__ = [
    "read_labels",
    "read_slice_header",
    "read_volume",
    "slice_files",
    "slice_ids",
    "write_volume",
]


def slice_files(images_dir: PathLike) -> list[Path]:
    """The TIFF files of a slice folder, in natural order of their stems (``2`` before ``10``)."""
    folder = Path(images_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"slice folder {folder} does not exist")
    files = [p for p in folder.iterdir() if p.suffix.lower() in TIFF_SUFFIXES and p.is_file()]
    if not files:
        raise FileNotFoundError(f"no .tif/.tiff files in {folder}")
    return sorted(files, key=lambda p: _natural_key(p.stem))


def slice_ids(images_dir: PathLike) -> list[str]:
    """The file stems of a slice folder in slice order: the ids the submission uses."""
    return [p.stem for p in slice_files(images_dir)]


def read_slice_header(path: PathLike) -> tuple[tuple[int, int], np.dtype]:
    """(shape, dtype) of a single-slice TIFF, read from its header only."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return tuple(page.shape), np.dtype(page.dtype)
    except (OSError, ValueError, tifffile.TiffFileError) as error:
        raise ValueError(f"cannot read TIFF {path}: {error}") from error


def read_volume(
    source: SliceSource,
    *,
    slices: SliceSelection = None,
    workers: int | None = None,
    dtype: np.dtype | type | None = np.uint16,
    out: np.ndarray | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Read a stack of 2D TIFF slices into a (Z, Y, X) array.

    Args:
        source: a folder of slices (sorted by numeric stem) or an explicit sequence of files.
        slices: a ``slice`` or sequence of indices into the sorted files; None reads all.
        workers: reader threads (default: ``min(8, cpu_count + 2)``; reads are I/O bound).
        dtype: the dtype every file must have (uint16 for competition images); None accepts the
            files' own dtype as long as all agree.
        out: optional preallocated (Z, Y, X) array, e.g. a ``np.memmap`` for volumes larger
            than memory.
        progress: show a tqdm bar when reading takes more than a couple of seconds.

    Raises:
        FileNotFoundError: missing folder, or no TIFFs in it.
        ValueError: unreadable file, non-2D slice, mixed shapes or dtypes, wrong dtype, or an
            ``out`` array of the wrong shape/dtype — each naming the file and the problem.
    """
    files = _select(_resolve_files(source), slices)
    shape, file_dtype = read_slice_header(files[0])
    if len(shape) != 2:
        raise ValueError(f"{files[0]}: expected a 2D grayscale slice, got shape {shape}")
    if dtype is not None and file_dtype != np.dtype(dtype):
        raise ValueError(
            f"{files[0]}: slices are {file_dtype}, expected {np.dtype(dtype)} "
            "(pass dtype=None to accept the files' own dtype)"
        )
    volume_shape = (len(files), *shape)
    if out is None:
        out = np.empty(volume_shape, dtype=file_dtype)
    elif out.shape != volume_shape or out.dtype != file_dtype:
        raise ValueError(f"out has shape {out.shape} {out.dtype}, need {volume_shape} {file_dtype}")

    def read_one(index: int) -> None:
        _read_slice_into(files[index], out[index])

    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = pool.map(read_one, range(len(files)))
        for _ in tqdm(done, total=len(files), desc="read", unit="slice", delay=2, disable=not progress):
            pass
    return out


def read_labels(
    source: SliceSource,
    *,
    slices: SliceSelection = None,
    workers: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Read a stack of uint8 label slices ({0, 255}, or {0, 1}) as a bool (Z, Y, X) array.

    Raises ValueError for non-uint8 files or values outside {0, 1, 255} (e.g. an image folder
    passed by mistake), naming the file.
    """
    files = _select(_resolve_files(source), slices)
    labels = read_volume(files, workers=workers, dtype=np.uint8, progress=progress)
    invalid = np.ones(256, dtype=np.bool_)
    invalid[list(LABEL_VALUES)] = False
    for index, label_slice in enumerate(labels):
        if invalid[label_slice].any():
            values = np.unique(label_slice)
            raise ValueError(
                f"{files[index]}: label values must be in {LABEL_VALUES}, found {values[:10].tolist()}"
            )
    # Convert in place: the bool view shares the uint8 buffer, so no second volume is allocated.
    as_bool = labels.view(np.bool_)
    np.not_equal(labels, 0, out=as_bool)
    return as_bool


def write_volume(
    volume: np.ndarray,
    out_dir: PathLike,
    stems: Sequence[str] | None = None,
) -> list[Path]:
    """Write a (Z, Y, X) array as one uncompressed single-strip TIFF per slice, like Kaggle's.

    Stems default to 4-digit slice numbers (``0000.tif``...). Each file is written to a temporary
    name and renamed, so an interrupted write never leaves a truncated slice. Bool volumes are
    written as uint8 {0, 255}, the label convention.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"write_volume expects a (Z, Y, X) array, got shape {volume.shape}")
    if stems is None:
        stems = [f"{i:04d}" for i in range(volume.shape[0])]
    if len(stems) != volume.shape[0]:
        raise ValueError(f"{len(stems)} stems for {volume.shape[0]} slices")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, image in zip(stems, volume, strict=True):
        if image.dtype == np.bool_:
            image = image.view(np.uint8) * np.uint8(255)
        path = folder / f"{stem}.tif"
        with atomic_output(path) as tmp:
            tifffile.imwrite(tmp, image, photometric="minisblack", rowsperstrip=image.shape[0])
        paths.append(path)
    return paths


def _read_slice_into(path: Path, target: np.ndarray) -> None:
    """Read one slice into ``target``, checking its shape and dtype against the volume's."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if tuple(page.shape) != target.shape or np.dtype(page.dtype) != target.dtype:
                raise ValueError(
                    f"{path}: slice is {tuple(page.shape)} {page.dtype}, but the volume's slices "
                    f"are {target.shape} {target.dtype} (mixed slice shapes or dtypes)"
                )
            offset, nbytes = _raw_extent(page)
            if offset is None or not target.flags.c_contiguous:
                page.asarray(out=target)
                return
            if nbytes != target.nbytes:
                raise ValueError(f"{path}: pixel data holds {nbytes} bytes, expected {target.nbytes}")
            fd = tif.filehandle.fileno()
            read = os.preadv(fd, [memoryview(target).cast("B")], offset)
            if read != nbytes:
                raise ValueError(f"{path}: file is truncated ({read} of {nbytes} pixel bytes)")
    except (OSError, tifffile.TiffFileError) as error:
        raise ValueError(f"cannot read TIFF {path}: {error}") from error


def _raw_extent(page: tifffile.TiffPage) -> tuple[int | None, int]:
    """(offset, size) of a page's pixel bytes when they can be copied verbatim, else (None, 0)."""
    dtype = np.dtype(page.dtype)
    native = dtype.newbyteorder(page.parent.byteorder) == dtype
    if not (page.is_final and native):
        return None, 0
    return page.dataoffsets[0], page.nbytes


def _resolve_files(source: SliceSource) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        return slice_files(source)
    files = [Path(p) for p in source]
    if not files:
        raise ValueError("no slice files given")
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} slice files do not exist, e.g. {missing[0]}")
    return files


def _select(files: list[Path], slices: SliceSelection) -> list[Path]:
    if slices is None:
        return files
    if isinstance(slices, slice):
        chosen = files[slices]
    else:
        indices = list(slices)
        bad = [i for i in indices if not -len(files) <= int(i) < len(files)]
        if bad:
            raise ValueError(f"slice indices {bad[:5]} out of range for {len(files)} slices")
        chosen = [files[int(i)] for i in indices]
    if not chosen:
        raise ValueError(f"slice selection {slices!r} selects none of the {len(files)} slices")
    return chosen


def _natural_key(stem: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", stem))
