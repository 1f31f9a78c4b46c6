"""The OME-Zarr output store of a block-wise prediction: mask, optional logits, pyramid, resume record.

Layout (OME-NGFF v0.4 in a zarr v2 store by default, v0.5 in a zarr v3 store with
``ome_version="0.5"``)::

    result.zarr/                  group; attribute "vessel_kit": shape, chunks, voxel size, logits
      mask/                       OME-Zarr image "mask": uint8 0/1, levels 0, 1, ... (2x max per level)
      logits/                     optional OME-Zarr image "logits": float16, levels (2x mean per level)
      .vessel_kit/done/<z>.<y>.<x>  one empty marker per finished block

A block writes whole chunks (its region must be chunk-aligned), so workers writing different
blocks never touch one file; its marker is written (atomically) only after its data, so a rerun
skips exactly the blocks that are complete. ``build_pyramid`` then makes level k (2^k
downsampling) from level k-1 one chunk at a time, never holding a whole level.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator, Sequence
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .atomic import atomic_output
from .regions import check_region

__all__ = ["OME_VERSIONS", "OutputStore", "create_output", "multiscales_metadata"]

OME_VERSIONS = ("0.4", "0.5")
_IMAGES = {"mask": (np.uint8, "max"), "logits": (np.float16, "mean")}  # image -> dtype, 2x2x2 reduction
_DONE = (".vessel_kit", "done")


def create_output(
    path: str | os.PathLike,
    shape: Sequence[int],
    *,
    voxel_size_um: float | None,
    chunks: Sequence[int] = (128, 128, 128),
    logits: bool = False,
    overwrite: bool = False,
    ome_version: str = "0.4",
) -> OutputStore:
    """Create the output store at ``path``, or reopen a compatible one (to resume).

    Args:
        shape: the (Z, Y, X) volume shape; chunks: the chunk shape (clipped to the shape).
        voxel_size_um: written as the OME scale in micrometres (None: scale 1, no unit).
        logits: also store float16 logits.
        overwrite: replace an existing output store (one with other settings included).

    Raises:
        ValueError: a store at ``path`` with another shape, chunks, voxel size, logits or version
            (both named) unless ``overwrite``; a ``path`` that is neither an empty folder nor an
            output store of vessel_kit (never replaced: it may be the input).
    """
    import zarr

    path = Path(path)
    settings = _settings(shape, chunks, voxel_size_um, logits, ome_version)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        existing = _existing_settings(path)
        if existing == settings and not overwrite:
            return OutputStore(path)
        if not overwrite:
            changed = ", ".join(f"{key} {existing.get(key)} (asked {value})" for key, value in settings.items()
                                if existing.get(key) != value)
            raise ValueError(f"output store {path} exists with other settings: {changed}; "
                             "pass overwrite=True (--overwrite) to replace it, or choose another path")
        shutil.rmtree(path)
    root = zarr.open_group(str(path), mode="w", zarr_format=_zarr_format(ome_version))
    root.update_attributes({"vessel_kit": settings})
    for name in ("mask", "logits") if logits else ("mask",):
        image = root.create_group(name)
        _create_level(image, 0, settings["shape"], settings["chunks"], _IMAGES[name][0], ome_version)
        _write_multiscales(image, name, 1, settings)
    return OutputStore(path)


class OutputStore:
    """An output store made by ``create_output``: write blocks, record them done, build the pyramid."""

    def __init__(self, path: str | os.PathLike) -> None:
        import zarr

        self.path = Path(path)
        self.settings = _existing_settings(self.path)
        self.root = zarr.open_group(str(self.path), mode="r+")
        self.shape: tuple[int, int, int] = tuple(self.settings["shape"])
        self.chunks: tuple[int, int, int] = tuple(self.settings["chunks"])
        self.voxel_size_um: float | None = self.settings["voxel_size_um"]
        self.has_logits: bool = self.settings["logits"]

    @property
    def mask(self) -> Any:
        """Level 0 of the mask, a lazy zarr array (uint8, 1 = vessel)."""
        return self.root["mask/0"]

    @property
    def logits(self) -> Any:
        """Level 0 of the float16 logits (a lazy zarr array), or None when the store has none."""
        return self.root["logits/0"] if self.has_logits else None

    def level(self, k: int, image: str = "mask") -> Any:
        """Pyramid level ``k`` of ``image`` ("mask" or "logits"), a lazy zarr array."""
        return self.root[f"{image}/{k}"]

    def write_block(self, region: tuple[slice, slice, slice], mask: np.ndarray, logits: np.ndarray | None = None) -> None:
        """Write one chunk-aligned block: ``mask`` (nonzero = vessel) and, when the store has them, ``logits``.

        Raises:
            ValueError: a region outside the volume or not on chunk boundaries (its end may be
                the volume's edge), arrays of another shape than the region, logits given to a
                store without them or missing for a store with them.
        """
        region = check_region(region, self.shape)
        misaligned = [(s.start, s.stop, c) for s, c, n in zip(region, self.chunks, self.shape)
                      if s.start % c or (s.stop % c and s.stop != n)]
        if misaligned:
            raise ValueError(f"{self.path}: block {_box(region)} is not aligned to the chunks {self.chunks} "
                             f"(starts and ends must be multiples of them, or end at the volume's edge {self.shape})")
        if (logits is None) == self.has_logits:
            raise ValueError(f"{self.path}: the store {'has' if self.has_logits else 'has no'} logits; "
                             f"write_block got {'none' if logits is None else 'logits'}")
        size = tuple(s.stop - s.start for s in region)
        for name, array in (("mask", mask), ("logits", logits)):
            if array is not None and tuple(np.shape(array)) != size:
                raise ValueError(f"{self.path}: {name} of shape {np.shape(array)} for block {_box(region)} of shape {size}")
        self.mask[region] = np.not_equal(mask, 0).astype(np.uint8)
        if logits is not None:
            self.logits[region] = np.asarray(logits, dtype=np.float16)

    def mark_done(self, block_id: Sequence[int]) -> None:
        """Record block ``block_id`` (its grid index) as written, with an atomically written marker."""
        folder = self.path.joinpath(*_DONE)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_output(folder / _block_name(block_id)) as tmp:
            tmp.write_bytes(b"")

    def done_blocks(self) -> set[tuple[int, ...]]:
        """The grid indices of the blocks recorded done."""
        folder = self.path.joinpath(*_DONE)
        if not folder.is_dir():
            return set()
        names = (p.name.split(".") for p in folder.iterdir() if not p.name.startswith("."))
        return {tuple(int(i) for i in parts) for parts in names if all(i.isdigit() for i in parts)}

    def build_pyramid(self, levels: int | None = None, progress: bool = True) -> int:
        """Build levels 1..``levels`` of every image from level 0 (default: until a level fits in one
        chunk), chunk by chunk, and list them in the OME metadata; returns the number of levels made."""
        shapes = _level_shapes(self.shape, self.chunks, levels)
        images = ["mask", "logits"] if self.has_logits else ["mask"]
        work = sum(_chunk_count(s, self.chunks) for s in shapes[1:]) * len(images)
        with tqdm(total=work, desc="pyramid", unit="chunk", disable=not progress) as bar:
            for name in images:
                dtype, reduce = _IMAGES[name]
                group = self.root[name]
                for k in range(1, len(shapes)):
                    source = group[str(k - 1)]
                    target = _create_level(group, k, shapes[k], self.chunks, dtype, self.settings["ome_version"])
                    for region in _chunk_regions(shapes[k], self.chunks):
                        box = tuple(slice(2 * s.start, min(2 * s.stop, n)) for s, n in zip(region, source.shape))
                        target[region] = _halve(source[box], reduce).astype(dtype)
                        bar.update()
                _write_multiscales(group, name, len(shapes), self.settings)
        return len(shapes) - 1

    def __repr__(self) -> str:
        return f"OutputStore({str(self.path)!r}, shape={self.shape}, chunks={self.chunks}, logits={self.has_logits})"


def multiscales_metadata(name: str, levels: int, voxel_size_um: float | None, reduce: str, ome_version: str) -> dict[str, Any]:
    """One OME-NGFF ``multiscales`` entry: z, y, x axes in micrometres (no unit when the voxel size
    is unknown) and ``levels`` datasets "0", "1", ... of scale 2^k voxels, shifted to the centre
    of the 2^k voxels each one covers."""
    size = 1.0 if voxel_size_um is None else float(voxel_size_um)
    axes = [{"name": a, "type": "space", **({"unit": "micrometer"} if voxel_size_um else {})} for a in "zyx"]
    datasets = []
    for k in range(levels):
        transforms = [{"type": "scale", "scale": [size * 2**k] * 3}]
        if k:
            transforms.append({"type": "translation", "translation": [size * (2**k - 1) / 2] * 3})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    entry = {"name": name, "axes": axes, "datasets": datasets, "type": reduce,
             "metadata": {"method": f"vessel_kit: {reduce} of 2x2x2 voxels per level"}}
    return {"version": ome_version, **entry} if ome_version == "0.4" else entry


# --- helpers -------------------------------------------------------------------------------------


def _settings(shape, chunks, voxel_size_um, logits, ome_version) -> dict[str, Any]:
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"the output shape must be 3 positive sides (Z, Y, X), got {shape}")
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != 3 or min(chunks) < 1:
        raise ValueError(f"chunks must be 3 positive sides (Z, Y, X), got {chunks}")
    if voxel_size_um is not None and not (math.isfinite(voxel_size_um) and voxel_size_um > 0):
        raise ValueError(f"voxel_size_um must be a positive number of micrometres or None, got {voxel_size_um}")
    if ome_version not in OME_VERSIONS:
        raise ValueError(f"ome_version must be one of {OME_VERSIONS}, got {ome_version!r}")
    return {"shape": list(shape), "chunks": [min(c, n) for c, n in zip(chunks, shape)],
            "voxel_size_um": None if voxel_size_um is None else float(voxel_size_um),
            "logits": bool(logits), "ome_version": ome_version}


def _existing_settings(path: Path) -> dict[str, Any]:
    """The vessel_kit settings of the output store at ``path``; a ValueError for anything else
    (a file, a folder, another zarr store: never replaced, it is not ours)."""
    import zarr

    if not path.is_dir() or not any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray")):
        raise ValueError(f"{path} exists and is not a zarr store: choose another output path")
    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception as error:
        raise ValueError(f"{path} is not a readable zarr store ({error}): choose another output path") from error
    settings = node.attrs.get("vessel_kit") if isinstance(node, zarr.Group) else None
    if not settings:
        raise ValueError(f"{path} is a zarr store but not an output store of vessel_kit (no 'vessel_kit' attribute): "
                         "choose another output path")
    return dict(settings)


def _zarr_format(ome_version: str) -> int:
    return 2 if ome_version == "0.4" else 3


def _create_level(group: Any, k: int, shape, chunks, dtype, ome_version: str) -> Any:
    """Array ``k`` of an image group: blosc-zstd chunks, fill 0, overwriting any earlier one."""
    from numcodecs import Blosc

    shuffle = Blosc.BITSHUFFLE if np.dtype(dtype).itemsize == 1 else Blosc.SHUFFLE
    options: dict[str, Any] = {}
    if ome_version == "0.4":
        options.update(compressors=Blosc(cname="zstd", clevel=5, shuffle=shuffle),
                       chunk_key_encoding={"name": "v2", "separator": "/"})
    else:
        from zarr.codecs import BloscCodec

        options.update(compressors=BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle" if shuffle == Blosc.BITSHUFFLE
                                              else "shuffle"), dimension_names=("z", "y", "x"))
    chunks = tuple(min(c, n) for c, n in zip(chunks, shape))
    return group.create_array(str(k), shape=tuple(shape), chunks=chunks, dtype=dtype, fill_value=0, overwrite=True, **options)


def _write_multiscales(group: Any, name: str, levels: int, settings: dict[str, Any]) -> None:
    version = settings["ome_version"]
    entry = multiscales_metadata(name, levels, settings["voxel_size_um"], _IMAGES[name][1], version)
    group.update_attributes({"multiscales": [entry]} if version == "0.4" else {"ome": {"version": version, "multiscales": [entry]}})


def _level_shapes(shape: tuple[int, ...], chunks: tuple[int, ...], levels: int | None) -> list[tuple[int, ...]]:
    """Level 0's shape and each halved one: ``levels`` more, or until a level fits in one chunk."""
    if levels is not None and (not isinstance(levels, int) or levels < 0):
        raise ValueError(f"levels must be a non-negative int or None, got {levels!r}")
    shapes = [tuple(shape)]
    while (len(shapes) <= levels) if levels is not None else any(n > c for n, c in zip(shapes[-1], chunks)):
        if max(shapes[-1]) == 1:
            raise ValueError(f"shape {shape} has no {levels} levels of 2x downsampling (the last is 1 voxel)")
        shapes.append(tuple((n + 1) // 2 for n in shapes[-1]))
    return shapes


def _chunk_regions(shape: Sequence[int], chunks: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    starts = [range(0, n, c) for n, c in zip(shape, chunks)]
    for corner in product(*starts):
        yield tuple(slice(s, min(s + c, n)) for s, c, n in zip(corner, chunks, shape))


def _chunk_count(shape: Sequence[int], chunks: Sequence[int]) -> int:
    return math.prod(-(-n // c) for n, c in zip(shape, chunks))


def _halve(block: np.ndarray, reduce: str) -> np.ndarray:
    """2x2x2 ``reduce`` ("max" or "mean") of a block; an odd last voxel forms a group of its own."""
    padded = np.pad(block.astype(np.float32 if reduce == "mean" else block.dtype), [(0, n % 2) for n in block.shape])
    z, y, x = (n // 2 for n in padded.shape)
    groups = padded.reshape(z, 2, y, 2, x, 2)
    if reduce == "max":
        return groups.max(axis=(1, 3, 5))
    counts = [np.minimum(2, n - 2 * np.arange(m)) for n, m in zip(block.shape, (z, y, x))]
    return groups.sum(axis=(1, 3, 5)) / (counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :])


def _block_name(block_id: Sequence[int]) -> str:
    if not (isinstance(block_id, (tuple, list)) and block_id and all(isinstance(i, (int, np.integer)) and i >= 0
                                                                      for i in block_id)):
        raise ValueError(f"a block id is a tuple of non-negative ints (its grid index), got {block_id!r}")
    return ".".join(str(int(i)) for i in block_id)


def _box(region: Sequence[slice]) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in region) + "]"
