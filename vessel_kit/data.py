"""2.5D training crops cut along xy, xz and yz from several volumes, with foreground-aware
sampling, sparse/soft labels and albumentations augmentation.

A crop along axis ``a`` is ``in_chans`` neighbouring slices along ``a`` (edges replicated) around
a centre voxel, ``crop_size`` pixels square in the other two axes, channels first. Only the crop
is read from the volume, so volumes can be ``np.memmap``s far larger than memory
(``cache_volume`` writes them once from the TIFF slices).

Targets are the labels of the ``out_chans`` slices centred on the crop's centre slice (1: the
centre slice alone; 3: the 1st place's "3 out") as float32 in [0, 1]: bool labels, uint8 soft
labels (0..255) and float16/float32 probabilities (pseudo-labels) are all accepted. ``valid`` is
1 where a pixel of a target slice counts for the loss: 0 in padding, in areas rotated in by
augmentation, on target slices beyond the volume's ends, and where a volume's optional ignore
mask says so.

Robustness options of ``CropConfig`` (all off by default) change how a crop is sampled: tilted
planes (``rotate_p``), real 3D zoom (``zoom_p``), low-resolution emulation (``lowres_p``) and a
fixed training scale (``scale``) go through one trilinear sampler (``oblique.sample_crop``) that
maps image, target and valid alike;
``intensity_p``/``invert_p`` change the normalised image only; ``cutmix_p`` pastes a box of a
second crop into the first, image, target and valid alike.

``SampledVolumes`` holds what the crop datasets share (and ``patches.PatchDataset``, the 3D one):
volumes drawn by weight, centres near labelled vessels, and one random stream per
(seed, epoch, index).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from .atomic import atomic_output
from .axes import AXES, SLICE_AXIS
from .augment import (
    augment_intensity,
    build_intensity_augmentation,
    cutmix,
    log_uniform,
    random_rotation,
    random_zoom,
    seed_pipeline,
)
from .layout import VolumeInfo
from .normalize import Normalization
from .oblique import plane_frame, sample_crop
from .volume import read_labels

if TYPE_CHECKING:  # albumentations is imported only to train: inference must not need it
    import albumentations as A

AUGMENTATIONS = ("hard", "light", "none")
MIN_SCALE, MAX_SCALE = 0.125, 8.0  # crops.scale range: beyond it, surely a mistake (as MAX_RESCALE at inference)

__all__ = [
    "AUGMENTATIONS",
    "AXES",
    "CropConfig",
    "CropDataset",
    "SampledVolumes",
    "TrainVolume",
    "build_augmentation",
    "cache_volume",
    "extract_crop",
    "vessel_mask",
]


@dataclass
class TrainVolume:
    """One training volume.

    Attributes:
        name: for logs.
        images: (Z, Y, X) integer intensities (array or memmap).
        target: (Z, Y, X) labels: bool, uint8 soft labels 0..255, or float probabilities.
        valid: optional (Z, Y, X) mask, nonzero where labels are trusted (sparse annotation).
        weight: how often this volume is sampled relative to the others.
        voxel_size_um: its voxel size, recorded in checkpoints.

    Example::

        volume = TrainVolume("kidney_1_dense", images, labels, weight=1.0, voxel_size_um=50.0)
    """

    name: str
    images: np.ndarray
    target: np.ndarray
    valid: np.ndarray | None = None
    weight: float = 1.0
    voxel_size_um: float | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 3:
            raise ValueError(f"volume {self.name!r}: images must be (Z, Y, X), got shape {self.images.shape}")
        for label, array in (("target", self.target), ("valid", self.valid)):
            if array is not None and array.shape != self.images.shape:
                raise ValueError(
                    f"volume {self.name!r}: {label} shape {array.shape} differs from images {self.images.shape}"
                )
        if self.target.dtype.kind not in "buf":
            raise ValueError(f"volume {self.name!r}: target dtype {self.target.dtype} is not bool, uint8 or float")
        if not self.weight > 0:
            raise ValueError(f"volume {self.name!r}: weight must be > 0, got {self.weight}")


@dataclass(frozen=True)
class CropConfig:
    """How crops are cut and sampled.

    ``axes`` maps axis names to sampling weights (e.g. ``{"xy": 1.0}`` for 2D-xy only);
    ``foreground_fraction`` of the crops are centred near a labelled vessel voxel, the rest
    anywhere; ``in_chans`` must be odd (1 = 2D, 3/5 = 2.5D); ``out_chans`` (odd, <= ``in_chans``)
    is how many target slices, centred on the middle input slice, a crop carries (the model's
    output planes).

    Robustness (each a per-crop probability, 0 = off):
        rotate_p: sample the crop on a plane tilted from the drawn axis plane by a rotation about a
            random 3D axis, angle uniform in [0, ``rotate_max_deg``] degrees (0-90); the channels
            stay parallel planes one voxel apart along the tilted normal. Unlike axis crops,
            resampled crops are not shifted inside the volume: what falls outside has valid 0.
        zoom_p: resample in 3D by a factor f log-uniform in ``zoom_range`` (±5 % per axis): the
            crop covers size/f voxels in-plane, channels are 1/f voxels apart, content appears
            f times its size (f = 0.79: a 63.08 µm scan seen by a 50 µm model).
        lowres_p: sample the image on a grid 1/f times coarser (f log-uniform in the part of
            ``zoom_range`` below 1) and interpolate it back: the blur of an upsampled coarse scan.
            Labels stay sharp.
        intensity_p: gamma, contrast/brightness, gaussian blur and gaussian noise, after
            normalisation, image only.
        invert_p: invert intensities within the normalised range.
        cutmix_p: CutMix: paste a random box (area fraction uniform in [0, 1]) of a second crop
            into this one, in image, target and valid alike.

    Scale (not random): ``scale`` s resamples every crop by s in 3D (content s times its size,
    neighbouring channels 1/s voxel apart), so the model learns the volume at voxel size
    v / s; training records v / s as the checkpoint's voxel size, and inference resamples any
    volume to it (``model_voxel_size_um``), so train and test see the same scale. The 1st place
    trained whole slices upscaled to 1536² (s ~1.5 for a ~1000-pixel plane) and ran at ~3072²,
    in-plane only (ours scales the slice axis too, as inference's resampling does). Scaled
    crops are shifted to stay inside the volume in-plane like axis crops; a plane whose sides
    times s fit in ``crop_size`` is the whole resized plane, centred and zero-padded (valid 0).

    Example::

        crops = CropConfig(crop_size=128, in_chans=3, foreground_fraction=0.7, rotate_p=0.2)
    """

    crop_size: int = 256
    in_chans: int = 1
    out_chans: int = 1
    axes: Mapping[str, float] = field(default_factory=lambda: {"xy": 1.0, "xz": 1.0, "yz": 1.0})
    foreground_fraction: float = 0.5
    crops_per_epoch: int = 1000
    augment: str = "hard"
    max_foreground_points: int = 200_000
    rotate_p: float = 0.0
    rotate_max_deg: float = 30.0
    zoom_p: float = 0.0
    zoom_range: tuple[float, float] = (0.7, 1.15)
    lowres_p: float = 0.0
    intensity_p: float = 0.0
    invert_p: float = 0.0
    cutmix_p: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.crop_size < 32 or self.crop_size % 32:
            raise ValueError(f"crop_size must be a positive multiple of 32, got {self.crop_size}")
        if self.in_chans < 1 or self.in_chans % 2 == 0:
            raise ValueError(f"in_chans must be odd (1, 3, 5, ...), got {self.in_chans}")
        if self.out_chans < 1 or self.out_chans % 2 == 0 or self.out_chans > self.in_chans:
            raise ValueError(f"out_chans must be odd and at most in_chans={self.in_chans} (the target slices centred "
                             f"on the middle input slice), got {self.out_chans}")
        unknown = set(self.axes) - set(AXES)
        if unknown or not self.axes or min(self.axes.values()) < 0 or sum(self.axes.values()) <= 0:
            raise ValueError(f"axes must map some of {AXES} to non-negative weights, got {dict(self.axes)}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {self.foreground_fraction}")
        if self.crops_per_epoch < 1:
            raise ValueError(f"crops_per_epoch must be >= 1, got {self.crops_per_epoch}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        self._check_robustness()

    def _check_robustness(self) -> None:
        """Validate the robustness options; a YAML list for zoom_range becomes a tuple."""
        check_probabilities(self, ("rotate_p", "zoom_p", "lowres_p", "intensity_p", "invert_p", "cutmix_p"))
        if not 0.0 <= self.rotate_max_deg <= 90.0:
            raise ValueError(f"rotate_max_deg must be in [0, 90] degrees, got {self.rotate_max_deg}")
        if not MIN_SCALE <= self.scale <= MAX_SCALE:
            raise ValueError(f"scale must be in [{MIN_SCALE}, {MAX_SCALE}] (the factor crops are resampled by), "
                             f"got {self.scale}")
        zoom = checked_zoom_range(self.zoom_range)
        if self.lowres_p > 0 and not zoom[0] < 1.0:
            raise ValueError(f"lowres_p needs zoom_range to reach below 1 (a coarser grid), got {self.zoom_range!r}")
        object.__setattr__(self, "zoom_range", zoom)


def check_probabilities(config: object, names: Sequence[str]) -> None:
    """ValueError naming the first of ``config``'s options ``names`` that is not in [0, 1]."""
    for name in names:
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ValueError(f"{name} is a probability in [0, 1], got {getattr(config, name)}")


def checked_zoom_range(zoom_range: Sequence[float]) -> tuple[float, float]:
    """``zoom_range`` as a (low, high) float tuple (a YAML list is accepted); ValueError unless
    0 < low <= high."""
    zoom = tuple(zoom_range)
    if len(zoom) != 2 or not 0.0 < zoom[0] <= zoom[1]:
        raise ValueError(f"zoom_range must be (low, high) with 0 < low <= high, got {zoom_range!r}")
    return float(zoom[0]), float(zoom[1])


class SampledVolumes(Dataset):
    """What the training datasets share: volumes drawn by weight, centres near labelled vessels
    (``foreground_fraction`` of them) and one random stream per (seed, epoch, index), so item
    ``i`` of epoch ``e`` is the same in every run and worker. Subclasses cut the items.

    Example::

        class Points(SampledVolumes):
            def __len__(self): return 10
            def __getitem__(self, index):
                rng = self.item_rng(index)
                volume_index = self.draw_volume(rng)
                return self.draw_centre(rng, volume_index, jitter=(8, 8, 8))
    """

    def __init__(
        self,
        volumes: Sequence[TrainVolume],
        normalization: Normalization,
        *,
        foreground_fraction: float,
        max_foreground_points: int,
        seed: int = 0,
    ) -> None:
        if not volumes:
            raise ValueError(f"{type(self).__name__} needs at least one volume")
        self.volumes = list(volumes)
        self.normalization = normalization
        self.foreground_fraction = foreground_fraction
        self.seed = seed
        self.epoch = 0
        self.windows = [normalization.window(v.images) for v in self.volumes]
        self.foreground = [_foreground_points(v.target, max_foreground_points, seed) for v in self.volumes]
        self._value_range = normalization.value_range
        weights = np.array([v.weight for v in self.volumes], dtype=float)
        self._volume_p = weights / weights.sum()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def item_seed(self, index: int, *salt: int) -> int:
        """The seed of item ``index`` this epoch (``salt`` gives further independent streams)."""
        return int(np.random.SeedSequence([self.seed, self.epoch, index, *salt]).generate_state(1)[0])

    def item_rng(self, index: int, *salt: int) -> np.random.Generator:
        return np.random.default_rng(self.item_seed(index, *salt))

    def draw_volume(self, rng: np.random.Generator) -> int:
        """The index of a volume, drawn by the volumes' weights."""
        return int(rng.choice(len(self.volumes), p=self._volume_p))

    def draw_centre(
        self, rng: np.random.Generator, volume_index: int, jitter: Sequence[int], fixed_axis: int | None = None
    ) -> tuple[int, int, int]:
        """A (z, y, x) centre: with probability ``foreground_fraction``, a labelled voxel moved by
        up to ``jitter`` voxels per axis (not along ``fixed_axis``), so vessels are near, not
        always at, the centre; else anywhere in the volume."""
        shape = np.array(self.volumes[volume_index].images.shape)
        points = self.foreground[volume_index]
        if len(points) and rng.random() < self.foreground_fraction:
            half = np.asarray(jitter)
            offset = rng.integers(-half, half + 1)
            if fixed_axis is not None:
                offset[fixed_axis] = 0
            centre = points[rng.integers(len(points))] + offset
        else:
            centre = (rng.random(3) * shape).astype(int)
        return tuple(int(c) for c in np.clip(centre, 0, shape - 1))


class CropDataset(SampledVolumes):
    """Random 2.5D crops from several volumes; item ``i`` of epoch ``e`` is deterministic.

    Items are dicts of float32 tensors: ``image`` (C, S, S), ``target`` (M, S, S) and ``valid``
    (M, S, S), M = ``out_chans``. Call ``set_epoch`` before each epoch for fresh crops.

    Example::

        dataset = CropDataset([volume], CropConfig(crop_size=128), Normalization("percentile"), seed=0)
        dataset.set_epoch(3)
        item = dataset[0]  # {"image": (1, 128, 128), "target": ..., "valid": ...}
    """

    def __init__(
        self,
        volumes: Sequence[TrainVolume],
        config: CropConfig,
        normalization: Normalization,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__(volumes, normalization, foreground_fraction=config.foreground_fraction,
                         max_foreground_points=config.max_foreground_points, seed=seed)
        self.config = config
        self.augment = build_augmentation(config.augment, nonnegative=self._value_range is not None)
        self.intensity = build_intensity_augmentation(config.intensity_p, config.invert_p)
        axes = [a for a in AXES if config.axes.get(a, 0) > 0]
        self._axes = axes
        axis_weights = np.array([config.axes[a] for a in axes], dtype=float)
        self._axis_p = axis_weights / axis_weights.sum()

    def __len__(self) -> int:
        return self.config.crops_per_epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self.item_rng(index)
        image, target, valid = self._sample(rng, self.item_seed(index))
        if self.config.cutmix_p > 0 and rng.random() < self.config.cutmix_p:
            partner = self._sample(self.item_rng(index, 1), self.item_seed(index, 1))
            image, target, valid = cutmix((image, target, valid), partner, rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)),
            "valid": torch.from_numpy(np.ascontiguousarray(valid, dtype=np.float32)),
        }

    def _sample(self, rng: np.random.Generator, item_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image (C, S, S), target (M, S, S), valid (M, S, S)) of one augmented crop drawn from ``rng``."""
        volume_index = self.draw_volume(rng)
        axis = self._axes[rng.choice(len(self._axes), p=self._axis_p)]
        centre = self._centre(rng, volume_index, SLICE_AXIS[axis])
        geometry = self._draw_geometry(rng, SLICE_AXIS[axis])
        if self.config.scale != 1.0:
            centre = _centre_inside(centre, geometry[0], self.config.crop_size, self.volumes[volume_index].images.shape,
                                    SLICE_AXIS[axis])
        image, target, valid, inside = self._crop(volume_index, axis, centre, geometry)
        if self.intensity is not None:
            seed_pipeline(self.intensity, int(rng.integers(2**31)))
            image = augment_intensity(self.intensity, image, self._value_range)
        image[:, ~inside] = 0.0
        if self.augment is not None:
            if self.config.in_chans > 1 and rng.random() < 0.5:
                # slice-order reversal: the neighbours' order carries no meaning; target slices follow
                image, target, valid = image[::-1], target[::-1], valid[::-1]
            seed_pipeline(self.augment, int(item_seed % 2**31))
            out = self.augment(image=np.ascontiguousarray(image.transpose(1, 2, 0)), mask=_channels_last(target),
                               valid=_channels_last(valid))
            image, target, valid = out["image"].transpose(2, 0, 1), _channels_first(out["mask"]), _channels_first(out["valid"])
        return image, target, valid

    def _centre(self, rng: np.random.Generator, volume_index: int, slice_axis: int) -> tuple[int, int, int]:
        """A crop centre; the jitter (a quarter of the crop's extent in voxels) is in-plane only, so
        the target slice still holds the voxel drawn."""
        jitter = int(self.config.crop_size / (4 * self.config.scale))
        return self.draw_centre(rng, volume_index, (jitter,) * 3, fixed_axis=slice_axis)

    def _draw_geometry(self, rng: np.random.Generator, slice_axis: int) -> tuple[np.ndarray, float] | None:
        """(frame, coarsen) of a tilted/zoomed/low-resolution crop, or None for a plain axis crop.

        Draws from ``rng`` only for options that are on, so configs without them get the same
        crops as before they existed.
        """
        config = self.config
        rotate, zoom, lowres = (p > 0 and rng.random() < p for p in (config.rotate_p, config.zoom_p, config.lowres_p))
        if not (rotate or zoom or lowres or config.scale != 1.0):
            return None
        frame = plane_frame(slice_axis) / config.scale
        if rotate:
            frame = random_rotation(rng, config.rotate_max_deg) @ frame
        if zoom:
            frame = frame / random_zoom(rng, *config.zoom_range)  # spacing 1/f along normal, rows, columns
        coarsen = 1.0 / log_uniform(rng, config.zoom_range[0], min(config.zoom_range[1], 1.0)) if lowres else 1.0
        return frame, coarsen

    def _crop(
        self, volume_index: int, axis: str, centre: tuple[int, int, int], geometry: tuple[np.ndarray, float] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(normalised image (C, S, S), target (M, S, S), valid (M, S, S), inside (S, S)) of one
        crop, image and masks cut alike; ``inside``: the centre slice's pixels inside the volume."""
        volume = self.volumes[volume_index]
        out_chans = self.config.out_chans
        cut = self._cutter(axis, centre, geometry)
        image, _ = cut(volume.images, self.config.in_chans, image=True)
        target, inside = cut(volume.target, out_chans)
        valid = inside.astype(np.float32)
        if volume.valid is not None:
            valid[cut(volume.valid, out_chans, order=0)[0] == 0] = 0.0
        image = self.normalization.apply(image, self.windows[volume_index])
        return image, as_probability(target, volume.target.dtype), valid, inside[out_chans // 2]

    def _cutter(
        self, axis: str, centre: tuple[int, int, int], geometry: tuple[np.ndarray, float] | None
    ) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
        """``cut(array, chans, image=False, order=1) -> (crop (chans, S, S), inside)``: an axis crop
        when ``geometry`` is None, else one sampled on its tilted/zoomed plane (coarsened for the
        image only). For labels (``image`` False), ``inside`` is (chans, S, S): each slice's pixels
        that lie inside the volume (a slice beyond its ends has none)."""
        size = self.config.crop_size
        slice_axis = SLICE_AXIS[axis]
        if geometry is None:
            def cut_axis(array: np.ndarray, chans: int, image: bool = False, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
                crop, inside = extract_crop(array, axis, centre, size, chans)
                if image:
                    return crop, inside
                slices = centre[slice_axis] + np.arange(chans) - chans // 2
                return crop, inside & ((slices >= 0) & (slices < array.shape[slice_axis]))[:, None, None]

            return cut_axis
        frame, coarsen = geometry

        def cut(array: np.ndarray, chans: int, image: bool = False, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
            if image:
                return sample_crop(array, centre, frame, size, chans, coarsen=coarsen, order=order)
            # one slice at a time, each through its own centre along the normal, to know what of it is inside
            slices = [sample_crop(array, np.add(centre, offset * frame[:, 0]), frame, size, 1, order=order)
                      for offset in range(-(chans // 2), chans // 2 + 1)]
            return np.concatenate([crop for crop, _ in slices]), np.stack([inside for _, inside in slices])

        return cut


def extract_crop(
    volume: np.ndarray,
    axis: str,
    centre: Sequence[int],
    size: int,
    in_chans: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a (in_chans, size, size) crop along ``axis`` around ``centre`` (z, y, x).

    Channels are the ``in_chans`` slices centred on ``centre`` along the slicing axis, indices
    clamped to the volume (edge replication). In-plane, the window is shifted to stay inside the
    volume and zero-padded where the volume is smaller than ``size``. Returns (crop, inside), where
    ``inside`` is a (size, size) bool mask of the pixels that came from the volume.
    """
    if axis not in SLICE_AXIS:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    slice_axis = SLICE_AXIS[axis]
    plane_axes = [a for a in range(3) if a != slice_axis]
    half = in_chans // 2
    channels = np.clip(np.arange(centre[slice_axis] - half, centre[slice_axis] + half + 1), 0, volume.shape[slice_axis] - 1)
    index: list[object] = [None, None, None]
    index[slice_axis] = channels
    extents = []
    for a in plane_axes:
        index[a] = window_inside(centre[a], size, volume.shape[a])
        extents.append(index[a].stop - index[a].start)
    # Reads only the crop from a memmap; moveaxis puts the channel axis first.
    crop = np.moveaxis(volume[tuple(index)], slice_axis, 0)
    out = np.zeros((in_chans, size, size), dtype=crop.dtype)
    out[:, : extents[0], : extents[1]] = crop
    inside = np.zeros((size, size), dtype=bool)
    inside[: extents[0], : extents[1]] = True
    return out, inside


def _channels_last(planes: np.ndarray) -> np.ndarray:
    """(M, S, S) target planes as albumentations masks: (S, S) for one plane, else (S, S, M)."""
    return planes[0] if len(planes) == 1 else np.ascontiguousarray(planes.transpose(1, 2, 0))


def _channels_first(mask: np.ndarray) -> np.ndarray:
    """An albumentations mask back as (M, S, S) planes (the inverse of ``_channels_last``)."""
    return mask[None] if mask.ndim == 2 else mask.transpose(2, 0, 1)


def _centre_inside(
    centre: tuple[int, int, int], frame: np.ndarray, size: int, shape: tuple[int, ...], slice_axis: int
) -> tuple[float, float, float]:
    """``centre`` moved in-plane so that a ``size`` crop on ``frame`` stays inside a volume of
    ``shape`` (as ``window_inside`` does for axis crops), or centred on an axis it overhangs."""
    moved = [float(c) for c in centre]
    for axis in range(3):
        if axis == slice_axis:
            continue
        half = size / 2 * (abs(frame[axis, 1]) + abs(frame[axis, 2]))  # the crop's half extent on this axis
        low, high = half, shape[axis] - 1 - half
        moved[axis] = (shape[axis] - 1) / 2 if low > high else float(np.clip(moved[axis], low, high))
    return moved[0], moved[1], moved[2]


def window_inside(centre: int, size: int, length: int) -> slice:
    """The ``size`` indices around ``centre`` on an axis of ``length``, shifted to stay inside it
    (cut short where the axis is shorter than ``size``)."""
    start = int(np.clip(centre - size // 2, 0, max(length - size, 0)))
    return slice(start, min(start + size, length))


def build_augmentation(kind: str, *, nonnegative: bool = True) -> A.Compose | None:
    """The "hard" (5th-place style), "light" or no ("none") augmentation pipeline.

    Works on HWC float32 images of any channel count, with the target and the valid mask as masks;
    areas rotated or shifted in are filled with 0 in image, target and valid. The scale range of
    "hard" (0.7-1.3) covers the 50 -> 63 µm change of the private test volume. ``nonnegative``
    False (z-scored images) leaves out "hard"'s gamma, which is NaN on negative values
    (``intensity_p`` applies gamma to a [0, 1] rescaled copy instead).
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {kind!r}")
    if kind == "none":
        return None
    import albumentations as A

    geometric = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
    if kind == "light":
        photometric = [A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5)]
        return A.Compose([*geometric, *photometric], additional_targets={"valid": "mask"})
    geometric.append(
        A.Affine(
            scale=(0.7, 1.3), translate_percent=(-0.1, 0.1), rotate=(-45, 45), shear=(-5, 5),
            border_mode=0, fill=0, fill_mask=0, p=0.7,
        )
    )
    geometric.append(
        A.OneOf(
            [
                A.GridDistortion(num_steps=5, distort_limit=0.2, border_mode=0, p=1.0),
                A.ElasticTransform(alpha=30, sigma=6, border_mode=0, p=1.0),
            ],
            p=0.25,
        )
    )
    photometric = [
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.7),
        *([A.RandomGamma(gamma_limit=(70, 150), p=0.3)] if nonnegative else []),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5), p=1.0), A.MotionBlur(blur_limit=(3, 5), p=1.0)], p=0.2),
        A.GaussNoise(std_range=(0.01, 0.05), p=0.3),
    ]
    return A.Compose([*geometric, *photometric], additional_targets={"valid": "mask"})


def cache_volume(
    info: VolumeInfo, cache_dir: str | os.PathLike, *, progress: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """(images, labels) of a volume as read-only memmaps, written once under ``cache_dir``.

    The first call reads the TIFF slices into ``<cache_dir>/<name>_images.npy`` (and
    ``_labels.npy``); later calls only map the files. Lets training sample crops from volumes far
    larger than memory. Files are written atomically, so an interrupted cache is rebuilt.
    """
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    images = cached_array(folder / f"{info.name}_images.npy", info.shape, np.uint16,
                          lambda out: info.read_images(out=out, progress=progress))
    labels = None
    if info.label_paths is not None:
        labels = cached_array(folder / f"{info.name}_labels.npy", info.shape, np.bool_,
                              lambda out: np.copyto(out, read_labels(info.label_paths, progress=progress)))
    return images, labels


def cached_array(
    path: Path, shape: tuple[int, ...], dtype: np.dtype | type, fill: Callable[[np.ndarray], object]
) -> np.ndarray:
    """The ``.npy`` at ``path`` as a read-only memmap; when missing, ``fill(out)`` writes it first
    into a memmap of ``shape`` and ``dtype``, atomically (an interrupted write is redone)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
            fill(out)
            out.flush()
            del out
    mapped = np.load(path, mmap_mode="r")
    if mapped.shape != tuple(shape):
        raise ValueError(f"cached {path} has shape {mapped.shape}, the volume is {tuple(shape)}; delete it to rebuild")
    return mapped


def vessel_mask(target: np.ndarray) -> np.ndarray:
    """Where a target of any accepted dtype says vessel: probability >= 0.5 (uint8 >= 128)."""
    if target.dtype == np.bool_:
        return np.asarray(target)
    return target >= (128 if target.dtype == np.uint8 else 0.5)


def _foreground_points(target: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Up to ``limit`` (z, y, x) coordinates of labelled voxels, read slice by slice."""
    per_slice = []
    for z in range(target.shape[0]):
        ys, xs = np.nonzero(vessel_mask(target[z]))
        if ys.size:
            per_slice.append(np.stack([np.full_like(ys, z), ys, xs], axis=1))
    if not per_slice:
        return np.empty((0, 3), dtype=np.int64)
    points = np.concatenate(per_slice)
    if len(points) > limit:
        points = points[np.random.default_rng(seed).choice(len(points), limit, replace=False)]
    return points


def as_probability(target: np.ndarray, source_dtype: np.dtype) -> np.ndarray:
    """Labels read from a target of ``source_dtype`` (maybe already interpolated to float32) as
    float32 in [0, 1]: uint8 soft labels are scaled from 0..255."""
    out = target.astype(np.float32)
    if source_dtype == np.uint8:
        out *= np.float32(1 / 255)
    return out
