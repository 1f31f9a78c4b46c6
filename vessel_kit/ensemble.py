"""Ensembles: the models ``Predictor`` averages, loaded from modules or checkpoints, and what
they agree they must be fed (in_chans, normalisation, tile size, voxel size, spatial dims) and
give (out_chans: the planes a 2.5D model predicts), and
their calibrated threshold.

Members of one rank form an ``Ensemble``. 2D and 3D members together form a ``MixedEnsemble``:
one ``Ensemble`` per rank (each agreeing on its own in_chans, normalisation and tile size), whose
logits are added with the share of the weight its members hold. Both give ``groups()``, the
(ensemble, share) pairs the ``Predictor`` runs.

Example::

    ensemble = load_ensemble(["a.safetensors", "b.safetensors"], weights=[2, 1])
    ensemble.threshold, ensemble.stride, ensemble.spatial_dims
    mixed = load_ensemble(["unet2d.safetensors", "dynunet3d.safetensors"], weights=[1, 3])
    [(group.spatial_dims, share) for group, share in mixed.groups()]  # [(2, 0.25), (3, 0.75)]
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .models import load_checkpoint, model_stride, module_out_chans, read_checkpoint_metadata
from .normalize import Normalization

ModelSource = torch.nn.Module | str | os.PathLike
DEFAULT_THRESHOLD = 0.5  # for models that carry no calibrated threshold

__all__ = ["DEFAULT_THRESHOLD", "Ensemble", "MixedEnsemble", "ModelSource", "check_tile_size", "load_ensemble",
           "module_spatial_dims"]


@dataclass
class Ensemble:
    """Models whose logits are averaged (with ``weights``), how they must be fed, and the
    probability threshold and smallest component (at the models' resolution) calibrated for
    them (None: not calibrated).

    Example::

        ensemble = load_ensemble(["fold0.safetensors", "fold1.safetensors"])
        predictor = Predictor(ensemble, InferConfig(tta="none"))
    """

    models: list[torch.nn.Module]
    weights: list[float]
    in_chans: int
    normalization: Normalization
    tile_size: int | tuple[int, ...] | None
    voxel_size_um: float | None
    threshold: float | None = None
    spatial_dims: int = 2
    out_chans: int = 1
    min_component_size: int | None = None

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this for every member (``models.model_stride``)."""
        return math.lcm(*(model_stride(model) for model in self.models))

    def groups(self) -> list[tuple[Ensemble, float]]:
        """The one rank this ensemble has, with all the weight: ``[(self, 1.0)]``."""
        return [(self, 1.0)]


@dataclass
class MixedEnsemble:
    """2D and 3D models averaged together: ``members`` holds one ``Ensemble`` per rank (2D
    first), ``shares`` the part of the total model weight each holds (summing to 1); ``threshold``
    and ``voxel_size_um`` are the whole ensemble's.

    Example::

        mixed = load_ensemble(["unet2d.safetensors", "dynunet3d.safetensors"], weights=[1, 3])
        predictor = Predictor(mixed, InferConfig(axes=("xy",), tta="none"))
    """

    members: list[Ensemble]
    shares: list[float]
    voxel_size_um: float | None
    threshold: float | None = None
    min_component_size: int | None = None

    def groups(self) -> list[tuple[Ensemble, float]]:
        """Each rank's ensemble with its share of the weight."""
        return list(zip(self.members, self.shares, strict=True))


def check_tile_size(tile_size: int | Sequence[int] | None, ensemble: Ensemble | MixedEnsemble) -> None:
    """ValueError unless ``tile_size`` (None: the ensemble's own) fits every member's stride, with
    one side per spatial dimension when it gives several; run by callers that must refuse a bad
    option before reading any volume. A mixed ensemble's ranks all get the same tile size."""
    if tile_size is None:
        return
    sides = [tile_size] if isinstance(tile_size, int) else list(tile_size)
    for group, _ in ensemble.groups():
        dims = group.spatial_dims
        if len(sides) not in (1, dims):
            raise ValueError(f"tile_size {tile_size} needs 1 or {dims} sides for these {dims}D models")
        if any(side % group.stride for side in sides):
            multiples = f"{group.stride} or {2 * group.stride}"
            raise ValueError(f"tile_size must be a positive multiple of the models' stride {group.stride}, got "
                             f"{tile_size}: use sides such as {multiples}")


class _Member(NamedTuple):
    """What one ensemble member says about how it is fed (None: it does not say)."""

    source: str
    in_chans: int | None
    normalization: Normalization | None
    tile_size: int | tuple[int, ...] | None
    voxel_size_um: float | None
    threshold: float | None
    spatial_dims: int
    out_chans: int
    min_component_size: int | None = None


def load_ensemble(
    models: ModelSource | Sequence[ModelSource],
    *,
    weights: Sequence[float] | None = None,
    in_chans: int | None = None,
    normalization: Normalization | None = None,
    device: str | torch.device = "cpu",
) -> Ensemble | MixedEnsemble:
    """Models from modules and/or checkpoint paths; checkpoints bring their in_chans,
    normalisation, tile size, training voxel size, spatial dims, out_chans and calibrated threshold
    (a module's spatial dims: 3 if it has 3D convolutions; its out_chans: ``module_out_chans``).
    Members of one rank must agree on what they are fed and on out_chans; all must agree on the training voxel size (the volume is resampled once).
    3D members read one channel: a given ``in_chans`` is the 2D modules' (and must be 1 when
    every member is 3D); a given ``normalization`` is every module's.

    Members of one rank give an ``Ensemble``; 2D and 3D members together a ``MixedEnsemble``.
    The threshold is the weighted mean of the checkpoints'; a checkpoint written before
    calibration counts as 0.5, with a warning. The smallest component kept is the smallest
    calibrated one of the weighted checkpoints (None: none has one)."""
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
            dims = module_spatial_dims(item)
            chans = 1 if dims == 3 else in_chans
            members.append(_Member(type(item).__name__, chans, normalization, None, None, None, dims,
                                   module_out_chans(item)))
        else:
            model, config = load_checkpoint(item, device=device)
            header = read_checkpoint_metadata(item)
            threshold = header["threshold"]
            if threshold is None:
                warnings.warn(f"{item} has no calibrated threshold (written before calibration); "
                              f"it counts as {DEFAULT_THRESHOLD}", stacklevel=2)
                threshold = DEFAULT_THRESHOLD
            loaded.append(model)
            members.append(_Member(str(item), config.in_chans, config.normalization, config.tile_size,
                                   config.voxel_size_um, threshold, config.spatial_dims, config.out_chans,
                                   header["min_component_size"]))
    ranks = sorted({m.spatial_dims for m in members})
    if ranks == [3] and in_chans not in (None, 1):
        raise ValueError(f"in_chans={in_chans} was given, but 3D models read one channel: give in_chans=1 or none")
    voxels = _agree("training voxel size", [(m.voxel_size_um, m.source) for m in members], None)
    threshold = _weighted_threshold([(w, m.threshold) for w, m in zip(weights, members, strict=True)])
    # the least removal any member was calibrated for: a component one model needs stays
    sizes = [m.min_component_size for w, m in zip(weights, members, strict=True) if w > 0 and m.min_component_size is not None]
    min_size = min(sizes) if sizes else None
    groups, shares = [], []
    for rank in ranks:
        picked = [i for i, m in enumerate(members) if m.spatial_dims == rank]
        share = sum(weights[i] for i in picked)
        if share == 0:  # every model of this rank has weight 0: it adds nothing
            continue
        group = [members[i] for i in picked]
        chans = _agree("in_chans", [(m.in_chans, m.source) for m in group], in_chans if rank == 2 else None)
        norm = _agree("normalization", [(m.normalization, m.source) for m in group], normalization)
        if chans is None or norm is None:
            raise ValueError("in_chans and normalization are needed for models given as modules (checkpoints carry them)")
        out_chans = _agree("out_chans", [(m.out_chans, m.source) for m in group], None)
        tiles = {m.tile_size for m in group} - {None}
        tile = min(tiles, key=lambda t: t if isinstance(t, int) else min(t)) if tiles else None
        group_threshold = _weighted_threshold([(weights[i], members[i].threshold) for i in picked])
        groups.append(Ensemble([loaded[i] for i in picked], [weights[i] / share for i in picked], chans, norm, tile,
                               voxels, group_threshold, rank, out_chans, min_size))
        shares.append(share)
    if len(groups) == 1:
        return groups[0]
    return MixedEnsemble(groups, shares, voxels, threshold, min_size)


def module_spatial_dims(model: torch.nn.Module) -> int:
    """3 for a model with 3D convolutions, else 2."""
    conv3d = (torch.nn.Conv3d, torch.nn.ConvTranspose3d)
    return 3 if any(isinstance(module, conv3d) for module in model.modules()) else 2


def _weighted_threshold(pairs: list[tuple[float, float | None]]) -> float | None:
    """The weighted mean of the thresholds that are known (None: none is)."""
    known = [(w, t) for w, t in pairs if t is not None]
    return sum(w * t for w, t in known) / sum(w for w, _ in known) if known else None


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
