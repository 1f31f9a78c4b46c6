"""3D training patches: (D, H, W) blocks of several volumes for 3D networks, with the crop
datasets' sampling (``data.SampledVolumes``: volumes by weight, centres near vessels, items fixed
by (seed, epoch, index)) and labels (bool, uint8 soft, float probabilities; a valid mask).

A plain patch is the (D, H, W) box around its centre, shifted to stay inside the volume and
zero-padded (valid 0) where the volume is smaller. Rotated (``rotate_p``: any angle about a random
3D axis) and zoomed (``zoom_p``: real resampling) patches are sampled trilinearly on the
transformed grid (``oblique.sample_box``): the source region itself turns, so nothing is cropped
from a rotated square; bool labels are interpolated linearly and cut at 0.5, soft labels stay soft,
the valid mask is sampled nearest, and what falls outside the volume has valid 0. Then intensity
augmentation (image only) and random flips along each axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .augment import augment_intensity, build_intensity_augmentation, random_rotation, random_zoom, seed_pipeline
from .data import SampledVolumes, TrainVolume, as_probability, check_probabilities, checked_zoom_range, window_inside
from .normalize import Normalization
from .oblique import sample_box
from .values import is_int

__all__ = ["PatchConfig", "PatchDataset", "extract_box"]


@dataclass(frozen=True)
class PatchConfig:
    """How 3D patches are cut and sampled.

    ``patch_size`` is (D, H, W) voxels (z, y, x); each side must be a multiple of the network's
    stride. ``foreground_fraction`` of the patches are centred near a labelled vessel voxel
    (moved by up to a quarter patch per axis), the rest anywhere.

    Augmentation (each a per-patch probability, 0 = off):
        rotate_p: rotate the sampled region about a uniformly random 3D axis by an angle uniform
            in [0, ``rotate_max_deg``] degrees (0-180).
        zoom_p: resample by a factor f log-uniform in ``zoom_range`` (±5 % per axis): content
            appears f times its size.
        intensity_p: gamma, contrast/brightness, blur and noise on the normalised image.
        flips: flip each axis with probability 0.5.

    Example::

        patches = PatchConfig(patch_size=(32, 128, 128), rotate_p=0.5, rotate_max_deg=180.0)
    """

    patch_size: tuple[int, int, int] = (64, 64, 64)
    foreground_fraction: float = 0.5
    patches_per_epoch: int = 1000
    max_foreground_points: int = 200_000
    flips: bool = True
    rotate_p: float = 0.0
    rotate_max_deg: float = 180.0
    zoom_p: float = 0.0
    zoom_range: tuple[float, float] = (0.7, 1.15)
    intensity_p: float = 0.0

    def __post_init__(self) -> None:
        size = tuple(self.patch_size)
        if len(size) != 3 or not all(is_int(s) and s >= 1 for s in size):
            raise ValueError(f"patch_size must be 3 positive ints (D, H, W), got {self.patch_size!r}")
        object.__setattr__(self, "patch_size", size)
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {self.foreground_fraction}")
        if self.patches_per_epoch < 1:
            raise ValueError(f"patches_per_epoch must be >= 1, got {self.patches_per_epoch}")
        check_probabilities(self, ("rotate_p", "zoom_p", "intensity_p"))
        if not 0.0 <= self.rotate_max_deg <= 180.0:
            raise ValueError(f"rotate_max_deg must be in [0, 180] degrees, got {self.rotate_max_deg}")
        object.__setattr__(self, "zoom_range", checked_zoom_range(self.zoom_range))


class PatchDataset(SampledVolumes):
    """Random 3D patches from several volumes; item ``i`` of epoch ``e`` is deterministic.

    Items are dicts of float32 tensors ``image``, ``target`` and ``valid``, each (1, D, H, W).
    Call ``set_epoch`` before each epoch for fresh patches.

    Example::

        dataset = PatchDataset([volume], PatchConfig(patch_size=(32, 64, 64)), Normalization("percentile"))
        dataset.set_epoch(3)
        item = dataset[0]  # {"image": (1, 32, 64, 64), "target": ..., "valid": ...}
    """

    def __init__(
        self, volumes: Sequence[TrainVolume], config: PatchConfig, normalization: Normalization, *, seed: int = 0
    ) -> None:
        super().__init__(volumes, normalization, foreground_fraction=config.foreground_fraction,
                         max_foreground_points=config.max_foreground_points, seed=seed)
        self.config = config
        self.intensity = build_intensity_augmentation(config.intensity_p, 0.0)
        self._jitter = tuple(side // 4 for side in config.patch_size)

    def __len__(self) -> int:
        return self.config.patches_per_epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self.item_rng(index)
        volume_index = self.draw_volume(rng)
        centre = self.draw_centre(rng, volume_index, self._jitter)
        image, target, valid, inside = self._patch(volume_index, centre, self._draw_frame(rng))
        if self.intensity is not None:
            seed_pipeline(self.intensity, int(rng.integers(2**31)))
            image = augment_intensity(self.intensity, image, self._value_range)  # D slices as channels
        image[~inside] = 0.0
        if self.config.flips:
            axes = tuple(axis for axis, flip in enumerate(rng.random(3) < 0.5) if flip)
            image, target, valid = (np.flip(array, axes) for array in (image, target, valid))
        return {
            key: torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
            for key, array in (("image", image), ("target", target), ("valid", valid))
        }

    def _draw_frame(self, rng: np.random.Generator) -> np.ndarray | None:
        """The sampling frame of a rotated and/or zoomed patch, or None for a plain box. Draws
        from ``rng`` only for options that are on."""
        config = self.config
        rotate, zoom = (p > 0 and rng.random() < p for p in (config.rotate_p, config.zoom_p))
        if not (rotate or zoom):
            return None
        frame = random_rotation(rng, config.rotate_max_deg) if rotate else np.eye(3)
        if zoom:
            frame = frame / random_zoom(rng, *config.zoom_range)  # spacing 1/f along d, h, w
        return frame

    def _patch(
        self, volume_index: int, centre: tuple[int, int, int], frame: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(normalised image, target, valid, inside) of one patch, image and masks cut alike."""
        volume, shape = self.volumes[volume_index], self.config.patch_size
        if frame is None:
            image, inside = extract_box(volume.images, centre, shape)
            target, _ = extract_box(volume.target, centre, shape)
            ignore = None if volume.valid is None else extract_box(volume.valid, centre, shape)[0] == 0
        else:
            image, inside = sample_box(volume.images, centre, frame, shape)
            target, _ = sample_box(volume.target, centre, frame, shape)
            if volume.target.dtype == np.bool_:
                target = target >= 0.5
            ignore = None if volume.valid is None else sample_box(volume.valid, centre, frame, shape, order=0)[0] == 0
        valid = inside.astype(np.float32)
        if ignore is not None:
            valid[ignore] = 0.0
        image = self.normalization.apply(image, self.windows[volume_index])
        return image, as_probability(target, volume.target.dtype), valid, inside


def extract_box(volume: np.ndarray, centre: Sequence[int], shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The ``shape`` (D, H, W) box of ``volume`` around ``centre`` (z, y, x), shifted to stay inside
    and zero-padded where the volume is smaller; returns (box, inside), ``inside`` a bool mask of
    the voxels that came from the volume. Reads only the box (memmaps stay on disk)."""
    index = tuple(window_inside(c, s, n) for c, s, n in zip(centre, shape, volume.shape, strict=True))
    extent = tuple(slice(0, w.stop - w.start) for w in index)
    box = np.zeros(tuple(shape), dtype=volume.dtype)
    box[extent] = volume[index]
    inside = np.zeros(tuple(shape), dtype=bool)
    inside[extent] = True
    return box, inside
