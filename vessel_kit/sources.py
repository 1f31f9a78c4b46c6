"""Volume sources: where a (Z, Y, X) volume is read from, one box at a time.

The inference engine and the normalisation statistics never hold a whole volume unless it already
is in memory: they ask a ``VolumeSource`` for the planes or blocks they need, so a chunked zarr or
dask volume, or a folder of TIFF slices, is read only where it is used.

- ``ArraySource`` wraps any array-like (numpy, ``np.memmap``, zarr, dask, h5py); numpy reads are
  views, so in-memory volumes cost nothing.
- ``TiffStackSource`` reads the Kaggle layout (one TIFF per slice) lazily: a region reads only its
  slices, and from uncompressed files only its rows.
- ``as_source`` turns what a user passes into a source (a zarr or N5 folder through
  ``ome_zarr.open_volume``); ``read_planes`` and ``iter_slabs`` read planes along any axis with
  edge-replicated neighbours (the 2.5D channels, the 3D context); ``read_box`` and ``iter_slices``
  read any lazy array (masks included) a box or a Z slice at a time.

Sources may also carry ``chunks``: their natural read unit (a zarr chunk, a dask chunk, one TIFF
slice), or None when any box is equally cheap; ``normalize`` aligns its sample to it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from .regions import check_region
from .volume import read_slice_header, read_slices, slice_files

Region3 = tuple[slice, slice, slice]
Chunks = tuple[int, int, int]

__all__ = [
    "ArraySource", "Slab", "TiffStackSource", "VolumeSource", "as_source", "iter_slabs", "iter_slices", "read_box",
    "read_planes",
]
SLAB_BYTES = 256 * 2**20  # iter_slices reads at most this much at a time


@runtime_checkable
class VolumeSource(Protocol):
    """A (Z, Y, X) volume that hands out boxes on request.

    ``read(region)`` takes one step-1 ``slice`` per axis inside ``shape`` (``regions.check_region``
    checks it) and returns that box as a numpy array of ``dtype``. ``slice_ids`` are the ids of the
    Z slices (the submission's), when the volume has them.

    Example:
        >>> source = as_source(np.zeros((4, 8, 8), np.uint16))
        >>> isinstance(source, VolumeSource), source.read((slice(1, 3), slice(None), slice(None))).shape
        (True, (2, 8, 8))
    """

    shape: tuple[int, int, int]
    dtype: np.dtype
    voxel_size_um: float | None
    slice_ids: list[str] | None

    def read(self, region: Region3) -> np.ndarray: ...


class ArraySource:
    """Any 3-D array-like with ``shape``, ``dtype`` and ``__getitem__`` as a ``VolumeSource``.

    numpy arrays and memmaps are read as views (no copy); zarr and h5py read only the chunks a box
    touches; a dask block is computed (anything whose read result has ``.compute()``).

    Example:
        >>> source = ArraySource(np.zeros((4, 8, 8), np.uint16), voxel_size_um=50.0)
        >>> source.read((slice(0, 2), slice(None), slice(2, 6))).shape
        (2, 8, 4)
    """

    def __init__(
        self, array: Any, *, voxel_size_um: float | None = None, slice_ids: Sequence[str] | None = None
    ) -> None:
        if not all(hasattr(array, name) for name in ("shape", "dtype", "__getitem__")):
            raise TypeError(
                f"ArraySource needs an array-like with shape, dtype and [] indexing, got {type(array).__name__}"
            )
        self.array = array
        shape = tuple(int(n) for n in array.shape)
        if len(shape) != 3 or 0 in shape:
            raise ValueError(f"ArraySource needs a non-empty (Z, Y, X) array, got shape {shape}")
        self.shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self.dtype = _check_dtype(np.dtype(array.dtype), "ArraySource")
        self.voxel_size_um = _check_voxel_size(voxel_size_um)
        self.slice_ids = None if slice_ids is None else [str(s) for s in slice_ids]
        if self.slice_ids is not None and len(self.slice_ids) != self.shape[0]:
            raise ValueError(
                f"ArraySource: {len(self.slice_ids)} slice_ids for {self.shape[0]} Z slices (shape {self.shape})"
            )
        self.chunks = _chunk_shape(array)

    def read(self, region: Region3) -> np.ndarray:
        """The box ``region`` as a numpy array: a view for numpy input, computed for dask."""
        return read_box(self.array, check_region(region, self.shape))

    def __repr__(self) -> str:
        return f"ArraySource({type(self.array).__name__}, shape={self.shape}, dtype={self.dtype})"


class TiffStackSource:
    """A folder of one-slice TIFFs (the Kaggle layout) as a lazy ``VolumeSource``.

    Only the first slice's header is read up front (shape, dtype); ``read`` opens only the slices in
    the region's Z range, checks each is the volume's shape and dtype, and from uncompressed files
    reads only the region's rows. ``slice_ids`` are the file stems, in natural order.

    Example:
        >>> source = TiffStackSource("kidney_5/images", voxel_size_um=50.16)  # doctest: +SKIP
        >>> xz_planes = source.read((slice(None), slice(100, 103), slice(None)))  # doctest: +SKIP
    """

    def __init__(self, images_dir: str | os.PathLike, *, voxel_size_um: float | None = None) -> None:
        self.images_dir = Path(images_dir)
        self.files = slice_files(images_dir)
        (height, width), dtype = read_slice_header(self.files[0])
        self.shape: tuple[int, int, int] = (len(self.files), height, width)
        self.dtype = _check_dtype(dtype, str(self.files[0]))
        self.voxel_size_um = _check_voxel_size(voxel_size_um)
        self.slice_ids = [path.stem for path in self.files]
        self.chunks: Chunks = (1, height, width)

    def read(self, region: Region3) -> np.ndarray:
        """The box ``region``, read from its slices' files only."""
        z, y, x = check_region(region, self.shape)
        return read_slices(self.files[z], self.shape[1:], self.dtype, crop=(y, x))

    def __repr__(self) -> str:
        return f"TiffStackSource({str(self.images_dir)!r}, shape={self.shape}, dtype={self.dtype})"


def as_source(obj: Any, *, voxel_size_um: float | None = None) -> VolumeSource:
    """``obj`` as a ``VolumeSource``: a source passes through, a zarr or N5 folder is opened by
    ``ome_zarr.open_volume``, another folder path becomes a ``TiffStackSource``, an array-like
    (numpy, memmap, zarr, dask: never loaded whole) an ``ArraySource``.

    Raises:
        TypeError: anything else, naming its type.
        ValueError: a source that carries a different ``voxel_size_um`` than the one given.
    """
    if isinstance(obj, VolumeSource):
        if voxel_size_um is not None and obj.voxel_size_um != voxel_size_um:
            raise ValueError(
                f"{obj!r} has voxel_size_um={obj.voxel_size_um}, but voxel_size_um={voxel_size_um} was given"
            )
        return obj
    if isinstance(obj, (str, os.PathLike)):
        from .ome_zarr import is_volume_store, open_volume

        if is_volume_store(obj):
            return open_volume(obj, voxel_size_um=voxel_size_um)
        return TiffStackSource(obj, voxel_size_um=voxel_size_um)
    if all(hasattr(obj, name) for name in ("shape", "dtype", "__getitem__")):
        return ArraySource(obj, voxel_size_um=voxel_size_um)
    raise TypeError(
        f"cannot read a volume from a {type(obj).__name__}: pass a VolumeSource, a folder of TIFF slices, "
        "or a (Z, Y, X) array-like (numpy, memmap, zarr, dask)"
    )


class Slab(NamedTuple):
    """Planes ``[start, stop)`` along an axis and their ``halo`` neighbours: ``block[k]`` is plane
    ``start - halo + k`` (see ``read_planes``).

    Example::

        for slab in iter_slabs(source, axis=1, size=8, halo=1):  # xz planes, 3 channels each
            planes = slab.block[1:-1]
    """

    start: int
    stop: int
    block: np.ndarray


def read_planes(source: VolumeSource, axis: int, start: int, stop: int, halo: int = 0) -> np.ndarray:
    """Planes ``[start - halo, stop + halo)`` of ``source`` along ``axis``, in one read, planes first.

    ``block[k]`` is plane ``start - halo + k`` oriented as ``np.moveaxis(volume, axis, 0)[...]``
    ((Y, X) planes for axis 0, (Z, X) for 1, (Z, Y) for 2). Planes beyond the volume repeat its edge
    plane, as the 2.5D neighbour channels want; away from the edges a numpy source's block is a view.

    Raises:
        ValueError: an axis outside 0-2, a negative halo, or ``[start, stop)`` not inside the axis.
    """
    _check_axis(axis, halo)
    count = source.shape[axis]
    lo, hi = max(0, start - halo), min(count, stop + halo)
    region = [slice(None)] * 3
    region[axis] = slice(start, stop)
    check_region(tuple(region), source.shape)  # the core planes must lie inside the volume
    region[axis] = slice(lo, hi)
    block = np.moveaxis(source.read(tuple(region)), axis, 0)
    if (lo, hi) == (start - halo, stop + halo):
        return block
    return block[np.clip(np.arange(start - halo, stop + halo), 0, count - 1) - lo]


def iter_slabs(source: VolumeSource, axis: int, size: int, halo: int = 0) -> Iterator[Slab]:
    """Consecutive slabs of ``size`` planes along ``axis`` (the last may be thinner), each read once
    with ``halo`` edge-replicated neighbour planes on both sides (see ``read_planes``).

    Raises:
        ValueError: ``size < 1``, or a bad axis or halo (checked here, before the first read).
    """
    _check_axis(axis, halo)
    if size < 1:
        raise ValueError(f"iter_slabs needs size >= 1, got {size}")
    count = source.shape[axis]
    bounds = ((start, min(count, start + size)) for start in range(0, count, size))
    return (Slab(start, stop, read_planes(source, axis, start, stop, halo)) for start, stop in bounds)


def read_box(volume: Any, region: tuple[slice, ...]) -> np.ndarray:
    """The box ``region`` of a ``VolumeSource`` or any array-like (numpy, zarr, h5py, dask: a dask
    box is computed) as a numpy array; a numpy box is a view."""
    if isinstance(volume, VolumeSource):
        return volume.read(region)
    block = volume[tuple(region)]
    compute = getattr(block, "compute", None)
    return np.asarray(compute() if callable(compute) else block)


def iter_slices(volume: Any, *, max_bytes: int = SLAB_BYTES) -> Iterator[np.ndarray]:
    """The Z slices of a (Z, Y, X) ``VolumeSource`` or array-like, in order, read in slabs.

    A slab is as many slices as fit in ``max_bytes``, never crossing a Z chunk boundary, so a
    chunked (zarr, dask) volume decodes each chunk once when a chunk's slab fits, and memory stays
    bounded when it doesn't.
    """
    depth, height, width = (int(n) for n in volume.shape)
    plane_bytes = height * width * np.dtype(volume.dtype).itemsize
    chunk = getattr(volume, "chunks", None) if isinstance(volume, VolumeSource) else _chunk_shape(volume)
    chunk_depth = chunk[0] if chunk else depth
    size = max(1, min(chunk_depth, max_bytes // max(plane_bytes, 1)))
    start = 0
    while start < depth:
        stop = min(start + size, (start // chunk_depth + 1) * chunk_depth, depth)
        yield from read_box(volume, (slice(start, stop), slice(0, height), slice(0, width)))
        start = stop


def _check_axis(axis: int, halo: int) -> None:
    if axis not in (0, 1, 2) or halo < 0:
        raise ValueError(f"planes need axis in (0, 1, 2) and halo >= 0, got axis={axis}, halo={halo}")


def _check_dtype(dtype: np.dtype, owner: str) -> np.dtype:
    if dtype.kind not in "uif":
        raise ValueError(f"{owner}: expected a numeric image volume, got dtype {dtype} (integers and floats only)")
    return dtype


def _check_voxel_size(voxel_size_um: float | None) -> float | None:
    if voxel_size_um is not None and not (math.isfinite(voxel_size_um) and voxel_size_um > 0):
        raise ValueError(f"voxel_size_um must be a positive number of micrometres or None, got {voxel_size_um}")
    return None if voxel_size_um is None else float(voxel_size_um)


def _chunk_shape(array: Any) -> Chunks | None:
    """The array's chunk shape: dask's ``chunksize``, zarr's or h5py's ``chunks``; None if it has none."""
    chunks = getattr(array, "chunksize", None) or getattr(array, "chunks", None)
    if isinstance(chunks, tuple) and len(chunks) == 3 and all(isinstance(n, (int, np.integer)) for n in chunks):
        return tuple(int(n) for n in chunks)  # type: ignore[return-value]
    return None
