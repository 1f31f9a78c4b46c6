"""``infer_volume``: predict one whole (Z, Y, X) volume in one call.

A thin convenience function over ``Predictor`` (as MONAI's ``sliding_window_inference`` is over
its inferer): it builds the ``InferConfig`` from its keyword options, sets the models up, and
returns the mask (or logits). To predict several volumes with the same models, make one
``Predictor`` and call it per volume; the engine is described in ``predictor.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .deadline import DeadlineWarning
from .ensemble import DEFAULT_THRESHOLD, Ensemble, ModelSource, check_tile_size, load_ensemble
from .infer_config import InferConfig
from .infer_options import check_infer_options
from .normalize import Normalization
from .predictor import LOGIT_LIMIT, MAX_RESCALE, RESCALE_TOLERANCE, Predictor

__all__ = [
    "DEFAULT_THRESHOLD", "LOGIT_LIMIT", "MAX_RESCALE", "RESCALE_TOLERANCE", "DeadlineWarning", "Ensemble",
    "InferConfig", "Predictor", "check_tile_size", "infer_volume", "load_ensemble",
]


def infer_volume(
    volume: np.ndarray,
    models: ModelSource | Sequence[ModelSource] | Ensemble | Predictor,
    config: InferConfig | None = None,
    *,
    in_chans: int | None = None,
    normalization: Normalization | None = None,
    model_weights: Sequence[float] | None = None,
    voxel_size_um: float | None = None,
    deadline: float | None = None,
    accumulator_path: str | os.PathLike | None = None,
    return_logits: bool = False,
    out: np.ndarray | None = None,
    **options: Any,
) -> np.ndarray:
    """Predict a (Z, Y, X) volume with one model, a checkpoint, or an ensemble of them.

    Args:
        volume: (Z, Y, X) intensities (uint16 as read, or any real dtype); arrays or memmaps.
        models: a module, a checkpoint path, a list of them, an ``Ensemble``, or a ``Predictor``
            already set up (then it brings the config, and neither ``config``, the options nor
            in_chans/normalization/model_weights may be given). Checkpoints carry in_chans,
            normalisation, tile size and training voxel size; modules need ``in_chans`` and
            ``normalization``.
        axes, axis_weights: the views to predict along ("xy" = planes along Z, "xz" along Y,
            "yz" along X) and their weights (default equal).
        tta: "none", "flips" (4 views) or "d4" (8); ``reverse_slices`` doubles the views with
            the 2.5D slice order reversed.
        tile_size: tile side (or one side per dimension: (H, W), or (D, H, W) patches for 3D
            models), a multiple of the models' stride; default the checkpoint's training tile,
            or whole planes (padded to the stride) for modules.
        pad_planes_to: with whole planes, pad each plane side up to at least this (reflecting
            the image), e.g. the model's training crop: the 40-row xz planes of a 40-slice
            volume are otherwise mostly convolution border.
        overlap: fraction of a tile shared with its neighbour, in [0, 1).
        voxel_size_um, model_voxel_size_um: when both are known and differ by more than
            ``RESCALE_TOLERANCE``, the volume is resampled to the model's resolution and the
            logits back (model_voxel_size_um defaults to the checkpoints' training voxel size).
        device: "cpu", "cuda", "cuda:1", or a list of devices that split the planes between
            them (e.g. Kaggle's two T4s); default every CUDA device that works
            (``usable_devices``), else the CPU.
        amp: float16 autocast on CUDA devices (default on; never on the CPU).
        prefetch: prepare the next batch in a background thread while the model runs (default
            on; False prepares it in the model's thread: one core per process, as
            ``infer_blocks`` does in one-thread dask workers on the CPU). Same result either way.
        threshold: the mask is probability > threshold; default the ensemble's calibrated
            threshold (``Ensemble.threshold``: the weighted mean of its checkpoints'), else 0.5.
        hysteresis: (high, low) probabilities instead: voxels above ``high`` seed the mask,
            which grows through 3D-connected voxels above ``low`` (vessels whose middle is sure
            and whose thin or faint ends are not).
        top_fraction: instead, the ``top_fraction`` of voxels with the highest logits
            (exactly, ties included).
        min_component_size: then drop 3D connected components smaller than this many voxels
            (``postprocess.remove_small_components``); default (None): the checkpoints'
            calibrated size (the smallest of them), scaled to the volume's voxel size; 0 keeps all.
        polarity: "as_given", "inverted" (predict the scan with its intensities mirrored, for
            dark vessels on a model of bright ones) or "auto" (the default): as given, and only
            when that mask finds almost nothing (``polarity.asks_for_mirrored``: almost empty,
            or sparse and speckled), mirrored too, keeping the mirrored mask if it is fuller,
            plausible and less speckled (``polarity.keeps_mirrored``), with a warning.
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
        config: an ``InferConfig``; the keyword options that are its field names (axes, tta,
            tile_size, threshold, ...) override it.

    Returns:
        a (Z, Y, X) bool mask, or float16 logits with ``return_logits``.
    """
    check_infer_options({
        "in_chans": in_chans, "normalization": normalization, "model_weights": model_weights,
        "voxel_size_um": voxel_size_um, "deadline": deadline, "accumulator_path": accumulator_path,
        "return_logits": return_logits,
    })
    if isinstance(models, Predictor):
        if config is not None or options or (in_chans, normalization, model_weights) != (None, None, None):
            raise ValueError("a Predictor brings its models and InferConfig: give infer_volume no config, "
                             "inference options, in_chans, normalization or model_weights with it")
        predictor = models
    else:
        config = config or InferConfig()
        if options:
            config = config.replace(**options)
        predictor = Predictor(models, config, model_weights=model_weights, in_chans=in_chans, normalization=normalization)
    result = predictor.prediction(volume, voxel_size_um=voxel_size_um, deadline=deadline,
                                  accumulator_path=accumulator_path, out=None if return_logits else out,
                                  with_mask=not return_logits)
    return result.logits.array() if return_logits else result.mask
