"""Inference: model logits for whole volumes.

For now one path: whole xy slices (2.5D stacks of ``in_chans`` neighbours, edges replicated),
padded to the model's stride, batched, logits averaged over models and stored as float16. It
serves validation during training and pseudo-labelling. The tiled, multi-axis, TTA engine
(``infer_volume``) builds on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .models import model_stride
from .normalize import Normalization, Window

__all__ = ["predict_slices"]


@torch.inference_mode()
def predict_slices(
    models: torch.nn.Module | Sequence[torch.nn.Module],
    volume: np.ndarray,
    *,
    in_chans: int,
    normalization: Normalization,
    window: Window | None = None,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Mean logits of ``models`` on every xy slice of ``volume``: a (Z, Y, X) float16 array.

    ``window`` is the volume's normalisation window (computed from ``volume`` when None).
    """
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    if not models:
        raise ValueError("predict_slices needs at least one model")
    if volume.ndim != 3 or volume.size == 0:
        raise ValueError(f"volume must be a non-empty (Z, Y, X) array, got shape {volume.shape}")
    if in_chans < 1 or in_chans % 2 == 0:
        raise ValueError(f"in_chans must be odd, got {in_chans}")
    if window is None:
        window = normalization.window(volume)
    for model in models:
        model.eval()
    depth, height, width = volume.shape
    stride = math.lcm(*(model_stride(model) for model in models))
    pad = (0, -width % stride, 0, -height % stride)
    logits = np.empty(volume.shape, dtype=np.float16)
    half = in_chans // 2
    for start in tqdm(range(0, depth, batch_size), desc="predict", unit="batch", disable=not progress):
        z_batch = range(start, min(start + batch_size, depth))
        stacks = [volume[np.clip(np.arange(z - half, z + half + 1), 0, depth - 1)] for z in z_batch]
        batch = torch.from_numpy(normalization.apply(np.stack(stacks), window)).to(device)
        batch = F.pad(batch, pad, mode="reflect" if min(height, width) > max(pad) else "replicate")
        summed = sum(model(batch).float() for model in models)
        logits[start : start + len(z_batch)] = (summed / len(models))[:, 0, :height, :width].cpu().numpy()
    return logits
