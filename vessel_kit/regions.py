"""Checked box regions: one step-1 ``slice`` per axis of an array.

Volume sources (``sources.py``) and cropped TIFF reads (``volume.read_volume``) take a region and
hand back exactly that box, so a region is validated once, here: a wrong rank, a step, a negative
or out-of-range bound is a ``ValueError`` naming the region and the shape, never numpy's silent
clamping or wrap-around.
"""

from __future__ import annotations

from collections.abc import Sequence

Region = tuple[slice, ...]

__all__ = ["Region", "check_region", "region_shape"]


def check_region(region: Sequence[slice], shape: Sequence[int]) -> Region:
    """``region`` with every ``None`` bound resolved against ``shape``: ``slice(start, stop)``.

    Raises:
        ValueError: not one slice per axis of ``shape``, a step other than 1, or bounds outside
            ``0 <= start < stop <= size`` (an empty box is refused: it is always a caller's bug).
    """
    shape = tuple(int(n) for n in shape)
    is_slices = isinstance(region, (tuple, list)) and all(isinstance(span, slice) for span in region)
    if not is_slices or len(region) != len(shape):
        raise ValueError(f"region {region!r} must be a tuple of {len(shape)} slices for shape {shape}")
    resolved = []
    for axis, (span, size) in enumerate(zip(region, shape)):
        if span.step not in (None, 1):
            raise ValueError(
                f"region {region!r}: axis {axis} has step {span.step}; only step 1 is supported (shape {shape})"
            )
        start = 0 if span.start is None else int(span.start)
        stop = size if span.stop is None else int(span.stop)
        if not 0 <= start < stop <= size:
            raise ValueError(
                f"region {region!r}: axis {axis} needs 0 <= start < stop <= {size}, "
                f"got [{start}, {stop}) (shape {shape})"
            )
        resolved.append(slice(start, stop))
    return tuple(resolved)


def region_shape(region: Region) -> tuple[int, ...]:
    """The box's extent per axis, for a region from ``check_region``."""
    return tuple(span.stop - span.start for span in region)
