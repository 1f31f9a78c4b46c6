"""Which devices can actually run the models: ``usable_devices``.

``torch.cuda.is_available()`` is not enough on Kaggle: a P100 (sm_60) under a recent torch build
reports CUDA as available and then fails at the first kernel ("no kernel image is available").
Each CUDA device is therefore tried with a small float16 convolution before it is used.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch

__all__ = ["usable_devices"]


def usable_devices(
    requested: str | Sequence[str] | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> list[str]:
    """The devices to run inference on.

    Args:
        requested: None or "auto" for every CUDA device that works (the CPU when none does);
            otherwise "cpu", "cuda", "cuda:1", a comma-separated string or a list of them, each
            of which must work.
        log: where to report a CUDA device that was skipped (default: stderr).

    Raises:
        ValueError: a requested device is malformed, absent, or cannot run a convolution.
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if requested is None or requested == "auto":
        working = []
        for index in range(torch.cuda.device_count()):
            problem = _cuda_problem(f"cuda:{index}")
            if problem:
                log(f"skipping cuda:{index} ({torch.cuda.get_device_name(index)}): {problem}")
            else:
                working.append(f"cuda:{index}")
        return working or ["cpu"]
    names = requested.split(",") if isinstance(requested, str) else list(requested)
    devices = []
    for name in (str(n).strip() for n in names):
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"device {name!r} is not a device name; use cpu, cuda, cuda:N or auto") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {name!r}: only cpu and cuda devices are supported")
        if device.type == "cuda":
            problem = _cuda_problem(name)
            if problem:
                raise ValueError(f"device {name!r} cannot be used: {problem}")
        devices.append(name)
    if not devices:
        raise ValueError("device list is empty")
    return devices


def _cuda_problem(name: str) -> str | None:
    """Why a CUDA device cannot run a float16 convolution, or None when it can."""
    device = torch.device(name)
    count = torch.cuda.device_count()
    if count == 0:
        return "this machine has no usable CUDA device"
    if device.index is not None and device.index >= count:
        return f"there are only {count} CUDA devices"
    try:
        with torch.inference_mode():
            x = torch.ones(1, 1, 8, 8, device=device, dtype=torch.float16)
            torch.nn.functional.conv2d(x, torch.ones(1, 1, 3, 3, device=device, dtype=torch.float16))
            torch.cuda.synchronize(device)
    except (RuntimeError, AssertionError) as error:
        return str(error).splitlines()[0]
    return None
