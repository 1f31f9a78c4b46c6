"""From checkpoints to a submission file: every test volume of a Kaggle layout, streamed.

``predict_submission`` is what the inference notebook and ``vessel-kit infer`` run. It sets the
models up once (a ``Predictor``), predicts the volumes one by one, writes each slice's RLE as soon as its volume is
done, reports the time spent and an estimate of the time left, and keeps to a time budget: a
volume that would not finish in time (estimated from the voxels-per-second rate so far) is not
started, and one that passes the deadline while running is stopped; both get empty masks. With
``on_error="empty"`` a failing volume (or ensemble, or layout) gets empty masks too, so a Kaggle
run always ends with a complete, valid submission.

A configuration error is never a failing volume: the options, the devices, the output paths and
the layout against ``sample_submission.csv`` are checked before any volume is read, and any
problem stops the call whatever ``on_error`` says. The submission is written to a temporary file,
validated, and only then renamed over ``out``, so a failed or interrupted run leaves the previous
submission as it was. With ``logits_dir``, finished volumes are kept and reused on a rerun
(``logits_cache``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .atomic import atomic_output
from .deadline import DeadlineWarning
from .devices import usable_devices
from .ensemble import load_ensemble
from .infer import infer_volume
from .infer_config import InferConfig
from .layout import VolumeInfo, find_volumes
from .logits_cache import LogitsCache
from .models import read_checkpoint_metadata
from .predictor import Predictor
from .rle import (
    EMPTY_RLE,
    SubmissionWriter,
    read_submission,
    rle_encode,
    slice_id,
    validate_submission,
)
from .values import is_finite_real

__all__ = [
    "ON_ERROR", "RESERVED_OPTIONS", "carried_infer_config", "check_submission_options", "predict_submission",
    "write_empty_submission",
]

ON_ERROR = ("raise", "empty")
# infer_volume arguments predict_submission sets itself (per volume, or from its own options)
RESERVED_OPTIONS = {
    "volume": "each volume's images", "models": "checkpoints", "voxel_size_um": "the layout's voxel size",
    "device": "device=", "deadline": "time_budget_s=", "accumulator_path": "logits_dir=",
    "return_logits": "logits_dir=", "out": "the submission file",
}


def predict_submission(
    data_root: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    split: str = "test",
    time_budget_s: float | None = None,
    device: str | Sequence[str] | None = None,
    on_error: str = "raise",
    logits_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    config: InferConfig | None = None,
    voxel_size_um: float | None = None,
    **infer_options,
) -> dict[str, str]:
    """Predict every volume of ``<data_root>/<split>`` into the submission ``out``.

    Args:
        checkpoints: the ensemble (``.safetensors`` files).
        time_budget_s: seconds from the call, kept as the work goes: a volume that would not
            finish in it is not started, axes that would overrun are left out (``infer_volume``'s
            ``deadline``), and a volume still running at the deadline gets empty masks.
        device: as ``usable_devices`` takes it (default: every working GPU, else the CPU).
        on_error: "raise", or "empty" to give a volume that fails empty masks and go on (the
            traceback is logged); when the layout itself cannot be read, every id of
            ``sample_submission.csv`` gets an empty mask.
        logits_dir: keep each volume's float16 logits there as ``<volume>.npy`` (a memmap, so
            not in RAM either; at the models' voxel size when the volume was rescaled), written
            under a temporary name until complete. A rerun with the same options, checkpoints
            and slice files reuses a volume recorded there (``<volume>.json``) instead of
            predicting it again.
        config: the inference settings (``InferConfig``). Default: the settings the checkpoints
            carry (a recipe's ``infer:`` section, e.g. 2nd place's top fraction and components)
            when they agree, else InferConfig's defaults. The keyword ``infer_options`` (its
            field names: axes, tta, tile_size, threshold, ...) override it. Each volume's voxel
            size comes from the layout.
        voxel_size_um: every volume's voxel size in µm, instead of the layout's (the Kaggle
            names'); for scans the name table does not know.

    Returns:
        each volume's status: "predicted", "predicted (... using [axes] only)" when the time
        budget left axes out, "empty (time budget)" or "empty (error: ...)".
        The file is validated against ``sample_submission.csv`` when the root has one, before
        it replaces ``out``.

    Raises:
        ValueError (and FileNotFoundError, PermissionError), whatever ``on_error`` says, before
        any volume is read: a bad option or device, ``out`` a folder or in a missing or
        read-only folder, ``logits_dir`` a file, a sample submission that does not list the
        layout's slices.
    """
    started = time.monotonic()
    check_submission_options({"on_error": on_error, "time_budget_s": time_budget_s, **infer_options})
    if voxel_size_um is not None and not (is_finite_real(voxel_size_um) and voxel_size_um > 0):
        raise ValueError(f"voxel_size_um must be a positive number of micrometres, got {voxel_size_um!r}")
    log = log or _log_to_stderr
    config = (config or carried_infer_config(checkpoints, log)).replace(**infer_options)
    _check_output_file(Path(out))
    if logits_dir is not None:
        _prepare_logits_dir(Path(logits_dir))
    devices = usable_devices(device if device is not None else _listed(config.device), log=log)
    config = config.replace(device=tuple(devices))
    log(f"devices: {', '.join(devices)}")
    sample = Path(data_root) / "sample_submission.csv"
    try:
        volumes = find_volumes(data_root, split)
        if voxel_size_um is not None:  # the user's voxel size overrides the Kaggle names'
            volumes = [replace(volume, voxel_size_um=float(voxel_size_um)) for volume in volumes]
    except (FileNotFoundError, ValueError) as error:
        if on_error == "raise" or split != "test" or not sample.is_file():
            raise
        log(f"cannot read the {split} volumes ({error}); writing empty masks for the sample submission's ids")
        return write_empty_submission(sample, out, reason=f"empty (error: {error})")
    checked_sample = sample if split == "test" and sample.is_file() else None
    if checked_sample:
        _check_sample_lists_layout(checked_sample, volumes, split)
    ensemble, failure = _load(checkpoints, devices, on_error, log)
    predictor = None if ensemble is None else Predictor(ensemble, config)  # a bad tile size raises, whatever on_error says
    cache = None
    if logits_dir is not None and failure is None:
        cache = LogitsCache(logits_dir, checkpoints, config.to_dict(), log)
        cache.remove_stale_temps()
    run = _Run(predictor, failure, on_error, log, started, time_budget_s, cache)
    return _write_validated(Path(out), volumes, run, checked_sample)


def check_submission_options(options: Mapping[str, object]) -> None:
    """Raise ValueError naming the option for a bad value of ``predict_submission``'s own
    ``on_error`` and ``time_budget_s``, an ``infer_volume`` argument it sets itself, or any other
    inference option (an unknown name or a bad value for ``InferConfig``)."""
    options = dict(options)
    on_error = options.pop("on_error", ON_ERROR[0])
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    budget = options.pop("time_budget_s", None)
    if budget is not None and not (is_finite_real(budget) and budget > 0):
        raise ValueError(f"time_budget_s must be a number of seconds > 0, got {budget!r}")
    reserved = sorted(set(options) & RESERVED_OPTIONS.keys())
    if reserved:
        raise ValueError("predict_submission sets " + ", ".join(f"{o} (use {RESERVED_OPTIONS[o]})" for o in reserved))
    InferConfig.from_dict(options)


def write_empty_submission(
    sample_submission: str | os.PathLike, out: str | os.PathLike, *, reason: str = "empty"
) -> dict[str, str]:
    """A valid submission with an empty mask for every id of the sample submission, written
    atomically; returns ``reason`` for each volume named in the ids (``<volume>_<stem>``)."""
    ids = read_submission(sample_submission)["id"]
    with SubmissionWriter(out) as writer:
        for row_id in ids:
            writer.add_row(row_id, EMPTY_RLE)
    return {row_id.rsplit("_", 1)[0]: reason for row_id in ids}


@dataclass
class _Run:
    """What every volume of one ``predict_submission`` call shares."""

    predictor: Predictor | None  # None when loading failed
    failure: str | None  # every volume's status when loading failed
    on_error: str
    log: Callable[[str], None]
    started: float
    budget: float | None
    cache: LogitsCache | None

    @property
    def deadline(self) -> float | None:
        return None if self.budget is None else self.started + self.budget


def _write_validated(out: Path, volumes: list[VolumeInfo], run: _Run, sample: Path | None) -> dict[str, str]:
    """Write the submission to a temporary file, validate it against ``sample`` (when given),
    and only then rename it to ``out``; returns the volumes' statuses."""
    with atomic_output(out) as tmp:
        with SubmissionWriter(tmp) as writer:
            status = _write_volumes(writer, volumes, run)
        if sample is not None:
            try:
                validate_submission(tmp, sample)
            except ValueError as error:
                raise ValueError(f"{out} was not written (a previous file is kept): {error}") from None
    return status


def _write_volumes(writer: SubmissionWriter, volumes: list[VolumeInfo], run: _Run) -> dict[str, str]:
    """Every volume's rows into ``writer`` (reused, predicted, or empty); returns the statuses."""
    remaining = sum(int(np.prod(v.shape)) for v in volumes)
    done, status = 0, {}
    for volume in volumes:
        voxels = int(np.prod(volume.shape))
        remaining -= voxels
        rows = run.cache.reusable_rows(volume) if run.cache else None
        if rows is not None:
            _add_rows(writer, volume, rows)
            status[volume.name] = "predicted"
            continue
        elapsed = time.monotonic() - run.started
        if run.failure:
            status[volume.name] = run.failure
        elif run.budget is not None and _out_of_time(elapsed, run.budget, voxels, done):
            run.log(f"{volume.name}: would not finish within the {run.budget:.0f} s budget; writing empty masks")
            status[volume.name] = "empty (time budget)"
        else:
            run.log(f"{volume.name}: {volume.shape}, {volume.voxel_size_um} µm")
            status[volume.name] = _predict(volume, run, writer)
        if not status[volume.name].startswith("predicted"):
            _add_rows(writer, volume, [EMPTY_RLE] * len(volume.stems))
            continue
        done += voxels
        elapsed = time.monotonic() - run.started
        run.log(f"{volume.name} done; {elapsed:.0f} s so far, about {elapsed * remaining / done:.0f} s to go")
    return status


def _out_of_time(elapsed: float, budget: float, voxels: int, done: int) -> bool:
    """The budget is spent, or this volume would overrun it at the voxel rate so far."""
    return elapsed >= budget or (done > 0 and elapsed + voxels * elapsed / done > budget)


def carried_infer_config(checkpoints: Sequence[str | os.PathLike], log: Callable[[str], None]) -> InferConfig:
    """The InferConfig of the inference settings the checkpoints carry (``extra["infer"]``) when
    those that carry any agree; InferConfig() when none does, or (with a note) when they differ.
    A carried ``hull_gate`` is dropped (with a note) unless the checkpoints are 2D and 3D.
    An unreadable checkpoint is skipped here: loading reports it."""
    carried, ranks = {}, set()
    for path in checkpoints:
        try:
            metadata = read_checkpoint_metadata(path)
        except (OSError, ValueError, KeyError):
            continue
        ranks.add(metadata["config"].spatial_dims)
        if metadata["extra"].get("infer"):
            carried[str(path)] = dict(metadata["extra"]["infer"])
    distinct = {json.dumps(settings, sort_keys=True) for settings in carried.values()}
    if len(distinct) > 1:
        log(f"the checkpoints carry different inference settings ({carried}); using the defaults")
        return InferConfig()
    if not carried:
        return InferConfig()
    settings = next(iter(carried.values()))
    if settings.get("hull_gate") is not None and ranks != {2, 3}:  # a hull-gated pair's member alone
        log(f"hull_gate={settings.pop('hull_gate')} needs 2D and 3D checkpoints together; predicting without it")
    log(f"inference settings carried by the checkpoints: {settings}")
    return InferConfig.from_dict(settings)


def _load(checkpoints, devices: list[str], on_error: str, log):
    """(ensemble, None), or (None, status) when loading failed and on_error is "empty"."""
    try:
        missing = [str(p) for p in checkpoints if not Path(p).is_file()]
        if not checkpoints or missing:
            raise FileNotFoundError(f"checkpoints not found: {', '.join(missing) or 'none given'}")
        return load_ensemble([str(p) for p in checkpoints], device=devices[0]), None
    except Exception as error:
        if on_error == "raise":
            raise
        log(f"cannot load the models, every volume gets empty masks:\n{traceback.format_exc()}")
        return None, f"empty (error: {error})"


def _predict(volume: VolumeInfo, run: _Run, writer: SubmissionWriter) -> str:
    """Predict one volume into ``writer``; returns its status (nothing is written unless
    predicted). With a logits cache the logits are renamed into place once complete, and a
    volume predicted with every axis is recorded for reuse."""
    options = {"deadline": run.deadline}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DeadlineWarning)
            with run.cache.writing(volume) if run.cache else nullcontext() as logits_path:
                if logits_path is not None:
                    options["accumulator_path"] = logits_path
                mask = infer_volume(volume.read_images(), run.predictor, voxel_size_um=volume.voxel_size_um, **options)
    except TimeoutError as error:
        run.log(f"{volume.name}: {error}; writing empty masks")
        return "empty (time budget)"
    except Exception as error:
        if run.on_error == "raise":
            raise
        run.log(f"{volume.name} failed, writing empty masks:\n{traceback.format_exc()}")
        return f"empty (error: {error})"
    rows = [rle_encode(plane) for plane in mask]
    _add_rows(writer, volume, rows)
    status = "predicted"
    for warning in caught:  # the deadline's note goes into the status, other warnings on their way
        if issubclass(warning.category, DeadlineWarning):
            run.log(f"{volume.name}: {warning.message}")
            status = f"predicted ({warning.message})"
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if run.cache and status == "predicted":
        run.cache.record(volume, rows)
    return status


def _add_rows(writer: SubmissionWriter, volume: VolumeInfo, rows: Sequence[str]) -> None:
    """One RLE per slice of ``volume``, in slice order."""
    for stem, rle in zip(volume.stems, rows, strict=True):
        writer.add_row(slice_id(volume.name, stem), rle)


# --- checks made before any volume is read -----------------------------------------------------


def _check_output_file(path: Path) -> None:
    """``out`` must be a file path in an existing, writable folder."""
    if path.is_dir():
        raise ValueError(f"out {path} is a folder; give the submission's file path")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder of out {path} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"out {path}: its folder is not writable")


def _prepare_logits_dir(path: Path) -> None:
    """Create ``logits_dir`` (a folder, writable) if needed."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"logits_dir {path} is a file; give a folder for the logits")
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise PermissionError(f"logits_dir {path} is not writable")


def _check_sample_lists_layout(sample: Path, volumes: list[VolumeInfo], split: str) -> None:
    """The sample submission must list exactly the slices of the layout (a stale sample would
    make the finished submission invalid)."""
    listed = set(read_submission(sample)["id"])
    present = {slice_id(volume.name, stem) for volume in volumes for stem in volume.stems}
    problems = [f"{len(ids)} {what}, e.g. {', '.join(sorted(ids)[:3])}" for ids, what in (
        (listed - present, f"ids of {sample.name} have no slice in {split}/"),
        (present - listed, f"slices of {split}/ are not in {sample.name}"),
    ) if ids]
    if problems:
        raise ValueError(f"{sample} does not match the {split} volumes: " + "; ".join(problems))


def _listed(device: str | tuple[str, ...] | None) -> str | list[str] | None:
    return list(device) if isinstance(device, tuple) else device


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
