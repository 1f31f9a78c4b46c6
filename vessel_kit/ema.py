"""Exponential moving average of a model's weights (``ModelEMA``), for validation and saving.

An average of the weights over the last few hundred optimiser steps generalises better than the
last step's weights; training validates and saves the average (``TrainConfig.optim.ema_decay``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .models import unwrap_model

__all__ = ["ModelEMA"]


class ModelEMA:
    """Exponential moving average of a model's weights, for validation and saving.

    Each ``update`` moves every floating-point parameter of ``module`` (a frozen eval-mode copy)
    towards the model's: ``ema = d * ema + (1 - d) * param``, and copies buffers (BatchNorm
    statistics) and any other parameters as they are. With warmup the decay after ``step`` updates is
    ``d = min(decay, (1 + step) / (warmup_steps + step))`` (0.1, 0.18, 0.25, ... for
    ``warmup_steps=10``), so early random weights fade fast; ``warmup_steps=0`` uses ``decay``
    from the first update.

    Example::

        ema = ModelEMA(model, decay=0.999)
        for batch in loader:
            ...  # optimiser step
            ema.update(model)
        validate(ema.module)
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup_steps: int = 10) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.step = 0
        self.module = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)
        self.module.zero_grad(set_to_none=True)

    @property
    def current_decay(self) -> float:
        """The decay the next ``update`` uses."""
        if self.warmup_steps == 0:
            return self.decay
        return min(self.decay, (1 + self.step) / (self.warmup_steps + self.step))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average."""
        ema_params, params = [], []
        for ema, param in zip(self.module.parameters(), unwrap_model(model).parameters(), strict=True):
            if ema.dtype.is_floating_point:
                ema_params.append(ema)
                params.append(param.detach())
            else:
                ema.copy_(param)
        if ema_params:
            torch._foreach_lerp_(ema_params, params, 1.0 - self.current_decay)
        for ema_buffer, buffer in zip(self.module.buffers(), unwrap_model(model).buffers(), strict=True):
            ema_buffer.copy_(buffer)
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "module": self.module.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.step = int(state["step"])
