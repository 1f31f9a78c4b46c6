"""Hull rules: how a 2D + 3D ensemble combines its two predictions (``InferConfig.hull_gate``).

The 4th place (0.712 private) did not average its 2D and 3D models. Per slice it filled the convex
hull of the 2D mask (probability > 0.05), dilated it (a 5 x 5 square, 5 times: 10 pixels), and
kept a voxel where p2D + hull x p3D > 0.05 + 0.5: inside the hull the 3D probability adds to the
2D one, outside it only the 2D model counts (their inference notebook, folder
``winning-team-solutions/team-4`` of cns-iu/hra-sennet-hoa-kaggle-2024).
``HullGate(dilation=10, shape="convex", rule="sum", threshold_3d=0.5)`` is that rule.
``HullGate(dilation)`` is the plain gate: the 3D mask where the 2D mask, dilated by a ball of
``dilation`` voxels, is (``postprocess.hull_gate``).

Everything streams slice by slice; the 2D mask (1 byte per voxel) is the only extra volume.

Example::

    config = InferConfig(hull_gate={"dilation": 10, "shape": "convex", "rule": "sum", "threshold_3d": 0.5})
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from .values import is_finite_real, is_int

__all__ = ["HULL_RULES", "HULL_SHAPES", "HullGate", "hull_slices", "sum_rule_slices"]

HULL_SHAPES = ("mask", "convex")  # the 2D mask itself, or its filled convex hull per slice
HULL_RULES = ("and", "sum")  # 3D mask inside the hull; or p2D + hull x p3D > t2D + t3D


@dataclass(frozen=True)
class HullGate:
    """One hull rule. ``dilation``: voxels (a 3D ball for ``shape="mask"``, an in-plane square
    for ``"convex"``). ``threshold_3d``: the 3D models' probability threshold (default: the
    inference threshold, else their calibrated one); the 2D models use the inference threshold
    (else theirs)."""

    dilation: int = 5
    shape: str = "mask"
    rule: str = "and"
    threshold_3d: float | None = None

    def __post_init__(self) -> None:
        if not is_int(self.dilation) or self.dilation < 0:
            raise ValueError(f"hull_gate dilation must be a non-negative int (voxels), got {self.dilation!r}")
        if self.shape not in HULL_SHAPES:
            raise ValueError(f"hull_gate shape must be one of {HULL_SHAPES}, got {self.shape!r}")
        if self.rule not in HULL_RULES:
            raise ValueError(f"hull_gate rule must be one of {HULL_RULES}, got {self.rule!r}")
        if self.threshold_3d is not None and not (is_finite_real(self.threshold_3d) and 0 < self.threshold_3d < 1):
            raise ValueError(f"hull_gate threshold_3d must be a probability in (0, 1), got {self.threshold_3d!r}")

    @classmethod
    def parse(cls, value: HullGate | int | Mapping[str, Any]) -> HullGate:
        """A rule from an int (the dilation, other fields default), a mapping of its fields, or a rule."""
        if isinstance(value, HullGate):
            return value
        if is_int(value):
            return cls(dilation=value)
        if isinstance(value, Mapping):
            names = [field.name for field in dataclasses.fields(cls)]
            unknown = sorted(set(value) - set(names))
            if unknown:
                raise ValueError(f"unknown hull_gate keys {unknown}; valid: {names}")
            return cls(**value)
        raise ValueError(f"hull_gate must be a dilation (int) or a mapping of {[f.name for f in dataclasses.fields(cls)]}, "
                         f"got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def hull_slices(mask_2d: np.ndarray, gate: HullGate) -> Iterator[np.ndarray]:
    """The bool (Y, X) hull of every slice of the 2D models' (Z, Y, X) bool mask."""
    if gate.shape == "mask":
        yield from ball_dilated_slices(mask_2d, gate.dilation)
        return
    square = np.ones((2 * gate.dilation + 1,) * 2, np.uint8)
    for plane in mask_2d:
        filled = np.zeros(plane.shape, np.uint8)
        points = cv2.findNonZero(plane.view(np.uint8))
        if points is not None:
            cv2.fillConvexPoly(filled, cv2.convexHull(points), 1)
        yield cv2.dilate(filled, square).view(np.bool_)


def ball_dilated_slices(mask: np.ndarray, radius: int) -> Iterator[np.ndarray]:
    """The slices of a (Z, Y, X) bool ``mask`` dilated by a ball of ``radius`` voxels, one at a
    time: one disk per neighbouring slice (radius sqrt(r² - dz²) at distance dz)."""
    disks = {dz: _disk(radius, dz) for dz in range(-radius, radius + 1)}
    depth = mask.shape[0]
    for z in range(depth):
        hull = np.zeros(mask.shape[1:], dtype=np.uint8)
        for dz, disk in disks.items():
            if 0 <= z + dz < depth:
                np.maximum(hull, cv2.dilate(mask[z + dz].view(np.uint8), disk), out=hull)
        yield hull.view(np.bool_)


def sum_rule_slices(logits_3d: Iterable[np.ndarray], logits_2d: Iterable[np.ndarray], hulls: Iterable[np.ndarray],
                    cut: float) -> Iterator[np.ndarray]:
    """Per slice, p2D + hull x p3D > ``cut`` (the 4th place's rule, with cut = t2D + t3D)."""
    for gated, other, hull in zip(logits_3d, logits_2d, hulls, strict=True):
        total = _sigmoid(other) + np.where(hull, _sigmoid(gated), np.float32(0))
        yield total > cut


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float32)))


def _disk(radius: int, dz: int) -> np.ndarray:
    """The uint8 (2r+1, 2r+1) slice of a radius-``radius`` ball at height ``dz``."""
    offsets = np.arange(-radius, radius + 1)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2 - dz**2).astype(np.uint8)
