"""From checkpoints to a submission file: every test volume of a Kaggle layout, streamed.

``predict_submission`` is what the inference notebook and ``vessel-kit infer`` run. It predicts
the volumes one by one with ``infer_volume``, writes each slice's RLE as soon as its volume is
done, reports the time spent and an estimate of the time left, and keeps to a time budget: a
volume that would not finish in time (estimated from the voxels-per-second rate so far) is not
started, and one that passes the deadline while running is stopped; both get empty masks. With
``on_error="empty"`` a failing volume (or ensemble, or layout) gets empty masks too, so a Kaggle
run always ends with a complete, valid submission.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .devices import usable_devices
from .infer import DeadlineWarning, infer_volume, load_ensemble
from .layout import VolumeInfo, find_volumes
from .rle import (
    EMPTY_RLE,
    SubmissionWriter,
    read_submission,
    slice_id,
    validate_submission,
)

__all__ = ["ON_ERROR", "RESERVED_OPTIONS", "predict_submission", "write_empty_submission"]

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
            not in RAM either; at the models' voxel size when the volume was rescaled).
        infer_options: go to ``infer_volume`` (axes, tta, tile_size, threshold, ...); each
            volume's voxel size comes from the layout.

    Returns:
        each volume's status: "predicted", "predicted (... using [axes] only)" when the time
        budget left axes out, "empty (time budget)" or "empty (error: ...)".
        The file is validated against ``sample_submission.csv`` when the root has one.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    reserved = sorted(set(infer_options) & RESERVED_OPTIONS.keys())
    if reserved:
        raise ValueError("predict_submission sets " + ", ".join(f"{o} (use {RESERVED_OPTIONS[o]})" for o in reserved))
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    started = time.monotonic()
    deadline = None if time_budget_s is None else started + time_budget_s
    sample = Path(data_root) / "sample_submission.csv"
    try:
        volumes = find_volumes(data_root, split)
    except (FileNotFoundError, ValueError) as error:
        if on_error == "raise" or split != "test" or not sample.is_file():
            raise
        log(f"cannot read the {split} volumes ({error}); writing empty masks for the sample submission's ids")
        return write_empty_submission(sample, out, reason=f"empty (error: {error})")
    loaded, failure = _load(checkpoints, device, on_error, log)
    if logits_dir is not None:
        Path(logits_dir).mkdir(parents=True, exist_ok=True)
    total = sum(int(np.prod(v.shape)) for v in volumes)
    done, status = 0, {}
    with SubmissionWriter(out) as writer:
        for volume in volumes:
            voxels = int(np.prod(volume.shape))
            elapsed = time.monotonic() - started
            if failure:
                status[volume.name] = failure
            elif deadline is not None and _out_of_time(elapsed, time_budget_s, voxels, done):
                log(f"{volume.name}: would not finish within the {time_budget_s:.0f} s budget; writing empty masks")
                status[volume.name] = "empty (time budget)"
            else:
                log(f"{volume.name}: {volume.shape}, {volume.voxel_size_um} µm")
                options = {**infer_options, "deadline": deadline}
                if logits_dir is not None:
                    options["accumulator_path"] = Path(logits_dir) / f"{volume.name}.npy"
                status[volume.name] = _predict(volume, loaded, on_error, log, options, writer)
            if not status[volume.name].startswith("predicted"):
                _add_empty(writer, volume)
                continue
            done += voxels
            elapsed = time.monotonic() - started
            log(f"{volume.name} done; {elapsed:.0f} s so far, about {elapsed * (total - done) / done:.0f} s to go")
    if split == "test" and sample.is_file():
        validate_submission(out, sample)
    return status


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


def _out_of_time(elapsed: float, budget: float, voxels: int, done: int) -> bool:
    """The budget is spent, or this volume would overrun it at the voxel rate so far."""
    return elapsed >= budget or (done > 0 and elapsed + voxels * elapsed / done > budget)


def _load(checkpoints, device, on_error, log):
    """((ensemble, devices), None), or (None, status) when loading failed and on_error is "empty"."""
    try:
        missing = [str(p) for p in checkpoints if not Path(p).is_file()]
        if not checkpoints or missing:
            raise FileNotFoundError(f"checkpoints not found: {', '.join(missing) or 'none given'}")
        devices = usable_devices(device, log=log)
        log(f"devices: {', '.join(devices)}")
        ensemble = load_ensemble([str(p) for p in checkpoints], device=devices[0])
        return (ensemble, devices), None
    except Exception as error:
        if on_error == "raise":
            raise
        log(f"cannot load the models, every volume gets empty masks:\n{traceback.format_exc()}")
        return None, f"empty (error: {error})"


def _predict(volume: VolumeInfo, loaded, on_error, log, options, writer) -> str:
    """Predict one volume into ``writer``; returns its status (nothing is written unless predicted)."""
    ensemble, devices = loaded
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DeadlineWarning)
            mask = infer_volume(
                volume.read_images(), ensemble, voxel_size_um=volume.voxel_size_um, device=devices, **options
            )
    except TimeoutError as error:
        log(f"{volume.name}: {error}; writing empty masks")
        return "empty (time budget)"
    except Exception as error:
        if on_error == "raise":
            raise
        log(f"{volume.name} failed, writing empty masks:\n{traceback.format_exc()}")
        return f"empty (error: {error})"
    writer.add_volume(volume.name, volume.stems, mask)
    status = "predicted"
    for warning in caught:  # the deadline's note goes into the status, other warnings on their way
        if issubclass(warning.category, DeadlineWarning):
            log(f"{volume.name}: {warning.message}")
            status = f"predicted ({warning.message})"
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return status


def _add_empty(writer: SubmissionWriter, volume: VolumeInfo) -> None:
    for stem in volume.stems:
        writer.add_row(slice_id(volume.name, stem), EMPTY_RLE)
