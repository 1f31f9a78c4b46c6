"""TIFF slice stacks <-> (Z, Y, X) arrays.

The competition ships one uncompressed, single-strip, little-endian TIFF per slice. For those files
``read_volume`` reads the pixel bytes straight into the output array with ``os.preadv`` (no
intermediate copy, no decoder), in parallel threads; any other TIFF goes through tifffile's
decoder. ``benchmarks/bench_io.py`` measures it against a ``cv2.imread`` loop. ``read_slices``,
under it, reads a (rows, cols) crop of some slices for lazy volume sources: from uncompressed
files, only the crop's rows.

Every slice's header is checked before its pixels are read (and the first slice's before the
volume is allocated): one 2D grayscale image per file, and pixel data that lies inside the file.
A corrupt or odd file is a ``ValueError`` naming it, never an exception from deep in tifffile.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile
from tqdm.auto import tqdm

from .atomic import atomic_output
from .folders import list_folder, path_kind
from .regions import Region, check_region, region_shape

PathLike = str | os.PathLike
SliceSource = PathLike | Sequence[PathLike]
SliceSelection = slice | Sequence[int] | None

TIFF_SUFFIXES = (".tif", ".tiff")
LABEL_VALUES = (0, 1, 255)

__all__ = [
    "read_labels",
    "read_slice_header",
    "read_slices",
    "read_volume",
    "slice_files",
    "slice_ids",
    "write_volume",
]


def slice_files(images_dir: PathLike) -> list[Path]:
    """The TIFF files of a slice folder, in natural order of their stems (``2`` before ``10``).

    Sub-folders are not slices, even when named like one. Warns (``UserWarning``) when numeric
    stems skip numbers: real scans may have gaps, but a missing file usually means a bad copy.

    Raises:
        FileNotFoundError: a missing folder, or one without TIFFs.
        ValueError: an unreadable folder; a TIFF name that is a dangling link, a link loop or a
            device; two files with the same stem (``0001.tif`` and ``0001.tiff``).
    """
    folder = Path(images_dir)
    names = [p for p in list_folder(folder, "slice folder") if p.suffix.lower() in TIFF_SUFFIXES]
    files = sorted((p for p in names if path_kind(p) == "file"), key=lambda p: _natural_key(p.stem))
    if not files:
        raise FileNotFoundError(f"no .tif/.tiff files in {folder}")
    _check_unique_stems(folder, files)
    _warn_numbering_gaps(folder, [p.stem for p in files])
    return files


def slice_ids(images_dir: PathLike) -> list[str]:
    """The file stems of a slice folder in slice order: the ids the submission uses."""
    return [p.stem for p in slice_files(images_dir)]


def read_slice_header(path: PathLike) -> tuple[tuple[int, int], np.dtype]:
    """(shape, dtype) of a single-slice TIFF, read from its header only.

    Raises ValueError naming the file when it is not a readable TIFF, holds no image or several,
    is not 2D grayscale, or declares pixel data beyond the end of the file.
    """
    with _open_slice(Path(path)) as (_, page):
        return page.shape, np.dtype(page.dtype)


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
        ValueError: unreadable or corrupt file, non-2D slice, a header declaring more pixel data
            than its file holds, mixed shapes or dtypes, wrong dtype, or an ``out`` array of the
            wrong shape/dtype — each naming the file and the problem.
    """
    files = _select(_resolve_files(source), slices)
    shape, file_dtype = read_slice_header(files[0])
    if dtype is not None and file_dtype != np.dtype(dtype):
        raise ValueError(
            f"{files[0]}: slices are {file_dtype}, expected {np.dtype(dtype)} "
            "(pass dtype=None to accept the files' own dtype)"
        )
    return read_slices(files, shape, file_dtype, out=out, workers=workers, progress=progress)


def read_slices(
    files: Sequence[Path],
    shape: tuple[int, int],
    dtype: np.dtype,
    *,
    crop: tuple[slice, slice] | None = None,
    out: np.ndarray | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Read the (rows, cols) ``crop`` of each of ``files`` into a (len(files), rows, cols) array.

    The lazy reader under ``read_volume`` and ``sources.TiffStackSource``: every file is checked to
    be a ``shape`` ``dtype`` slice (the volume's), and uncompressed slices read only the crop's rows,
    so a few rows of every slice cost a few rows. ``crop`` (default: whole slices) takes step-1
    slices inside ``shape``; ``out``, ``workers`` and ``progress`` are as in ``read_volume``.

    Raises:
        ValueError: a crop outside ``shape`` (see ``regions.check_region``), an ``out`` of the wrong
            shape/dtype, or a file that is unreadable, corrupt or not a ``shape`` ``dtype`` slice.
    """
    box = check_region(crop or (slice(None), slice(None)), shape)
    volume_shape = (len(files), *region_shape(box))
    if out is None:
        out = np.empty(volume_shape, dtype=dtype)
    elif out.shape != volume_shape or out.dtype != dtype:
        raise ValueError(f"out has shape {out.shape} {out.dtype}, need {volume_shape} {dtype}")

    def read_one(index: int) -> None:
        _read_slice_into(Path(files[index]), out[index], shape, box)

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


def _read_slice_into(path: Path, target: np.ndarray, shape: tuple[int, int], box: Region) -> None:
    """Read the ``box`` (rows, cols) of one slice into ``target``, checking the slice is ``shape`` and
    ``target.dtype`` like the volume's. Uncompressed native-order slices read only the box's rows."""
    rows, cols = box
    with _open_slice(path) as (tif, page):
        if page.shape != shape or np.dtype(page.dtype) != target.dtype:
            raise ValueError(
                f"{path}: slice is {page.shape} {page.dtype}, but the volume's slices "
                f"are {shape} {target.dtype} (mixed slice shapes or dtypes)"
            )
        if not _is_raw(page):
            with _naming_errors(path):
                target[...] = page.asarray()[rows, cols]
            return
        full_rows = target.flags.c_contiguous and target.shape[1] == shape[1]
        band = target if full_rows else np.empty((rows.stop - rows.start, shape[1]), target.dtype)
        _pread_into(path, tif, page.dataoffsets[0] + rows.start * band.strides[0], band)
        if band is not target:
            target[...] = band[:, cols]


@contextmanager
def _open_slice(path: Path) -> Iterator[tuple[tifffile.TiffFile, tifffile.TiffPage]]:
    """The open TIFF at ``path`` and its one page, after ``_check_page``."""
    with _naming_errors(path):
        tif = tifffile.TiffFile(path)
    with tif:
        with _naming_errors(path):
            count = len(tif.pages)
            page = tif.pages[0] if count else None
        _check_page(path, page, count, tif.filehandle.size)
        yield tif, page


def _check_page(path: Path, page: tifffile.TiffPage | None, count: int, file_size: int) -> None:
    """ValueError naming ``path`` unless it holds exactly one 2D grayscale image inside the file."""
    if page is None:
        raise ValueError(f"{path}: the TIFF holds no image")
    if count > 1:
        raise ValueError(f"{path}: the TIFF holds {count} images; expected one 2D slice per file")
    separate_samples, depth, _, _, contig_samples = page.shaped
    if separate_samples * depth * contig_samples != 1:
        raise ValueError(f"{path}: expected a 2D grayscale slice, got shape {page.shape}")
    if page.dtype is None:
        raise ValueError(
            f"{path}: unsupported pixel format ({page.bitspersample} bits, sample format {page.sampleformat})"
        )
    _check_pixel_extent(path, page, file_size)


def _check_pixel_extent(path: Path, page: tifffile.TiffPage, file_size: int) -> None:
    """ValueError naming ``path`` when its header places pixel data beyond the end of the file.

    Checked from the header alone, before any buffer is sized from it: every strip (or tile) must
    end inside the file, and uncompressed strips must hold the whole declared image. (Compressed
    strips can decode to any size; their decoder reports a short stream.)
    """
    spans = [(offset, count) for offset, count in zip(page.dataoffsets, page.databytecounts) if count]
    end = max((offset + count for offset, count in spans), default=0)
    if end > file_size:
        raise ValueError(
            f"{path}: header places pixel data up to byte {end}, but the file has {file_size} bytes "
            "(truncated or corrupt file)"
        )
    stored = sum(count for _, count in spans)
    if page.compression == 1 and stored < page.nbytes:
        raise ValueError(
            f"{path}: header declares a {page.shape} {page.dtype} image ({page.nbytes} bytes), but its "
            f"strips hold {stored} bytes (corrupt header)"
        )


@contextmanager
def _naming_errors(path: Path) -> Iterator[None]:
    """Re-raise what tifffile, a decoder or the OS raise while reading ``path`` as a ValueError naming it."""
    try:
        yield
    except Exception as error:  # decoders raise anything: zlib.error, IndexError, ValueError, ...
        raise ValueError(f"cannot read TIFF {path}: {error or type(error).__name__}") from error


def _is_raw(page: tifffile.TiffPage) -> bool:
    """Whether a page's pixel bytes can be copied verbatim: contiguous, uncompressed, native order."""
    dtype = np.dtype(page.dtype)
    return page.is_final and dtype.newbyteorder(page.parent.byteorder) == dtype


def _pread_into(path: Path, tif: tifffile.TiffFile, offset: int, target: np.ndarray) -> None:
    """Read ``target.nbytes`` bytes at ``offset`` straight into ``target`` (no intermediate copy)."""
    with _naming_errors(path):
        read = os.preadv(tif.filehandle.fileno(), [memoryview(target).cast("B")], offset)
    if read != target.nbytes:  # the file shrank after its header was checked
        raise ValueError(f"{path}: file is truncated ({read} of {target.nbytes} pixel bytes)")


def _resolve_files(source: SliceSource) -> list[Path]:
    """The slice files of a folder (``slice_files``) or of an explicit list, each checked to be a file."""
    if isinstance(source, (str, os.PathLike)):
        return slice_files(source)
    files = [Path(p) for p in source]
    if not files:
        raise ValueError("no slice files given")
    kinds = [path_kind(p) for p in files]  # a broken link is a ValueError naming it
    missing = [p for p, kind in zip(files, kinds) if kind is None]
    if missing:
        raise FileNotFoundError(f"{len(missing)} slice files do not exist, e.g. {missing[0]}")
    folders = [p for p, kind in zip(files, kinds) if kind == "folder"]
    if folders:
        raise ValueError(f"{folders[0]} is a folder, not a slice file")
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
    return tuple(int(part) if part.isdecimal() else part for part in re.split(r"(\d+)", stem))


def _check_unique_stems(folder: Path, files: list[Path]) -> None:
    """ValueError when two files share a stem (``0001.tif``, ``0001.tiff``): one id, two slices."""
    by_stem: dict[str, Path] = {}
    for path in files:
        first = by_stem.setdefault(path.stem, path)
        if first is not path:
            raise ValueError(f"{folder}: {first.name} and {path.name} are both slice {path.stem!r}")


def _warn_numbering_gaps(folder: Path, stems: list[str]) -> None:
    """Warn, naming ``folder`` and the missing numbers, when all-numeric stems skip numbers."""
    if not all(stem.isascii() and stem.isdigit() for stem in stems):
        return
    numbers = [int(stem) for stem in stems]
    gaps = [(low + 1, high - 1) for low, high in zip(numbers, numbers[1:]) if high - low > 1]
    if not gaps:
        return
    width = len(stems[0])
    spans = [f"{a:0{width}d}" if a == b else f"{a:0{width}d}-{b:0{width}d}" for a, b in gaps]
    missing = sum(b - a + 1 for a, b in gaps)
    shown = ", ".join(spans[:10]) + (f", ... ({len(spans) - 10} more gaps)" if len(spans) > 10 else "")
    warnings.warn(f"{folder}: slice numbers skip {shown} ({missing} missing)", stacklevel=3)
