"""``open_volume``: any stored (Z, Y, X) volume as a lazy ``VolumeSource``, with its voxel size.

Reads a folder of TIFF slices (the Kaggle layout), OME-Zarr multiscale images (v0.4 in a zarr v2
store, v0.5 in a zarr v3 store, as the Human Organ Atlas publishes them), plain zarr arrays, N5
datasets and multiscale groups (``n5.py``), and any array-like (numpy, memmap, dask, zarr).
Nothing is read up front but metadata: the source reads only the chunks a box touches.

- **Voxel size** (µm, of the level read), first found of: the ``voxel_size_um`` argument (the
  full-resolution voxel size: levels keep their ratios from the metadata), the OME-Zarr
  ``coordinateTransformations`` scale with the ``axes`` units, the N5 ``pixelResolution`` or
  ``resolution`` with ``downsamplingFactors``, the Kaggle volume names (``KNOWN_VOXEL_SIZES_UM``,
  matched on the path's name). Scales without a unit give no voxel size.
- **Pyramid level**: ``level=k``, or with ``model_voxel_size_um`` the level whose voxel size is
  nearest the model's (in ratio), so a 2.5 µm organ is read at 40 µm for a 50 µm model; else 0.
- **Axes**: singleton t and c axes are dropped; spatial axes named in another order (e.g. x, y,
  z, as some Human Organ Atlas stores hold them) are read as (Z, Y, X) by their names, lazily;
  anything else that is not a volume is refused.

Importing this module does not import zarr: it is imported when a zarr store is opened.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .hoa import HOA_PREFIX
from .layout import KNOWN_VOXEL_SIZES_UM
from .n5 import N5Array, is_n5, read_attributes
from .regions import check_region
from .sources import ArraySource, Region3, TiffStackSource, VolumeSource, as_source

__all__ = [
    "DTYPES", "Level", "StoreSource", "UNITS_UM", "choose_level", "is_volume_store", "open_volume", "require_voxel_size",
]

DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
# Micrometres per unit, for OME-Zarr axis units (UDUNITS names) and the short forms N5 uses.
UNITS_UM = {
    "angstrom": 1e-4, "nanometer": 1e-3, "nm": 1e-3, "micrometer": 1.0, "micron": 1.0, "um": 1.0,
    "µm": 1.0, "μm": 1.0, "millimeter": 1e3, "mm": 1e3, "centimeter": 1e4, "cm": 1e4, "meter": 1e6, "m": 1e6,
}
ANISOTROPY_TOLERANCE = 0.01  # spatial scales that differ by more than this are refused
_ZARR_FILES = ("zarr.json", ".zarray", ".zgroup", ".zattrs")


@dataclass(frozen=True)
class Level:
    """One pyramid level: its array path in the store and its voxel size relative to level 0."""

    path: str
    factor: float  # voxel size / level 0's
    voxel_size_um: float | None  # from the metadata
    anisotropic: str | None = None  # why the metadata gives no one voxel size, if it doesn't


class StoreSource(ArraySource):
    """A ``VolumeSource`` over one level of a zarr or N5 store.

    Besides the ``ArraySource`` fields it knows its ``path``, ``level`` and the voxel size of
    every level (``level_voxel_sizes_um``), and a read that fails in the store (a missing or
    corrupt chunk, a codec error) is a ValueError naming the path, the level and the box.
    """

    def __init__(self, array: Any, path: Path, level: int, levels: list[float | None], voxel_size_um: float | None) -> None:
        super().__init__(array, voxel_size_um=voxel_size_um)
        self.path, self.level, self.level_voxel_sizes_um = path, level, levels

    def read(self, region: Region3) -> np.ndarray:
        region = check_region(region, self.shape)
        try:
            return super().read(region)
        except Exception as error:
            box = ", ".join(f"{s.start}:{s.stop}" for s in region)
            raise ValueError(
                f"{self.path} (level {self.level}): cannot read the block [{box}]: {type(error).__name__}: {error}; "
                "a chunk of it is missing or corrupt: download or write it again, or open another level"
            ) from error

    def __repr__(self) -> str:
        return f"StoreSource({str(self.path)!r}, level={self.level}, shape={self.shape}, dtype={self.dtype})"


def open_volume(
    volume: Any,
    *,
    voxel_size_um: float | None = None,
    level: int | None = None,
    model_voxel_size_um: float | None = None,
) -> VolumeSource:
    """``volume`` (a path or an array-like) as a lazy (Z, Y, X) ``VolumeSource`` (see the module doc).

    Args:
        volume: a TIFF-slice folder, an OME-Zarr image, a zarr array, an N5 dataset or multiscale
            group, ``hoa:<name>`` (a Human Organ Atlas dataset, ``hoa.open_hoa``; needs the
            ``vessel_kit[hoa]`` extra), or an array-like (numpy, memmap, dask, zarr).
        voxel_size_um: the full-resolution voxel size in µm; overrides the metadata.
        level: the pyramid level to read (default: nearest ``model_voxel_size_um``, else 0).
        model_voxel_size_um: the models' voxel size, to choose the level.

    Raises:
        ValueError: naming the path and the fix: an unknown layout, a level out of range, axes
            that are not (Z, Y, X) after dropping singleton t/c, a dtype other than uint8/uint16/
            float32, anisotropic or broken metadata, or a level to choose without a voxel size.
    """
    if not isinstance(volume, (str, os.PathLike)):
        return _array_volume(volume, voxel_size_um, level)
    if _is_hoa_name(volume):
        from .hoa import open_hoa

        return open_hoa(str(volume).removeprefix(HOA_PREFIX), level=level, model_voxel_size_um=model_voxel_size_um,
                        voxel_size_um=voxel_size_um)
    path = Path(volume)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist or is not a folder (expected TIFF slices, OME-Zarr, zarr or N5)")
    if any((path / name).is_file() for name in _ZARR_FILES):
        array, levels = _open_zarr(path)
    elif is_n5(path):
        array, levels = _open_n5(path)
    else:
        return _tiff_volume(path, voxel_size_um, level)
    base = _base_voxel_size(levels, voxel_size_um, path)
    index = choose_level(levels, base, level, model_voxel_size_um, path)
    sizes = [None if base is None else base * lv.factor for lv in levels]
    data, axes = array(levels[index].path)
    return StoreSource(_spatial(data, axes, path), path, index, sizes, sizes[index])


def require_voxel_size(source: VolumeSource) -> float:
    """The source's voxel size; a ValueError naming the source and the fix when it has none."""
    if source.voxel_size_um is None:
        raise ValueError(
            f"{source!r} has no voxel size (none in its metadata, and its name is not a known volume): "
            "pass --voxel-size UM (voxel_size_um=UM, the full-resolution voxel size in micrometres)"
        )
    return source.voxel_size_um


def is_volume_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zarr (OME-Zarr or plain) or N5 folder ``open_volume`` reads as a store
    (or a Human Organ Atlas dataset, ``hoa:<name>``)."""
    if _is_hoa_name(path):
        return True
    path = Path(path)
    return path.is_dir() and (is_n5(path) or any((path / name).is_file() for name in _ZARR_FILES))


def _is_hoa_name(volume: str | os.PathLike) -> bool:
    """``hoa:<name>`` (``hoa.py``), unless a local path of that name exists."""
    return str(volume).startswith(HOA_PREFIX) and not Path(volume).exists()


def named_voxel_size(path: Path) -> float | None:
    """The Kaggle voxel size of a volume named by ``path`` (``kidney_5``, ``kidney_5.zarr``,
    ``kidney_5/images``), or None."""
    names = [path.name, path.name.split(".")[0]]
    if path.name == "images":
        names.append(path.parent.name)
    return next((KNOWN_VOXEL_SIZES_UM[name] for name in names if name in KNOWN_VOXEL_SIZES_UM), None)


# --- layouts ---------------------------------------------------------------------------------


def _array_volume(array: Any, voxel_size_um: float | None, level: int | None) -> VolumeSource:
    if isinstance(array, VolumeSource):
        return as_source(array, voxel_size_um=voxel_size_um)
    if level not in (None, 0):
        raise ValueError(f"an array-like has one level, got level={level}")
    shape = tuple(getattr(array, "shape", ()))
    where = f"the {type(array).__name__} of shape {shape}"
    view = _spatial(array, [None] * len(shape), where) if hasattr(array, "shape") else array
    return as_source(view, voxel_size_um=voxel_size_um)


def _tiff_volume(path: Path, voxel_size_um: float | None, level: int | None) -> VolumeSource:
    if level not in (None, 0):
        raise ValueError(f"{path}: a folder of TIFF slices has one level, got level={level}")
    source = TiffStackSource(path, voxel_size_um=named_voxel_size(path) if voxel_size_um is None else voxel_size_um)
    _check_dtype(source.dtype, path)
    return source


def _open_zarr(path: Path):
    """(array opener, levels) of an OME-Zarr image or a plain zarr array."""
    import zarr

    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception as error:
        raise ValueError(f"{path} is not a readable zarr store: {type(error).__name__}: {error}") from error
    if isinstance(node, zarr.Array):
        return (lambda _: (node, [None] * node.ndim)), [Level("", 1.0, None)]
    attrs = dict(node.attrs)
    multiscales = attrs.get("ome", attrs).get("multiscales")
    if not multiscales:
        with warnings.catch_warnings():  # zarr 3 warns of folders that are not zarr nodes (.vessel_kit/)
            warnings.simplefilter("ignore")
            children = sorted(name for name, _ in node.members(max_depth=0))
        raise ValueError(
            f"{path} is a zarr group without OME-Zarr multiscales metadata (it holds {children}): "
            "open one of its arrays or images by its path"
        )
    axes, levels = _ome_levels(multiscales[0], path)
    return (lambda name: (node[name], axes)), levels


def _ome_levels(multiscale: dict[str, Any], path: Path) -> tuple[list[str | None], list[Level]]:
    """The axis names and the levels of one OME ``multiscales`` entry (v0.1-0.5)."""
    axes_meta = multiscale.get("axes") or ["z", "y", "x"]
    axes = [a.get("name") if isinstance(a, dict) else a for a in axes_meta]
    spatial = [k for k, a in enumerate(axes_meta) if _is_spatial(a)]
    if spatial != [len(axes) - 3, len(axes) - 2, len(axes) - 1]:
        raise ValueError(f"{path}: OME axes {axes} must end with the 3 spatial axes (z, y, x) of a volume")
    units = [axes_meta[k].get("unit") if isinstance(axes_meta[k], dict) else None for k in spatial]
    unit_um = _unit_um(units, path)
    outer = _scale(multiscale.get("coordinateTransformations"), len(axes))
    scales = {str(d["path"]): _scale(d.get("coordinateTransformations"), len(axes)) * outer
              for d in multiscale.get("datasets", [])}
    if not scales:
        raise ValueError(f"{path}: its OME multiscales metadata lists no datasets")
    return axes, _levels({name: scale[spatial] for name, scale in scales.items()}, unit_um, path)


def _open_n5(path: Path):
    """(array opener, levels) of an N5 dataset or a multiscale group of ``s0, s1, ...`` datasets."""
    attrs = read_attributes(path)
    if "dimensions" in attrs:
        names = [""]
    else:
        names = sorted((p.name for p in path.iterdir() if re.fullmatch(r"s\d+", p.name) and is_n5(p)), key=lambda n: int(n[1:]))
        if not names:
            raise ValueError(f"{path} is an N5 group without datasets s0, s1, ...: open one of its datasets")
    arrays = {name: N5Array(path / name) for name in names}
    first = arrays[names[0]]
    resolution, unit_um = _n5_resolution(attrs, path) or _n5_resolution(first.attrs, path) or (np.ones(3), None)
    scales = {}
    for k, (name, array) in enumerate(arrays.items()):
        listed = attrs.get("scales")
        down = array.attrs.get("downsamplingFactors") or (listed[k] if listed and len(listed) > k else None)
        factors = np.asarray(down, float)[::-1] if down else np.divide(first.shape, array.shape)
        scales[name] = resolution * factors
    return (lambda name: (arrays[name], [None] * first.ndim)), _levels(scales, unit_um, path)


def _n5_resolution(attrs: dict[str, Any], path: Path) -> tuple[np.ndarray, float | None] | None:
    """(z, y, x resolution, µm per unit) of N5 ``pixelResolution`` ({dimensions, unit} or a list)
    or ``resolution`` (with ``units``); None when absent."""
    resolution = attrs.get("pixelResolution", attrs.get("resolution"))
    if resolution is None:
        return None
    if isinstance(resolution, dict):
        values, units = resolution.get("dimensions"), [resolution.get("unit")] * 3
    else:
        values, units = resolution, attrs.get("units") or [attrs.get("unit")] * 3
    return np.asarray(values, float)[::-1], _unit_um(list(units)[:3], path)


def _levels(scales: dict[str, np.ndarray], unit_um: float | None, path: Path) -> list[Level]:
    """Levels from each dataset's (z, y, x) scale in units of ``unit_um`` µm (None: no unit)."""
    levels, first = [], None
    for name, scale in scales.items():
        size, anisotropic = _isotropic(scale, path, name)
        first = first or size
        known = unit_um is not None and anisotropic is None
        levels.append(Level(name, size / first, size * unit_um if known else None, anisotropic))
    return levels


# --- metadata helpers --------------------------------------------------------------------------


def _base_voxel_size(levels: list[Level], voxel_size_um: float | None, path: Path) -> float | None:
    """Level 0's voxel size: the argument, else the metadata, else the Kaggle name table."""
    if voxel_size_um is not None:
        if not (math.isfinite(voxel_size_um) and voxel_size_um > 0):
            raise ValueError(f"voxel_size_um must be a positive number of micrometres, got {voxel_size_um}")
        return float(voxel_size_um)
    if levels[0].anisotropic:
        raise ValueError(levels[0].anisotropic)
    return levels[0].voxel_size_um if levels[0].voxel_size_um is not None else named_voxel_size(path)


def choose_level(levels: list[Level], base: float | None, level: int | None, model_um: float | None, path: Path) -> int:
    """The pyramid level to read: ``level`` (checked), else the one nearest ``model_um`` in ratio
    (``base`` is level 0's voxel size), else 0. ``path`` names the volume in errors."""
    if level is not None:
        if not (isinstance(level, int) and 0 <= level < len(levels)):
            raise ValueError(f"{path} has levels 0-{len(levels) - 1}, got level={level}")
        return level
    if model_um is None or len(levels) == 1:
        return 0
    if base is None:
        raise ValueError(
            f"{path} has {len(levels)} pyramid levels but no voxel size to choose one for the models' "
            f"{model_um} µm: pass --voxel-size UM (voxel_size_um=UM) or --level K (level=K)"
        )
    return min(range(len(levels)), key=lambda k: (abs(math.log(base * levels[k].factor / model_um)), k))


def _spatial(array: Any, axes: list[str | None], where: Any):
    """``array`` as (Z, Y, X): leading singleton axes (t, c) dropped and spatial axes named in
    another order permuted, both lazily; checks 3D and dtype."""
    shape = tuple(int(n) for n in array.shape)
    extra = len(shape) - 3
    if extra < 0 or any(n != 1 for n in shape[:extra]):
        named = ", ".join(f"{a or '?'}={n}" for a, n in zip(axes, shape)) if any(axes) else str(shape)
        raise ValueError(
            f"{where}: expected a (Z, Y, X) volume (leading t/c axes of size 1 are dropped), got shape {named}: "
            "select one time point and channel first"
        )
    _check_dtype(np.dtype(array.dtype), where)
    names = [str(name).lower() if name else None for name in axes[-3:]]
    order = tuple(names.index(name) for name in "zyx") if sorted(names, key=str) == ["x", "y", "z"] else (0, 1, 2)
    return array if extra == 0 and order == (0, 1, 2) else _ZYXView(array, extra, order)


class _ZYXView:
    """A lazy (Z, Y, X) view of an array whose ``extra`` leading axes have size 1 and whose
    spatial axes are stored in another order: output axis i is stored spatial axis ``order[i]``."""

    def __init__(self, array: Any, extra: int, order: tuple[int, int, int]) -> None:
        self.array, self.extra, self.order = array, extra, order
        stored = tuple(array.shape[extra:])
        self.shape, self.dtype = tuple(stored[k] for k in order), array.dtype
        chunks = getattr(array, "chunksize", None) or getattr(array, "chunks", None)
        self.chunks = tuple(chunks[extra:][k] for k in order) if isinstance(chunks, tuple) else None

    def __getitem__(self, box: Any) -> Any:
        box = box if isinstance(box, tuple) else (box,)
        box = tuple(box) + (slice(None),) * (3 - len(box))
        stored: list[Any] = [None] * 3
        for axis, k in enumerate(self.order):
            stored[k] = box[axis]
        data = self.array[(0,) * self.extra + tuple(stored)]
        if self.order == (0, 1, 2):
            return data
        data = np.asarray(data)
        kept = [k for k in self.order if not isinstance(stored[k], (int, np.integer))]  # int indices drop axes
        positions = sorted(kept)
        return data.transpose([positions.index(k) for k in kept]) if len(kept) > 1 else data


def _check_dtype(dtype: np.dtype, where: Any) -> None:
    if dtype not in DTYPES:
        raise ValueError(
            f"{where}: dtype {dtype} is not supported; volumes are uint8, uint16 or float32: convert it "
            "(e.g. array.astype('float32'))"
        )


def _is_spatial(axis: Any) -> bool:
    if isinstance(axis, dict):
        return axis.get("type") == "space" or (axis.get("type") is None and axis.get("name") in ("z", "y", "x"))
    return axis in ("z", "y", "x")


def _unit_um(units: list[Any], path: Path) -> float | None:
    """Micrometres per unit of the spatial axes; None when any has no unit; ValueError for an
    unknown unit or axes with different units."""
    if any(u is None for u in units):
        return None
    unknown = [u for u in units if str(u).lower() not in UNITS_UM]
    if unknown:
        raise ValueError(f"{path}: unknown spatial unit {unknown[0]!r}; known: {', '.join(UNITS_UM)}")
    factors = {UNITS_UM[str(u).lower()] for u in units}
    if len(factors) > 1:
        raise ValueError(f"{path}: the spatial axes have different units {units}")
    return factors.pop()


def _scale(transforms: list[dict[str, Any]] | None, ndim: int) -> np.ndarray:
    scale = np.ones(ndim)
    for transform in transforms or []:
        if transform.get("type") == "scale":
            scale = scale * np.asarray(transform["scale"], float)
    return scale


def _isotropic(scale: np.ndarray, path: Path, dataset: str) -> tuple[float, str | None]:
    """(geometric mean of the spatial ``scale``, why it is not one voxel size or None): the engine
    resamples isotropically, so axes that differ need the user's ``voxel_size_um``."""
    scale = np.asarray(scale, float)
    if scale.size != 3 or not np.all(np.isfinite(scale) & (scale > 0)):
        raise ValueError(f"{path}: dataset {dataset!r} has scale {scale.tolist()}; expected 3 positive numbers")
    mean = float(scale[0]) if np.all(scale == scale[0]) else float(np.exp(np.log(scale).mean()))
    if scale.max() <= scale.min() * (1 + ANISOTROPY_TOLERANCE):
        return mean, None
    return mean, (f"{path}: dataset {dataset!r} has anisotropic voxels {scale.tolist()} (z, y, x); vessel_kit "
                  "needs isotropic voxels: resample the volume, or pass --voxel-size UM to treat it as isotropic")
