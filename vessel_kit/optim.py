"""Optimisation settings (``OptimConfig``) and the optimiser and scheduler registries.

``build_optimizer(config, params)`` and ``build_scheduler(config, optimizer, total_steps)`` make
what ``config.optimizer`` and ``config.scheduler`` name, from ``OPTIMIZERS`` and ``SCHEDULERS``;
``register_optimizer`` and ``register_scheduler`` add entries. The defaults, AdamW and a
one-cycle schedule (warm up over the first 10 % of the steps to ``lr``, then anneal), are what
training always used. Schedulers step once per optimiser step.

    optimizer: adamw | adam | sgd          (optimizer_kwargs: e.g. betas, momentum, nesterov)
    scheduler: onecycle | cosine | constant (scheduler_kwargs: e.g. pct_start, eta_min)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .values import is_int

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "OptimConfig",
    "build_optimizer",
    "build_scheduler",
    "register_optimizer",
    "register_scheduler",
]

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter], "OptimConfig"], Optimizer]
SchedulerFactory = Callable[[Optimizer, "OptimConfig", int], LRScheduler]


def _adamw(params: Iterable[torch.nn.Parameter], config: OptimConfig) -> Optimizer:
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **config.optimizer_kwargs)


def _adam(params: Iterable[torch.nn.Parameter], config: OptimConfig) -> Optimizer:
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, **config.optimizer_kwargs)


def _sgd(params: Iterable[torch.nn.Parameter], config: OptimConfig) -> Optimizer:
    """SGD with momentum 0.9 unless ``optimizer_kwargs`` says otherwise."""
    kwargs = {"momentum": 0.9, **config.optimizer_kwargs}
    return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay, **kwargs)


def _onecycle(optimizer: Optimizer, config: OptimConfig, total_steps: int) -> LRScheduler:
    """One cycle peaking at ``lr``; warm-up fraction ``pct_start`` 0.1 unless told otherwise."""
    kwargs = {"pct_start": 0.1, **config.scheduler_kwargs}
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps, **kwargs)


def _cosine(optimizer: Optimizer, config: OptimConfig, total_steps: int) -> LRScheduler:
    """Cosine annealing from ``lr`` to ``eta_min`` (0 unless told otherwise) over the run."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, **config.scheduler_kwargs)


def _constant(optimizer: Optimizer, config: OptimConfig, total_steps: int) -> LRScheduler:
    """``lr`` throughout."""
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0, **config.scheduler_kwargs)


# Name -> factory; add entries with register_optimizer / register_scheduler.
OPTIMIZERS: dict[str, OptimizerFactory] = {"adamw": _adamw, "adam": _adam, "sgd": _sgd}
SCHEDULERS: dict[str, SchedulerFactory] = {"onecycle": _onecycle, "cosine": _cosine, "constant": _constant}


@dataclass(frozen=True)
class OptimConfig:
    """How the weights are optimised: the ``optim:`` section of a training config.

    ``optimizer`` and ``scheduler`` name entries of ``OPTIMIZERS`` and ``SCHEDULERS``, with extra
    keyword arguments in ``optimizer_kwargs`` and ``scheduler_kwargs``. ``lr`` is the peak learning
    rate (6e-5 suits pretrained encoders; from-scratch ones want ~1e-3). Gradients of
    ``accumulate_steps`` batches make one optimiser step; their norm is clipped to
    ``max_grad_norm`` (null: no clipping). ``ema_decay`` keeps an average of the weights
    (``ModelEMA``) that is validated and saved instead of the raw weights (null: none).

    Example::

        config = OptimConfig(optimizer="sgd", lr=1e-2, scheduler="cosine", scheduler_kwargs={"eta_min": 1e-5})
        optimizer = build_optimizer(config, model.parameters())
        scheduler = build_scheduler(config, optimizer, total_steps=1000)
    """

    optimizer: str = "adamw"
    lr: float = 6e-5
    weight_decay: float = 1e-2
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    scheduler: str = "onecycle"
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    accumulate_steps: int = 1
    max_grad_norm: float | None = 1.0
    ema_decay: float | None = 0.999

    def __post_init__(self) -> None:
        _registered(OPTIMIZERS, self.optimizer, "optimizer")
        _registered(SCHEDULERS, self.scheduler, "scheduler")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0) or self.lr == 0:
                raise ValueError(f"{name} must be a finite number >= 0 (lr > 0), got {value}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if self.accumulate_steps < 1:
            raise ValueError(f"accumulate_steps must be >= 1, got {self.accumulate_steps}")
        self._try_building()

    def _try_building(self) -> None:
        """Build the optimiser and scheduler for one dummy parameter, so that a bad keyword
        argument fails now (naming the option), not after the training data is loaded."""
        try:
            optimizer = build_optimizer(self, [torch.zeros(1, requires_grad=True)])
        except (TypeError, ValueError) as error:
            what = f"optimizer {self.optimizer!r} with optimizer_kwargs {self.optimizer_kwargs}"
            raise ValueError(f"{what}: {error}") from None
        try:
            build_scheduler(self, optimizer, total_steps=100)
        except (TypeError, ValueError) as error:
            what = f"scheduler {self.scheduler!r} with scheduler_kwargs {self.scheduler_kwargs}"
            raise ValueError(f"{what}: {error}") from None


def build_optimizer(config: OptimConfig, params: Iterable[torch.nn.Parameter]) -> Optimizer:
    """The optimiser ``config.optimizer`` names, over ``params``."""
    return _registered(OPTIMIZERS, config.optimizer, "optimizer")(params, config)


def build_scheduler(config: OptimConfig, optimizer: Optimizer, total_steps: int) -> LRScheduler:
    """The learning-rate schedule ``config.scheduler`` names, for a run of ``total_steps``
    optimiser steps (``scheduler.step()`` after each)."""
    if not is_int(total_steps) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    return _registered(SCHEDULERS, config.scheduler, "scheduler")(optimizer, config, total_steps)


def register_optimizer(name: str, factory: OptimizerFactory, *, replace: bool = False) -> None:
    """Make ``name`` a valid ``OptimConfig.optimizer``: ``factory(params, config)`` returns the
    optimiser (reading ``config.lr``, ``config.weight_decay`` and ``config.optimizer_kwargs``)."""
    _register(OPTIMIZERS, name, factory, "optimizer", replace)


def register_scheduler(name: str, factory: SchedulerFactory, *, replace: bool = False) -> None:
    """Make ``name`` a valid ``OptimConfig.scheduler``: ``factory(optimizer, config, total_steps)``
    returns the scheduler (reading ``config.scheduler_kwargs``)."""
    _register(SCHEDULERS, name, factory, "scheduler", replace)


def _register(registry: dict[str, Callable], name: str, factory: Callable, what: str, replace: bool) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise ValueError(f"{what} {name!r}: the factory must be callable, got {factory!r}")
    if name in registry and not replace:
        raise ValueError(f"{what} {name!r} is registered already; pass replace=True to replace it")
    registry[name] = factory


def _registered(registry: dict[str, Callable], name: str, what: str) -> Callable:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; valid: {sorted(registry)}")
    return registry[name]
