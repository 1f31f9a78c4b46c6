"""Inference on whole volumes: ``infer_volume``.

For each axis (xy, xz, yz) every 2D plane is cut into overlapping tiles — ``in_chans``
neighbouring planes as channels for 2.5D models, edges replicated — tiles of consecutive planes
are batched together so the model always sees full batches, each batch goes through every TTA
view of every model, the view logits are inverted and averaged, the tiles are blended back with
a gaussian importance map, and the plane, divided by the summed weights, is added (times the
axis weight) into one float16 (Z, Y, X) accumulator. The threshold is applied once at the end.

Memory: the input stays as it is (uint16), the accumulator is float16 (or a memmap), and the
rest is a few planes and batches — peak memory does not grow with the number of axes, views or
models. A background thread prepares the next batch while the model runs. When the volume's
voxel size differs from the models' training voxel size, the volume is resampled to the models'
resolution (``resample.py``) and the logits are resampled back slice by slice.
"""

from __future__ import annotations

import copy
import math
import os
import queue
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .axes import AXES, SLICE_AXIS
from .calibration import logit
from .devices import usable_devices
from .infer_options import check_infer_options
from .models import load_checkpoint, model_stride, read_checkpoint_metadata
from .normalize import Normalization
from .postprocess import mask_output, hysteresis_threshold, remove_small_components
from .resample import resample_volume, resampled_slices, scaled_shape
from .tiling import gaussian_importance, plane_normaliser, window_starts
from .tta import tta_views

ModelSource = torch.nn.Module | str | os.PathLike
LOGIT_LIMIT = 1000.0  # plane logits are clipped to +-this before float16 accumulation (max 65504)
RESCALE_TOLERANCE = 0.02  # voxel sizes within 2 % count as equal (kidney_5: 50.28 vs 50 µm)
MAX_RESCALE = 8.0  # a volume is never resampled by more than this factor per side (a wrong voxel size)
DEFAULT_THRESHOLD = 0.5  # for models that carry no calibrated threshold

__all__ = ["DeadlineWarning", "Ensemble", "check_tile_size", "infer_volume", "load_ensemble"]


class DeadlineWarning(UserWarning):
    """Axes were left out so that ``infer_volume`` ends before its deadline."""


@dataclass
class Ensemble:
    """Models whose logits are averaged (with ``weights``), how they must be fed, and the
    probability threshold calibrated for them (None: not calibrated)."""

    models: list[torch.nn.Module]
    weights: list[float]
    in_chans: int
    normalization: Normalization
    tile_size: int | None
    voxel_size_um: float | None
    threshold: float | None = None

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this for every member (``models.model_stride``)."""
        return math.lcm(*(model_stride(model) for model in self.models))


def check_tile_size(tile_size: int | None, ensemble: Ensemble) -> None:
    """ValueError unless ``tile_size`` (None: the ensemble's own) fits every member's stride; run
    by callers that must refuse a bad option before reading any volume."""
    if tile_size is not None and tile_size % ensemble.stride:
        raise ValueError(f"tile_size must be a positive multiple of the models' stride {ensemble.stride}, got {tile_size}")


class _Member(NamedTuple):
    """What one ensemble member says about how it is fed (None: it does not say)."""

    source: str
    in_chans: int | None
    normalization: Normalization | None
    tile_size: int | None
    voxel_size_um: float | None
    threshold: float | None


def load_ensemble(
    models: ModelSource | Sequence[ModelSource],
    *,
    weights: Sequence[float] | None = None,
    in_chans: int | None = None,
    normalization: Normalization | None = None,
    device: str | torch.device = "cpu",
) -> Ensemble:
    """Models from modules and/or checkpoint paths; checkpoints bring their in_chans,
    normalisation, tile size, training voxel size and calibrated threshold. Members must agree on
    what they are fed. The ensemble's threshold is the weighted mean of its checkpoints'; a
    checkpoint written before calibration counts as 0.5, with a warning."""
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
            members.append(_Member(type(item).__name__, in_chans, normalization, None, None, None))
        else:
            model, config = load_checkpoint(item, device=device)
            threshold = read_checkpoint_metadata(item)["threshold"]
            if threshold is None:
                warnings.warn(f"{item} has no calibrated threshold (written before calibration); "
                              f"it counts as {DEFAULT_THRESHOLD}", stacklevel=2)
                threshold = DEFAULT_THRESHOLD
            loaded.append(model)
            members.append(_Member(str(item), config.in_chans, config.normalization, config.tile_size,
                                   config.voxel_size_um, threshold))
    chans = _agree("in_chans", [(m.in_chans, m.source) for m in members], in_chans)
    norm = _agree("normalization", [(m.normalization, m.source) for m in members], normalization)
    tiles = {m.tile_size for m in members} - {None}
    voxels = _agree("training voxel size", [(m.voxel_size_um, m.source) for m in members], None, required=False)
    if chans is None or norm is None:
        raise ValueError("in_chans and normalization are needed for models given as modules (checkpoints carry them)")
    calibrated = [(w, m.threshold) for w, m in zip(weights, members, strict=True) if m.threshold is not None]
    threshold = None
    if calibrated:
        threshold = sum(w * t for w, t in calibrated) / sum(w for w, _ in calibrated)
    return Ensemble(loaded, weights, chans, norm, min(tiles) if tiles else None, voxels, threshold)


def infer_volume(
    volume: np.ndarray,
    models: ModelSource | Sequence[ModelSource] | Ensemble,
    *,
    axes: Sequence[str] = AXES,
    axis_weights: Mapping[str, float] | None = None,
    tta: str = "flips",
    reverse_slices: bool = False,
    tile_size: int | None = None,
    overlap: float = 0.5,
    batch_size: int = 8,
    in_chans: int | None = None,
    normalization: Normalization | None = None,
    model_weights: Sequence[float] | None = None,
    voxel_size_um: float | None = None,
    model_voxel_size_um: float | None = None,
    device: str | torch.device | Sequence[str | torch.device] | None = None,
    amp: bool | None = None,
    threshold: float | None = None,
    hysteresis: tuple[float, float] | None = None,
    top_fraction: float | None = None,
    min_component_size: int = 0,
    return_logits: bool = False,
    accumulator_path: str | os.PathLike | None = None,
    out: np.ndarray | None = None,
    progress: bool = True,
    deadline: float | None = None,
    min_plane_side: int = 16,
) -> np.ndarray:
    """Predict a (Z, Y, X) volume with one model, a checkpoint, or an ensemble of them.

    Args:
        volume: (Z, Y, X) intensities (uint16 as read, or any real dtype); arrays or memmaps.
        models: a module, a checkpoint path, a list of them, or an ``Ensemble``. Checkpoints
            carry in_chans, normalisation, tile size and training voxel size; modules need
            ``in_chans`` and ``normalization``.
        axes, axis_weights: the views to predict along ("xy" = planes along Z, "xz" along Y,
            "yz" along X) and their weights (default equal).
        tta: "none", "flips" (4 views) or "d4" (8); ``reverse_slices`` doubles the views with
            the 2.5D slice order reversed.
        tile_size: square tile side, a multiple of the models' stride; default the checkpoint's
            training tile, or whole planes (padded to the stride) for modules.
        overlap: fraction of a tile shared with its neighbour, in [0, 1).
        voxel_size_um, model_voxel_size_um: when both are known and differ by more than
            ``RESCALE_TOLERANCE``, the volume is resampled to the model's resolution and the
            logits back (model_voxel_size_um defaults to the checkpoints' training voxel size).
        device: "cpu", "cuda", "cuda:1", or a list of devices that split the planes between
            them (e.g. Kaggle's two T4s); default every CUDA device that works
            (``usable_devices``), else the CPU.
        amp: float16 autocast on CUDA devices (default on; never on the CPU).
        threshold: the mask is probability > threshold; default the ensemble's calibrated
            threshold (``Ensemble.threshold``: the weighted mean of its checkpoints'), else 0.5.
        hysteresis: (high, low) probabilities instead: voxels above ``high`` seed the mask,
            which grows through 3D-connected voxels above ``low`` (vessels whose middle is sure
            and whose thin or faint ends are not).
        top_fraction: instead, the ``top_fraction`` of voxels with the highest logits
            (exactly, ties included).
        min_component_size: then drop 3D connected components smaller than this many voxels
            (``postprocess.remove_small_components``).
        return_logits: return the float16 averaged logits instead of a mask.
        accumulator_path: keep the float16 accumulator in a ``.npy`` memmap at this path
            instead of RAM.
        out: optional (Z, Y, X) bool array (e.g. a memmap) to write the mask into.
        min_plane_side: an axis whose planes have a side shorter than this is skipped (with a
            warning; the other axes' weights are rescaled), e.g. xz and yz of the 3-slice public
            test placeholder, which would be thousands of tiles of mostly padding. When every
            axis is that thin, the one with the largest planes is kept.
        deadline: a ``time.monotonic()`` time (``predict_submission``'s time budget). An axis
            that would end past it at the tile rate so far is not started, and the axes done
            are used alone (with a warning); past it in the middle of an axis, the prediction
            stops with ``TimeoutError``.

    Returns:
        a (Z, Y, X) bool mask, or float16 logits with ``return_logits``.
    """
    _check_volume(volume)
    check_infer_options({
        "axes": axes, "axis_weights": axis_weights, "tta": tta, "reverse_slices": reverse_slices,
        "tile_size": tile_size, "overlap": overlap, "batch_size": batch_size, "in_chans": in_chans,
        "normalization": normalization, "model_weights": model_weights, "voxel_size_um": voxel_size_um,
        "model_voxel_size_um": model_voxel_size_um, "amp": amp, "threshold": threshold,
        "hysteresis": hysteresis, "top_fraction": top_fraction, "min_component_size": min_component_size,
        "return_logits": return_logits, "accumulator_path": accumulator_path, "progress": progress,
        "deadline": deadline, "min_plane_side": min_plane_side,
    })
    devices = _devices(device)
    if isinstance(models, Ensemble) and (in_chans, normalization, model_weights) != (None, None, None):
        raise ValueError("in_chans, normalization and model_weights belong to the Ensemble; don't pass them with one")
    ensemble = models if isinstance(models, Ensemble) else load_ensemble(
        models, weights=model_weights, in_chans=in_chans, normalization=normalization, device=devices[0]
    )
    axis_weights = _check_axes(axes, axis_weights)
    tile = tile_size if tile_size is not None else ensemble.tile_size
    check_tile_size(tile, ensemble)
    if threshold is None:
        threshold = DEFAULT_THRESHOLD if ensemble.threshold is None else ensemble.threshold
    use_amp = amp is not False and all(d.type == "cuda" for d in devices)
    views = tta_views(tta, reverse_slices=reverse_slices and ensemble.in_chans > 1)

    window = ensemble.normalization.window(volume)
    model_voxel = model_voxel_size_um or ensemble.voxel_size_um
    factor = voxel_size_um / model_voxel if voxel_size_um and model_voxel else 1.0
    if not 1 / MAX_RESCALE <= factor <= MAX_RESCALE:
        raise ValueError(f"voxel_size_um={voxel_size_um} is {factor:.3g} times the models' {model_voxel} µm: "
                         f"more than the {MAX_RESCALE:g}x rescale allowed; check the voxel size")
    rescale = abs(factor - 1.0) > RESCALE_TOLERANCE
    source = resample_volume(volume, scaled_shape(volume.shape, factor)) if rescale else volume
    axis_weights = _drop_thin_axes(axis_weights, source.shape, min_plane_side)
    accumulator = _zeros(source.shape, accumulator_path)
    plans = [_AxisPlan.make(source.shape, axis, tile, overlap, ensemble.stride, square=tta == "d4") for axis in axis_weights]
    bar = _TileProgress(sum(p.tile_count for p in plans), deadline, progress)
    replicas = _replicas(ensemble, devices)
    done_weight = 0.0
    try:
        for index, plan in enumerate(plans):
            if bar.would_overrun(plan.tile_count):
                warnings.warn(f"the deadline leaves no time for axes {[p.axis for p in plans[index:]]}; "
                              f"using {[p.axis for p in plans[:index]]} only", DeadlineWarning, stacklevel=2)
                break
            weight = axis_weights[plan.axis]
            _run_axis(source, plan, weight, replicas, window, views, batch_size, use_amp, accumulator, bar)
            done_weight += weight
    finally:
        bar.close()
    del source
    if done_weight < 1.0 - 1e-6:  # axes were skipped: renormalise the weights of those done
        _scale(accumulator, 1.0 / done_weight)

    def logit_slices() -> Iterator[np.ndarray]:
        if accumulator.shape == volume.shape:
            return iter(accumulator)
        return resampled_slices(accumulator, volume.shape, dtype=np.float16)

    if return_logits:
        if accumulator.shape == volume.shape:
            return accumulator
        return resample_volume(accumulator, volume.shape, dtype=np.float16)
    if hysteresis is not None:
        mask = hysteresis_threshold(logit_slices, volume.shape, *(logit(p) for p in hysteresis), out=out)
    else:
        mask = _threshold(logit_slices, volume.shape, threshold, top_fraction, out)
    return remove_small_components(mask, min_component_size, out=mask) if min_component_size > 1 else mask


class _TileProgress:
    """A tqdm bar over tiles that also enforces the deadline (safe to update from threads)."""

    def __init__(self, total: int, deadline: float | None, show: bool) -> None:
        self.deadline, self.total, self.done = deadline, total, 0
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.bar = tqdm(total=total, desc="infer", unit="tile", disable=not show, smoothing=0.05)

    def would_overrun(self, tiles: int) -> bool:
        """Whether ``tiles`` more, at the rate so far, would end past the deadline (False before
        any tile is done: the first axis always starts)."""
        if self.deadline is None or self.done == 0:
            return False
        now = time.monotonic()
        return now + tiles * (now - self.started) / self.done > self.deadline

    def update(self, tiles: int) -> None:
        with self.lock:
            self.done += tiles
            self.bar.update(tiles)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeoutError(f"inference passed its deadline after {self.done} of {self.total} tiles")

    def close(self) -> None:
        self.bar.close()


# --- one axis -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _AxisPlan:
    """Where the tiles of every plane of one axis go, and the plane's blending weights."""

    axis: str
    planes: int
    plane_shape: tuple[int, int]
    tile_shape: tuple[int, int]
    starts: tuple[list[int], list[int]]
    importance: np.ndarray
    normaliser: np.ndarray

    @classmethod
    def make(cls, shape, axis: str, tile: int | None, overlap: float, stride: int, square: bool) -> _AxisPlan:
        slice_axis = SLICE_AXIS[axis]
        height, width = (side for a, side in enumerate(shape) if a != slice_axis)
        if tile is None:  # whole planes, padded up to the stride
            tile_shape = (_round_up(height, stride), _round_up(width, stride))
            if square:
                tile_shape = (max(tile_shape),) * 2
            importance = np.ones(tile_shape, dtype=np.float32)
        else:
            tile_shape = (tile, tile)
            importance = gaussian_importance(tile_shape)
        steps = [max(1, int(side * (1 - overlap))) for side in tile_shape]
        starts = (window_starts(height, tile_shape[0], steps[0]), window_starts(width, tile_shape[1], steps[1]))
        normaliser = plane_normaliser((height, width), tile_shape, starts, importance)
        return cls(axis, shape[slice_axis], (height, width), tile_shape, starts, importance, normaliser)

    @property
    def windows(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.starts[0] for x in self.starts[1]]

    @property
    def tile_count(self) -> int:
        return self.planes * len(self.windows)


def _run_axis(source, plan, weight, replicas, window, views, batch_size, use_amp, accumulator, bar) -> None:
    """Predict every plane of one axis and add weight x its logits into the accumulator.

    With several devices, each takes a contiguous share of the planes; planes are disjoint
    slices of the accumulator, so the threads never write the same voxels.
    """
    bounds = np.linspace(0, plan.planes, len(replicas) + 1).round().astype(int)
    shares = [(replica, int(a), int(b)) for replica, a, b in zip(replicas, bounds[:-1], bounds[1:], strict=True) if b > a]

    def run(share) -> None:
        replica, start, stop = share
        _run_planes(source, plan, start, stop, weight, replica, window, views, batch_size, use_amp, accumulator, bar)

    if len(shares) == 1:
        run(shares[0])  # in this thread: errors and Ctrl-C surface directly
        return
    with ThreadPoolExecutor(max_workers=len(shares)) as pool:
        for future in [pool.submit(run, share) for share in shares]:
            future.result()


def _run_planes(source, plan, start, stop, weight, replica, window, views, batch_size, use_amp, accumulator, bar) -> None:
    models, weights, device, ensemble = replica
    planes = np.moveaxis(source, SLICE_AXIS[plan.axis], 0)
    targets = np.moveaxis(accumulator, SLICE_AXIS[plan.axis], 0)
    height, width = plan.plane_shape
    tile_h, tile_w = plan.tile_shape
    windows = plan.windows
    pending: dict[int, list] = {}  # plane index -> [padded logit sum, windows done]
    for batch_index, batch in _prefetch(_batches(planes, plan, start, stop, ensemble, window, batch_size), device):
        logits = _forward(models, weights, views, batch, use_amp)
        for (plane, y, x), tile_logits in zip(batch_index, logits, strict=True):
            entry = pending.setdefault(plane, [np.zeros((max(height, tile_h), max(width, tile_w)), np.float32), 0])
            entry[0][y : y + tile_h, x : x + tile_w] += tile_logits * plan.importance
            entry[1] += 1
            if entry[1] == len(windows):
                blended = entry[0][:height, :width] / plan.normaliser
                _check_finite(blended, plan.axis, plane)
                np.clip(blended, -LOGIT_LIMIT, LOGIT_LIMIT, out=blended)
                blended *= weight
                targets[plane] += blended
                del pending[plane]
        bar.update(len(batch_index))


def _batches(planes, plan, start, stop, ensemble, window, batch_size) -> Iterator[tuple[list, np.ndarray]]:
    """(index, tiles) batches of (B, C, T, T) float32 tiles running across consecutive planes."""
    half = ensemble.in_chans // 2
    count = planes.shape[0]
    tile_h, tile_w = plan.tile_shape
    index, tiles = [], []
    for plane in range(start, stop):
        neighbours = np.clip(np.arange(plane - half, plane + half + 1), 0, count - 1)
        stack = ensemble.normalization.apply(planes[neighbours], window)
        stack = _pad_to(stack, tile_h, tile_w)
        for y, x in plan.windows:
            index.append((plane, y, x))
            tiles.append(stack[:, y : y + tile_h, x : x + tile_w])
            if len(tiles) == batch_size:
                yield index, np.stack(tiles)
                index, tiles = [], []
    if tiles:
        yield index, np.stack(tiles)


def _prefetch(batches: Iterator, device: torch.device) -> Iterator[tuple[list, torch.Tensor]]:
    """Prepare the next batches in a background thread (numpy work releases the GIL) and move
    them to the device (pinned, non-blocking on CUDA) while the model runs. Every hand-over
    watches a stop flag, so a failing consumer never leaves the producer blocked."""
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


def _forward(models, weights, views, batch: torch.Tensor, use_amp: bool) -> np.ndarray:
    """Mean over views of the weighted model logits, each view inverted: (B, T, T) float32."""
    total = None
    with torch.inference_mode(), torch.autocast(batch.device.type, dtype=torch.float16, enabled=use_amp):
        for transform, inverse in views:
            viewed = transform(batch).contiguous(memory_format=torch.channels_last)  # as the models (_replicas)
            logits = sum(w * model(viewed).float() for model, w in zip(models, weights, strict=True))
            restored = inverse(logits)
            total = restored if total is None else total + restored
    return (total / len(views))[:, 0].float().cpu().numpy()


# --- output -------------------------------------------------------------------------------------


def _threshold(logit_slices, shape, threshold: float, top_fraction: float | None, out: np.ndarray | None) -> np.ndarray:
    """The final mask, slice by slice: logits above the threshold's logit, or the exact top
    fraction of voxels (from a histogram of the float16 bit patterns)."""
    out = mask_output(out, shape)
    if top_fraction is None:
        cut = np.float16(logit(threshold))
        for z, logits in enumerate(logit_slices()):
            np.greater(logits, cut, out=out[z])
        return out
    counts = np.zeros(65536, dtype=np.int64)
    for logits in logit_slices():
        counts += np.bincount(_order_keys(logits).ravel(), minlength=65536)
    wanted = math.ceil(top_fraction * int(np.prod(shape)))
    above = np.cumsum(counts[::-1])[::-1]  # above[k] = voxels with key >= k
    key = int(np.flatnonzero(above >= wanted).max()) if wanted > 0 else 65536
    for z, logits in enumerate(logit_slices()):
        np.greater_equal(_order_keys(logits), key, out=out[z])
    return out


def _order_keys(values: np.ndarray) -> np.ndarray:
    """uint16 keys ordered like the float16 values (negative ones reversed), for exact histograms."""
    bits = np.asarray(values, dtype=np.float16).view(np.uint16)
    negative = bits >= 0x8000
    return np.where(negative, ~bits, bits | 0x8000).astype(np.uint16)


# --- checks and small helpers -------------------------------------------------------------------


def _check_volume(volume: np.ndarray) -> None:
    if not hasattr(volume, "ndim") or volume.ndim != 3:
        raise ValueError(f"volume must be a (Z, Y, X) array, got shape {getattr(volume, 'shape', type(volume).__name__)}")
    if volume.size == 0:
        raise ValueError(f"volume is empty (shape {volume.shape})")
    if volume.dtype.kind not in "uif":
        raise ValueError(f"volume must hold intensities (integer or float), got dtype {volume.dtype}")


def _check_axes(axes: Sequence[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    """Each axis' weight, normalised to sum to 1, in the order of ``axes``."""
    axes = [axes] if isinstance(axes, str) else list(axes)
    if not axes or len(set(axes)) != len(axes) or not set(axes) <= set(AXES):
        raise ValueError(f"axes must be distinct names from {AXES}, got {axes}")
    weights = dict(weights or {axis: 1.0 for axis in axes})
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
                      f"(min_plane_side={min_side}) for a volume of shape {shape}", stacklevel=3)
    total = sum(kept.values())
    if total <= 0:
        raise ValueError(f"every axis with a positive weight has planes thinner than min_plane_side={min_side}")
    return {axis: w / total for axis, w in kept.items()}


def _agree(what: str, values: list[tuple[object, str]], given: object, required: bool = True):
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


def _devices(device) -> list[torch.device]:
    """The devices as ``usable_devices`` checks them (torch.device objects accepted too)."""
    if isinstance(device, torch.device):
        device = str(device)
    return [torch.device(name) for name in usable_devices(device)]


def _replicas(ensemble: Ensemble, devices: list[torch.device]) -> list[tuple]:
    """(models, weights, device, ensemble) per device; models are copied to devices after the first.

    Models run in channels_last memory format (in place for the first device): convolutions are
    faster that way on the CPU (benchmarks/bench_memory_format.py: 1.46x for a ResNet-18 U-Net)
    and on tensor-core GPUs.
    """
    replicas = []
    for index, device in enumerate(devices):
        if index == 0:
            models = [m.to(device, memory_format=torch.channels_last).eval() for m in ensemble.models]
        else:
            models = [copy.deepcopy(m).to(device, memory_format=torch.channels_last).eval() for m in ensemble.models]
        replicas.append((models, ensemble.weights, device, ensemble))
    return replicas


def _zeros(shape, path) -> np.ndarray:
    if path is None:
        return np.zeros(shape, dtype=np.float16)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)


def _scale(accumulator: np.ndarray, factor: float, chunk: int = 16) -> None:
    """Multiply the float16 accumulator in place, a few slices at a time (no float32 copy)."""
    for start in range(0, accumulator.shape[0], chunk):
        accumulator[start : start + chunk] *= np.float16(factor)


def _pad_to(stack: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad a (C, H, W) stack at the bottom/right up to (height, width), mirroring the border."""
    pad_h, pad_w = max(0, height - stack.shape[1]), max(0, width - stack.shape[2])
    if not pad_h and not pad_w:
        return stack
    mode = "reflect" if pad_h < stack.shape[1] and pad_w < stack.shape[2] else "edge"
    return np.pad(stack, ((0, 0), (0, pad_h), (0, pad_w)), mode=mode)


def _check_finite(plane: np.ndarray, axis: str, index: int) -> None:
    if not np.isfinite(plane).all():
        raise FloatingPointError(f"non-finite logits on {axis} plane {index}: the model produced NaN or inf")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
