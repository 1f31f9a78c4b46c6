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
- 3D models: the volume is cut into overlapping patches; each patch's view-averaged logits,
  times its gaussian and divided by the (separable) summed weights, are added into the
  accumulator directly.
- 2D and 3D models together (``MixedEnsemble``): the 2D models' plane passes and the 3D models'
  patch pass fill the same accumulator, each weighted by its models' share of the weight.

A window larger than the volume is fine: the volume is padded up to it (mirrored at its border),
at the cost of predicting the padding.

Memory: the input stays as it is (uint16), the accumulator is float16 (or a memmap), and the rest
is a few planes, patches and batches: peak memory does not grow with the number of axes, views
or models. A background thread prepares the next batch while the model runs. When the volume's
voxel size differs from the models' training voxel size, the volume is resampled to the models'
resolution (``resample.py``) and the logits are resampled back slice by slice.

Example::

    predictor = Predictor(["best.safetensors"], InferConfig(tta="none", axes=("xy",)))
    logits = predictor.logits(volume, voxel_size_um=50.0)
    mask = predictor.to_mask(logits)
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .axes import AXES, SLICE_AXIS
from .calibration import logit
from .deadline import Deadline, DeadlineWarning
from .devices import usable_devices
from .ensemble import DEFAULT_THRESHOLD, Ensemble, MixedEnsemble, ModelSource, check_tile_size, load_ensemble
from .infer_config import InferConfig
from .normalize import Normalization
from .postprocess import hysteresis_threshold, mask_output, remove_small_components
from .resample import resample_volume, resampled_slices, scaled_shape
from .sources import ArraySource, VolumeSource, as_source, read_planes
from .tta import View, tta_views
from .windows import PatchPass, PlanePass, plan_patches, plan_planes

LOGIT_LIMIT = 1000.0  # logits are clipped to +-this before float16 accumulation (max 65504)
RESCALE_TOLERANCE = 0.02  # voxel sizes within 2 % count as equal (kidney_5: 50.28 vs 50 µm)
MAX_RESCALE = 8.0  # a volume is never resampled by more than this factor per side (a wrong voxel size)

__all__ = ["LOGIT_LIMIT", "MAX_RESCALE", "RESCALE_TOLERANCE", "LogitVolume", "Predictor"]


@dataclass(frozen=True)
class LogitVolume:
    """The averaged float16 logits of one volume, at the models' resolution (``accumulator``),
    and the (Z, Y, X) ``shape`` of the volume they belong to.

    Example::

        logits = predictor.logits(volume, voxel_size_um=63.08)  # accumulator at the models' 50 µm
        for z, plane in enumerate(logits.slices()):             # back at 63.08 µm, slice by slice
            ...
    """

    accumulator: np.ndarray
    shape: tuple[int, int, int]

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
        self._groups = [_Group(group, share, _replicas(group, self.devices)) for group, share in self.ensemble.groups()]

    @property
    def threshold(self) -> float:
        """The probability threshold masks use: the config's, else the ensemble's calibrated one,
        else 0.5."""
        if self.config.threshold is not None:
            return self.config.threshold
        return DEFAULT_THRESHOLD if self.ensemble.threshold is None else self.ensemble.threshold

    def predict(
        self,
        volume: VolumeSource | np.ndarray,
        *,
        voxel_size_um: float | None = None,
        deadline: float | None = None,
        accumulator_path: str | os.PathLike | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """The (Z, Y, X) bool mask of ``volume``: ``logits`` then ``to_mask``."""
        logits = self.logits(volume, voxel_size_um=voxel_size_um, deadline=deadline, accumulator_path=accumulator_path)
        return self.to_mask(logits, out=out)

    def logits(
        self,
        volume: VolumeSource | np.ndarray,
        *,
        voxel_size_um: float | None = None,
        deadline: float | None = None,
        accumulator_path: str | os.PathLike | None = None,
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
        """
        if hasattr(volume, "ndim"):
            _check_volume(volume)
        original = as_source(volume)
        config = self.config
        voxel_size_um = original.voxel_size_um if voxel_size_um is None else voxel_size_um
        source = _at_model_resolution(original, voxel_size_um, config.model_voxel_size_um or self.ensemble.voxel_size_um)
        jobs = [job for group in self._groups for job in self._plan(group, original, source.shape)]
        accumulator = _zeros(source.shape, accumulator_path)
        clock = Deadline(deadline, total=sum(work.tile_count for work, _, _ in jobs))
        done_weight = 0.0
        with _Progress(clock.total, config.progress, clock) as tick:
            for index, (work, feed, replicas) in enumerate(jobs):
                if clock.would_overrun(work.tile_count):
                    names = [_pass_name(p) for p, _, _ in jobs]
                    warnings.warn(f"the deadline leaves no time for axes {names[index:]}; using {names[:index]} only",
                                  DeadlineWarning, stacklevel=3)
                    break
                if isinstance(work, PatchPass):
                    _run_patch_pass(source, work, replicas, feed, accumulator, tick)
                else:
                    _run_plane_pass(source, work, replicas, feed, accumulator, tick)
                done_weight += work.weight
        del source
        if done_weight < 1.0 - 1e-6:  # passes were skipped: renormalise the weights of those done
            _scale(accumulator, 1.0 / done_weight)
        return LogitVolume(accumulator, original.shape)

    def _plan(self, group: _Group, original: VolumeSource, shape: tuple[int, int, int]) -> list[_Job]:
        """One rank's passes over a volume of ``shape`` (weighted by the rank's share), each with
        how its windows are fed (intensity window from the ``original`` volume) and its replicas."""
        config, ensemble = self.config, group.ensemble
        tile = config.tile_size if config.tile_size is not None else ensemble.tile_size
        square = config.tta == "d4"
        if ensemble.spatial_dims == 3:
            passes: list[PlanePass | PatchPass] = [plan_patches(
                shape, tile=tile, overlap=config.overlap, stride=ensemble.stride, square=square, weight=group.share)]
        else:
            weights = _drop_thin_axes(self.axis_weights, shape, config.min_plane_side)
            passes = plan_planes(shape, {axis: w * group.share for axis, w in weights.items()}, tile=tile,
                                 overlap=config.overlap, stride=ensemble.stride, square=square)
        feed = _Feed(
            in_chans=ensemble.in_chans, normalization=ensemble.normalization,
            intensity_window=ensemble.normalization.window(original), weights=ensemble.weights,
            batch_size=config.batch_size, use_amp=config.amp is not False and all(d.type == "cuda" for d in self.devices),
            views=tta_views(config.tta, spatial_dims=ensemble.spatial_dims,
                            reverse_slices=config.reverse_slices and ensemble.in_chans > 1),
        )
        return [(work, feed, group.replicas) for work in passes]

    def to_mask(self, logits: LogitVolume, *, out: np.ndarray | None = None) -> np.ndarray:
        """The bool mask of ``logits`` as the config says: ``hysteresis``, else ``top_fraction``,
        else probability > ``threshold``; then components under ``min_component_size`` go.
        Streams the logits slice by slice; writes into ``out`` when given."""
        config = self.config
        if config.hysteresis is not None:
            high, low = config.hysteresis
            mask = hysteresis_threshold(logits.slices, logits.shape, logit(high), logit(low), out=out)
        else:
            mask = _threshold(logits.slices, logits.shape, self.threshold, config.top_fraction, out)
        if config.min_component_size > 1:
            return remove_small_components(mask, config.min_component_size, connectivity=config.connectivity, out=mask)
        return mask


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
    views, batch size and autocast."""

    in_chans: int
    normalization: Normalization
    intensity_window: tuple[float, float]
    weights: list[float]
    views: list[View]
    batch_size: int
    use_amp: bool


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


def _run_plane_pass(source: VolumeSource, work: PlanePass, replicas: list[_Replica], feed: _Feed, accumulator, tick) -> None:
    """Predict every plane of one axis and add weight x its logits into the accumulator.

    With several devices, each takes a contiguous share of the planes; planes are disjoint
    slices of the accumulator, so the threads never write the same voxels.
    """
    bounds = np.linspace(0, work.planes, len(replicas) + 1).round().astype(int)
    shares = [(replica, int(a), int(b)) for replica, a, b in zip(replicas, bounds[:-1], bounds[1:], strict=True) if b > a]

    def run(share) -> None:
        replica, start, stop = share
        _run_planes(source, work, range(start, stop), replica, feed, accumulator, tick)

    _in_threads(run, shares)


def _run_planes(source: VolumeSource, work: PlanePass, planes: range, replica: _Replica, feed: _Feed, accumulator, tick) -> None:
    grid = work.grid
    targets = np.moveaxis(accumulator, SLICE_AXIS[work.axis], 0)
    height, width = grid.region_shape
    tile_h, tile_w = grid.window_shape
    corners = grid.corners
    normaliser = grid.normaliser()
    pending: dict[int, list] = {}  # plane index -> [padded logit sum, windows done]
    batches = _plane_batches(source, work, planes, feed)
    for batch_index, batch in _prefetch(batches, replica.device):
        logits = _forward(replica.models, batch, feed)
        for (plane, y, x), tile_logits in zip(batch_index, logits, strict=True):
            entry = pending.setdefault(plane, [np.zeros((max(height, tile_h), max(width, tile_w)), np.float32), 0])
            entry[0][y : y + tile_h, x : x + tile_w] += tile_logits * grid.importance
            entry[1] += 1
            if entry[1] == len(corners):
                blended = entry[0][:height, :width] / normaliser
                _check_finite(blended, f"{work.axis} plane {plane}")
                np.clip(blended, -LOGIT_LIMIT, LOGIT_LIMIT, out=blended)
                blended *= work.weight
                targets[plane] += blended
                del pending[plane]
        tick(len(batch_index))


def _plane_batches(source: VolumeSource, work: PlanePass, planes: range, feed: _Feed,
                   slab: int = 8) -> Iterator[tuple[list, np.ndarray]]:
    """(index, tiles) batches of (B, C, T, T) float32 tiles running across consecutive planes,
    read ``slab`` planes (plus their neighbour planes) at a time."""
    half = feed.in_chans // 2
    slice_axis = SLICE_AXIS[work.axis]
    height, width = work.grid.window_shape

    def tiles() -> Iterator[tuple[tuple[int, int, int], np.ndarray]]:
        for first in range(planes.start, planes.stop, slab):
            last = min(first + slab, planes.stop)
            block = read_planes(source, slice_axis, first, last, halo=half)  # block[k]: plane first - half + k
            for plane in range(first, last):
                neighbours = block[plane - first : plane - first + feed.in_chans]
                stack = _pad_to(feed.normalization.apply(neighbours, feed.intensity_window), (height, width))
                for y, x in work.grid.corners:
                    yield (plane, y, x), stack[:, y : y + height, x : x + width]

    return _batched(tiles(), feed.batch_size)


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
        bounds = np.linspace(0, len(corners), len(replicas) + 1).round().astype(int)
        shares = [(replica, corners[a:b]) for replica, a, b in zip(replicas, bounds[:-1], bounds[1:], strict=True) if b > a]

        def run(share) -> None:
            replica, mine = share
            for batch_index, batch in _prefetch(_patch_batches(source, work, mine, feed), replica.device):
                for corner, patch_logits in zip(batch_index, _forward(replica.models, batch, feed), strict=True):
                    rows.add(corner, patch_logits)
                tick(len(batch_index))

        _in_threads(run, shares)
        rows.flush(until=z_starts[index + 1] if index + 1 < len(z_starts) else accumulator.shape[0])


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
        """Blend rows [start, until) into the accumulator and keep the rest open."""
        done = until - self.start
        if done <= 0:
            return
        region = (slice(self.start, until), *(slice(0, side) for side in self.accumulator.shape[1:]))
        blended = self.sums[:done] / self.work.grid.normaliser(region)
        np.clip(blended, -LOGIT_LIMIT, LOGIT_LIMIT, out=blended)
        blended *= self.work.weight
        self.accumulator[region] += blended
        kept = self.sums[done:].copy()
        self.sums[:] = 0
        self.sums[: len(kept)] = kept
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


def _in_threads(run: Callable, shares: list) -> None:
    """``run`` each share, in this thread when there is one (errors and Ctrl-C surface directly),
    else one thread per share."""
    if len(shares) == 1:
        run(shares[0])
        return
    with ThreadPoolExecutor(max_workers=len(shares)) as pool:
        for future in [pool.submit(run, share) for share in shares]:
            future.result()


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


def _forward(models: list[torch.nn.Module], batch: torch.Tensor, feed: _Feed) -> np.ndarray:
    """Mean over views of the weighted model logits, each view inverted: (B, *window) float32."""
    total = None
    memory_format = _memory_format(batch.ndim)
    with torch.inference_mode(), torch.autocast(batch.device.type, dtype=torch.float16, enabled=feed.use_amp):
        for transform, inverse in feed.views:
            viewed = transform(batch).contiguous(memory_format=memory_format)  # as the models (_replicas)
            logits = sum(w * model(viewed).float() for model, w in zip(models, feed.weights, strict=True))
            restored = inverse(logits)
            total = restored if total is None else total + restored
    return (total / len(feed.views))[:, 0].float().cpu().numpy()


def _replicas(ensemble: Ensemble, devices: list[torch.device]) -> list[_Replica]:
    """The ensemble's models on each device; copied to the devices after the first.

    Models run in channels-last memory format (in place for the first device): convolutions are
    faster that way on the CPU (benchmarks/bench_memory_format.py: 1.46x for a ResNet-18 U-Net)
    and on tensor-core GPUs.
    """
    memory_format = _memory_format(ensemble.spatial_dims + 2)
    replicas = []
    for index, device in enumerate(devices):
        models = ensemble.models if index == 0 else [copy.deepcopy(m) for m in ensemble.models]
        replicas.append(_Replica([m.to(device, memory_format=memory_format).eval() for m in models], device))
    return replicas


def _memory_format(ndim: int) -> torch.memory_format:
    """channels_last for (B, C, H, W), channels_last_3d for (B, C, D, H, W)."""
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


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
    factor = voxel_size_um / model_voxel_um if voxel_size_um and model_voxel_um else 1.0
    if not 1 / MAX_RESCALE <= factor <= MAX_RESCALE:
        raise ValueError(f"voxel_size_um={voxel_size_um} is {factor:.3g} times the models' {model_voxel_um} µm: "
                         f"more than the {MAX_RESCALE:g}x rescale allowed; check the voxel size")
    if abs(factor - 1.0) <= RESCALE_TOLERANCE:
        return source
    whole = source.read(tuple(slice(0, side) for side in source.shape))
    return ArraySource(resample_volume(whole, scaled_shape(source.shape, factor)))


def _check_3d_options(config: InferConfig, ensemble: Ensemble | MixedEnsemble) -> None:
    """ValueError naming the option for a plane-pass option given to 3D models only (in a mixed
    ensemble such options are the 2D models'), and for tta="d4" with non-square 3D patches."""
    groups = [group for group, _ in ensemble.groups()]
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
