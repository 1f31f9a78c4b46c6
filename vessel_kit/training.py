"""The training loop: ``train(TrainConfig)``.

AdamW + OneCycle, AMP on CUDA, gradient accumulation, gradient clipping, EMA weights, validation
by the real surface Dice on held-out volumes (also resampled to ``val_voxel_sizes_um``: a
simulated private test) with the probability threshold calibrated on them and stored in the
checkpoints (``validation.py``), best-checkpoint saving, a JSON-lines metrics log
and a PNG of the curves. The state is saved after every epoch, so an interrupted run resumes
where it stopped; crops depend only on (seed, epoch, index), so a resumed run is the run that
was interrupted.

Outputs in ``out_dir``: ``best.safetensors`` (EMA weights of the best validation epoch),
``last.safetensors``, ``state.pt`` (for resuming), ``metrics.jsonl``, ``curves.png``,
``config.yaml``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .atomic import atomic_output
from .axes import AXES
from .config_files import load_yaml_mapping
from .data import CropConfig, CropDataset, TrainVolume, cache_volume, vessel_mask
from .devices import usable_devices
from .layout import VolumeInfo, find_volumes
from .losses import build_loss
from .models import (
    ModelConfig,
    ModelEMA,
    build_model_from_config,
    load_checkpoint,
    load_training_state,
    read_checkpoint_metadata,
    save_checkpoint,
    save_training_state,
)
from .normalize import Normalization
from .runs import claim_run_dir
from .validation import validate, validation_cases

__all__ = ["RECIPES", "TrainConfig", "TrainResult", "load_train_volumes", "train"]

# Named starting points; a config names one with ``recipe:`` and overrides what it needs.
RECIPES: dict[str, dict] = {
    # A 2.5D U-Net from scratch on the synthetic dataset, on 2 CPU cores in a few minutes.
    # Robust by construction: five synthetic style families, tilted planes, 3D zoom and
    # low-resolution emulation around the 50 -> 63 µm ratio, intensity augmentation and
    # inversion; validated (and its threshold calibrated) at 50 and at 63.08 µm.
    "synthetic_cpu": {
        "train_volumes": ["kidney_1_dense", "kidney_2", "synth_wall", "synth_bright", "synth_faint", "synth_random"],
        "val_volumes": ["kidney_3_dense"], "val_voxel_sizes_um": [63.08],
        "volume_weights": {"kidney_2": 0.6, "synth_wall": 0.5, "synth_bright": 0.5, "synth_faint": 0.4,
                           "synth_random": 0.4},
        "encoder": "resnet18", "in_chans": 3, "crop_size": 128,
        "model_kwargs": {"decoder_channels": [128, 64, 32, 16, 8]},  # half the CPU time of the default
        "foreground_fraction": 0.7, "crops_per_epoch": 384, "augment": "light", "epochs": 12,
        "batch_size": 16, "lr": 2e-3, "ema_decay": 0.98,
        "rotate_p": 0.2, "rotate_max_deg": 30.0, "zoom_p": 0.25, "zoom_range": [0.7, 1.15], "lowres_p": 0.15,
        "intensity_p": 0.4, "invert_p": 0.1,
    },
    # The competition data on a GPU: MaxViT-base U-Net on 512 crops along 3 axes, the 5th-place
    # loss, EMA; pretrained encoder weights must be given as a local file (encoder_weights).
    "kaggle_2p5d": {
        "train_volumes": ["kidney_1_dense", "kidney_2"], "val_volumes": ["kidney_3_dense"],
        "volume_weights": {"kidney_2": 0.65}, "encoder": "tu-maxvit_base_tf_512", "in_chans": 1,
        "crop_size": 512, "augment": "hard", "loss": "5th_place", "epochs": 30, "batch_size": 8,
        "accumulate_steps": 4, "lr": 6e-5, "ema_decay": 0.999, "num_workers": 4,
    },
}


@dataclass
class TrainConfig:
    """Everything a training run needs; loadable from YAML (``TrainConfig.from_yaml``).

    Volumes are named as in the Kaggle layout under ``data_root``. ``soft_labels`` maps a volume
    name (train or test split) to a ``.npy`` of uint8 soft labels (0..255, e.g. from
    ``make_pseudo_labels``) used as its target instead of (or, for test volumes, in the absence
    of) its labels. ``lr`` 6e-5 is the seed baseline's, for pretrained encoders; from-scratch
    encoders want ~1e-3.
    """

    data_root: str
    out_dir: str = "runs/unet"
    train_volumes: list[str] = field(default_factory=lambda: ["kidney_1_dense", "kidney_2"])
    val_volumes: list[str] = field(default_factory=lambda: ["kidney_3_dense"])
    volume_weights: dict[str, float] = field(default_factory=dict)
    soft_labels: dict[str, str] = field(default_factory=dict)
    cache_dir: str | None = None
    # model
    arch: str = "unet"
    encoder: str = "resnet34"
    encoder_weights: str | None = None
    in_chans: int = 1
    model_kwargs: dict = field(default_factory=dict)  # more build_model options, e.g. decoder_channels
    normalization: dict = field(default_factory=lambda: {"mode": "percentile", "low": 10.0, "high": 99.8})
    # crops
    crop_size: int = 256
    axes: dict[str, float] = field(default_factory=lambda: {"xy": 1.0, "xz": 1.0, "yz": 1.0})
    foreground_fraction: float = 0.5
    crops_per_epoch: int = 2000
    augment: str = "hard"
    # robustness (data.CropConfig): tilted planes, 3D zoom, low-resolution emulation, intensity
    rotate_p: float = 0.0
    rotate_max_deg: float = 30.0
    zoom_p: float = 0.0
    zoom_range: tuple[float, float] = (0.7, 1.15)
    lowres_p: float = 0.0
    intensity_p: float = 0.0
    invert_p: float = 0.0
    # optimisation
    loss: str | dict | list = "5th_place"  # see losses.build_loss
    epochs: int = 20
    batch_size: int = 16
    accumulate_steps: int = 1
    lr: float = 6e-5
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    ema_decay: float | None = 0.999
    amp: bool | None = None  # None: on for CUDA
    # runtime
    device: str | None = None  # None: cuda if available
    num_workers: int = 2
    seed: int = 0
    val_threshold: float | None = None  # None: calibrate on validation (stored in the checkpoint)
    val_voxel_sizes_um: list[float] = field(default_factory=list)  # also validate resampled to these
    val_batch_size: int = 4
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        _check_field_types(self)
        for name in ("lr", "weight_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0) or self.lr == 0:
                raise ValueError(f"{name} must be a finite number >= 0 (lr > 0), got {getattr(self, name)}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if self.num_workers < 0 or self.val_batch_size < 1:
            raise ValueError(f"num_workers must be >= 0 and val_batch_size >= 1, got {self.num_workers}, {self.val_batch_size}")
        if self.epochs < 1 or self.batch_size < 1 or self.accumulate_steps < 1:
            raise ValueError(
                f"epochs, batch_size and accumulate_steps must be >= 1, got "
                f"{self.epochs}, {self.batch_size}, {self.accumulate_steps}"
            )
        if not self.train_volumes:
            raise ValueError("train_volumes is empty")
        if self.crops_per_epoch < self.batch_size * self.accumulate_steps:
            raise ValueError(
                f"crops_per_epoch ({self.crops_per_epoch}) must hold at least one optimiser step "
                f"(batch_size x accumulate_steps = {self.batch_size * self.accumulate_steps})"
            )
        if self.val_threshold is not None and not 0.0 < self.val_threshold < 1.0:
            raise ValueError(f"val_threshold is a probability in (0, 1) or null (calibrate), got {self.val_threshold}")
        for size in self.val_voxel_sizes_um:
            if not (isinstance(size, (int, float)) and not isinstance(size, bool) and 0 < size < math.inf):
                raise ValueError(f"val_voxel_sizes_um must be positive voxel sizes in µm, got {self.val_voxel_sizes_um}")
        overlap = set(self.train_volumes) & set(self.val_volumes)
        if overlap:
            raise ValueError(f"volumes {sorted(overlap)} are in both train_volumes and val_volumes")
        Normalization.from_dict(self.normalization)  # fail early on a bad normalisation
        self.crop_config()

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        return cls.from_dict(load_yaml_mapping(path, what="training config"))

    @classmethod
    def from_dict(cls, values: Mapping) -> TrainConfig:
        """A config from options; ``recipe: NAME`` starts from ``RECIPES[NAME]``."""
        values = dict(values)
        recipe = values.pop("recipe", None)
        if recipe is not None:
            if recipe not in RECIPES:
                raise ValueError(f"unknown recipe {recipe!r}; recipes: {sorted(RECIPES)}")
            values = {**RECIPES[recipe], **values}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; valid options: {sorted(names)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def crop_config(self) -> CropConfig:
        return CropConfig(**{f.name: getattr(self, f.name) for f in fields(CropConfig) if hasattr(self, f.name)})


_SCALAR_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,),
                 "list": (list,)}


def _check_field_types(config: TrainConfig) -> None:
    """A ValueError naming the option whose value has the wrong type (a YAML ``epochs: ten``),
    for the fields typed with plain scalars, dicts and lists (``| None`` allowed where declared)."""
    for item in fields(config):
        declared = [part.strip() for part in str(item.type).split("|")]
        kinds = [part.split("[")[0] for part in declared]
        if not set(kinds) <= {*_SCALAR_TYPES, "None", "tuple"}:
            continue  # e.g. loss: str | dict | list is checked by build_loss
        value = getattr(config, item.name)
        if value is None and "None" in kinds:
            continue
        accepted = tuple(t for kind in kinds if kind in _SCALAR_TYPES for t in _SCALAR_TYPES[kind])
        if "tuple" in kinds:
            accepted += (tuple, list)
        is_bool = isinstance(value, bool)
        if not isinstance(value, accepted) or (is_bool and "bool" not in kinds):
            raise ValueError(f"training option {item.name} must be {item.type}, got {value!r}")


@dataclass
class TrainResult:
    best_score: float
    best_epoch: int
    best_checkpoint: Path
    last_checkpoint: Path
    history: list[dict]


def train(config: TrainConfig, *, overwrite: bool = False) -> TrainResult:
    """Train a model as ``config`` says; return where the checkpoints are and the history.

    ``out_dir`` belongs to one config (``runs.claim_run_dir``): the same config resumes, another
    one is refused before anything is written, unless ``overwrite`` (which deletes the old run's
    files first).
    """
    out_dir = Path(config.out_dir)
    mode = claim_run_dir(out_dir, config.to_dict(), overwrite=overwrite)
    device = torch.device(_training_device(config.device))
    use_amp = device.type == "cuda" if config.amp is None else config.amp and device.type == "cuda"
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)

    normalization = Normalization.from_dict(config.normalization)
    _check_no_shared_images(config)
    train_volumes = load_train_volumes(config, config.train_volumes)
    _warn_if_unlabelled(train_volumes)
    val_volumes = load_train_volumes(config, config.val_volumes) if config.val_volumes else []
    val_cases = validation_cases(val_volumes, config.val_voxel_sizes_um)
    dataset = CropDataset(train_volumes, config.crop_config(), normalization, seed=config.seed)
    loader = DataLoader(
        dataset, batch_size=config.batch_size, shuffle=False, drop_last=True,
        num_workers=config.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=config.num_workers > 0,
    )
    voxel_sizes = {v.voxel_size_um for v in train_volumes} - {None}
    model_config = ModelConfig(
        arch=config.arch, encoder=config.encoder, in_chans=config.in_chans, normalization=normalization,
        voxel_size_um=voxel_sizes.pop() if len(voxel_sizes) == 1 else None, tile_size=config.crop_size,
        model_kwargs=config.model_kwargs,
    )
    model = build_model_from_config(model_config, encoder_weights=config.encoder_weights).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(loader) // config.accumulate_steps
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.1
    )
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    ema = ModelEMA(model, decay=config.ema_decay) if config.ema_decay else None
    criterion = build_loss(config.loss)

    trained_on = {"data_root": str(config.data_root), "train_volumes": list(config.train_volumes),
                  "val_volumes": list(config.val_volumes), "ema": bool(ema)}
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
        train_stats = _train_epoch(model, loader, criterion, optimizer, scheduler, scaler, ema, config, device, use_amp, epoch)
        evaluated = ema.module if ema else model
        record = {"epoch": epoch, **train_stats, "lr": scheduler.get_last_lr()[0]}
        if val_cases:
            record.update(validate(
                evaluated, val_cases, in_chans=config.in_chans, normalization=normalization,
                model_voxel_size_um=model_config.voxel_size_um, device=device,
                batch_size=config.val_batch_size, threshold=config.val_threshold,
            ))
        record["seconds"] = round(time.perf_counter() - started, 2)
        history.append(record)
        score = record.get("val_surface_dice", -record["train_loss"])
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        checkpoint = {"metrics": metrics, "extra": trained_on, "threshold": record.get("val_threshold")}
        save_checkpoint(out_dir / "last.safetensors", evaluated, model_config, **checkpoint)
        if score > best["score"]:
            best = {"score": score, "epoch": epoch}
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
    if val_cases and config.val_threshold is None and best["epoch"] >= 0 and not _calibrated_on_every_axis(best_path):
        _calibrate_on_every_axis(best_path, val_cases, config, device)
    return TrainResult(
        best_score=best["score"], best_epoch=best["epoch"], best_checkpoint=out_dir / "best.safetensors",
        last_checkpoint=out_dir / "last.safetensors", history=history,
    )


def _calibrated_on_every_axis(checkpoint: Path) -> bool:
    """Whether ``_calibrate_on_every_axis`` already rewrote this checkpoint (a rerun of a finished
    run, or one whose best epoch did not change, need not predict the validation volumes again)."""
    return "val_threshold_3axes" in read_checkpoint_metadata(checkpoint)["metrics"]


def _calibrate_on_every_axis(checkpoint: Path, cases, config: TrainConfig, device: torch.device) -> None:
    """Rewrite the best checkpoint's threshold, calibrated on the validation cases predicted along
    every axis, as ``infer_volume`` predicts by default (the epochs validate on xy alone)."""
    model, model_config = load_checkpoint(checkpoint, device=device)
    header = read_checkpoint_metadata(checkpoint)
    record = validate(model, cases, in_chans=model_config.in_chans, normalization=model_config.normalization,
                      model_voxel_size_um=model_config.voxel_size_um, device=device,
                      batch_size=config.val_batch_size, axes=AXES)
    metrics = {**header["metrics"], **{f"{key}_3axes": value for key, value in record.items()}}
    save_checkpoint(checkpoint, model, model_config, metrics=metrics, extra=header["extra"],
                    threshold=record["val_threshold"])
    if config.progress:
        tqdm.write(f"threshold calibrated on 3 axes: {record['val_threshold']} "
                   f"(validation surface Dice {record['val_surface_dice']:.4g})")


def load_train_volumes(config: TrainConfig, names: list[str]) -> list[TrainVolume]:
    """The named volumes of ``config.data_root`` with their targets (labels or soft labels).

    Uses memmaps from ``config.cache_dir`` when set (written on first use), else reads into RAM.
    """
    infos = _volume_infos(config.data_root, names)
    volumes = []
    for name, info in zip(names, infos, strict=True):
        if config.cache_dir:
            images, labels = cache_volume(info, config.cache_dir, progress=config.progress)
        else:
            images = info.read_images(progress=config.progress)
            labels = info.read_labels(progress=config.progress) if info.label_paths else None
        target = _soft_labels(config.soft_labels[name], images.shape) if name in config.soft_labels else labels
        if target is None:
            raise ValueError(f"volume {name!r} has no labels; give it soft labels in soft_labels")
        weight = config.volume_weights.get(name, 1.0)
        volumes.append(TrainVolume(name, images, target, weight=weight, voxel_size_um=info.voxel_size_um))
    return volumes


def _train_epoch(model, loader, criterion, optimizer, scheduler, scaler, ema, config, device, use_amp, epoch) -> dict:
    """One pass over the loader; returns the mean loss and mean loss parts."""
    totals: dict[str, float] = {}
    batches = 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not config.progress)
    for step, batch in enumerate(bar):
        image, target, valid = (batch[k].to(device, non_blocking=True) for k in ("image", "target", "valid"))
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            logits = model(image)
        loss = criterion(logits.float(), target, valid)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch}, batch {step}: loss is {loss.item()}; lower lr or check the data")
        scaler.scale(loss / config.accumulate_steps).backward()
        if (step + 1) % config.accumulate_steps == 0:
            if config.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
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


def _training_device(requested: str | None) -> str:
    """The device to train on: the first that ``usable_devices`` accepts (a missing or broken
    device is a ValueError naming it, before any data is read)."""
    return usable_devices(requested)[0]


def _warn_if_unlabelled(volumes: list[TrainVolume]) -> None:
    """Warn about training volumes with no vessel voxel: the model would learn to predict nothing."""
    empty = [v.name for v in volumes if not any(vessel_mask(plane).any() for plane in v.target)]
    if empty:
        warnings.warn(f"training volumes {empty} have no labelled vessel voxel; check their labels", stacklevel=3)


def _volume_infos(root: str, names: list[str]) -> list[VolumeInfo]:
    """The named volumes of the train and test splits of ``root``."""
    available = {}
    for split in ("train", "test"):
        if (Path(root) / split).is_dir():
            available.update({v.name: v for v in find_volumes(root, split)})
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"volumes {missing} are not in {root}; available: {sorted(available)}")
    return [available[n] for n in names]


def _check_no_shared_images(config: TrainConfig) -> None:
    """Refuse validation volumes whose image files are also trained on (kidney_3_dense's images
    are kidney_3_sparse's): the validation score would be a training score."""
    if not config.val_volumes:
        return
    trained = {p.resolve() for info in _volume_infos(config.data_root, config.train_volumes) for p in info.image_paths}
    for info in _volume_infos(config.data_root, config.val_volumes):
        shared = [p for p in info.image_paths if p.resolve() in trained]
        if shared:
            raise ValueError(
                f"validation volume {info.name!r} shares {len(shared)} image files with the training "
                f"volumes (e.g. {shared[0]}): validate on a volume that is not trained on"
            )


def _soft_labels(path: str, shape: tuple[int, ...]) -> np.ndarray:
    labels = np.load(path, mmap_mode="r")
    if labels.shape != tuple(shape) or labels.dtype != np.uint8:
        raise ValueError(f"soft labels {path} are {labels.shape} {labels.dtype}; expected {tuple(shape)} uint8")
    return labels


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
        if key in history[0]:
            score_axis.plot(epochs, [r[key] for r in history], marker="o", label=key)
    score_axis.set_xlabel("epoch")
    score_axis.set_title("validation")
    score_axis.set_ylim(0, 1)
    score_axis.legend()
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)
