"""OptimConfig and the optimiser and scheduler registries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vessel_kit import optim
from vessel_kit.optim import OptimConfig, build_optimizer, build_scheduler, register_optimizer, register_scheduler


def _lrs(config: OptimConfig, steps: int) -> list[float]:
    """The learning rate before each of ``steps`` optimiser steps."""
    model = nn.Linear(2, 1)
    optimizer = build_optimizer(config, model.parameters())
    scheduler = build_scheduler(config, optimizer, total_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_each_optimizer_builds_with_lr_and_weight_decay(name, cls):
    optimizer = build_optimizer(OptimConfig(optimizer=name, lr=1e-3, weight_decay=0.05), nn.Linear(2, 1).parameters())
    assert type(optimizer) is cls
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 0.05


def test_optimizer_kwargs_reach_the_optimizer():
    params = list(nn.Linear(2, 1).parameters())
    assert build_optimizer(OptimConfig(optimizer="sgd"), params).defaults["momentum"] == 0.9
    sgd = build_optimizer(OptimConfig(optimizer="sgd", optimizer_kwargs={"momentum": 0.5, "nesterov": True}), params)
    assert sgd.defaults["momentum"] == 0.5 and sgd.defaults["nesterov"]
    assert build_optimizer(OptimConfig(optimizer_kwargs={"betas": [0.8, 0.9]}), params).defaults["betas"] == (0.8, 0.9)


def test_the_default_is_what_training_always_did():
    """AdamW + OneCycle peaking at lr after 10 % of the steps, as training hard-coded before."""
    config = OptimConfig(lr=1e-3)
    model = nn.Linear(2, 1)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2), max_lr=1e-3, total_steps=50, pct_start=0.1
    )
    expected = []
    for _ in range(50):
        expected.append(reference.optimizer.param_groups[0]["lr"])
        reference.optimizer.step()
        reference.step()
    assert _lrs(config, 50) == pytest.approx(expected)
    assert max(expected) == pytest.approx(1e-3)


def test_schedulers():
    cosine = _lrs(OptimConfig(lr=1e-2, scheduler="cosine", scheduler_kwargs={"eta_min": 1e-4}), 20)
    assert cosine[0] == pytest.approx(1e-2) and cosine == sorted(cosine, reverse=True) and cosine[-1] < 1e-3
    assert _lrs(OptimConfig(lr=1e-2, scheduler="constant"), 10) == pytest.approx([1e-2] * 10)
    onecycle = _lrs(OptimConfig(lr=1e-2, scheduler_kwargs={"pct_start": 0.5}), 20)
    assert max(range(20), key=onecycle.__getitem__) in (9, 10)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown optimizer 'lamb'; valid: \['adam', 'adamw', 'sgd'\]"):
        OptimConfig(optimizer="lamb")
    with pytest.raises(ValueError, match=r"unknown scheduler 'step'; valid: \['constant', 'cosine', 'onecycle'\]"):
        OptimConfig(scheduler="step")


@pytest.mark.parametrize("options, match", [
    ({"optimizer_kwargs": {"momentum": 0.9}}, "optimizer 'adamw' with optimizer_kwargs {'momentum': 0.9}: .*momentum"),
    ({"scheduler_kwargs": {"pct": 0.3}}, "scheduler 'onecycle' with scheduler_kwargs {'pct': 0.3}: .*pct"),
    ({"lr": 0.0}, "lr must be a finite number"),
    ({"weight_decay": float("inf")}, "weight_decay must be a finite number"),
    ({"ema_decay": 1.0}, r"ema_decay must be in \(0, 1\) or null"),
    ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0 or null"),
    ({"accumulate_steps": 0}, "accumulate_steps must be >= 1"),
])
def test_bad_options_fail_when_the_config_is_made(options, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**options)


def test_registering_an_optimizer_and_a_scheduler(monkeypatch):
    monkeypatch.setattr(optim, "OPTIMIZERS", dict(optim.OPTIMIZERS))
    monkeypatch.setattr(optim, "SCHEDULERS", dict(optim.SCHEDULERS))
    register_optimizer("rmsprop", lambda params, config: torch.optim.RMSprop(params, lr=config.lr, **config.optimizer_kwargs))
    register_scheduler("halve", lambda optimizer, config, total: torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(1, total // 2), gamma=0.5))
    config = OptimConfig(optimizer="rmsprop", lr=0.1, scheduler="halve", optimizer_kwargs={"alpha": 0.9})
    assert type(build_optimizer(config, nn.Linear(2, 1).parameters())) is torch.optim.RMSprop
    assert _lrs(config, 4) == pytest.approx([0.1, 0.1, 0.05, 0.05])
    with pytest.raises(ValueError, match="'adamw' is registered already; pass replace=True"):
        register_optimizer("adamw", lambda params, config: None)
    with pytest.raises(ValueError, match="the factory must be callable"):
        register_scheduler("x", "cosine")
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        build_scheduler(config, build_optimizer(config, nn.Linear(2, 1).parameters()), total_steps=0)
