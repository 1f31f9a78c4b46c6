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
from .infer import predict_slices
from .models import load_checkpoint

__all__ = ["make_pseudo_labels"]


def make_pseudo_labels(
    checkpoints: Sequence[str | os.PathLike],
    images: np.ndarray,
    out_path: str | os.PathLike,
    *,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Write uint8 soft labels (255 x sigmoid of the ensemble's mean logits) for ``images``.

    All checkpoints must take the same input (in_chans and normalisation), since their logits are
    averaged on one input. The file is written atomically.
    """
    if not checkpoints:
        raise ValueError("make_pseudo_labels needs at least one checkpoint")
    loaded = [load_checkpoint(path, device=device) for path in checkpoints]
    models = [model for model, _ in loaded]
    first = loaded[0][1]
    for path, (_, config) in zip(checkpoints, loaded, strict=True):
        if (config.in_chans, config.normalization) != (first.in_chans, first.normalization):
            raise ValueError(
                f"{path} takes in_chans={config.in_chans}, {config.normalization}; {checkpoints[0]} takes "
                f"in_chans={first.in_chans}, {first.normalization}: an ensemble needs one input"
            )
    logits = predict_slices(
        models, images, in_chans=first.in_chans, normalization=first.normalization,
        batch_size=batch_size, device=device, progress=progress,
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
