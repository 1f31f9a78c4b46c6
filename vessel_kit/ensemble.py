"""Ensembles: the models ``Predictor`` averages, loaded from modules or checkpoints, and what
they agree they must be fed (in_chans, normalisation, tile size, voxel size, spatial dims) and
their calibrated threshold.

Example::

    ensemble = load_ensemble(["a.safetensors", "b.safetensors"], weights=[2, 1])
    ensemble.threshold, ensemble.stride, ensemble.spatial_dims
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .models import load_checkpoint, model_stride, read_checkpoint_metadata
from .normalize import Normalization

ModelSource = torch.nn.Module | str | os.PathLike
DEFAULT_THRESHOLD = 0.5  # for models that carry no calibrated threshold

__all__ = ["DEFAULT_THRESHOLD", "Ensemble", "ModelSource", "check_tile_size", "load_ensemble", "module_spatial_dims"]


@dataclass
class Ensemble:
    """Models whose logits are averaged (with ``weights``), how they must be fed, and the
    probability threshold calibrated for them (None: not calibrated).

    Example::

        ensemble = load_ensemble(["fold0.safetensors", "fold1.safetensors"])
        predictor = Predictor(ensemble, InferConfig(tta="none"))
    """

    models: list[torch.nn.Module]
    weights: list[float]
    in_chans: int
    normalization: Normalization
    tile_size: int | None
    voxel_size_um: float | None
    threshold: float | None = None
    spatial_dims: int = 2

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this for every member (``models.model_stride``)."""
        return math.lcm(*(model_stride(model) for model in self.models))


def check_tile_size(tile_size: int | Sequence[int] | None, ensemble: Ensemble) -> None:
    """ValueError unless ``tile_size`` (None: the ensemble's own) fits every member's stride, with
    one side per spatial dimension when it gives several; run by callers that must refuse a bad
    option before reading any volume."""
    if tile_size is None:
        return
    sides = [tile_size] if isinstance(tile_size, int) else list(tile_size)
    if len(sides) not in (1, ensemble.spatial_dims):
        raise ValueError(f"tile_size {tile_size} needs 1 or {ensemble.spatial_dims} sides for these {ensemble.spatial_dims}D models")
    if any(side % ensemble.stride for side in sides):
        raise ValueError(f"tile_size must be a positive multiple of the models' stride {ensemble.stride}, got {tile_size}")


class _Member(NamedTuple):
    """What one ensemble member says about how it is fed (None: it does not say)."""

    source: str
    in_chans: int | None
    normalization: Normalization | None
    tile_size: int | None
    voxel_size_um: float | None
    threshold: float | None
    spatial_dims: int


def load_ensemble(
    models: ModelSource | Sequence[ModelSource],
    *,
    weights: Sequence[float] | None = None,
    in_chans: int | None = None,
    normalization: Normalization | None = None,
    device: str | torch.device = "cpu",
) -> Ensemble:
    """Models from modules and/or checkpoint paths; checkpoints bring their in_chans,
    normalisation, tile size, training voxel size, spatial dims and calibrated threshold (a
    module's spatial dims: 3 if it has 3D convolutions). Members must agree on what they are fed.
    The ensemble's threshold is the weighted mean of its checkpoints'; a checkpoint written
    before calibration counts as 0.5, with a warning."""
    items = list(models) if isinstance(models, (list, tuple)) else [models]
    if not items:
        raise ValueError("no models given")
    weights = [1.0] * len(items) if weights is None else [float(w) for w in weights]
    if len(weights) != len(items) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"model weights must be {len(items)} non-negative numbers with a positive sum, got {weights}")
    total = sum(weights)
    weights = [w / total for w in weights]
    loaded, members = [], []
    for item in items:
        if isinstance(item, torch.nn.Module):
            loaded.append(item.to(device).eval())
            members.append(_Member(type(item).__name__, in_chans, normalization, None, None, None, module_spatial_dims(item)))
        else:
            model, config = load_checkpoint(item, device=device)
            threshold = read_checkpoint_metadata(item)["threshold"]
            if threshold is None:
                warnings.warn(f"{item} has no calibrated threshold (written before calibration); "
                              f"it counts as {DEFAULT_THRESHOLD}", stacklevel=2)
                threshold = DEFAULT_THRESHOLD
            loaded.append(model)
            members.append(_Member(str(item), config.in_chans, config.normalization, config.tile_size,
                                   config.voxel_size_um, threshold, getattr(config, "spatial_dims", 2)))
    chans = _agree("in_chans", [(m.in_chans, m.source) for m in members], in_chans)
    norm = _agree("normalization", [(m.normalization, m.source) for m in members], normalization)
    tiles = {m.tile_size for m in members} - {None}
    voxels = _agree("training voxel size", [(m.voxel_size_um, m.source) for m in members], None)
    dims = _agree("spatial dims", [(m.spatial_dims, m.source) for m in members], None)
    if chans is None or norm is None:
        raise ValueError("in_chans and normalization are needed for models given as modules (checkpoints carry them)")
    calibrated = [(w, m.threshold) for w, m in zip(weights, members, strict=True) if m.threshold is not None]
    threshold = None
    if calibrated:
        threshold = sum(w * t for w, t in calibrated) / sum(w for w, _ in calibrated)
    tile = min(tiles, key=lambda t: t if isinstance(t, int) else min(t)) if tiles else None
    return Ensemble(loaded, weights, chans, norm, tile, voxels, threshold, dims)


def module_spatial_dims(model: torch.nn.Module) -> int:
    """3 for a model with 3D convolutions, else 2."""
    conv3d = (torch.nn.Conv3d, torch.nn.ConvTranspose3d)
    return 3 if any(isinstance(module, conv3d) for module in model.modules()) else 2


def _agree(what: str, values: list[tuple[object, str]], given: object):
    """The one value all members share (or ``given`` when no member says); else ValueError."""
    known = [(value, source) for value, source in values if value is not None]
    distinct = {repr(value) for value, _ in known}
    if given is not None:
        conflicting = [(v, s) for v, s in known if v != given]
        if conflicting:
            raise ValueError(f"{what}={given!r} was given, but {conflicting[0][1]} needs {conflicting[0][0]!r}")
        return given
    if len(distinct) > 1:
        listing = "; ".join(f"{source}: {value!r}" for value, source in known)
        raise ValueError(f"ensemble members disagree on {what} ({listing}); they need one input")
    return known[0][0] if known else None
