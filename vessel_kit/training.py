"""The training loop: ``train(TrainConfig)`` (the config: ``train_config.py``).

The optimiser and schedule of ``config.optim`` (AdamW + OneCycle by default, ``optim.py``), AMP
on CUDA, optional ``torch.compile`` (``compile``), gradient accumulation, gradient clipping, EMA
weights (``ema.py``), validation by the real surface Dice on held-out volumes (also resampled
to ``val_voxel_sizes_um``: a simulated private test) with the probability threshold calibrated on
them and stored in the checkpoints (``validation.py``), best-checkpoint saving, a JSON-lines
metrics log and a PNG of the curves. The state is saved after every epoch, so an interrupted run resumes
where it stopped (``training_state.py``); crops depend only on (seed, epoch, index), so a resumed
run is the run that was interrupted. 2D models train on crops (``data.CropDataset``), 3D models on
patches (``patches.PatchDataset``) through the same loop; validation predicts whole volumes either
way (3D models patch by patch). Volumes are read through ``layout.load_train_volumes`` (resampled
to ``target_voxel_size_um`` when set: ``train_resolution.py``) and trained on the first device
``devices.usable_devices`` accepts.

Outputs in ``out_dir``: ``best.safetensors`` (EMA weights of the best validation epoch),
``last.safetensors``, ``state.pt`` (for resuming), ``metrics.jsonl``, ``curves.png``,
``config.yaml``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .atomic import atomic_output
from .axes import AXES
from .data import CropDataset, TrainVolume, vessel_mask
from .devices import usable_devices
from .ema import ModelEMA
from .layout import VOXEL_SIZES_FILE, check_no_shared_images, load_train_volumes
from .losses import build_loss
from .models import (
    build_model_from_config, compile_model, load_checkpoint, memory_format, read_checkpoint_metadata, save_checkpoint,
)
from .normalize import Normalization
from .optim import build_optimizer, build_scheduler
from .patches import PatchDataset
from .predictor import RESCALE_TOLERANCE
from .runs import claim_run_dir
from .train_config import TrainConfig
from .train_resolution import at_voxel_size
from .training_state import load_training_state, save_training_state
from .validation import validate, validation_cases

if TYPE_CHECKING:
    from .members import MembersResult

# TrainConfig and load_train_volumes are re-exported: they were defined here.
__all__ = ["TrainConfig", "TrainResult", "canonical_config", "load_train_volumes", "train"]


@dataclass
class TrainResult:
    best_score: float
    best_epoch: int
    best_checkpoint: Path
    last_checkpoint: Path
    history: list[dict]


def train(config: TrainConfig, *, overwrite: bool = False) -> TrainResult | MembersResult:
    """Train a model as ``config`` says; return where the checkpoints are and the history.

    ``out_dir`` belongs to one config (``runs.claim_run_dir``): the same config resumes, another
    one is refused before anything is written, unless ``overwrite`` (which deletes the old run's
    files first). A config with ``members`` trains each in turn (``members.train_members``) and
    returns a ``members.MembersResult``.
    """
    if config.members:
        from .members import train_members  # members.py imports this module

        return train_members(config, overwrite=overwrite)
    out_dir = Path(config.out_dir)
    mode = claim_run_dir(out_dir, config.to_dict(), overwrite=overwrite, canonical=canonical_config)
    # The first device usable_devices accepts: a missing or broken one is a ValueError naming it,
    # before any data is read.
    device = torch.device(usable_devices(config.device)[0])
    use_amp = device.type == "cuda" if config.amp is None else config.amp and device.type == "cuda"
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)

    normalization = Normalization.from_dict(config.model.normalization)
    check_no_shared_images(config.data_root, config.train_volumes, config.val_volumes)
    train_volumes = _load_volumes(config, config.train_volumes)
    if config.target_voxel_size_um is not None:
        train_volumes = [at_voxel_size(v, config.target_voxel_size_um, cache_dir=config.cache_dir) for v in train_volumes]
    _warn_if_unlabelled(train_volumes)
    val_volumes = _load_volumes(config, config.val_volumes) if config.val_volumes else []
    val_cases = validation_cases(val_volumes, config.val_voxel_sizes_um)
    if config.patches is not None:
        dataset = PatchDataset(train_volumes, config.patches, normalization, seed=config.seed)
    else:
        dataset = CropDataset(train_volumes, config.crops, normalization, seed=config.seed)
    loader = DataLoader(
        dataset, batch_size=config.batch_size, shuffle=False, drop_last=True,
        num_workers=config.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=config.num_workers > 0,
    )
    model_config = config.model.model_config(voxel_size_um=_model_voxel_size(config, train_volumes),
                                             tile_size=config.sample_size)
    # 3D models are validated patch by patch at the training patch size; 2D ones on whole planes,
    # padded up to the training crop (a thinner plane is mostly convolution border).
    val_tile = config.sample_size if config.patches is not None else None
    model = build_model_from_config(model_config, encoder_weights=config.model.encoder_weights)
    model = model.to(device, memory_format=memory_format(model_config.spatial_dims + 2))  # batches follow (_train_epoch)
    # The compiled wrapper only runs the forward pass; optimiser, EMA, state and checkpoints keep
    # the plain module, so no "_orig_mod." key reaches a file.
    forward = compile_model(model, device) if config.compile else model
    optimizer = build_optimizer(config.optim, model.parameters())
    steps_per_epoch = len(loader) // config.optim.accumulate_steps
    scheduler = build_scheduler(config.optim, optimizer, total_steps=config.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    ema = ModelEMA(model, decay=config.optim.ema_decay) if config.optim.ema_decay else None
    criterion = build_loss(config.loss)

    trained_on = {"data_root": str(config.data_root), "train_volumes": list(config.train_volumes),
                  "val_volumes": list(config.val_volumes), "ema": bool(ema), "infer": dict(config.infer)}
    state_path = out_dir / "state.pt"
    start_epoch, best, history = 0, {"score": -math.inf, "epoch": -1}, []
    if mode == "resume":
        start_epoch, best, history = _resume(state_path, model, optimizer, scheduler, scaler, ema)

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_yaml(out_dir / "config.yaml", config.to_dict())
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        dataset.set_epoch(epoch)
        model.train()
        train_stats = _train_epoch(model, forward, loader, criterion, optimizer, scheduler, scaler, ema, config,
                                   device, use_amp, epoch)
        evaluated = ema.module if ema else model
        record = {"epoch": epoch, **train_stats, "lr": scheduler.get_last_lr()[0]}
        validated = bool(val_cases) and (epoch >= config.val_from_epoch or epoch == config.epochs - 1)
        if validated:
            record.update(validate(
                evaluated, val_cases, in_chans=config.model.in_chans, normalization=normalization,
                model_voxel_size_um=model_config.voxel_size_um, device=device,
                batch_size=config.val_batch_size, threshold=config.val_threshold, tile_size=val_tile,
                pad_planes_to=config.sample_size if val_tile is None else None,
                calibration_tolerance=config.calibration_tolerance, calibration_rule=config.calibration_rule,
            ))
        record["seconds"] = round(time.perf_counter() - started, 2)
        # an epoch before val_from_epoch has no score to compare: it is saved as last, never as best
        selectable = validated or not val_cases
        if selectable:
            record["selection_score"] = _selection_score(record, history, config.val_score_smoothing)
        history.append(record)
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        checkpoint = {"metrics": metrics, "extra": trained_on, "threshold": record.get("val_threshold")}
        save_checkpoint(out_dir / "last.safetensors", evaluated, model_config, **checkpoint)
        if selectable and record["selection_score"] > best["score"]:
            best = {"score": record["selection_score"], "epoch": epoch}
            save_checkpoint(out_dir / "best.safetensors", evaluated, model_config, **checkpoint)
        save_training_state(
            state_path, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, epoch=epoch,
            extra={"scaler": scaler.state_dict(), "best": best, "history": history},
        )
        _append_jsonl(out_dir / "metrics.jsonl", record)
        _plot_curves(history, out_dir / "curves.png")
        if config.progress:
            tqdm.write(_format_record(record))
    best_path = out_dir / "best.safetensors"
    calibrate = val_cases and config.val_threshold is None and best["epoch"] >= 0
    # A 3D model's epochs already predicted as inference does; a 2D model's predicted along xy only.
    if calibrate and config.patches is None and not _calibrated_on_every_axis(best_path):
        _calibrate_on_every_axis(best_path, val_cases, config, device)
    return TrainResult(
        best_score=best["score"], best_epoch=best["epoch"], best_checkpoint=out_dir / "best.safetensors",
        last_checkpoint=out_dir / "last.safetensors", history=history,
    )


def _selection_score(record: dict, history: list[dict], smoothing: float) -> float:
    """What the best checkpoint is chosen on: the validation surface Dice (without validation,
    minus the training loss), smoothed over the epochs so far: one epoch's score on a few small
    volumes is noisy, and a lucky threshold can make a barely trained epoch look best. An epoch
    before ``val_from_epoch`` counts as 0: otherwise the first validated epoch, the least trained,
    would be the only one not smoothed (a held-out-family fold kept its 5th epoch of 8, 0.195)."""
    score = record.get("val_surface_dice", -record["train_loss"])
    if not history:
        return score
    previous = history[-1].get("selection_score", 0.0)
    return smoothing * previous + (1.0 - smoothing) * score


def _model_voxel_size(config: TrainConfig, volumes: list[TrainVolume]) -> float | None:
    """The voxel size the model learns (stored in its checkpoints): the training volumes' mean
    when all are known and within ``RESCALE_TOLERANCE`` of each other (kidney_1 50 µm, kidney_3
    50.16 µm), divided by ``crops.scale``, which needs it known. None, with a warning when some
    volumes have a size, when unknown or mixed: inference then never resamples."""
    sizes = {v.name: v.voxel_size_um for v in volumes}
    known = [size for size in sizes.values() if size is not None]
    alike = len(known) == len(sizes) and max(known) / min(known) - 1.0 <= RESCALE_TOLERANCE
    size = float(np.mean(known)) if alike else None
    if size is None and known:
        warnings.warn(f"training volumes have unknown or different voxel sizes {sizes}: the checkpoint records none, "
                      f"so inference will not resample volumes of other sizes; record them in {VOXEL_SIZES_FILE} at "
                      "the data root or set target_voxel_size_um", stacklevel=3)
    scale = config.crops.scale if config.crops is not None else 1.0
    if scale == 1.0:
        return size
    if size is None:
        raise ValueError(f"crops.scale {scale} needs one known voxel size for the training volumes, got "
                         f"{sizes}: the checkpoint records voxel size / "
                         "scale so that inference resamples alike; set target_voxel_size_um to bring them to one")
    return size / scale


def _calibrated_on_every_axis(checkpoint: Path) -> bool:
    """Whether ``_calibrate_on_every_axis`` already rewrote this checkpoint (a rerun of a finished
    run, or one whose best epoch did not change, need not predict the validation volumes again)."""
    return "val_threshold_3axes" in read_checkpoint_metadata(checkpoint)["metrics"]


def _calibrate_on_every_axis(checkpoint: Path, cases, config: TrainConfig, device: torch.device) -> None:
    """Rewrite the best checkpoint's threshold (and, unless ``calibrate_min_component_size`` is
    off, its smallest component kept), calibrated on the validation cases predicted as
    ``infer_volume`` predicts by default: along every axis (the epochs validate on xy alone);
    on whole planes padded up to the training crop, which scores within ~0.005 of the
    checkpoint's tiles at half their cost (a plane thinner than the crop, e.g. the xz planes of a
    32-slice volume, is mostly convolution border: 0.001 instead of 0.097 unpadded)."""
    model, model_config = load_checkpoint(checkpoint, device=device)
    header = read_checkpoint_metadata(checkpoint)
    record = validate(model, cases, in_chans=model_config.in_chans, normalization=model_config.normalization,
                      model_voxel_size_um=model_config.voxel_size_um, device=device,
                      batch_size=config.val_batch_size, axes=AXES, pad_planes_to=config.sample_size,
                      component_sizes=config.calibration_component_sizes if config.calibrate_min_component_size else None,
                      calibration_tolerance=config.calibration_tolerance, calibration_rule=config.calibration_rule)
    metrics = {**header["metrics"], **{f"{key}_3axes": value for key, value in record.items()}}
    save_checkpoint(checkpoint, model, model_config, metrics=metrics, extra=header["extra"],
                    threshold=record["val_threshold"], min_component_size=record.get("val_min_component_size"))
    if config.progress:
        cleaned = (f"; components under {record['val_min_component_size']} voxels removed: "
                   f"{record['val_surface_dice_cleaned']:.4g}" if "val_min_component_size" in record else "")
        tqdm.write(f"threshold calibrated on 3 axes: {record['val_threshold']} "
                   f"(validation surface Dice {record['val_surface_dice']:.4g}{cleaned})")


def _load_volumes(config: TrainConfig, names: list[str]) -> list[TrainVolume]:
    """``layout.load_train_volumes`` with ``config``'s soft labels, weights and cache."""
    return load_train_volumes(
        config.data_root, names, soft_labels=config.soft_labels, volume_weights=config.volume_weights,
        cache_dir=config.cache_dir, progress=config.progress,
    )


def canonical_config(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """A run folder's stored options as this version writes them (a run started before the config
    had sections resumes), or as they are when they no longer make a config."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return TrainConfig.from_dict(values).to_dict()
    except (ValueError, TypeError):
        return values


def _train_epoch(model, forward, loader, criterion, optimizer, scheduler, scaler, ema, config, device, use_amp, epoch) -> dict:
    """One pass over the loader, ``forward`` (``model`` or its compiled wrapper) predicting;
    returns the mean loss and mean loss parts."""
    totals: dict[str, float] = {}
    batches = 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not config.progress)
    for step, batch in enumerate(bar):
        image, target, valid = (batch[k].to(device, non_blocking=True) for k in ("image", "target", "valid"))
        image = image.contiguous(memory_format=memory_format(image.ndim))  # as the model
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            logits = forward(image)
        loss = criterion(logits.float(), target, valid)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch}, batch {step}: loss is {loss.item()}; lower lr or check the data")
        scaler.scale(loss / config.optim.accumulate_steps).backward()
        if (step + 1) % config.optim.accumulate_steps == 0:
            if config.optim.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema:
                ema.update(model)
        parts = {"train_loss": loss.item(), **{f"loss_{k}": v for k, v in getattr(criterion, "last_parts", {}).items()}}
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value
        batches += 1
        bar.set_postfix(loss=f"{totals['train_loss'] / batches:.4f}")
    return {key: value / batches for key, value in totals.items()}


def _resume(state_path, model, optimizer, scheduler, scaler, ema) -> tuple[int, dict, list]:
    state = load_training_state(state_path, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema)
    extra = state["extra"]
    scaler.load_state_dict(extra["scaler"])
    tqdm.write(f"resuming from {state_path} after epoch {state['epoch']}")
    return state["epoch"] + 1, extra["best"], list(extra["history"])


def _warn_if_unlabelled(volumes: list[TrainVolume]) -> None:
    """Warn about training volumes with no vessel voxel: the model would learn to predict nothing."""
    empty = [v.name for v in volumes if not any(vessel_mask(plane).any() for plane in v.target)]
    if empty:
        warnings.warn(f"training volumes {empty} have no labelled vessel voxel; check their labels", stacklevel=3)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


def _write_yaml(path: Path, values: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(yaml.safe_dump(values, sort_keys=False))


def _format_record(record: dict) -> str:
    shown = ["epoch", "train_loss", "val_surface_dice", "val_dice", "lr", "seconds"]
    return "  ".join(f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}" for k in shown if k in record)


def _plot_curves(history: list[dict], path: Path) -> None:
    """Loss and validation scores per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_title("loss")
    loss_axis.legend()
    for key in ("val_surface_dice", "val_dice"):
        validated = [r for r in history if key in r]  # epochs before val_from_epoch have no score
        if validated:
            score_axis.plot([r["epoch"] for r in validated], [r[key] for r in validated], marker="o", label=key)
    score_axis.set_xlabel("epoch")
    score_axis.set_title("validation")
    score_axis.set_ylim(0, 1)
    if score_axis.get_legend_handles_labels()[0]:  # a run without validation has no scores
        score_axis.legend()
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)
