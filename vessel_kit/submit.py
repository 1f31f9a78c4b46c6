"""From checkpoints to a submission file: every test volume of a Kaggle layout, streamed.

``predict_submission`` is what the inference notebook and ``vessel-kit infer`` run. It predicts
the volumes one by one with ``infer_volume``, writes each slice's RLE as soon as its volume is
done, reports the time spent and an estimate of the time left, and keeps to a time budget:
a volume that would not finish in time (estimated from the voxels-per-second rate so far) gets
empty masks instead, so the notebook always ends with a complete, valid submission.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .infer import infer_volume, load_ensemble
from .layout import find_volumes
from .rle import SubmissionWriter, validate_submission

__all__ = ["predict_submission"]


def predict_submission(
    data_root: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    split: str = "test",
    time_budget_s: float | None = None,
    device=None,
    log=None,
    **infer_options,
) -> dict[str, str]:
    """Predict every volume of ``<data_root>/<split>`` into the submission ``out``.

    ``infer_options`` go to ``infer_volume`` (axes, tta, tile_size, threshold, ...); each volume's
    voxel size comes from the layout. Returns each volume's status: "predicted" or "empty (time
    budget)". The file is validated against ``sample_submission.csv`` when the root has one.
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    missing = [str(p) for p in checkpoints if not Path(p).is_file()]
    if not checkpoints or missing:
        raise FileNotFoundError(f"checkpoints not found: {', '.join(missing) or 'none given'}")
    devices = device if isinstance(device, (list, tuple)) else [device] if device else None
    ensemble = load_ensemble([str(p) for p in checkpoints], device=(devices or [_default_device()])[0])
    volumes = find_volumes(data_root, split)
    total = sum(int(np.prod(v.shape)) for v in volumes)
    started, done, status = time.perf_counter(), 0, {}
    with SubmissionWriter(out) as writer:
        for volume in volumes:
            voxels = int(np.prod(volume.shape))
            elapsed = time.perf_counter() - started
            if time_budget_s is not None and done and elapsed + voxels * elapsed / done > time_budget_s:
                log(f"{volume.name}: would not finish within the {time_budget_s:.0f} s budget; writing empty masks")
                empty = np.zeros(volume.shape[1:], dtype=bool)
                writer.add_volume(volume.name, volume.stems, itertools.repeat(empty, len(volume.stems)))
                status[volume.name] = "empty (time budget)"
                continue
            log(f"{volume.name}: {volume.shape}, {volume.voxel_size_um} µm")
            mask = infer_volume(
                volume.read_images(), ensemble, voxel_size_um=volume.voxel_size_um, device=devices, **infer_options
            )
            writer.add_volume(volume.name, volume.stems, mask)
            status[volume.name] = "predicted"
            done += voxels
            elapsed = time.perf_counter() - started
            log(f"{volume.name} done; {elapsed:.0f} s so far, about {elapsed * (total - done) / done:.0f} s to go")
    sample = Path(data_root) / "sample_submission.csv"
    if split == "test" and sample.is_file():
        validate_submission(out, sample)
    return status


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
