"""``Predictor``: models and an ``InferConfig`` set up once, then whole volumes predicted.

Prediction of logits is kept apart from export, as in nnU-Net: ``Predictor.logits`` fills one
float16 (Z, Y, X) accumulator with the averaged logits; ``Predictor.to_mask`` turns them into a
mask (threshold, hysteresis or top fraction, then small-component removal).

How the accumulator is filled depends on the models' rank (``windows.py``):

- 2D / 2.5D models: for each axis (xy, xz, yz) every plane is cut into overlapping tiles —
  ``in_chans`` neighbouring planes as channels, edges replicated — tiles of consecutive planes
  are batched together, each batch goes through every TTA view of every model, the view logits
  are inverted and averaged, the tiles are blended back with a gaussian importance map, and the
  plane, divided by the summed weights, is added (times the axis weight) into the accumulator.
  A multi-slice model (``out_chans`` m > 1, e.g. the 1st place's 3 in, 3 out) predicts the m
  planes centred on its window's middle plane: each output plane is summed into its own plane,
  and a plane is blended once every window that predicts it is in, divided by their count (m
  windows, fewer within m // 2 planes of the volume's ends). The open planes are those within
  m // 2 of the planes being predicted: a few planes of float32 sums more, nothing per volume.
- 3D models: the volume is cut into overlapping patches; each patch's view-averaged logits,
  times its gaussian and divided by the (separable) summed weights, are added into the
  accumulator directly.
- 2D and 3D models together (``MixedEnsemble``): the 2D models' plane passes and the 3D models'
  patch pass fill the same accumulator, each weighted by its models' share of the weight.

A window larger than the volume is fine: the volume is padded up to it (mirrored at its border),
at the cost of predicting the padding.

Memory: the input stays as it is (uint16), the accumulator is float16 (or a memmap), and the rest
is a few planes, patches and batches: peak memory does not grow with the number of axes, views
or models. A background thread prepares the next batch while the model runs (unless
``InferConfig.prefetch`` is False). When the volume's voxel size differs from the models'
training voxel size, the volume is resampled to the models' resolution (``resample.py``) and the
logits are resampled back slice by slice.

Block-wise (``logits(..., region=box)``, driven by ``blocks.py``): only the box's logits, from the
windows of the whole volume's grid that reach it, read where they need it, so the box equals
that part of the whole-volume result (2D, 2.5D and 3D models).

Example::

    predictor = Predictor(["best.safetensors"], InferConfig(tta="none", axes=("xy",)))
    logits = predictor.logits(volume, voxel_size_um=50.0)
    mask = predictor.to_mask(logits)
"""

from __future__ import annotations

import copy
import itertools
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .axes import AXES, SLICE_AXIS
from .calibration import logit, scaled_component_size
from .deadline import Deadline, DeadlineWarning
from .devices import usable_devices
from .ensemble import DEFAULT_THRESHOLD, Ensemble, MixedEnsemble, ModelSource, check_tile_size, load_ensemble
from .infer_config import InferConfig
from .models import compile_model, memory_format
from .normalize import Normalization, Window
from .polarity import InvertedSource, MaskCount, asks_for_mirrored, count_voxels, keeps_mirrored
from .hull import hull_slices, sum_rule_slices
from .postprocess import hysteresis_threshold, mask_output, order_keys, remove_small_components, top_fraction_key
from .regions import Region, check_region, region_shape
from .resample import ResampledSource, resample_region, resample_volume, resampled_slices, scaled_shape, source_span
from .sources import ArraySource, VolumeSource, as_source, read_planes
from .tta import View, tta_views
from .windows import PatchPass, PlanePass, Reach, plan_patches, plan_planes

LOGIT_LIMIT = 1000.0  # logits are clipped to +-this before float16 accumulation (max 65504)
RESCALE_TOLERANCE = 0.02  # voxel sizes within 2 % count as equal (kidney_5: 50.28 vs 50 µm)
MAX_RESCALE = 8.0  # a volume is never resampled by more than this factor per side (a wrong voxel size)

__all__ = ["LOGIT_LIMIT", "MAX_RESCALE", "RESCALE_TOLERANCE", "LogitVolume", "Prediction", "Predictor", "voxel_ratio"]


@dataclass(frozen=True)
class LogitVolume:
    """The averaged float16 logits of one volume, at the models' resolution (``accumulator``),
    and the (Z, Y, X) ``shape`` of the volume they belong to. Under ``InferConfig.hull_gate``
    they are the 3D models' logits, and ``hull`` holds the 2D models' (whose mask gates them).

    Example::

        logits = predictor.logits(volume, voxel_size_um=63.08)  # accumulator at the models' 50 µm
        for z, plane in enumerate(logits.slices()):             # back at 63.08 µm, slice by slice
            ...
    """

    accumulator: np.ndarray
    shape: tuple[int, int, int]
    hull: LogitVolume | None = None
    mirrored: bool = False  # predicted from the volume's mirrored intensities (``polarity.InvertedSource``)

    def slices(self) -> Iterator[np.ndarray]:
        """The logits one (Y, X) slice at a time, at ``shape`` (resampled when needed)."""
        if self.accumulator.shape == self.shape:
            return iter(self.accumulator)
        return resampled_slices(self.accumulator, self.shape, dtype=np.float16)

    def array(self) -> np.ndarray:
        """The logits as one float16 array of ``shape`` (the accumulator itself when no
        resampling was needed)."""
        if self.accumulator.shape == self.shape:
            return self.accumulator
        return resample_volume(self.accumulator, self.shape, dtype=np.float16)

    @property
    def voxels_per_model_voxel(self) -> float:
        """Voxels of ``shape`` per voxel of the accumulator (the models' resolution): what a
        component size counted at the models' resolution scales by for this volume."""
        return float(np.prod(self.shape) / np.prod(self.accumulator.shape))


class Prediction(NamedTuple):
    """A volume's ``LogitVolume`` and its bool mask (None when not asked for)."""

    logits: LogitVolume
    mask: np.ndarray | None


class Predictor:
    """One model, checkpoint or ensemble, set up once (loaded, replicated on its devices) to
    predict any number of volumes as ``config`` says.

    ``model_weights``, ``in_chans`` and ``normalization`` are for loading (modules need
    ``in_chans`` and ``normalization``; checkpoints carry them); with an ``Ensemble`` or
    ``MixedEnsemble`` they belong to it and must not be given.

    3D models refuse the options of plane passes: ``axes`` other than the default or ("xy",)
    (the volume's own orientation), ``axis_weights`` and ``reverse_slices``; ``tta="d4"`` rotates
    their patches in the (H, W) plane, so it needs patches with H == W. In a mixed ensemble those
    options are the 2D models'. ``min_plane_side`` only concerns plane passes.

    Example::

        predictor = Predictor("best.safetensors", InferConfig(tta="flips"))
        for volume in volumes:
            mask = predictor.predict(volume, voxel_size_um=63.08)
    """

    def __init__(
        self,
        models: ModelSource | Sequence[ModelSource] | Ensemble | MixedEnsemble,
        config: InferConfig | None = None,
        *,
        model_weights: Sequence[float] | None = None,
        in_chans: int | None = None,
        normalization: Normalization | None = None,
    ) -> None:
        self.config = config or InferConfig()
        self.devices = _devices(self.config.device)
        given = isinstance(models, (Ensemble, MixedEnsemble))
        if given and (in_chans, normalization, model_weights) != (None, None, None):
            raise ValueError("in_chans, normalization and model_weights belong to the Ensemble; don't pass them with one")
        self.ensemble = models if given else load_ensemble(
            models, weights=model_weights, in_chans=in_chans, normalization=normalization, device=self.devices[0]
        )
        check_tile_size(self.config.tile_size, self.ensemble)
        _check_3d_options(self.config, self.ensemble)
        self.axis_weights = _axis_weights(self.config)
        self._groups = [_Group(group, share, _replicas(group, self.devices, compiled=self.config.compile))
                        for group, share in self.ensemble.groups()]

    @property
    def threshold(self) -> float:
        """The probability threshold masks use: the config's, else the ensemble's calibrated one,
        else 0.5."""
        if self.config.threshold is not None:
            return self.config.threshold
        return DEFAULT_THRESHOLD if self.ensemble.threshold is None else self.ensemble.threshold

    def min_component_size(self, voxel_ratio: float = 1.0) -> int:
        """The smallest 3D component masks keep, in voxels of a volume with ``voxel_ratio`` voxels
        per model voxel: the config's as given, else the ensemble's calibrated one (counted at the
        models' resolution) scaled by ``voxel_ratio``, else 0 (keep all)."""
        if self.config.min_component_size is not None:
            return self.config.min_component_size
        return self.calibrated_min_component_size(voxel_ratio)

    def calibrated_min_component_size(self, voxel_ratio: float = 1.0) -> int:
        """The ensemble's calibrated smallest component (counted at the models' resolution) in
        voxels of a volume with ``voxel_ratio`` voxels per model voxel; 0 when it has none."""
        return scaled_component_size(self.ensemble.min_component_size or 0, voxel_ratio)

    def predict(
        self,
        volume: VolumeSource | np.ndarray,
        *,
        voxel_size_um: float | None = None,
        deadline: float | None = None,
        accumulator_path: str | os.PathLike | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """The (Z, Y, X) bool mask of ``volume``: ``prediction(...).mask``."""
        return self.prediction(volume, voxel_size_um=voxel_size_um, deadline=deadline,
                               accumulator_path=accumulator_path, out=out).mask

    def prediction(
        self,
        volume: VolumeSource | np.ndarray,
        *,
        voxel_size_um: float | None = None,
        deadline: float | None = None,
        accumulator_path: str | os.PathLike | None = None,
        out: np.ndarray | None = None,
        with_mask: bool = True,
    ) -> Prediction:
        """The logits (``logits``) and mask (``to_mask``, into ``out``) of the whole ``volume`` in
        the config's ``polarity`` (``vessel_kit.polarity``): as read, mirrored, or ("auto", the
        default) as read and, only when that mask finds almost nothing (``polarity.asks_for_mirrored``:
        almost empty, or sparse and speckled), mirrored too, keeping the mirrored pass when
        ``polarity.keeps_mirrored`` (fuller, plausible, less speckled; its accumulator goes beside
        ``accumulator_path``).
        ``with_mask=False``: the logits alone (no mask made where the polarity needs none)."""
        if hasattr(volume, "ndim"):
            _check_volume(volume)
        source = as_source(volume)
        options = {"voxel_size_um": voxel_size_um, "deadline": deadline}
        polarity = self.config.polarity or "auto"
        first = self.logits(InvertedSource(source) if polarity == "inverted" else source,
                            accumulator_path=accumulator_path, **options)
        if polarity != "auto" and not with_mask:
            return Prediction(first, None)
        if polarity != "auto":
            return Prediction(first, self.to_mask(first, out=out))
        mask, as_read = self.counted_mask(first, out=out)
        if not asks_for_mirrored(as_read):
            return Prediction(first, mask)
        try:
            mirrored = self.logits(InvertedSource(source), accumulator_path=_beside(accumulator_path, "mirrored"),
                                   **options)
        except TimeoutError:  # the scan as read was predicted in time: its mask stands
            warnings.warn(f"the mask of {source!r} as read finds almost nothing ({as_read.described()}) and the "
                          "deadline left no time to predict its mirrored intensities (polarity 'auto')",
                          DeadlineWarning, stacklevel=2)
            return Prediction(first, mask)
        mirrored_mask, mirrored_count = self.counted_mask(mirrored)
        if not keeps_mirrored(as_read, mirrored_count):
            return Prediction(first, mask)
        warnings.warn(f"the mask of {source!r} as read finds almost nothing ({as_read.described()}), that of its "
                      f"mirrored intensities {mirrored_count.described()}: the mirrored one is used (polarity 'auto'; "
                      "polarity='as_given' keeps the scan as read)", stacklevel=2)
        mask[...] = mirrored_mask
        return Prediction(mirrored, mask)

    def logits(
        self,
        volume: VolumeSource | np.ndarray,
        *,
        voxel_size_um: float | None = None,
        deadline: float | None = None,
        accumulator_path: str | os.PathLike | None = None,
        region: Sequence[slice] | None = None,
        intensity_windows: Sequence[Window | None] | None = None,
    ) -> LogitVolume:
        """The averaged logits of a (Z, Y, X) ``volume`` (uint16 as read, or any real dtype): an
        array-like (numpy, memmap, zarr, dask), a folder of TIFF slices or any ``VolumeSource``,
        read plane slab by plane slab (or patch by patch), never whole.

        ``voxel_size_um`` (default: the source's): when it and the models' voxel size are known
        and differ by more than ``RESCALE_TOLERANCE``, the volume is resampled to the models'
        resolution (which reads it whole).
        ``deadline``: a ``time.monotonic()`` time; a pass (axis) that would end past it at the
        tile rate so far is not started and the passes done are used alone (``DeadlineWarning``);
        past it in the middle of a pass, ``TimeoutError``. ``accumulator_path``: keep the float16
        accumulator in a ``.npy`` memmap there instead of RAM.
        ``region``: one slice per axis; only the logits of that box are predicted (the
        ``LogitVolume`` of the box, at the volume's resolution), bit-identical to that box of the
        whole volume's logits up to the models' batch arithmetic: see ``_region_logits``.
        ``intensity_windows``: the normalisation windows, one per rank (``intensity_windows``);
        default: sampled from ``volume``.
        """
        if hasattr(volume, "ndim"):
            _check_volume(volume)
        original = as_source(volume)
        mirrored = isinstance(original, InvertedSource)
        config = self.config
        voxel_size_um = original.voxel_size_um if voxel_size_um is None else voxel_size_um
        model_voxel_um = config.model_voxel_size_um or self.ensemble.voxel_size_um
        windows = self.intensity_windows(original) if intensity_windows is None else list(intensity_windows)
        if len(windows) != len(self._groups):
            raise ValueError(f"intensity_windows has {len(windows)} windows; these models need {len(self._groups)} (one per rank)")
        if region is not None:
            if deadline is not None or accumulator_path is not None:
                raise ValueError("deadline and accumulator_path are for whole volumes; a region (block) is predicted "
                                 "in RAM without a deadline: leave them unset with region")
            return self._region_logits(original, region, _model_shape(original.shape, voxel_size_um, model_voxel_um), windows)
        source = _at_model_resolution(original, voxel_size_um, model_voxel_um)
        plans = [self._plan(group, source.shape, window) for group, window in zip(self._groups, windows, strict=True)]
        clock = Deadline(deadline, total=sum(work.tile_count for jobs in plans for work, _, _ in jobs))
        with _Progress(clock.total, config.progress, clock) as tick:
            if config.hull_gate is None:
                accumulator = _accumulate(source, [job for jobs in plans for job in jobs], _zeros(source.shape, accumulator_path), clock, tick)
                return LogitVolume(accumulator, original.shape, mirrored=mirrored)
            # hull gating: each rank is averaged on its own; the 2D models' mask gates the 3D models'
            by_rank = {group.ensemble.spatial_dims: jobs for group, jobs in zip(self._groups, plans, strict=True)}
            hull = _accumulate(source, by_rank[2], _zeros(source.shape, _beside(accumulator_path, "hull")), clock, tick)
            gated = _accumulate(source, by_rank[3], _zeros(source.shape, accumulator_path), clock, tick)
        return LogitVolume(gated, original.shape, hull=LogitVolume(hull, original.shape, mirrored=mirrored), mirrored=mirrored)

    def intensity_windows(self, volume: VolumeSource | np.ndarray) -> list[Window | None]:
        """Each rank's intensity window for ``volume`` (sampled from it, see ``Normalization.window``):
        computed once per volume and passed to every block of a block-wise run."""
        source = as_source(volume)
        return [group.ensemble.normalization.window(source) for group in self._groups]

    def _region_logits(self, original: VolumeSource, region: Sequence[slice], shape: tuple[int, int, int],
                       windows: list[Window | None]) -> LogitVolume:
        """The logits of the box ``region`` of ``original``, predicted at the models' resolution
        (``shape``) over the same global window grid as the whole volume: only the windows that
        reach the box are run, reading only what they (and the 2.5D neighbour planes) need, and
        each voxel's window sum, normaliser, clipping and float16 additions are those of the
        whole-volume run. With resampling, the box of the model-resolution volume that the
        region's logits are resampled from is predicted, from a ``ResampledSource``, and resampled
        back with the same taps as the whole volume."""
        self._check_blockable()
        region = check_region(region, original.shape)
        source = original if shape == original.shape else ResampledSource(original, shape)
        core = region if shape == original.shape else source_span(shape, original.shape, region)
        plans = [self._plan(group, shape, window) for group, window in zip(self._groups, windows, strict=True)]
        jobs = [job for jobs in plans for job in jobs]
        clock = Deadline(None, total=sum(_tiles_reaching(work, core, feed.out_chans) for work, feed, _ in jobs))
        with _Progress(clock.total, self.config.progress, clock) as tick:
            accumulator = _accumulate(source, jobs, np.zeros(region_shape(core), np.float16), clock, tick, core)
        mirrored = isinstance(original, InvertedSource)
        if source is original:
            return LogitVolume(accumulator, region_shape(region), mirrored=mirrored)
        back = resample_region(lambda box: accumulator[_shift(box, core)], shape, original.shape, region, dtype=np.float16)
        return LogitVolume(back, region_shape(region), mirrored=mirrored)

    def _check_blockable(self) -> None:
        """ValueError for what a region (block) cannot be predicted with exactly."""
        if self.config.hull_gate is not None:
            raise ValueError("hull_gate thresholds the 2D and 3D models' logits apart, over the whole volume: it has no "
                             "block-wise (region) form; unset hull_gate, or predict the volume whole (infer_volume)")
        if any(group.ensemble.spatial_dims == 2 and group.ensemble.normalization.mode == "zscore" for group in self._groups):
            raise ValueError("block-wise (region) inference of 2D models needs a per-volume intensity window, but "
                             "normalization mode 'zscore' normalises each whole plane stack on its own: use models "
                             "trained with 'percentile' or 'unit'")

    def _plan(self, group: _Group, shape: tuple[int, int, int], window: Window | None) -> list[_Job]:
        """One rank's passes over a volume of ``shape`` (weighted by the rank's share), each with
        how its windows are fed (the volume's intensity ``window``) and its replicas."""
        config, ensemble = self.config, group.ensemble
        tile = config.tile_size if config.tile_size is not None else ensemble.tile_size
        square = config.tta == "d4"
        if ensemble.spatial_dims == 3:
            passes: list[PlanePass | PatchPass] = [plan_patches(
                shape, tile=tile, overlap=config.overlap, stride=ensemble.stride, square=square, weight=group.share)]
        else:
            weights = _drop_thin_axes(self.axis_weights, shape, config.min_plane_side)
            passes = plan_planes(shape, {axis: w * group.share for axis, w in weights.items()}, tile=tile,
                                 overlap=config.overlap, stride=ensemble.stride, square=square,
                                 min_whole_side=config.pad_planes_to)
        feed = _Feed(
            in_chans=ensemble.in_chans, out_chans=ensemble.out_chans, normalization=ensemble.normalization,
            intensity_window=window, weights=ensemble.weights,
            batch_size=config.batch_size, use_amp=config.amp is not False and all(d.type == "cuda" for d in self.devices),
            prefetch=config.prefetch is not False,
            views=tta_views(config.tta, spatial_dims=ensemble.spatial_dims,
                            reverse_slices=config.reverse_slices and ensemble.in_chans > 1),
        )
        return [(work, feed, group.replicas) for work in passes]

    def to_mask(self, logits: LogitVolume, *, out: np.ndarray | None = None) -> np.ndarray:
        """The bool mask of ``logits`` as the config says: ``hysteresis``, else ``top_fraction``,
        else probability > ``threshold``; then components under ``min_component_size`` go
        (``min_component_size``: the calibrated one scales with the volume's voxel size).
        Streams the logits slice by slice; writes into ``out`` when given."""
        return self._without_small_components(self._cut(logits, out), logits)

    def counted_mask(self, logits: LogitVolume, *, out: np.ndarray | None = None) -> tuple[np.ndarray, MaskCount]:
        """``to_mask`` and its ``polarity.MaskCount`` (the voxels kept, and those above the cut
        before the component filter): the evidence polarity "auto" decides on."""
        mask = self._cut(logits, out)
        above = count_voxels(mask)
        mask = self._without_small_components(mask, logits)
        return mask, MaskCount(count_voxels(mask), above, mask.size)

    def _cut(self, logits: LogitVolume, out: np.ndarray | None) -> np.ndarray:
        """``logits`` cut as the config says, before small components go."""
        return self._mask(logits, self.threshold, out) if logits.hull is None else self._hull_mask(logits, out)

    def _without_small_components(self, mask: np.ndarray, logits: LogitVolume) -> np.ndarray:
        """``mask`` (in place) without the components under ``min_component_size`` at ``logits``' voxel size."""
        min_size = self.min_component_size(logits.voxels_per_model_voxel)
        if min_size > 1:
            return remove_small_components(mask, min_size, connectivity=self.config.connectivity, out=mask)
        return mask

    def _mask(self, logits: LogitVolume, threshold: float, out: np.ndarray | None) -> np.ndarray:
        """``logits`` thresholded as the config says: hysteresis, top fraction or ``threshold``."""
        if self.config.hysteresis is not None:
            high, low = self.config.hysteresis
            return hysteresis_threshold(logits.slices, logits.shape, logit(high), logit(low), out=out)
        return _threshold(logits.slices, logits.shape, threshold, self.config.top_fraction, out)

    def _hull_mask(self, logits: LogitVolume, out: np.ndarray | None) -> np.ndarray:
        """The mask of a hull-gated 2D + 3D ensemble (``hull.HullGate``): the 2D mask's hull
        gates the 3D mask ("and") or adds the 3D probability to the 2D one inside it ("sum")."""
        gate = self.config.hull_gate
        ranks = {group.ensemble.spatial_dims: group.ensemble for group in self._groups}
        threshold_2d = self._rank_threshold(ranks[2])
        threshold_3d = gate.threshold_3d if gate.threshold_3d is not None else self._rank_threshold(ranks[3])
        hulls = hull_slices(self._mask(logits.hull, threshold_2d, None), gate)
        if gate.rule == "and":
            mask = self._mask(logits, threshold_3d, out)
            for z, hull in enumerate(hulls):
                mask[z] &= hull
            return mask
        mask = mask_output(out, logits.shape)
        for z, plane in enumerate(sum_rule_slices(logits.slices(), logits.hull.slices(), hulls, threshold_2d + threshold_3d)):
            mask[z] = plane
        return mask

    def _rank_threshold(self, ensemble: Ensemble) -> float:
        """One rank's threshold under a hull rule: the config's, else its checkpoints' calibrated one, else 0.5."""
        if self.config.threshold is not None:
            return self.config.threshold
        return DEFAULT_THRESHOLD if ensemble.threshold is None else ensemble.threshold


def _accumulate(source: VolumeSource, jobs: list[_Job], accumulator: np.ndarray, clock: Deadline, tick,
                core: Region | None = None) -> np.ndarray:
    """Run ``jobs`` (passes with their feeds and replicas) into ``accumulator`` (the box ``core``
    of the volume only, when given) and return it,
    divided by the weight of the passes done (so one rank of a mixed ensemble run alone is that
    rank's average): a pass the deadline leaves no time for is skipped (``DeadlineWarning``) and
    the others stand for it."""
    done_weight = 0.0
    for index, (work, feed, replicas) in enumerate(jobs):
        if clock.would_overrun(work.tile_count):
            names = [_pass_name(p) for p, _, _ in jobs]
            if done_weight == 0:
                raise TimeoutError(f"the deadline leaves no time for any of the passes {names}")
            warnings.warn(f"the deadline leaves no time for axes {names[index:]}; using {names[:index]} only",
                          DeadlineWarning, stacklevel=4)
            break
        if isinstance(work, PatchPass) and core is not None:
            _run_patch_region(source, work, replicas, feed, accumulator, tick, core)
        elif isinstance(work, PatchPass):
            _run_patch_pass(source, work, replicas, feed, accumulator, tick)
        else:
            _run_plane_pass(source, work, replicas, feed, accumulator, tick, core)
        done_weight += work.weight
    if abs(done_weight - 1.0) > 1e-6:  # passes were skipped, or one rank of a mixed ensemble ran alone
        _scale(accumulator, 1.0 / done_weight)
    return accumulator


# --- what every pass of one volume shares ------------------------------------------------------


@dataclass(frozen=True)
class _Replica:
    """The ensemble's models on one device."""

    models: list[torch.nn.Module]
    device: torch.device


# A pass, how its windows are fed, and the replicas that run it.
_Job = tuple["PlanePass | PatchPass", "_Feed", "list[_Replica]"]


@dataclass(frozen=True)
class _Group:
    """One rank of the ensemble: its models, their share of the weight, their replicas."""

    ensemble: Ensemble
    share: float
    replicas: list[_Replica]


@dataclass(frozen=True)
class _Feed:
    """How windows become model input and logits: intensity normalisation, model weights, TTA
    views, batch size, autocast, and whether batches are prepared in a background thread
    (``prefetch``); ``out_chans`` is the models' output channels (planes)."""

    in_chans: int
    out_chans: int
    normalization: Normalization
    intensity_window: tuple[float, float]
    weights: list[float]
    views: list[View]
    batch_size: int
    use_amp: bool
    prefetch: bool


class _Progress:
    """A tqdm bar over tiles that records them in the deadline too; ``tick(n)`` is thread-safe."""

    def __init__(self, total: int, show: bool, clock: Deadline) -> None:
        self.bar = tqdm(total=total, desc="infer", unit="tile", disable=not show, smoothing=0.05)
        self.clock = clock
        self.lock = threading.Lock()

    def __enter__(self) -> Callable[[int], None]:
        return self.tick

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def tick(self, tiles: int) -> None:
        with self.lock:
            self.bar.update(tiles)
        self.clock.record(tiles)


# --- 2D / 2.5D: planes along an axis -----------------------------------------------------------


def _run_plane_pass(source: VolumeSource, work: PlanePass, replicas: list[_Replica], feed: _Feed, accumulator, tick,
                    core: Region | None = None) -> None:
    """Predict every plane of one axis and add weight x its logits into the accumulator (which
    holds the box ``core`` of the volume, when given: then only its planes, and in them only the
    tiles that reach it, are predicted).

    With several devices, each takes a contiguous share of the planes; planes are disjoint
    slices of the accumulator, so the threads never write the same voxels.
    """
    slice_axis = SLICE_AXIS[work.axis]
    planes = range(work.planes) if core is None else range(core[slice_axis].start, core[slice_axis].stop)
    in_plane = tuple(slice(0, side) for side in work.grid.region_shape) if core is None else _in_plane(core, slice_axis)
    def run(share) -> None:
        replica, mine = share
        _run_planes(source, work, mine, in_plane, planes.start, replica, feed, accumulator, tick)

    _in_threads(run, _shares(planes, replicas))


def _run_planes(source: VolumeSource, work: PlanePass, planes: range, in_plane: Region, first_plane: int,
                replica: _Replica, feed: _Feed, accumulator, tick) -> None:
    """The planes ``planes``, each blended over its box ``in_plane`` and added into the
    accumulator, whose plane 0 along the pass' axis is plane ``first_plane``.

    The windows centred on plane p predict planes p - m // 2 .. p + m // 2 (m = ``out_chans``), so
    the windows centred within m // 2 planes of ``planes`` are run, in plane order (a share's
    neighbour runs its edge planes too: threads never write one plane). Each output plane is
    summed into its own plane's float32 sums; a plane is blended when all its windows are in,
    divided by its normaliser times the number of window centres predicting it (m at most; 1 for
    m = 1: the arithmetic of a one-plane model is unchanged).
    """
    grid = work.grid
    half = feed.out_chans // 2
    centres = range(max(planes.start - half, 0), min(planes.stop + half, work.planes))
    targets = np.moveaxis(accumulator, SLICE_AXIS[work.axis], 0)
    tile_h, tile_w = grid.window_shape
    reach = grid.reaching(in_plane)
    (top, left), blend_box = reach.origin, _shift(in_plane, reach.span)
    normaliser = grid.normaliser(in_plane)
    normalisers: dict[int, np.ndarray] = {}  # centres predicting a plane -> normaliser x their count
    pending: dict[int, list] = {}  # plane index -> [padded logit sum, windows done]
    batches = _plane_batches(source, work, centres, reach, feed)
    for batch_index, batch in _prefetch(batches, replica.device, background=feed.prefetch):
        logits = _forward(replica.models, batch, feed)
        for (centre, y, x), window_logits in zip(batch_index, logits, strict=True):
            for plane, plane_logits in zip(range(centre - half, centre + half + 1), window_logits, strict=True):
                if plane not in planes:
                    continue
                entry = pending.setdefault(plane, [np.zeros(reach.extent, np.float32), 0])
                entry[0][y - top : y - top + tile_h, x - left : x - left + tile_w] += plane_logits * grid.importance
                entry[1] += 1
                predicting = min(plane + half, work.planes - 1) - max(plane - half, 0) + 1
                if entry[1] == len(reach.corners) * predicting:
                    if predicting not in normalisers:
                        normalisers[predicting] = normaliser * np.float32(predicting)
                    _blend_into(targets[plane - first_plane], entry[0][blend_box], normalisers[predicting], work.weight,
                                check=f"{work.axis} plane {plane}")
                    del pending[plane]
        tick(len(batch_index))


def _plane_batches(source: VolumeSource, work: PlanePass, planes: range, reach: Reach, feed: _Feed,
                   slab: int = 8) -> Iterator[tuple[list, np.ndarray]]:
    """(index, tiles) batches of (B, C, T, T) float32 tiles of the windows ``reach`` names,
    running across consecutive planes, read ``slab`` planes (plus their neighbour planes, and in
    each plane only the span the windows cover) at a time."""
    half = feed.in_chans // 2
    slice_axis = SLICE_AXIS[work.axis]
    height, width = work.grid.window_shape
    (top, left), whole = reach.origin, reach.span == tuple(slice(0, side) for side in work.grid.region_shape)
    planes_source = source if whole else _Cropped(source, _with_plane_axis(reach.span, slice_axis, source.shape))

    def tiles() -> Iterator[tuple[tuple[int, int, int], np.ndarray]]:
        for first in range(planes.start, planes.stop, slab):
            last = min(first + slab, planes.stop)
            block = read_planes(planes_source, slice_axis, first, last, halo=half)  # block[k]: plane first - half + k
            for plane in range(first, last):
                neighbours = block[plane - first : plane - first + feed.in_chans]
                stack = _pad_to(feed.normalization.apply(neighbours, feed.intensity_window), (height, width))
                for y, x in reach.corners:
                    yield (plane, y, x), stack[:, y - top : y - top + height, x - left : x - left + width]

    return _batched(tiles(), feed.batch_size)


class _Cropped:
    """The box ``box`` of ``source`` as a source of its own (reads shifted into the box)."""

    def __init__(self, source: VolumeSource, box: Region) -> None:
        self.source, self.box = source, box
        self.shape = region_shape(box)
        self.dtype = source.dtype

    def read(self, region: Region) -> np.ndarray:
        region = check_region(region, self.shape)
        return self.source.read(tuple(slice(r.start + b.start, r.stop + b.start) for r, b in zip(region, self.box, strict=True)))


def _in_plane(box: Region, slice_axis: int) -> Region:
    """The (H, W) part of a (Z, Y, X) box, for planes along ``slice_axis``."""
    return tuple(part for axis, part in enumerate(box) if axis != slice_axis)


def _with_plane_axis(in_plane: Region, slice_axis: int, shape: tuple[int, int, int]) -> Region:
    """The (Z, Y, X) box of an (H, W) box over every plane along ``slice_axis``."""
    parts = list(in_plane)
    parts.insert(slice_axis, slice(0, shape[slice_axis]))
    return tuple(parts)


def _shift(box: Region, origin: Region) -> Region:
    """``box`` in the coordinates of a box starting at ``origin``'s starts."""
    return tuple(slice(part.start - start.start, part.stop - start.start) for part, start in zip(box, origin, strict=True))


def _tiles_reaching(work: PlanePass | PatchPass, core: Region, out_chans: int = 1) -> int:
    """The tiles (patches) of a pass that a run of the box ``core`` predicts (for planes, the
    windows centred within ``out_chans // 2`` planes of the box too)."""
    if isinstance(work, PatchPass):
        return len(work.grid.reaching(core).corners)
    slice_axis = SLICE_AXIS[work.axis]
    half = out_chans // 2
    planes = min(core[slice_axis].stop + half, work.planes) - max(core[slice_axis].start - half, 0)
    return planes * len(work.grid.reaching(_in_plane(core, slice_axis)).corners)


# --- 3D: patches -------------------------------------------------------------------------------


def _run_patch_pass(source: VolumeSource, work: PatchPass, replicas: list[_Replica], feed: _Feed, accumulator, tick) -> None:
    """Predict every patch and add weight x the blended logits into the accumulator.

    Patches go row by row of their Z starts. Their weighted logits are summed in float32 over the
    rows that patches still open can reach (``_OpenRows``). Rows that no later patch reaches are
    divided by the normaliser and added into the float16 accumulator: one rounding per voxel, as
    for planes. Within a row of starts, the devices share the patches, and the sums take a lock.
    """
    grid = work.grid
    in_plane = list(itertools.product(*grid.starts[1:]))
    rows = _OpenRows(accumulator, work)
    z_starts = list(grid.starts[0])
    for index, z in enumerate(z_starts):
        corners = [(z, *yx) for yx in in_plane]

        def run(share) -> None:
            replica, mine = share
            for batch_index, batch in _prefetch(_patch_batches(source, work, mine, feed), replica.device,
                                            background=feed.prefetch):
                for corner, patch_logits in zip(batch_index, _forward(replica.models, batch, feed)[:, 0], strict=True):
                    rows.add(corner, patch_logits)
                tick(len(batch_index))

        _in_threads(run, _shares(corners, replicas))
        rows.flush(until=z_starts[index + 1] if index + 1 < len(z_starts) else accumulator.shape[0])


def _run_patch_region(source: VolumeSource, work: PatchPass, replicas: list[_Replica], feed: _Feed, accumulator, tick,
                      core: Region) -> None:
    """The patch pass of the box ``core`` only (the accumulator holds that box): the patches that
    reach it, their weighted logits summed in float32 over the span they cover in the order of
    the whole pass, then the box divided by the normaliser, clipped, weighted and added into the
    float16 accumulator as ``_OpenRows.flush`` does. The devices share the patches."""
    grid = work.grid
    reach = grid.reaching(core)
    sums = np.zeros(reach.extent, np.float32)
    lock = threading.Lock()

    def run(share) -> None:
        replica, mine = share
        for batch_index, batch in _prefetch(_patch_batches(source, work, mine, feed), replica.device,
                                            background=feed.prefetch):
            for corner, patch_logits in zip(batch_index, _forward(replica.models, batch, feed)[:, 0], strict=True):
                box = tuple(slice(start - origin, min(start + side, total) - origin) for start, side, total, origin
                            in zip(corner, grid.window_shape, grid.region_shape, reach.origin, strict=True))
                inside = tuple(slice(0, part.stop - part.start) for part in box)
                weighted = patch_logits[inside] * grid.importance[inside]
                _check_finite(weighted, f"the patch at {corner}")
                with lock:
                    sums[box] += weighted
            tick(len(batch_index))

    _in_threads(run, _shares(reach.corners, replicas))
    _blend_into(accumulator, sums[_shift(core, reach.span)], grid.normaliser(core), work.weight)


class _OpenRows:
    """float32 sums of weighted patch logits over the Z rows [start, start + window depth) that
    patches still to come can reach; ``flush`` blends the finished rows into the accumulator."""

    def __init__(self, accumulator: np.ndarray, work: PatchPass) -> None:
        self.accumulator, self.work = accumulator, work
        self.depth = work.grid.window_shape[0]
        self.start = 0
        self.sums = np.zeros((self.depth, *accumulator.shape[1:]), np.float32)
        self.lock = threading.Lock()

    def add(self, corner: tuple[int, ...], logits: np.ndarray) -> None:
        """Add one patch's logits x importance (cropped to the volume)."""
        region = tuple(slice(start, min(start + side, total))
                       for start, side, total in zip(corner, self.work.grid.window_shape, self.accumulator.shape, strict=True))
        inside = tuple(slice(0, r.stop - r.start) for r in region)
        weighted = logits[inside] * self.work.grid.importance[inside]
        _check_finite(weighted, f"the patch at {corner}")
        rows = slice(region[0].start - self.start, region[0].stop - self.start)
        with self.lock:
            self.sums[(rows, *region[1:])] += weighted

    def flush(self, until: int) -> None:
        """Blend rows [start, until) into the accumulator, one row at a time, and move the open
        rows to the front (row by row: the extra memory is a few (Y, X) planes)."""
        done = until - self.start
        if done <= 0:
            return
        in_plane = tuple(slice(0, side) for side in self.accumulator.shape[1:])
        for row in range(done):
            z = self.start + row
            _blend_into(self.accumulator[z], self.sums[row], self.work.grid.normaliser((slice(z, z + 1), *in_plane))[0],
                        self.work.weight)
        for row in range(self.depth - done):
            self.sums[row] = self.sums[row + done]
        self.sums[max(self.depth - done, 0):] = 0
        self.start = until


def _patch_batches(source: VolumeSource, work: PatchPass, corners: list[tuple[int, ...]], feed: _Feed) -> Iterator[tuple[list, np.ndarray]]:
    """(corners, patches) batches of (B, 1, D, H, W) float32 patches, each read on its own."""
    shape = work.grid.window_shape

    def patches() -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        for corner in corners:
            region = tuple(slice(start, min(start + side, total)) for start, side, total in zip(corner, shape, source.shape, strict=True))
            yield corner, _pad_to(feed.normalization.apply(source.read(region), feed.intensity_window), shape)[None]

    return _batched(patches(), feed.batch_size)


def _batched(windows: Iterator[tuple[object, np.ndarray]], size: int) -> Iterator[tuple[list, np.ndarray]]:
    """(keys, stacked windows) batches of ``size`` (the last may be smaller) from (key, window) pairs."""
    keys, arrays = [], []
    for key, window in windows:
        keys.append(key)
        arrays.append(window)
        if len(arrays) == size:
            yield keys, np.stack(arrays)
            keys, arrays = [], []
    if arrays:
        yield keys, np.stack(arrays)


# --- running models ----------------------------------------------------------------------------


def _shares(items: Sequence, replicas: list[_Replica]) -> list[tuple[_Replica, Sequence]]:
    """``items`` (planes, patch corners) cut into one contiguous share per replica (none empty)."""
    bounds = np.linspace(0, len(items), len(replicas) + 1).round().astype(int)
    return [(replica, items[a:b]) for replica, a, b in zip(replicas, bounds[:-1], bounds[1:], strict=True) if b > a]


def _blend_into(target: np.ndarray, sums: np.ndarray, normaliser: np.ndarray, weight: float, *,
                check: str | None = None) -> None:
    """target += weight x clip(sums / normaliser): summed window logits blended and added into the
    float16 accumulator, one rounding per voxel. ``check`` names the place for a non-finite error."""
    blended = sums / normaliser
    if check is not None:
        _check_finite(blended, check)
    np.clip(blended, -LOGIT_LIMIT, LOGIT_LIMIT, out=blended)
    blended *= weight
    target += blended


def _in_threads(run: Callable, shares: list) -> None:
    """``run`` each share, in this thread when there is one (errors and Ctrl-C surface directly),
    else one thread per share."""
    if len(shares) == 1:
        run(shares[0])
        return
    with ThreadPoolExecutor(max_workers=len(shares)) as pool:
        for future in [pool.submit(run, share) for share in shares]:
            future.result()


def _prefetch(batches: Iterator, device: torch.device, *, background: bool = True) -> Iterator[tuple[list, torch.Tensor]]:
    """Prepare the next batches in a background thread (numpy work releases the GIL) and move
    them to the device (pinned, non-blocking on CUDA) while the model runs. Every hand-over
    watches a stop flag, so a failing consumer never leaves the producer blocked.
    ``background=False`` (``InferConfig.prefetch``): the batches are prepared in this thread,
    one at a time, as the consumer asks (the same tensors: one core per process, no overlap)."""
    if not background:
        for index, tiles in batches:
            yield index, torch.from_numpy(tiles).to(device)
        return
    ready: queue.Queue = queue.Queue(maxsize=2)
    done = object()
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for index, tiles in batches:
                tensor = torch.from_numpy(tiles)
                if device.type == "cuda":
                    tensor = tensor.pin_memory()
                if not offer((index, tensor)):
                    return
            offer(done)
        except BaseException as error:  # surfaced in the consumer
            offer(error)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            index, tensor = item
            yield index, tensor.to(device, non_blocking=True)
    finally:
        stop.set()
        producer.join()


def _forward(models: list[torch.nn.Module], batch: torch.Tensor, feed: _Feed) -> np.ndarray:
    """Mean over views of the weighted model logits, each view inverted: (B, out_chans, *window)
    float32."""
    total = None
    layout = memory_format(batch.ndim)
    with torch.inference_mode(), torch.autocast(batch.device.type, dtype=torch.float16, enabled=feed.use_amp):
        for transform, inverse in feed.views:
            viewed = transform(batch).contiguous(memory_format=layout)  # as the models (_replicas)
            logits = sum(w * _checked_output(model(viewed), feed.out_chans).float()
                         for model, w in zip(models, feed.weights, strict=True))
            restored = inverse(logits)
            total = restored if total is None else total + restored
    return (total / len(feed.views)).float().cpu().numpy()


def _checked_output(logits: torch.Tensor, out_chans: int) -> torch.Tensor:
    """``logits`` if they have the ``out_chans`` channels the ensemble says, else ValueError."""
    if logits.shape[1] != out_chans:
        raise ValueError(f"a model output {logits.shape[1]} channels, but the ensemble says out_chans={out_chans}: a "
                         "module predicting several planes declares them (module.out_chans = m, as built models do); "
                         "checkpoints store out_chans")
    return logits


def _replicas(ensemble: Ensemble, devices: list[torch.device], *, compiled: bool = False) -> list[_Replica]:
    """The ensemble's models on each device; copied to the devices after the first.

    Models run in channels-last memory format (``models.memory_format``; in place for the first
    device). ``compiled`` wraps each replica in ``torch.compile``
    (``models.compile_model``; the ensemble keeps the plain modules).
    """
    layout = memory_format(ensemble.spatial_dims + 2)
    replicas = []
    for index, device in enumerate(devices):
        models = ensemble.models if index == 0 else [copy.deepcopy(m) for m in ensemble.models]
        models = [m.to(device, memory_format=layout).eval() for m in models]
        replicas.append(_Replica([compile_model(m, device) for m in models] if compiled else models, device))
    return replicas


# --- output ------------------------------------------------------------------------------------


def _threshold(logit_slices, shape, threshold: float, top_fraction: float | None, out: np.ndarray | None) -> np.ndarray:
    """The final mask, slice by slice: logits above the threshold's logit, or the exact top
    fraction of voxels (from a histogram of the float16 bit patterns)."""
    out = mask_output(out, shape)
    if top_fraction is None:
        cut = np.float16(logit(threshold))
        for z, logits in enumerate(logit_slices()):
            np.greater(logits, cut, out=out[z])
        return out
    key = top_fraction_key(logit_slices(), int(np.prod(shape)), top_fraction)
    for z, logits in enumerate(logit_slices()):
        np.greater_equal(order_keys(logits), key, out=out[z])
    return out


# --- checks and small helpers ------------------------------------------------------------------


def _check_volume(volume: np.ndarray) -> None:
    if not hasattr(volume, "ndim") or volume.ndim != 3:
        raise ValueError(f"volume must be a (Z, Y, X) array, got shape {getattr(volume, 'shape', type(volume).__name__)}")
    if volume.size == 0:
        raise ValueError(f"volume is empty (shape {volume.shape})")
    if volume.dtype.kind not in "uif":
        raise ValueError(f"volume must hold intensities (integer or float), got dtype {volume.dtype}")


def _at_model_resolution(source: VolumeSource, voxel_size_um: float | None, model_voxel_um: float | None) -> VolumeSource:
    """``source`` resampled to the models' voxel size when both sizes are known and differ by
    more than ``RESCALE_TOLERANCE`` (in RAM); else ``source`` itself."""
    shape = _model_shape(source.shape, voxel_size_um, model_voxel_um)
    if shape == source.shape:
        return source
    whole = source.read(tuple(slice(0, side) for side in source.shape))
    return ArraySource(resample_volume(whole, shape))


def voxel_ratio(shape: tuple[int, int, int], voxel_size_um: float | None, model_voxel_um: float | None) -> float:
    """Voxels of a volume of ``shape`` per voxel of it at the models' resolution (1: it is not
    resampled): what a component size counted at the models' resolution is scaled by."""
    return float(np.prod(shape) / np.prod(_model_shape(shape, voxel_size_um, model_voxel_um)))


def _model_shape(shape: tuple[int, int, int], voxel_size_um: float | None, model_voxel_um: float | None) -> tuple[int, int, int]:
    """The volume's shape at the models' voxel size: ``shape`` itself unless both sizes are known
    and differ by more than ``RESCALE_TOLERANCE``."""
    factor = voxel_size_um / model_voxel_um if voxel_size_um and model_voxel_um else 1.0
    if not 1 / MAX_RESCALE <= factor <= MAX_RESCALE:
        raise ValueError(f"voxel_size_um={voxel_size_um} is {factor:.3g} times the models' {model_voxel_um} µm: "
                         f"more than the {MAX_RESCALE:g}x rescale allowed; check the voxel size")
    return tuple(shape) if abs(factor - 1.0) <= RESCALE_TOLERANCE else scaled_shape(shape, factor)


def _check_3d_options(config: InferConfig, ensemble: Ensemble | MixedEnsemble) -> None:
    """ValueError naming the option for a plane-pass option given to 3D models only (in a mixed
    ensemble such options are the 2D models'), for tta="d4" with non-square 3D patches, and for
    hull_gate without both 2D and 3D models."""
    groups = [group for group, _ in ensemble.groups()]
    gate = config.hull_gate
    if gate is not None and sorted(group.spatial_dims for group in groups) != [2, 3]:
        ranks = " and ".join(sorted({f"{group.spatial_dims}D" for group in groups}))
        raise ValueError(f"inference option hull_gate={gate.to_dict()} gates 3D models' mask by 2D models' mask, but "
                         f"this ensemble has only {ranks} models: give it 2D and 3D checkpoints, or unset hull_gate")
    if gate is not None and gate.rule == "sum" and (config.hysteresis is not None or config.top_fraction is not None):
        raise ValueError("hull_gate rule 'sum' adds probabilities and thresholds them: it excludes hysteresis and "
                         "top_fraction; use rule 'and', or a threshold")
    if all(group.spatial_dims == 3 for group in groups):
        if tuple(config.axes) not in (AXES, ("xy",)) or config.axis_weights is not None:
            raise ValueError(f"inference options axes={list(config.axes)}, axis_weights={config.axis_weights} choose "
                             "plane passes, but these models are 3D: they predict the volume in its own orientation. "
                             "Leave axes and axis_weights unset (or axes=['xy'])")
        if config.reverse_slices:
            raise ValueError("inference option reverse_slices=True reverses the slice channels of 2.5D models, but these "
                             "models are 3D: set reverse_slices=False")
    for group in groups:
        tile = config.tile_size if config.tile_size is not None else group.tile_size
        if group.spatial_dims == 3 and config.tta == "d4" and isinstance(tile, tuple) and tile[-1] != tile[-2]:
            raise ValueError(f"inference option tta='d4' rotates 3D patches in their (H, W) plane, so it needs H == W, "
                             f"but tile_size is {tile}: use tta='flips', or a tile_size with H == W")


def _axis_weights(config: InferConfig) -> dict[str, float]:
    """Each axis' weight, normalised to sum to 1, in the order of ``config.axes``."""
    axes = list(config.axes)
    if not axes or len(set(axes)) != len(axes) or not set(axes) <= set(AXES):
        raise ValueError(f"axes must be distinct names from {AXES}, got {axes}")
    weights = dict(config.axis_weights or {axis: 1.0 for axis in axes})
    if set(weights) != set(axes) or min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise ValueError(f"axis_weights must give each of {axes} a non-negative weight, got {weights}")
    total = sum(weights.values())
    return {axis: weights[axis] / total for axis in axes}


def _drop_thin_axes(weights: dict[str, float], shape: tuple[int, ...], min_side: int) -> dict[str, float]:
    """The axes whose planes are at least ``min_side`` on both sides, weights summing to 1."""
    plane_side = {axis: min(s for i, s in enumerate(shape) if i != SLICE_AXIS[axis]) for axis in weights}
    kept = {axis: w for axis, w in weights.items() if plane_side[axis] >= min_side}
    if not kept:
        widest = max(weights, key=plane_side.get)
        kept = {widest: 1.0}
    for axis in weights.keys() - kept.keys():
        warnings.warn(f"skipping axis {axis}: its planes are only {plane_side[axis]} pixels on a side "
                      f"(min_plane_side={min_side}) for a volume of shape {shape}", stacklevel=5)
    total = sum(kept.values())
    if total <= 0:
        raise ValueError(f"every axis with a positive weight has planes thinner than min_plane_side={min_side}")
    return {axis: w / total for axis, w in kept.items()}


def _pass_name(work: PlanePass | PatchPass) -> str:
    return work.axis if isinstance(work, PlanePass) else "3d"


def _devices(device) -> list[torch.device]:
    """The devices as ``usable_devices`` checks them (torch.device objects accepted too)."""
    if isinstance(device, torch.device):
        device = str(device)
    if isinstance(device, tuple):
        device = list(device)
    return [torch.device(name) for name in usable_devices(device)]


def _beside(path: str | os.PathLike | None, tag: str) -> str | None:
    """A second accumulator file next to ``path`` ("acc.npy" -> "acc.hull.npy"); None for None."""
    if path is None:
        return None
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.{tag}{ext or '.npy'}"


def _zeros(shape, path) -> np.ndarray:
    if path is None:
        return np.zeros(shape, dtype=np.float16)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)


def _scale(accumulator: np.ndarray, factor: float, chunk: int = 16) -> None:
    """Multiply the float16 accumulator in place, a few slices at a time (no float32 copy)."""
    for start in range(0, accumulator.shape[0], chunk):
        accumulator[start : start + chunk] *= np.float16(factor)


def _pad_to(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Pad the trailing dims of ``array`` at their end up to ``shape``, mirroring the border
    (replicating it where the array is too thin to mirror)."""
    lead = array.ndim - len(shape)
    pads = [(0, 0)] * lead + [(0, max(0, side - have)) for side, have in zip(shape, array.shape[lead:], strict=True)]
    if not any(after for _, after in pads):
        return array
    mirrorable = all(after < have for (_, after), have in zip(pads[lead:], array.shape[lead:], strict=True))
    return np.pad(array, pads, mode="reflect" if mirrorable else "edge")


def _check_finite(values: np.ndarray, where: str) -> None:
    if not np.isfinite(values).all():
        raise FloatingPointError(f"non-finite logits on {where}: the model produced NaN or inf")
