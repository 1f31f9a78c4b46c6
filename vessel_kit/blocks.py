"""``infer_blocks``: predict a volume of any size block by block into an OME-Zarr store, serially
or on a dask.distributed cluster, resumably, with the result of the in-memory ``infer_volume``.

The volume is cut into blocks aligned to the output chunks (a block is a multiple of them, so no
two blocks write one chunk). Each block is one ``Predictor.logits(volume, region=block)`` call:
the tile grid is the whole volume's, only the tiles reaching the block are run (every axis, TTA
view and model), reading only the planes and spans they need, so the block's logits are those of
the whole-volume run (resampling included); the intensity window is sampled once from the whole
volume and given to every block. The block is thresholded (probability > threshold: a local rule,
the same as ``Predictor.to_mask``), written, and only then marked done in the store. A rerun skips
the done blocks; a failing block is retried ``retries`` times.

2D, 2.5D and 3D models (and mixed ensembles) run block-wise. The non-local mask rules
(``hysteresis``, ``top_fraction``, ``min_component_size`` > 1) run as a second, global pass over
the stored logits (``blocks_rules``; they turn ``logits=True`` on), with the mask of the in-memory
run; ``hull_gate`` and ``polarity="auto"`` are refused with a ValueError (no block-wise form, see
``blocks_rules``); ``polarity="inverted"`` reads every block mirrored (``polarity.InvertedSource``).

Executors: ``"serial"`` (this process), or ``"dask"``: a ``LocalCluster`` of ``workers`` processes
with one thread each (one GPU each as the dask resource ``GPU`` when CUDA is there), or the
cluster behind ``scheduler`` (an address such as ``tcp://host:8786``, or a dask-jobqueue cluster
object). The models are loaded once per worker process (``_Models.predictor``), not per block.
A dask worker with one thread that runs the models on the CPU uses one core: torch gets one
intra-op thread, and the batches are prepared in the model's thread (``InferConfig.prefetch``
None, the default, becomes False there; an explicit True or False is kept), so N such workers
keep N cores busy, not N x ~1.1 (``_process_config``).

Example::

    store = infer_blocks("kidney.ome.zarr", ["best.safetensors"], "vessels.zarr", block=256,
                         executor="dask", workers=2)
    store.mask  # a lazy zarr array, with a multiscale pyramid beside it
"""

from __future__ import annotations

import itertools
import os
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .regions import Region
from .sources import VolumeSource

__all__ = ["EXECUTORS", "block_regions", "infer_blocks"]

EXECUTORS = ("serial", "dask")
_BLOCKS_ATTRIBUTE = "vessel_kit_blocks"  # the block shape a store's done markers refer to
_LOADED: dict[str, Any] = {}  # per process: the Predictor of the current run, by its token


def infer_blocks(
    source: Any,
    models: Any,
    out: str | os.PathLike,
    *,
    config: Any = None,
    block: int | Sequence[int] = (256, 256, 256),
    chunks: int | Sequence[int] = (128, 128, 128),
    voxel_size_um: float | None = None,
    level: int | None = None,
    executor: str = "serial",
    workers: int | None = None,
    scheduler: Any = None,
    resources: dict[str, float] | None = None,
    retries: int = 2,
    overwrite: bool = False,
    logits: bool = False,
    progress: bool = True,
    pyramid: bool = True,
    **options: Any,
) -> Any:
    """Predict ``source`` block by block into the OME-Zarr store ``out``; returns the ``OutputStore``.

    Args:
        source: a path ``open_volume`` reads (OME-Zarr, zarr, N5, TIFF folder; for a store, the
            pyramid level nearest the models' voxel size), an array-like or a ``VolumeSource``.
            With dask, prefer a path or a zarr/dask array: a numpy volume is copied to every worker.
        models: what ``Predictor`` takes: checkpoint paths, modules, an ``Ensemble``.
        out: the output store path (``create_output``); an existing store with the same
            settings is resumed, one with other settings is an error unless ``overwrite``.
        config, options: the ``InferConfig`` and field overrides (tta, axes, tile_size, ...).
        block: the block side(s) in voxels, a multiple of ``chunks`` (the output's chunk sides).
        voxel_size_um: the source's voxel size when it carries none (``--voxel-size``); level: the
            pyramid level of a store to read (default: the one nearest the models' voxel size).
        executor: "serial" or "dask"; ``workers``: LocalCluster processes (default 1);
            ``scheduler``: an existing cluster's address or cluster object instead; ``resources``:
            the dask resources a block needs (default: ``{"GPU": 1}`` when the workers advertise
            a GPU resource, as the LocalCluster's do on a CUDA machine). In a worker with one
            thread (the LocalCluster's, or ``--nthreads 1``) that runs on the CPU, torch runs one
            thread and ``prefetch`` (unless the config sets it) is False: one core per worker.
            Serially, and on GPU or multi-thread workers, ``prefetch`` None means True.
        retries: how many times a failing block is retried (serially, or by dask).
        logits: also store the float16 logits (always, with a non-local mask rule: its second
            pass reads them); pyramid: build the multiscale levels at the end.
        progress: a tqdm bar of blocks done / total with an ETA.

    Raises:
        ValueError: bad input (not 3D, a dtype other than uint8/uint16/float32, no voxel size
            when the models need one, a store with other settings, blocks not a multiple of the
            chunks, options with no block-wise form), naming what and the fix.
        ImportError: ``executor="dask"`` without dask.distributed installed.
    """
    from .blocks_rules import finish_masks, split_rules, with_component_size
    from .infer_config import InferConfig
    from .ome_zarr import DTYPES, open_volume
    from .ome_zarr_out import create_output
    from .polarity import InvertedSource
    from .predictor import Predictor, voxel_ratio

    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    config = config or InferConfig()
    if options:
        config = config.replace(**options)
    config, rules = split_rules(config)  # the first pass thresholds; the rules' pass rewrites the masks
    run_models = _Models(models, config.replace(progress=False), uuid.uuid4().hex)
    # serial: this process' Predictor runs the blocks; dask: the workers', and this one (on the CPU
    # unless a device is set) only checks the models and samples the intensity window
    predictor = run_models.predictor() if executor == "serial" else Predictor(
        models, run_models.config.replace(device=config.device or "cpu"))
    model_voxel_um = config.model_voxel_size_um or predictor.ensemble.voxel_size_um
    volume = open_volume(source, voxel_size_um=voxel_size_um, level=level, model_voxel_size_um=model_voxel_um)
    if volume.dtype not in DTYPES:
        raise ValueError(f"{volume!r}: dtype {volume.dtype} is not supported; volumes are uint8, uint16 or float32: "
                         "convert it (e.g. array.astype('float32'))")
    if model_voxel_um is not None and volume.voxel_size_um is None:
        raise ValueError(f"{volume!r} has no voxel size, and the models were trained at {model_voxel_um} µm: pass "
                         "voxel_size_um=UM (--voxel-size UM), the volume's voxel size, so it is resampled exactly as "
                         "infer_volume would")
    if config.polarity == "inverted":
        volume = InvertedSource(volume)
    ratio = voxel_ratio(volume.shape, volume.voxel_size_um, model_voxel_um)
    rules = with_component_size(rules, predictor.calibrated_min_component_size(ratio))
    logits = logits or rules is not None
    chunk_shape = _sides(chunks, "chunks")
    block_shape = _block_shape(_sides(block, "block"), chunk_shape, volume.shape)
    store = create_output(out, volume.shape, voxel_size_um=volume.voxel_size_um, chunks=chunk_shape, logits=logits,
                          overwrite=overwrite)
    _check_block_record(store, block_shape)
    windows = predictor.intensity_windows(volume)
    grid = dict(block_regions(volume.shape, block_shape))
    done = store.done_blocks() & grid.keys()
    todo = [(index, region) for index, region in grid.items() if index not in done]
    task = _BlockTask(run_models, volume, store.path, windows, logits)
    with tqdm(total=len(grid), initial=len(done), desc="blocks", unit="block", disable=not progress) as bar:
        if executor == "serial":
            _run_serial(task, todo, retries, bar.update)
        else:
            _run_dask(task, todo, retries, workers, scheduler, resources, bar.update)
    finish_masks(store, rules, predictor.threshold, block_shape, progress=progress)
    if pyramid:
        store.build_pyramid(progress=progress)
    return store


def block_regions(shape: Sequence[int], block: Sequence[int]) -> Iterator[tuple[tuple[int, int, int], Region]]:
    """(grid index, region) of every block of ``block`` sides over ``shape``, in C order; the
    last block along an axis ends at the volume's edge."""
    starts = [range(0, side, size) for side, size in zip(shape, block, strict=True)]
    for corner in itertools.product(*starts):
        index = tuple(start // size for start, size in zip(corner, block, strict=True))
        yield index, tuple(slice(start, min(start + size, side)) for start, size, side in zip(corner, block, shape, strict=True))


# --- one block ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Models:
    """What every worker needs to set the models up: the ``Predictor`` arguments and a token
    naming this run (a worker keeps the Predictor of the latest token only)."""

    models: Any
    config: Any
    token: str

    def predictor(self) -> Any:
        """This process' Predictor of these models, made on first use (``_process_config``)."""
        if self.token not in _LOADED:
            from .predictor import Predictor

            _LOADED.clear()
            _LOADED[self.token] = Predictor(self.models, _process_config(self.config))
        return _LOADED[self.token]


@dataclass(frozen=True)
class _BlockTask:
    """Predict, threshold, write and mark done one block (picklable: it runs on dask workers)."""

    models: _Models
    volume: VolumeSource
    store: Path
    windows: list
    logits: bool

    def __call__(self, index: tuple[int, int, int], region: Region) -> tuple[int, int, int]:
        from .ome_zarr_out import OutputStore

        predictor = self.models.predictor()
        try:
            logits = predictor.logits(self.volume, region=region, intensity_windows=self.windows)
        except Exception as error:  # named by its block; input errors keep their type (the CLI prints them)
            box = ", ".join(f"{part.start}:{part.stop}" for part in region)
            kind = type(error) if type(error) in (ValueError, OSError, FloatingPointError) else RuntimeError
            raise kind(f"block {index} [{box}] of {self.volume!r} failed: {type(error).__name__}: {error}") from error
        mask = predictor.to_mask(logits)
        store = OutputStore(self.store)
        store.write_block(region, mask, logits.accumulator if self.logits else None)
        store.mark_done(index)
        return index


def _run_serial(task: _BlockTask, todo: list, retries: int, advance: Callable[[int], None]) -> None:
    """Every block in this process, each tried up to ``1 + retries`` times."""
    for index, region in todo:
        for attempt in range(retries + 1):
            try:
                task(index, region)
                break
            except Exception as error:
                if attempt == retries:
                    raise
                warnings.warn(f"{error}; retrying ({attempt + 1} of {retries})", stacklevel=2)
        advance(1)


def _run_dask(task: _BlockTask, todo: list, retries: int, workers: int | None, scheduler: Any,
              resources: dict[str, float] | None, advance: Callable[[int], None]) -> None:
    """Every block as a dask task (retried by dask), on a LocalCluster or ``scheduler``'s cluster;
    each task needs ``resources`` (default: one GPU when the workers have GPUs as a resource)."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as error:
        raise ImportError("executor='dask' needs dask.distributed: pip install 'vessel_kit[scale]' "
                          "(or 'dask[distributed]')") from error
    import torch

    if scheduler is None:
        gpu = {"GPU": 1} if torch.cuda.is_available() else None
        cluster = LocalCluster(n_workers=workers or 1, threads_per_worker=1, processes=True, resources=gpu,
                               dashboard_address=None)
        client = Client(cluster)
    else:
        cluster, client = None, Client(scheduler)
    try:
        if resources is None:
            advertised = [info.get("resources", {}) for info in client.scheduler_info()["workers"].values()]
            resources = {"GPU": 1} if any("GPU" in offered for offered in advertised) else None
        shared = client.scatter(task, broadcast=True, hash=False)
        futures = [client.submit(_run_task, shared, index, region, key=f"vessel-block-{task.models.token}-{'.'.join(map(str, index))}",
                                 retries=retries, resources=resources, pure=False) for index, region in todo]
        for future in as_completed(futures):
            future.result()
            advance(1)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _run_task(task: _BlockTask, index: tuple[int, int, int], region: Region) -> tuple[int, int, int]:
    return task(index, region)


# --- checks and helpers ------------------------------------------------------------------------


def _sides(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    sides = (value,) * 3 if isinstance(value, (int, np.integer)) else tuple(value)
    if len(sides) != 3 or not all(isinstance(side, (int, np.integer)) and side > 0 for side in sides):
        raise ValueError(f"{name} must be a positive int or 3 positive ints (Z, Y, X), got {value!r}")
    return tuple(int(side) for side in sides)  # type: ignore[return-value]


def _block_shape(block: tuple[int, int, int], chunks: tuple[int, int, int], shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``block`` checked to be whole chunks (a block covering an axis whole is always fine)."""
    bad = [(b, c) for b, c, n in zip(block, chunks, shape, strict=True) if b % min(c, n) and b < n]
    if bad:
        raise ValueError(f"block {block} must be a multiple of the output chunks {chunks} on every axis "
                         f"(so no two blocks write one chunk), e.g. block={tuple(c * max(1, b // c) for b, c in zip(block, chunks))}")
    return tuple(min(b, n) for b, n in zip(block, shape))  # type: ignore[return-value]


def _check_block_record(store: Any, block: tuple[int, int, int]) -> None:
    """The store's done markers are grid indices: refuse to resume them with another block shape."""
    recorded = store.root.attrs.get(_BLOCKS_ATTRIBUTE)
    if recorded is not None and tuple(recorded) != block and store.done_blocks():
        raise ValueError(f"{store.path} was written with blocks {tuple(recorded)}, not {block}: resume with "
                         f"block={tuple(recorded)}, or pass overwrite=True (--overwrite) to start again")
    store.root.update_attributes({_BLOCKS_ATTRIBUTE: list(block)})


def _process_config(config: Any) -> Any:
    """``config`` for this process: the worker's own GPU (``_worker_device``); and in a dask
    worker with one thread on the CPU, one core: torch on one intra-op thread, and unless the
    config says otherwise, batches prepared in the model's thread (``prefetch=False``: the
    background thread would keep ~1.1 cores busy per worker). Elsewhere ``config`` as given."""
    import torch

    config = config.replace(device=_worker_device(config.device))
    worker = _dask_worker()
    if worker is None or worker.state.nthreads != 1 or not _on_cpu(config.device):
        return config
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    return config if config.prefetch is not None else config.replace(prefetch=False)


def _on_cpu(device: Any) -> bool:
    """Whether an ``InferConfig.device`` runs on the CPU only (None: on the CPU when no CUDA
    device works, as ``usable_devices`` decides for the Predictor)."""
    import torch

    from .devices import usable_devices

    names = None if device is None else [str(d) for d in device] if isinstance(device, (list, tuple)) else str(device)
    return all(torch.device(name).type == "cpu" for name in usable_devices(names, log=lambda message: None))


def _worker_device(device: Any) -> Any:
    """``device``, or for a dask worker without one and several GPUs, the worker's own GPU
    (LocalCluster workers are named 0, 1, ...)."""
    worker = None if device is not None else _dask_worker()
    if worker is None:
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{int(worker.name) % count}" if count > 1 and str(worker.name).isdigit() else None


def _dask_worker() -> Any:
    """The dask worker running this task, or None (not in a dask task, or no dask.distributed).
    A worker process has imported distributed; a serial run is spared its import (~0.8 s)."""
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None
