"""``make_synthetic_volume``: one synthetic volume, its image in a drawn look and its labels."""

from __future__ import annotations

import numbers

import numpy as np

from ..values import is_finite_real
from .geometry import draw_outline, grow_forest, labelled_branches, organ_weight, rasterize
from .render import Scene, render_image
from .styles import Style, draw_look, resolve_style

MIN_SIDE = 8  # the smallest volume side accepted


def make_synthetic_volume(
    shape: tuple[int, int, int],
    seed: int,
    voxel_size_um: float = 50.0,
    *,
    labelled_fraction: float = 1.0,
    style: str | Style = "hipct",
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic vessel volume: (image uint16 (Z, Y, X), vessel labels bool (Z, Y, X)).

    ``style`` names a family of ``STYLES`` (or is a ``Style``); the look is drawn from it by
    ``seed``, so the same arguments always give identical arrays. The vessel geometry depends on
    ``shape``, ``seed`` and ``voxel_size_um`` only: for one seed every style shows the same trees
    (those outside the organ outline, where a look has one, are cut off). Labels are the vessels
    including any wall; particles and other texture are never labelled. ``labelled_fraction``
    < 1 mimics sparse annotation: whole subtrees holding about ``1 - labelled_fraction`` of the
    vessel voxels are left unlabelled; the image, identical for any ``labelled_fraction``, still
    shows them.

    Raises ValueError for a shape that is not three ints >= 8, a voxel size that is not a positive
    number, a ``labelled_fraction`` outside (0, 1], or an unknown style (listing the styles).
    """
    image, _, labels = synthesize(shape, seed, voxel_size_um, labelled_fraction, style)
    return image, labels


def synthesize(
    shape: tuple[int, int, int],
    seed: int,
    voxel_size_um: float,
    labelled_fraction: float,
    style: str | Style,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, dense labels, labels): the work behind ``make_synthetic_volume``.

    Separate random streams for geometry, image, annotation and look keep the geometry the same
    whatever the style, and the image and the dense labels the same whatever
    ``labelled_fraction`` is.
    """
    shape = _check_args(shape, voxel_size_um, labelled_fraction)
    style = resolve_style(style)
    geometry_seed, image_seed, label_seed, look_seed = np.random.SeedSequence(seed).spawn(4)
    geometry_rng = np.random.default_rng(geometry_seed)
    outline = draw_outline(geometry_rng, shape)
    branches = grow_forest(geometry_rng, shape, voxel_size_um)
    look = draw_look(style, np.random.default_rng(look_seed))
    owner, depth = rasterize(branches, shape, with_depth=look.walled > 0)
    organ = organ_weight(outline, shape) if look.outline else None
    if organ is not None:
        owner[organ < 0.5] = 0  # depth only matters where owner > 0
    counts = np.bincount(owner.ravel(), minlength=len(branches) + 1)[1:]
    labelled = labelled_branches(np.random.default_rng(label_seed), branches, counts, labelled_fraction)
    labelled = np.concatenate(([False], labelled))  # per owner value, 0 = no vessel
    trees = np.array([branch.tree for branch in branches])
    scene = Scene(owner, depth, organ, trees)
    image = render_image(image_seed, look, scene, voxel_size_um)
    return image, owner > 0, labelled[owner]


def _check_args(
    shape: tuple[int, int, int], voxel_size_um: float, labelled_fraction: float
) -> tuple[int, int, int]:
    """Validate the arguments of ``make_synthetic_volume``; return the shape as plain ints."""
    sides = tuple(shape) if isinstance(shape, (tuple, list)) else ()
    integral = all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in sides)
    if len(sides) != 3 or not integral or min(sides) < MIN_SIDE:
        raise ValueError(f"shape must be three ints (Z, Y, X), each >= {MIN_SIDE}, got {shape!r}")
    if not (is_finite_real(voxel_size_um) and voxel_size_um > 0):
        raise ValueError(f"voxel_size_um must be a positive number, got {voxel_size_um!r}")
    if not (is_finite_real(labelled_fraction) and 0 < labelled_fraction <= 1):
        raise ValueError(f"labelled_fraction must be in (0, 1], got {labelled_fraction!r}")
    return tuple(int(n) for n in sides)
