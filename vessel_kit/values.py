"""Type checks of option values shared by the config checks (numpy-free, imported everywhere)."""

from __future__ import annotations

import math
import numbers

__all__ = ["is_finite_real", "is_int"]


def is_finite_real(value: object) -> bool:
    """A finite real number, not a bool (``True`` is an int to Python, never a size or a rate)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: object) -> bool:
    """A Python int, not a bool: what sizes, counts and dilations are stored as (numpy integers
    are refused, as they do not serialise into checkpoint metadata)."""
    return isinstance(value, int) and not isinstance(value, bool)
