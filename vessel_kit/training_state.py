"""The training state for resuming: ``save_training_state`` / ``load_training_state``.

One ``torch.save`` file of plain tensors and containers (model, optimizer, scheduler and EMA
states, the epoch and step, and plain extra data), read back with ``weights_only=True``, so
loading it runs no pickled code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_output
from .ema import ModelEMA
from .folders import existing_file
from .models import unwrap_model

TRAINING_STATE_FORMAT_VERSION = 1
_PLAIN_TYPES = (str, int, float, bool, type(None))  # exact types: numpy scalars subclass float

__all__ = ["TRAINING_STATE_FORMAT_VERSION", "load_training_state", "save_training_state"]


def save_training_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    step: int | None = None,
    scheduler: Any | None = None,
    ema: ModelEMA | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write what resuming training needs, atomically: the model, optimizer, optional scheduler
    and EMA states, ``epoch``, ``step`` and ``extra`` (plain data: dicts, lists, str, numbers,
    bool, None and tensors, e.g. a GradScaler's state or RNG states)."""
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    payload = {
        "format_version": TRAINING_STATE_FORMAT_VERSION,
        "epoch": int(epoch),
        "step": None if step is None else int(step),
        "extra": extra,
    }
    for name, obj in _stateful(model, optimizer, scheduler, ema).items():
        payload[name] = obj.state_dict()
    path = Path(path)
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_training_state(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Any | None = None,
    ema: ModelEMA | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore the given objects from a ``save_training_state`` file (tensors mapped to
    ``device``) and return ``{"epoch", "step", "extra"}``."""
    path = existing_file(path)
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch.load raises many types for bad files; all mean "unreadable"
        raise ValueError(f"{path} is not a readable training state: {err}") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise ValueError(f"{path} is not a vessel_kit training state")
    for name, obj in _stateful(model, optimizer, scheduler, ema).items():
        if name not in payload:
            raise ValueError(f"{path} holds no {name} state")
        obj.load_state_dict(payload[name])
    return {key: payload[key] for key in ("epoch", "step", "extra")}


def _stateful(
    model: nn.Module | None, optimizer: torch.optim.Optimizer | None, scheduler: Any | None, ema: ModelEMA | None
) -> dict[str, Any]:
    """The given training objects by name (models unwrapped), skipping None."""
    model = None if model is None else unwrap_model(model)
    objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "ema": ema}
    return {name: obj for name, obj in objects.items() if obj is not None}


def _check_plain(value: Any, where: str) -> None:
    """Raise ValueError unless ``value`` is plain data that ``torch.load(weights_only=True)`` reads."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, where)
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif type(value) not in _PLAIN_TYPES and not isinstance(value, torch.Tensor):
        raise ValueError(f"{where} holds a {type(value).__name__}; only plain data and tensors can be saved")
