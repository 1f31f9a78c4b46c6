"""Human Organ Atlas datasets by name, through ``hoa-tools`` (``pip install 'vessel_kit[hoa]'``).

The Human Organ Atlas publishes its HiP-CT scans (kidney, brain, heart, lung, ...) on a public
Google Cloud bucket, as N5 or OME-Zarr multiscale pyramids (levels 0-4, each a 2x downsampling).
``hoa-tools`` carries the metadata of every dataset (name, voxel size, store URL) and opens a
level as a lazy (z, y, x) array: it reads its store anonymously (gcsfs), converts N5 on the fly
and transposes the OME-Zarr arrays, which are stored x-fastest-last as (x, y, z). We use it for
exactly that, and give the array to ``open_volume`` as any array-like, with the voxel size of
the level read, so block-wise inference reads only the chunks of the blocks it runs.

Names are ``hoa_tools.inventory.load_inventory()``'s index, e.g.
``A186_lung_right_complete-organ_24.132um_bm18``; ``open_volume("hoa:<name>")`` and
``vessel-kit infer hoa:<name> ...`` open one.

Example::

    volume = open_hoa("K292_kidney_complete-organ_10.22um_bm18", model_voxel_size_um=50.0)
    volume.voxel_size_um  # 40.88: level 2, the one nearest the model's 50 µm
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from .sources import VolumeSource

__all__ = ["HOA_PREFIX", "LEVELS", "dataset_names", "open_hoa"]

HOA_PREFIX = "hoa:"  # open_volume("hoa:<name>") opens a dataset by name
LEVELS = 5  # every Human Organ Atlas dataset is published at levels 0-4 (hoa-tools' documentation)


def open_hoa(
    name: str,
    *,
    level: int | None = None,
    model_voxel_size_um: float | None = None,
    voxel_size_um: float | None = None,
) -> VolumeSource:
    """The Human Organ Atlas dataset ``name`` as a lazy (Z, Y, X) ``VolumeSource`` with its voxel size.

    Args:
        level: the pyramid level to read (0 = full resolution, each next one 2x coarser); default:
            the one nearest ``model_voxel_size_um``, else 0.
        voxel_size_um: the full-resolution voxel size, overriding the dataset's metadata.

    Raises:
        ImportError: hoa-tools is not installed (``pip install 'vessel_kit[hoa]'``).
        ValueError: an unknown name (the closest names listed), a level out of range, a level
            missing from the store, or an array that is not a 3D uint8/uint16/float32 volume.
    """
    from .ome_zarr import Level, choose_level, open_volume

    dataset = _dataset(name)
    base = float(dataset.data.voxel_size_um if voxel_size_um is None else voxel_size_um)
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"voxel_size_um must be a positive number of micrometres, got {voxel_size_um}")
    levels = [Level(str(k), 2.0**k, base * 2**k) for k in range(LEVELS)]
    where = f"{HOA_PREFIX}{name}"
    index = choose_level(levels, base, level, model_voxel_size_um, where)  # type: ignore[arg-type]
    try:
        array = dataset.data_array(downsample_level=index).data
    except KeyError as error:
        raise ValueError(f"{where}: its store has no level {index} ({error}); choose another with level=K "
                         "(--level K)") from error
    return open_volume(array, voxel_size_um=levels[index].voxel_size_um)


def dataset_names() -> list[str]:
    """The names of every Human Organ Atlas dataset hoa-tools knows, sorted."""
    return sorted(_inventory().index)


def _dataset(name: str) -> Any:
    """hoa-tools' ``Dataset`` called ``name``; a ValueError listing the closest names otherwise."""
    try:
        return _hoa_tools().dataset.get_dataset(name)
    except KeyError:
        names = dataset_names()
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {', '.join(names[:3])}"
        raise ValueError(f"no Human Organ Atlas dataset named {name!r} among hoa-tools' {len(names)}: {hint} "
                         "(list them with vessel_kit.hoa.dataset_names())") from None


def _inventory() -> Any:
    return _hoa_tools().inventory.load_inventory()


def _hoa_tools() -> Any:
    """The hoa_tools package with its dataset and inventory modules; a clear ImportError without it."""
    try:
        import hoa_tools.dataset
        import hoa_tools.inventory
    except ImportError as error:
        raise ImportError(f"opening Human Organ Atlas datasets by name needs hoa-tools ({error}): "
                          "pip install 'vessel_kit[hoa]'") from error
    return hoa_tools
