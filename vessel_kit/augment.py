"""Random draws for training-time robustness: plane rotations, zoom factors, an intensity chain
and CutMix.

Geometry is drawn here and applied by ``oblique.sample_crop``; intensities are changed after
normalisation, on the image only (labels and masks are never touched). The intensity chain works
on images scaled to [0, 1] (albumentations' float range, which it clips to), so ``augment_intensity``
maps the normalisation's output range onto [0, 1] and back.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .oblique import rotation_matrix

if TYPE_CHECKING:  # albumentations is imported only to train: inference must not need it
    import albumentations as A

__all__ = [
    "augment_intensity",
    "build_intensity_augmentation",
    "cutmix",
    "log_uniform",
    "random_rotation",
    "random_zoom",
    "seed_pipeline",
]

ZOOM_JITTER = 0.05  # per-axis zoom varies by up to this fraction around the drawn factor


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation about a uniformly random 3D axis by an angle uniform in [0, max_deg] degrees."""
    return rotation_matrix(rng.normal(size=3), rng.uniform(0.0, max_deg))


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A factor drawn log-uniformly in [low, high], so zooming in and out are equally likely."""
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def random_zoom(rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """Per-axis zoom factors: one log-uniform draw in [low, high], jittered by ±ZOOM_JITTER per axis."""
    return log_uniform(rng, low, high) * np.exp(rng.uniform(-ZOOM_JITTER, ZOOM_JITTER, size=3))


def build_intensity_augmentation(intensity_p: float, invert_p: float) -> A.Compose | None:
    """The intensity chain for [0, 1] float images, or None when both probabilities are 0.

    With probability ``intensity_p``: gamma, contrast and brightness, gaussian blur (random sigma)
    and gaussian noise (random std, independent per channel), each step with its own chance; then,
    independently with probability ``invert_p``, inversion ``1 - x`` so vessels of either polarity
    are learned. Seed it per item with ``seed_pipeline``.
    """
    if intensity_p == 0 and invert_p == 0:
        return None
    import albumentations as A

    chain = A.Compose(
        [
            A.RandomGamma(gamma_limit=(60, 170), p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.3, p=0.7),
            A.GaussianBlur(blur_limit=0, sigma_limit=(0.3, 1.5), p=0.3),
            A.GaussNoise(std_range=(0.01, 0.08), p=0.4),
        ],
        p=intensity_p,
    )
    return A.Compose([chain, A.InvertImg(p=invert_p)])


def seed_pipeline(pipeline: A.BaseCompose, seed: int) -> None:
    """Seed an albumentations pipeline for one item with one random stream shared by its transforms.

    ``Compose.set_random_seed`` (albumentations 2.0) seeds every transform with the same seed, so
    their draws coincide: all p=0.5 transforms fire together (both flips or neither). A shared
    stream keeps the item deterministic and the transforms independent.
    """
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


def augment_intensity(
    transform: A.Compose, image: np.ndarray, value_range: tuple[float, float] | None
) -> np.ndarray:
    """``transform`` applied to a (C, H, W) float32 image whose values span ``value_range``.

    The image is mapped from ``value_range`` onto [0, 1] for the chain and back, so gamma sees
    non-negative values and inversion maps the range onto itself. ``None`` (z-scored images, no
    fixed range) uses the crop's own min and max.
    """
    low, high = value_range if value_range is not None else (float(image.min()), float(image.max()))
    scale = max(high - low, 1e-6)
    unit = np.clip((image - low) / scale, 0.0, 1.0).astype(np.float32)
    out = transform(image=np.ascontiguousarray(unit.transpose(1, 2, 0)))["image"]
    return (out.transpose(2, 0, 1) * scale + low).astype(np.float32)


def cutmix(
    first: Sequence[np.ndarray], second: Sequence[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, ...]:
    """CutMix (Yun et al. 2019): ``first``'s arrays with one random box taken from ``second``'s.

    The arrays of an item (image (C, H, W), target (H, W), valid (H, W), ...) share their last two
    axes and get the same box, so the pasted image keeps its labels and its valid mask. The box
    covers a fraction 1 - lambda of the plane, lambda uniform in [0, 1] (Beta(1, 1), as in the
    paper), centred uniformly and clipped at the edges.
    """
    height, width = first[0].shape[-2:]
    cut = np.sqrt(1.0 - rng.uniform())
    box_h, box_w = int(height * cut), int(width * cut)
    y, x = int(rng.integers(height)), int(rng.integers(width))
    rows = slice(max(y - box_h // 2, 0), min(y + box_h - box_h // 2, height))
    columns = slice(max(x - box_w // 2, 0), min(x + box_w - box_w // 2, width))
    mixed = []
    for a, b in zip(first, second, strict=True):
        if a.shape[-2:] != (height, width) or b.shape != a.shape:
            raise ValueError(f"cutmix needs arrays of one plane shape, got {a.shape} and {b.shape}")
        out = np.array(a, copy=True)
        out[..., rows, columns] = b[..., rows, columns]
        mixed.append(out)
    return tuple(mixed)
