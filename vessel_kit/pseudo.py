"""Pseudo-labels: soft labels for unlabelled or partly labelled volumes from trained models.

The 5th place trained on soft labels of extra data — never hardened — and found it the most
useful trick. ``make_pseudo_labels`` averages the logits of an ensemble, applies the sigmoid once
and stores the probability as uint8 (0..255) in a ``.npy`` file, which ``TrainConfig.soft_labels``
then feeds to training as a memmap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_output
from .devices import usable_devices
from .infer import infer_volume, load_ensemble

__all__ = ["make_pseudo_labels"]


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
        return_logits=True, progress=progress,
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
