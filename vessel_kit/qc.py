"""A quality-control figure for predicted volumes: what a prediction looks like and how its score
depends on the threshold.

One row per volume: its three orthogonal middle slices (xy, xz, yz) with the truth and the
prediction drawn over the image (green: truth only, red: prediction only, yellow: both), and the
surface Dice of ``logits > logit(threshold)`` for thresholds from 0.05 to 0.95 with the chosen
threshold marked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import atomic_output
from .calibration import threshold_scores
from .layout import find_volumes
from .metric import decode_row, read_solution
from .resample import resample_volume
from .rle import duplicated_ids, read_submission, slice_id

__all__ = ["DEFAULT_THRESHOLDS", "QCVolume", "qc_report", "read_solution_volume", "save_qc_figure", "threshold_curve"]

DEFAULT_THRESHOLDS = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2))


@dataclass
class QCVolume:
    """One row of the figure: (Z, Y, X) image, truth and prediction, and its threshold curve."""

    name: str
    image: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray
    curve: list[tuple[float, float]]
    threshold: float = 0.5


def qc_report(
    data_root: str | os.PathLike,
    submission_csv: str | os.PathLike,
    logits_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    threshold: float = 0.5,
) -> dict[str, list[tuple[float, float]]]:
    """The QC figure of every test volume of a dataset with a ``solution.csv`` (the synthetic
    one), from a submission and the logits ``predict_submission(..., logits_dir=...)`` kept.
    Returns each volume's threshold curve."""
    data_root, logits_dir = Path(data_root), Path(logits_dir)
    predicted = _submission_rles(submission_csv)
    solution = read_solution(data_root / "solution.csv")
    rows = []
    for volume in find_volumes(data_root, "test"):
        truth = _volume_truth(solution, volume.name, data_root / "solution.csv")
        logits_path = logits_dir / f"{volume.name}.npy"
        if not logits_path.is_file():
            raise FileNotFoundError(f"no logits for {volume.name} in {logits_dir}")
        logits = np.load(logits_path, mmap_mode="r")
        if logits.shape != truth.shape:  # predicted at the models' voxel size
            logits = resample_volume(logits, truth.shape, dtype=np.float16)
        prediction = np.stack([_predicted_slice(predicted, slice_id(volume.name, stem), truth.shape[1:], submission_csv)
                               for stem in volume.stems])
        curve = threshold_curve(logits, truth)
        rows.append(QCVolume(volume.name, volume.read_images(), truth, prediction, curve, threshold))
    save_qc_figure(out, rows)
    return {row.name: row.curve for row in rows}


def read_solution_volume(solution_csv: str | os.PathLike, volume: str) -> np.ndarray:
    """The (Z, Y, X) bool truth of one volume from a solution CSV (id, rle, width, height, image,
    slice), in slice order."""
    return _volume_truth(read_solution(solution_csv), volume, solution_csv)


def threshold_curve(
    logits: np.ndarray, truth: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> list[tuple[float, float]]:
    """Surface Dice of ``probability > t`` for each threshold ``t`` (compared on the logits)."""
    scores = threshold_scores([logits], [truth], thresholds)[:, 0]
    return [(float(t), float(score)) for t, score in zip(thresholds, scores, strict=True)]


def save_qc_figure(path: str | os.PathLike, volumes: Sequence[QCVolume]) -> Path:
    """Draw the figure (one row per volume) into a PNG at ``path``, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not volumes:
        raise ValueError("no volumes to draw")
    figure, rows = plt.subplots(len(volumes), 4, figsize=(16, 4 * len(volumes)), squeeze=False)
    for axes, item in zip(rows, volumes, strict=True):
        for ax, (label, cut) in zip(axes[:3], _middle_cuts(item.image.shape), strict=True):
            ax.imshow(_overlay(item.image[cut], item.truth[cut], item.prediction[cut]), interpolation="nearest")
            ax.set_title(f"{item.name} {label}", fontsize=10)
            ax.set_axis_off()
        thresholds, scores = zip(*item.curve, strict=True)
        axes[3].plot(thresholds, scores, marker="o", markersize=3)
        axes[3].axvline(item.threshold, color="gray", linestyle="--", label=f"threshold {item.threshold}")
        axes[3].set(xlabel="probability threshold", ylabel="surface Dice", ylim=(0, 1), title=f"{item.name} score vs threshold")
        axes[3].legend(loc="lower center", fontsize=8)
    figure.suptitle("green: truth only, red: prediction only, yellow: both", fontsize=11)
    figure.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)
    return path


def _volume_truth(solution: pd.DataFrame, volume: str, where: str | os.PathLike) -> np.ndarray:
    rows = solution[solution["image"] == volume]
    if rows.empty:
        raise ValueError(f"{where} has no rows for volume {volume!r}")
    columns = rows[["id", "rle", "height", "width"]].itertuples(index=False)
    return np.stack([decode_row(rle, (h, w), f"solution file {where}", row_id) for row_id, rle, h, w in columns])


def _submission_rles(path: str | os.PathLike) -> dict[str, str]:
    """id -> rle of a submission; duplicated ids are an error naming the file."""
    table = read_submission(path)
    duplicates = duplicated_ids(table)
    if duplicates:
        raise ValueError(f"submission file {path}: ids {duplicates[:3]} occur more than once")
    return dict(table[["id", "rle"]].itertuples(index=False))


def _predicted_slice(predicted: dict[str, str], row_id: str, shape: tuple[int, int], path) -> np.ndarray:
    if row_id not in predicted:
        raise ValueError(f"submission file {path}: no row for id {row_id!r}")
    return decode_row(predicted[row_id], shape, f"submission file {path}", row_id)


def _middle_cuts(shape: tuple[int, int, int]) -> list[tuple[str, tuple]]:
    z, y, x = (side // 2 for side in shape)
    return [(f"xy z={z}", (z, slice(None), slice(None))), (f"xz y={y}", (slice(None), y, slice(None))),
            (f"yz x={x}", (slice(None), slice(None), x))]


def _overlay(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """RGB float image: the slice windowed to its 1-99.5th percentiles, mask colours blended in."""
    low, high = np.percentile(image, (1, 99.5))
    gray = np.clip((image.astype(np.float32) - low) / max(high - low, 1e-6), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    colours = {(True, False): (0, 1, 0), (False, True): (1, 0, 0), (True, True): (1, 1, 0)}
    for (in_truth, in_prediction), colour in colours.items():
        where = (truth == in_truth) & (prediction == in_prediction)
        rgb[where] = 0.4 * rgb[where] + 0.6 * np.array(colour)
    return rgb
