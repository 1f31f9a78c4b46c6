"""Pseudo-labels: soft labels for unlabelled or partly labelled volumes from trained models.

The 5th place trained on soft labels of extra data — never hardened — and found it the most
useful trick. ``make_pseudo_labels`` averages the logits of an ensemble, applies the sigmoid once
and stores the probability as uint8 (0..255) in a ``.npy`` file, which ``TrainConfig.soft_labels``
then feeds to training as a memmap.

The 3rd place instead densified the sparse labels of kidney_2 (~65 % of its vessels annotated)
and kidney_3 (~85 %): every annotated voxel kept, the model's most probable other voxels added
(0.652 -> 0.727 on the leaderboard in their ablation). ``densify_label`` does that to a stated
vessel fraction (or annotation coverage) and writes the result as uint8 0/255, which
``TrainConfig.soft_labels`` takes like any soft label.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_output
from .data import vessel_mask
from .devices import usable_devices
from .infer import infer_volume, load_ensemble
from .sources import as_source, iter_slices

__all__ = ["Densified", "densify_label", "make_pseudo_labels"]

LEVELS = 256  # uint8 probability levels: p = level / 255


def make_pseudo_labels(
    checkpoints: Sequence[str | os.PathLike],
    images: np.ndarray,
    out_path: str | os.PathLike,
    *,
    axes: tuple[str, ...] = ("xy", "xz", "yz"),
    tta: str = "flips",
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Path:
    """Write uint8 soft labels (255 x sigmoid of the ensemble's mean logits) for ``images``.

    The logits come from ``infer_volume`` over ``axes`` with ``tta`` views. All checkpoints must
    take the same input (in_chans and normalisation): their logits are averaged on one input.
    The file is written atomically. ``device`` None runs on the first device ``usable_devices``
    accepts (a working GPU, else the CPU).
    """
    if not checkpoints:
        raise ValueError("make_pseudo_labels needs at least one checkpoint")
    device = usable_devices(None if device is None else str(device))[0]
    ensemble = load_ensemble(list(checkpoints), device=device)
    logits = infer_volume(
        images, ensemble, axes=axes, tta=tta, batch_size=batch_size, device=device,
        polarity="as_given", return_logits=True, progress=progress,
    )
    out_path = Path(out_path)
    with atomic_output(out_path) as tmp:
        soft = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=images.shape)
        for z, slice_logits in enumerate(logits):
            probability = 1.0 / (1.0 + np.exp(-slice_logits.astype(np.float32)))
            soft[z] = np.rint(probability * 255)
        soft.flush()
        del soft
    return out_path


@dataclass(frozen=True)
class Densified:
    """What ``densify_label`` wrote: ``path``; the vessel fraction of the sparse label
    (``annotated_fraction``) and of the written one (``fraction``); the uint8 probability
    ``cut`` (voxels above it were added, and an evenly spread share of those at it); ``added``
    voxels."""

    path: Path
    annotated_fraction: float
    fraction: float
    cut: int
    added: int


def densify_label(
    sparse_label: Any,
    probability: Any,
    out_path: str | os.PathLike,
    *,
    target_fraction: float | None = None,
    coverage: float | None = None,
    progress: bool = True,
) -> Densified:
    """Write a dense label: ``sparse_label``'s vessels plus the most probable unlabelled voxels,
    until the vessel fraction of the volume is ``target_fraction``.

    Give ``target_fraction`` (of all voxels), or ``coverage``, the share of the vessels the
    sparse label annotates (kidney_2 ~0.65, kidney_3 ~0.85): the target is then the annotated
    fraction / coverage. ``sparse_label`` (bool, uint8 0/255 or float 0/1: vessel from half up) and
    ``probability`` (uint8 0..255 as ``make_pseudo_labels`` writes, or float in [0, 1]) are
    (Z, Y, X) arrays, memmaps or TIFF folders of the same shape, read slice by slice twice:
    first a histogram of the unlabelled voxels' probabilities picks the cut, then the slices
    are written, so no whole-volume float array is ever held. The added voxels are those above
    the cut plus, of the voxels exactly at it, a share spread evenly in Z, Y, X order that
    makes the count exact. Voxels of probability 0 are never added.

    The output is a uint8 .npy of 0/255 (written atomically), for ``TrainConfig.soft_labels``.

    Raises:
        ValueError: shapes differ, a dtype is not accepted, neither or both of
            ``target_fraction``/``coverage``, a target not above the annotated fraction or above
            1 (or above what the voxels of non-zero probability can reach), each naming it.
    """
    label, soft = _volume(sparse_label), _volume(probability)
    if tuple(label.shape) != tuple(soft.shape) or len(label.shape) != 3:
        raise ValueError(f"sparse_label shape {tuple(label.shape)} and probability shape {tuple(soft.shape)} "
                         "must be the same (Z, Y, X)")
    if soft.dtype != np.uint8 and soft.dtype.kind != "f":
        raise ValueError(f"probability must be uint8 (0..255) or float in [0, 1], got dtype {soft.dtype}")
    total = int(np.prod(label.shape))
    histogram, annotated = np.zeros(LEVELS, np.int64), 0
    for labelled, levels in _slices(label, soft, "histogram", progress):
        annotated += int(labelled.sum())
        histogram += np.bincount(levels[~labelled], minlength=LEVELS)
    if not annotated:
        raise ValueError("sparse_label has no vessel voxel (uint8 labels are 0/255, vessel where >= 128): "
                         "nothing to densify from")
    target = _target_count(annotated, total, target_fraction, coverage)
    need = target - annotated
    above = np.cumsum(histogram[::-1])[::-1]  # above[c]: unlabelled voxels at level >= c
    if need > above[1]:
        raise ValueError(f"target fraction {target / total:.6g} needs {need} more voxels, but only {above[1]} "
                         f"unlabelled voxels have a probability above 0 (at most {(annotated + above[1]) / total:.6g})")
    cut = int(np.nonzero(above >= need)[0].max())  # the highest level whose voxels cover the need
    strictly_above = int(above[cut + 1]) if cut + 1 < LEVELS else 0
    at_cut, take = int(histogram[cut]), need - strictly_above
    out_path = Path(out_path)
    seen = 0  # voxels at the cut passed so far, in Z, Y, X order
    with atomic_output(out_path) as tmp:
        dense = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=tuple(label.shape))
        for z, (labelled, levels) in enumerate(_slices(label, soft, "writing", progress)):
            tied = (levels == cut) & ~labelled
            count = int(tied.sum())
            # The i-th tied voxel is taken when floor((i + 1)·take / at_cut) steps up: take of at_cut, evenly.
            order = np.arange(seen, seen + count, dtype=np.int64)
            seen += count
            keep = labelled | (levels > cut)
            keep[tied] = (order + 1) * take // at_cut > order * take // at_cut
            dense[z] = keep * np.uint8(255)
        dense.flush()
        del dense
    return Densified(path=out_path, annotated_fraction=annotated / total, fraction=target / total, cut=cut, added=need)


def _target_count(annotated: int, total: int, target_fraction: float | None, coverage: float | None) -> int:
    """The vessel voxel count to reach, from exactly one of ``target_fraction`` and ``coverage``."""
    if (target_fraction is None) == (coverage is None):
        raise ValueError("give one of target_fraction (the vessel fraction to reach) and coverage "
                         "(the share of the vessels the sparse label annotates)")
    if coverage is not None:
        if not 0.0 < coverage < 1.0:
            raise ValueError(f"coverage must be in (0, 1): the annotated share of the vessels, got {coverage}")
        target_fraction = annotated / total / coverage
    annotated_fraction = annotated / total
    count = min(total, round(target_fraction * total))
    if not (annotated_fraction < target_fraction <= 1.0 and count > annotated):
        raise ValueError(f"target_fraction must be above the sparse label's vessel fraction "
                         f"({annotated_fraction:.6g}, {annotated} voxels) by at least one voxel and at most 1, "
                         f"got {target_fraction:.6g}")
    return count


def _volume(volume: Any) -> Any:
    """A path as a ``VolumeSource`` (TIFF folder, zarr); an array-like (bool too) as it is."""
    return as_source(volume) if isinstance(volume, (str, os.PathLike)) else volume


def _slices(label, soft, what: str, progress: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(vessel mask, uint8 probability levels) per Z slice of the two volumes."""
    bar = tqdm(zip(iter_slices(label), iter_slices(soft)), total=label.shape[0], unit="slice",
               desc=f"densify: {what}", disable=not progress, leave=False)
    for labelled, probability in bar:
        if probability.dtype != np.uint8:
            probability = np.rint(np.clip(probability, 0.0, 1.0) * 255).astype(np.uint8)
        yield vessel_mask(labelled), probability
