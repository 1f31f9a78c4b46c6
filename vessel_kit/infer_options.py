"""The one validator of ``infer_volume``'s options: names, types and ranges.

``infer_volume`` runs it first, and so do the callers that must refuse a bad option *before*
any work (``predict_submission``, ``vessel-kit infer``, the Kaggle bundle builder), so a typo
such as ``tta: rot90`` stops a run at once instead of turning every mask empty on Kaggle.
Checks that need the models (a tile size's stride, the ensemble's threshold) stay in
``infer_volume``.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Mapping, Sequence

from .axes import AXES
from .hull import HullGate
from .polarity import POLARITIES
from .tta import TTA_MODES
from .values import is_finite_real

# Voxel sizes outside this range (µm) are surely a mistake (HiP-CT ranges from ~1 to ~25 µm per
# voxel at full resolution; coarse pyramid levels reach a few hundred).
VOXEL_SIZE_RANGE_UM = (0.05, 10_000.0)

__all__ = ["INFER_OPTIONS", "VOXEL_SIZE_RANGE_UM", "check_infer_options"]


def check_infer_options(options: Mapping[str, object]) -> None:
    """Raise ValueError naming the option for an unknown name or a value of the wrong type or
    range. The per-call arguments (``volume``, ``models``, ``out``) are not options."""
    unknown = sorted(set(options) - INFER_OPTIONS.keys())
    if unknown:
        raise ValueError(f"unknown inference options {unknown}; valid: {sorted(INFER_OPTIONS)}")
    for name, value in options.items():
        problem = INFER_OPTIONS[name](value)
        if problem:
            raise ValueError(f"inference option {name}={value!r}: {problem}")
    if options.get("top_fraction") is not None and options.get("hysteresis") is not None:
        raise ValueError("inference options top_fraction and hysteresis exclude each other; give one")


# --- value checks: each returns None when the value is fine, else what is wrong ---------------


def _int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _optional(check: Callable[[object], str | None]) -> Callable[[object], str | None]:
    return lambda value: None if value is None else check(value)


def _boolean(value: object) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _int_at_least(low: int) -> Callable[[object], str | None]:
    return lambda value: None if _int(value) and value >= low else f"must be an int >= {low}"


def _probability(value: object) -> str | None:
    return None if is_finite_real(value) and 0.0 < value < 1.0 else "must be a probability in (0, 1)"


def _fraction(value: object) -> str | None:
    return None if is_finite_real(value) and 0.0 <= value <= 1.0 else "must be a number in [0, 1]"


def _overlap(value: object) -> str | None:
    return None if is_finite_real(value) and 0.0 <= value < 1.0 else "must be a number in [0, 1)"


def _voxel_size(value: object) -> str | None:
    low, high = VOXEL_SIZE_RANGE_UM
    if is_finite_real(value) and low <= value <= high:
        return None
    return f"must be a voxel size in µm between {low} and {high}"


def _axes(value: object) -> str | None:
    axes = [value] if isinstance(value, str) else value
    if isinstance(axes, Sequence) and axes and len(set(axes)) == len(axes) and set(axes) <= set(AXES):
        return None
    return f"must be distinct names from {AXES}"


def _weights(value: object) -> str | None:
    values = list(value.values()) if isinstance(value, Mapping) else value
    if (isinstance(values, Sequence) and values and all(is_finite_real(v) and v >= 0 for v in values)
            and sum(values) > 0):
        return None
    return "must be non-negative numbers with a positive sum"


def _axis_weights(value: object) -> str | None:
    if not isinstance(value, Mapping) or not set(value) <= set(AXES):
        return f"must map axis names from {AXES} to weights"
    return _weights(value)


def _choice(choices: Sequence[str]) -> Callable[[object], str | None]:
    return lambda value: None if value in choices else f"must be one of {tuple(choices)}"


def _hysteresis(value: object) -> str | None:
    pair = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if pair and len(pair) == 2 and all(is_finite_real(v) for v in pair) and 0.0 < pair[1] < pair[0] < 1.0:
        return None
    return "must be (high, low) probabilities with 0 < low < high < 1"


def _tile_size(value: object) -> str | None:
    sides = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if sides and len(sides) <= 3 and all(_int(side) and side >= 1 for side in sides):
        return None
    return "must be an int >= 1, or one such int per dimension (3 for 3D patches)"


def _in_chans(value: object) -> str | None:
    return None if _int(value) and value >= 1 and value % 2 else "must be an odd int >= 1"


def _normalization(value: object) -> str | None:
    from .normalize import Normalization

    return None if isinstance(value, Normalization) else "must be a vessel_kit.normalize.Normalization"


def _device(value: object) -> str | None:
    import torch

    from .devices import usable_devices

    names = [str(d) for d in value] if isinstance(value, (list, tuple)) else value
    if isinstance(names, torch.device):
        names = str(names)
    try:
        usable_devices(names, log=lambda message: None)
    except ValueError as error:
        return str(error)
    return None


def _path(value: object) -> str | None:
    return None if isinstance(value, (str, os.PathLike)) else "must be a file path"


def _hull_gate(value: object) -> str | None:
    try:
        HullGate.parse(value)
    except ValueError as error:
        return str(error)
    return None


def _deadline(value: object) -> str | None:
    return None if is_finite_real(value) else "must be a time.monotonic() time"


# Every option of infer_volume and its check.
INFER_OPTIONS: dict[str, Callable[[object], str | None]] = {
    "axes": _axes,
    "axis_weights": _optional(_axis_weights),
    "tta": _choice(TTA_MODES),
    "reverse_slices": _boolean,
    "tile_size": _optional(_tile_size),
    "overlap": _overlap,
    "batch_size": _int_at_least(1),
    "in_chans": _optional(_in_chans),
    "normalization": _optional(_normalization),
    "model_weights": _optional(_weights),
    "voxel_size_um": _optional(_voxel_size),
    "model_voxel_size_um": _optional(_voxel_size),
    "device": _optional(_device),
    "amp": _optional(_boolean),
    "compile": _boolean,
    "prefetch": _optional(_boolean),
    "threshold": _optional(_probability),
    "hysteresis": _optional(_hysteresis),
    "top_fraction": _optional(_fraction),
    "min_component_size": _optional(_int_at_least(0)),
    "connectivity": _optional(_choice((6, 18, 26))),
    "hull_gate": _optional(_hull_gate),
    "polarity": _optional(_choice(POLARITIES)),
    "return_logits": _boolean,
    "accumulator_path": _optional(_path),
    "progress": _boolean,
    "deadline": _optional(_deadline),
    "min_plane_side": _int_at_least(1),
    "pad_planes_to": _optional(_int_at_least(1)),
}
