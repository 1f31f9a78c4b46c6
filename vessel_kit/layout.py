"""The Kaggle data layout: which volumes a dataset root holds, where their slices are, and their
voxel sizes.

    <root>/train/<volume>/images/NNNN.tif   uint16 slices
    <root>/train/<volume>/labels/NNNN.tif   uint8 {0, 255}
    <root>/test/<volume>/images/NNNN.tif

One quirk is handled here so no caller has to: ``kidney_3_dense`` ships labels only; its images are
the same-named files in ``kidney_3_sparse/images``. In general a volume with labels but no images
takes its images from the sibling volume whose image folder holds every label file name.

A dataset may record its volumes' voxel sizes in ``<root>/voxel_sizes.json`` (``{"name": µm}``,
as ``make_synthetic_dataset`` writes it); those override ``KNOWN_VOXEL_SIZES_UM``, so a checkpoint
trained on the dataset knows its resolution and inference resamples other volumes to it.

Training reads its volumes by name through ``load_train_volumes`` (both splits; soft labels and a
memmap cache optional), after ``check_no_shared_images`` refused validation volumes whose images
are trained on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .folders import list_folder, path_kind
from .values import is_finite_real
from .volume import read_labels, read_slice_header, read_volume, slice_files

if TYPE_CHECKING:
    from .data import TrainVolume

SPLITS = ("train", "test")

# Voxel sizes (µm) published for the competition volumes; a volume not listed has no known size.
KNOWN_VOXEL_SIZES_UM: dict[str, float] = {
    "kidney_1_dense": 50.0,
    "kidney_1_voi": 5.2,
    "kidney_2": 50.0,
    "kidney_3_sparse": 50.16,
    "kidney_3_dense": 50.16,
    "kidney_5": 50.28,
    "kidney_6": 63.08,
}

VOXEL_SIZES_FILE = "voxel_sizes.json"

__all__ = [
    "KNOWN_VOXEL_SIZES_UM",
    "VOXEL_SIZES_FILE",
    "VolumeInfo",
    "check_no_shared_images",
    "find_volumes",
    "load_train_volumes",
    "named_volumes",
    "read_soft_labels",
    "read_voxel_sizes",
]


@dataclass(frozen=True)
class VolumeInfo:
    """One volume of a Kaggle-layout dataset: its slice files and metadata."""

    name: str
    image_paths: tuple[Path, ...]
    label_paths: tuple[Path, ...] | None
    voxel_size_um: float | None

    @property
    def stems(self) -> list[str]:
        """Slice ids (file stems) in slice order."""
        return [p.stem for p in self.image_paths]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X), from the first slice's header (no pixel data is read)."""
        (height, width), _ = read_slice_header(self.image_paths[0])
        return len(self.image_paths), height, width

    def read_images(self, **kwargs) -> np.ndarray:
        """The (Z, Y, X) uint16 image volume; keyword arguments go to ``read_volume``."""
        return read_volume(self.image_paths, **kwargs)

    def read_labels(self, **kwargs) -> np.ndarray:
        """The (Z, Y, X) bool label volume; keyword arguments go to ``read_labels``."""
        if self.label_paths is None:
            raise ValueError(f"volume {self.name!r} has no labels")
        return read_labels(self.label_paths, **kwargs)


def find_volumes(
    root: str | os.PathLike,
    split: str = "train",
    *,
    voxel_sizes: Mapping[str, float] | None = None,
) -> list[VolumeInfo]:
    """The volumes of ``<root>/<split>``, sorted by name.

    Args:
        root: the dataset root (the folder holding ``train/`` and ``test/``).
        split: "train" or "test".
        voxel_sizes: voxel sizes (µm) by volume name, overriding those of ``<root>/voxel_sizes.json``
            (``read_voxel_sizes``), which override ``KNOWN_VOXEL_SIZES_UM``.

    Raises:
        ValueError: unknown split; a volume whose labels don't match its images (missing or extra
            file names, or another slice shape); a labels-only volume whose images are nowhere;
            an unreadable folder; a volume, ``images`` or ``labels`` entry that is a broken
            link, or an ``images``/``labels`` that is a file; the errors of ``slice_files`` and
            ``read_voxel_sizes``.
        FileNotFoundError: missing root or split folder, or a split with no volumes.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    split_dir = Path(root) / split
    if path_kind(split_dir) != "folder":
        raise FileNotFoundError(f"{split_dir} does not exist (expected the Kaggle layout <root>/{split}/<volume>/images)")
    sizes = {**KNOWN_VOXEL_SIZES_UM, **read_voxel_sizes(root), **(voxel_sizes or {})}
    folders = sorted(p for p in list_folder(split_dir, "split folder") if path_kind(p) == "folder")
    image_folders = {p.name: images for p in folders if (images := _slice_folder(p / "images"))}
    volumes = []
    for folder in folders:
        labels_dir = _slice_folder(folder / "labels")
        label_paths = tuple(slice_files(labels_dir)) if labels_dir else None
        if folder.name in image_folders:
            image_paths = tuple(slice_files(image_folders[folder.name]))
            if label_paths is not None:
                _check_same_stems(folder.name, image_paths, label_paths)
        elif label_paths is not None:
            image_paths = _borrow_images(folder.name, label_paths, image_folders)
        else:
            continue  # neither images nor labels: not a volume
        if label_paths is not None:
            _check_same_slice_shape(image_paths[0], label_paths[0])
        volumes.append(VolumeInfo(folder.name, image_paths, label_paths, sizes.get(folder.name)))
    if not volumes:
        raise FileNotFoundError(f"no volumes (folders with images/ or labels/) in {split_dir}")
    return volumes


def read_voxel_sizes(root: str | os.PathLike) -> dict[str, float]:
    """The voxel sizes (µm) by volume name that ``<root>/voxel_sizes.json`` records ({} without
    the file). ValueError, naming the file, when it is not a JSON object of names to positive
    numbers."""
    path = Path(root) / VOXEL_SIZES_FILE
    if not path.is_file():
        return {}
    try:
        sizes = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}); expected {{\"<volume>\": <voxel size in µm>}}") from None
    if not isinstance(sizes, dict):
        raise ValueError(f"{path} holds a {type(sizes).__name__}; expected {{\"<volume>\": <voxel size in µm>}}")
    bad = {name: size for name, size in sizes.items() if not (is_finite_real(size) and size > 0)}
    if bad:
        raise ValueError(f"{path}: voxel sizes must be positive numbers of µm, got {bad}")
    return {name: float(size) for name, size in sizes.items()}


def named_volumes(root: str | os.PathLike, names: Sequence[str]) -> list[VolumeInfo]:
    """The named volumes of the train and test splits of ``root``, in the order named; a
    ValueError lists the available names when one is not there."""
    available = {}
    for split in SPLITS:
        if (Path(root) / split).is_dir():
            available.update({v.name: v for v in find_volumes(root, split)})
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"volumes {missing} are not in {root}; available: {sorted(available)}")
    return [available[n] for n in names]


def check_no_shared_images(root: str | os.PathLike, train_names: Sequence[str], val_names: Sequence[str]) -> None:
    """Refuse validation volumes whose image files are also trained on (kidney_3_dense's images
    are kidney_3_sparse's): the validation score would be a training score."""
    if not val_names:
        return
    trained = {p.resolve() for info in named_volumes(root, train_names) for p in info.image_paths}
    for info in named_volumes(root, val_names):
        shared = [p for p in info.image_paths if p.resolve() in trained]
        if shared:
            raise ValueError(
                f"validation volume {info.name!r} shares {len(shared)} image files with the training "
                f"volumes (e.g. {shared[0]}): validate on a volume that is not trained on"
            )


def read_soft_labels(path: str | os.PathLike, shape: tuple[int, ...]) -> np.ndarray:
    """A ``.npy`` of uint8 soft labels (0..255) as a memmap, checked against the volume's ``shape``."""
    labels = np.load(path, mmap_mode="r")
    if labels.shape != tuple(shape) or labels.dtype != np.uint8:
        raise ValueError(f"soft labels {path} are {labels.shape} {labels.dtype}; expected {tuple(shape)} uint8")
    return labels


def load_train_volumes(
    root: str | os.PathLike,
    names: Sequence[str],
    *,
    soft_labels: Mapping[str, str] | None = None,
    volume_weights: Mapping[str, float] | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[TrainVolume]:
    """The named volumes of ``root`` with their targets: the ``.npy`` that ``soft_labels`` names
    for a volume, else its labels. ``volume_weights`` (default 1) are their sampling weights.

    Uses memmaps from ``cache_dir`` when set (written on first use), else reads into RAM.
    """
    from .data import TrainVolume, cache_volume  # data needs torch; this module stays numpy-only

    soft_labels, volume_weights = soft_labels or {}, volume_weights or {}
    volumes = []
    for name, info in zip(names, named_volumes(root, names), strict=True):
        if cache_dir:
            images, labels = cache_volume(info, cache_dir, progress=progress)
        else:
            images = info.read_images(progress=progress)
            labels = info.read_labels(progress=progress) if info.label_paths else None
        target = read_soft_labels(soft_labels[name], images.shape) if name in soft_labels else labels
        if target is None:
            raise ValueError(f"volume {name!r} has no labels; give it soft labels in soft_labels")
        weight = volume_weights.get(name, 1.0)
        volumes.append(TrainVolume(name, images, target, weight=weight, voxel_size_um=info.voxel_size_um))
    return volumes


def _slice_folder(path: Path) -> Path | None:
    """``path`` when it is a folder, None when nothing is there; ValueError for a file or a broken link."""
    kind = path_kind(path)
    if kind == "file":
        raise ValueError(f"{path} is a file; expected a folder of TIFF slices")
    return path if kind == "folder" else None


def _borrow_images(
    name: str, label_paths: tuple[Path, ...], image_folders: Mapping[str, Path]
) -> tuple[Path, ...]:
    """Images of a labels-only volume: the same-named files of the sibling holding all of them."""
    names = [p.name for p in label_paths]
    # Prefer siblings sharing the name before the last "_" (kidney_3_dense -> kidney_3_sparse).
    prefix = name.rsplit("_", 1)[0]
    for sibling in sorted(image_folders, key=lambda s: not s.startswith(prefix)):
        folder = image_folders[sibling]
        if all((folder / n).is_file() for n in names):
            return tuple(folder / n for n in names)
    raise ValueError(
        f"volume {name!r} has labels but no images/ folder, and no sibling volume's images/ holds "
        f"all of its {len(names)} label files (e.g. {names[0]})"
    )


def _check_same_stems(name: str, image_paths: tuple[Path, ...], label_paths: tuple[Path, ...]) -> None:
    images = {p.stem for p in image_paths}
    labels = {p.stem for p in label_paths}
    if images != labels:
        missing = sorted(images - labels)[:3]
        extra = sorted(labels - images)[:3]
        raise ValueError(
            f"volume {name!r}: labels don't match images ({len(image_paths)} image and "
            f"{len(label_paths)} label slices; unlabelled e.g. {missing}, labels without image e.g. {extra})"
        )


def _check_same_slice_shape(image_path: Path, label_path: Path) -> None:
    image_shape, _ = read_slice_header(image_path)
    label_shape, _ = read_slice_header(label_path)
    if image_shape != label_shape:
        raise ValueError(
            f"label slice {label_path} is {label_shape} but image slice {image_path} is {image_shape}"
        )
