"""A small N5 reader: one dataset as a lazy array that reads only the blocks a box touches.

zarr 3 has no N5 store, and ``tensorstore`` or zarr 2 are heavy to add for reading, so this reads
the format itself (the N5 specification, github.com/saalfeldlab/n5): a dataset is a folder with an
``attributes.json`` (``dimensions``, ``blockSize``, ``dataType``, ``compression``) and one file
per block at ``<ix>/<iy>/<iz>``. Dimensions are listed fastest first (x, y, z), so the numpy shape
is their reverse. A block file is a big-endian header (uint16 mode, uint16 ndim, ndim uint32
sizes, plus a uint32 element count in mode 1) and the compressed big-endian values; edge blocks may
be smaller than ``blockSize``, and a missing block reads as zeros.

Compressions: raw, gzip (and its zlib variant), bzip2 and xz from the standard library; blosc and
zstd through ``numcodecs`` (zarr's codec package, in the ``scale`` extra).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import struct
import zlib
from collections.abc import Callable
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["N5Array", "is_n5", "read_attributes"]

COMPRESSIONS = ("raw", "gzip", "bzip2", "xz", "blosc", "zstd")


def is_n5(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an N5 container, group or dataset (a folder with ``attributes.json``)."""
    return (Path(path) / "attributes.json").is_file()


def read_attributes(path: str | os.PathLike) -> dict[str, Any]:
    """The ``attributes.json`` of an N5 folder ({} when it has none); a ValueError names a broken one."""
    file = Path(path) / "attributes.json"
    if not file.is_file():
        return {}
    try:
        attributes = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(attributes, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(attributes).__name__}")
    return attributes


class N5Array:
    """One N5 dataset as a read-only array: ``shape`` and ``chunks`` in numpy (C) order, native
    ``dtype``, and ``array[box]`` with step-1 slices reading only the blocks the box touches.

    Example:
        >>> volume = N5Array("organ.n5/s2")  # doctest: +SKIP
        >>> volume[100:164, :, 500:600].shape  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.attrs = read_attributes(self.path)
        missing = [key for key in ("dimensions", "blockSize", "dataType") if key not in self.attrs]
        if missing:
            raise ValueError(f"{self.path} is not an N5 dataset: its attributes.json lacks {', '.join(missing)}")
        self.shape: tuple[int, ...] = tuple(int(n) for n in reversed(self.attrs["dimensions"]))
        self.chunks: tuple[int, ...] = tuple(int(n) for n in reversed(self.attrs["blockSize"]))
        try:
            self.dtype = np.dtype(self.attrs["dataType"])
        except TypeError:
            raise ValueError(f"{self.path}: unknown N5 dataType {self.attrs['dataType']!r}") from None
        self._decompress = _decompressor(self.attrs, self.path)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, box: tuple[slice, ...]) -> np.ndarray:
        """The box (one step-1 slice per axis; None bounds allowed) as a native-order numpy array."""
        if not isinstance(box, tuple) or len(box) != self.ndim or not all(isinstance(s, slice) for s in box):
            raise IndexError(f"{self.path}: index with {self.ndim} slices, got {box!r}")
        bounds = [s.indices(n) for s, n in zip(box, self.shape, strict=True)]
        if any(step != 1 for _, _, step in bounds):
            raise IndexError(f"{self.path}: only step-1 slices are supported, got {box!r}")
        out = np.zeros([max(0, stop - start) for start, stop, _ in bounds], dtype=self.dtype)
        if out.size == 0:
            return out
        spans = [range(start // c, (stop - 1) // c + 1) for (start, stop, _), c in zip(bounds, self.chunks, strict=True)]
        for index in product(*spans):
            block = self.read_block(index)
            if block is None:
                continue  # a missing block is all zeros
            origin = [i * c for i, c in zip(index, self.chunks, strict=True)]
            src, dst = [], []
            for (start, stop, _), o, n in zip(bounds, origin, block.shape, strict=True):
                lo, hi = max(start, o), min(stop, o + n)
                src.append(slice(lo - o, hi - o))
                dst.append(slice(lo - start, hi - start))
            out[tuple(dst)] = block[tuple(src)]
        return out

    def read_block(self, index: tuple[int, ...]) -> np.ndarray | None:
        """Block ``index`` (its grid position, numpy order) as an array, or None when its file is missing.

        Raises:
            ValueError: a block file that cannot be decoded, naming it and the block.
        """
        file = self.path.joinpath(*(str(i) for i in reversed(index)))
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return self._decode(raw)
        except Exception as error:  # zlib, blosc, struct or reshape errors all mean a broken block
            raise ValueError(
                f"{self.path}: cannot decode block {index} (file {file}): {type(error).__name__}: {error}; "
                "the block is corrupt or truncated: download or write it again"
            ) from error

    def _decode(self, raw: bytes) -> np.ndarray:
        mode, ndim = struct.unpack(">HH", raw[:4])
        if mode not in (0, 1) or ndim != self.ndim:
            raise ValueError(f"block header has mode {mode} and {ndim} dimensions (expected mode 0 or 1, {self.ndim})")
        sizes = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        offset = 4 + 4 * ndim + (4 if mode == 1 else 0)
        count = int(np.prod(sizes))
        values = np.frombuffer(self._decompress(raw[offset:]), dtype=self.dtype.newbyteorder(">"), count=count)
        return values.reshape(tuple(reversed(sizes))).astype(self.dtype)

    def __repr__(self) -> str:
        return f"N5Array({str(self.path)!r}, shape={self.shape}, chunks={self.chunks}, dtype={self.dtype})"


def _decompressor(attrs: dict[str, Any], path: Path) -> Callable[[bytes], Any]:
    """The decompression function of a dataset's ``compression`` (or old ``compressionType``)."""
    compression = attrs.get("compression", {"type": attrs.get("compressionType", "raw")})
    kind = compression.get("type") if isinstance(compression, dict) else None
    if kind == "raw":
        return bytes
    if kind == "gzip":
        return zlib.decompress if compression.get("useZlib") else gzip.decompress
    if kind == "bzip2":
        return bz2.decompress
    if kind == "xz":
        return lzma.decompress
    if kind in ("blosc", "zstd"):
        try:
            from numcodecs import Blosc, Zstd
        except ImportError:
            raise ImportError(f"{path} is {kind}-compressed: install numcodecs (pip install 'vessel_kit[scale]')") from None
        return (Blosc() if kind == "blosc" else Zstd()).decode  # picklable, for dask workers
    raise ValueError(f"{path}: unsupported N5 compression {compression!r}; supported: {', '.join(COMPRESSIONS)}")
