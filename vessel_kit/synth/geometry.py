"""Vessel geometry: branching trees of tapered tubes, their voxel map, the organ outline and
sparse annotation. Arrays are (Z, Y, X); lengths in voxels unless named ``_um``.

2-3 vessel trees (``TREES``) enter the volume through its faces. Each branch is a smooth cubic Bezier tube,
3-7 radii long, that tapers slightly and splits into two children with Murray's law radii
(r0³ = r1³ + r2³, the larger child keeping 75-95 % of the parent radius) and Murray's optimal
branching angles. Radii are defined in micrometres — roots up to ``ROOT_RADIUS_UM`` (15 voxels at
50 µm), tips ``TIP_RADIUS_UM`` (1 voxel at 50 µm) — and converted with ``voxel_size_um``, so at
63.08 µm the same kind of anatomy has vessels 50/63.08 times as thick in voxels (and shorter
branches, so the trees differ in detail). So that trees fit small volumes, root radii are
multiplied by ``median(shape) / 512`` (clipped to [0.25, 1]): a (128, 512, 512) volume at 50 µm
has roots of up to 15 voxels, a (64, 256, 256) one of up to 7.5. That factor depends on the shape
only, never on the voxel size.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

# Root radii shrink by median(shape) / FULL_SIZE_SIDE in smaller volumes.
ROOT_RADIUS_UM = 750.0
TIP_RADIUS_UM = 50.0
FULL_SIZE_SIDE = 512
BRANCH_LENGTH_RADII = (3.0, 7.0)  # a branch is this many (start) radii long
TREES = (2, 3)  # the number of vessel trees entering a volume, inclusive range
MAX_BEND_DEGREES = 45.0  # the largest turn along one branch


@dataclass(frozen=True)
class Branch:
    """One vessel branch: its tree, its parent branch (-1 for a root) and its tapered centreline."""

    tree: int
    parent: int
    points: np.ndarray  # (n, 3) centreline points, voxel coordinates (z, y, x)
    radii: np.ndarray  # (n,) radius in voxels at each point


def grow_forest(
    rng: np.random.Generator, shape: tuple[int, int, int], voxel_size_um: float
) -> list[Branch]:
    """Grow ``TREES`` vessel trees breadth-first; a parent always precedes its children in the list.

    A branch whose end leaves the volume gets no children; children thinner than the tip radius
    are not grown.
    """
    size_factor = min(1.0, max(0.25, float(np.median(shape)) / FULL_SIZE_SIDE))
    root_radius = ROOT_RADIUS_UM * size_factor / voxel_size_um
    tip_radius = TIP_RADIUS_UM / voxel_size_um
    last_voxel = np.array(shape) - 1
    queue = deque()
    for tree in range(rng.integers(TREES[0], TREES[1] + 1)):
        start, direction = _root_pose(rng, shape)
        queue.append((tree, -1, start, direction, root_radius * rng.uniform(0.7, 1.0)))
    branches = []
    while queue:
        tree, parent, start, direction, radius = queue.popleft()
        points, radii, end_direction = _branch_path(rng, start, direction, radius)
        branches.append(Branch(tree, parent, points, radii))
        end = points[-1]
        if np.all((end >= 0) & (end <= last_voxel)):
            for child_radius, child_direction in _split(rng, radii[-1], end_direction):
                if child_radius >= tip_radius:
                    queue.append((tree, len(branches) - 1, end, child_direction, child_radius))
    return branches


def rasterize(
    branches: list[Branch], shape: tuple[int, int, int], *, with_depth: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """(owner, depth) maps of the vessels.

    ``owner`` holds 1 + the index of the last branch covering a voxel, or 0; ``depth`` (float32,
    only ``with_depth``, else None) how far inside the vessel surface the voxel lies, in voxels
    (the largest over the segments covering it, so a junction has no inner surface), 0 outside
    the vessels. A wall is the voxels of small depth.
    """
    owner = np.zeros(shape, dtype=np.min_scalar_type(len(branches)))
    depth = np.zeros(shape, dtype=np.float32) if with_depth else None
    for index, branch in enumerate(branches, start=1):
        for a, b, radius_a, radius_b in zip(
            branch.points[:-1], branch.points[1:], branch.radii[:-1], branch.radii[1:], strict=True
        ):
            _paint_segment(owner, depth, a, b, (radius_a, radius_b), index)
    return owner, depth


@dataclass(frozen=True)
class Outline:
    """The organ outline: per slice an ellipse whose centre and semi-axes (voxels) drift linearly
    in z from their first-slice to their last-slice values, each a (first, last) pair."""

    centre_y: tuple[float, float]
    centre_x: tuple[float, float]
    axis_y: tuple[float, float]
    axis_x: tuple[float, float]


def draw_outline(rng: np.random.Generator, shape: tuple[int, int, int]) -> Outline:
    """A random organ outline: semi-axes of 0.9-1.2 half sides, so the corners of most slices lie
    outside the organ."""
    _, height, width = shape

    def drifting(low: float, high: float, side: int) -> tuple[float, float]:
        first, last = rng.uniform(low, high, 2) * side
        return float(first), float(last)

    return Outline(
        drifting(0.4, 0.6, height), drifting(0.4, 0.6, width),
        drifting(0.45, 0.6, height), drifting(0.45, 0.6, width),
    )


def organ_weight(outline: Outline, shape: tuple[int, int, int]) -> np.ndarray:
    """(Z, Y, X) float32: 1 inside the organ, 0 outside, a 3-voxel ramp between."""
    depth, height, width = shape
    z = np.linspace(0.0, 1.0, depth, dtype=np.float32)[:, None, None]

    def along_z(ends: tuple[float, float]) -> np.ndarray:
        return (ends[0] + (ends[1] - ends[0]) * z).astype(np.float32)

    centre_y, centre_x = along_z(outline.centre_y), along_z(outline.centre_x)
    axis_y, axis_x = along_z(outline.axis_y), along_z(outline.axis_x)
    y = np.arange(height, dtype=np.float32)[None, :, None]
    x = np.arange(width, dtype=np.float32)[None, None, :]
    radius = np.sqrt(((y - centre_y) / axis_y) ** 2 + ((x - centre_x) / axis_x) ** 2)
    inside_distance = (1.0 - radius) * np.minimum(axis_y, axis_x)
    return np.clip(0.5 + inside_distance / 3.0, 0.0, 1.0)


def labelled_branches(
    rng: np.random.Generator, branches: list[Branch], counts: np.ndarray, fraction: float
) -> np.ndarray:
    """Which branches stay labelled, dropping whole subtrees until ~``1 - fraction`` of the voxels.

    ``counts`` are the voxels of each branch. Subtrees are tried in random order and dropped when
    their still-labelled voxels fit in what is left to drop; ``remaining`` (the still-labelled
    voxels of each subtree) is kept up to date, so no voxel is counted twice.
    """
    parents = [branch.parent for branch in branches]
    children = [[] for _ in branches]
    remaining = counts.astype(np.int64)
    for index in range(len(branches) - 1, -1, -1):  # children come after their parents
        if parents[index] >= 0:
            children[parents[index]].append(index)
            remaining[parents[index]] += remaining[index]
    to_drop = (1.0 - fraction) * counts.sum()
    labelled = np.ones(len(branches), dtype=bool)
    for index in rng.permutation(len(branches)):
        gain = remaining[index]
        if not labelled[index] or gain > to_drop:
            continue
        to_drop -= gain
        ancestor = parents[index]
        while ancestor >= 0:
            remaining[ancestor] -= gain
            ancestor = parents[ancestor]
        stack = [index]
        while stack:
            node = stack.pop()
            labelled[node], remaining[node] = False, 0
            stack.extend(child for child in children[node] if labelled[child])
    return labelled


# --- helpers --------------------------------------------------------------------------------------


def _root_pose(
    rng: np.random.Generator, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """A root's start, on a random face of the volume, and its direction, toward the interior."""
    extent = np.array(shape, dtype=float) - 1
    start = extent * rng.uniform(0.2, 0.8, 3)
    axis = rng.integers(3)
    start[axis] = extent[axis] * rng.integers(2)
    target = extent * rng.uniform(0.3, 0.7, 3)
    return start, _unit(target - start)


def _branch_path(
    rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points, radii, end direction) of one branch: a cubic Bezier sampled at 5 points.

    The radius tapers by 5 % along it. Four chords follow the curve closely, since it turns at
    most ``MAX_BEND_DEGREES`` over its length.
    """
    length = max(4.0, radius * rng.uniform(*BRANCH_LENGTH_RADII))
    end_direction = _turn(rng, direction, rng.uniform(0.0, np.radians(MAX_BEND_DEGREES)))
    end = start + length * _unit(direction + end_direction)
    handle = length / 3
    controls = np.stack([start, start + handle * direction, end - handle * end_direction, end])
    t = np.linspace(0.0, 1.0, 5)[:, None]
    bernstein = np.hstack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3])
    return bernstein @ controls, radius * np.linspace(1.0, 0.95, len(t)), end_direction


def _split(
    rng: np.random.Generator, radius: float, direction: np.ndarray
) -> list[tuple[float, np.ndarray]]:
    """Two children (radius, direction): Murray radii and angles, either side of the parent."""
    large = radius * rng.uniform(0.75, 0.95)
    small = (radius**3 - large**3) ** (1 / 3)
    side = _turn(rng, direction, np.pi / 2)
    children = []
    for child, sibling, sign in ((large, small, 1.0), (small, large, -1.0)):
        angle = _murray_angle(radius, child, sibling) + rng.normal(0.0, np.radians(8))
        children.append((child, np.cos(angle) * direction + sign * np.sin(angle) * side))
    return children


def _murray_angle(parent: float, child: float, sibling: float) -> float:
    """The parent-child angle that minimises the work of flow (Murray, 1926)."""
    cosine = (parent**4 + child**4 - sibling**4) / (2 * parent**2 * child**2)
    return float(np.arccos(np.clip(cosine, -1.0, 1.0)))


def _turn(rng: np.random.Generator, direction: np.ndarray, angle: float) -> np.ndarray:
    """``direction`` rotated by ``angle`` toward a random perpendicular."""
    random = rng.standard_normal(3)
    perpendicular = _unit(random - (random @ direction) * direction)
    return np.cos(angle) * direction + np.sin(angle) * perpendicular


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _paint_segment(
    owner: np.ndarray,
    depth: np.ndarray | None,
    a: np.ndarray,
    b: np.ndarray,
    radii: tuple[float, float],
    value: int,
) -> None:
    """Paint segment ab, its radius tapering linearly from ``radii[0]`` to ``radii[1]``: set
    ``owner`` to ``value`` and raise ``depth`` (if any) to the depth below this tube's surface.

    Only the segment's bounding box is touched.
    """
    radius_a, radius_b = radii
    reach = max(radius_a, radius_b) + 1
    low = [max(math.floor(min(p, q) - reach), 0) for p, q in zip(a, b, strict=True)]
    high = [min(math.ceil(max(p, q) + reach), side) for p, q, side in zip(a, b, owner.shape, strict=True)]
    if any(hi <= lo for lo, hi in zip(low, high, strict=True)):
        return
    a, b = a.astype(np.float32), b.astype(np.float32)
    # Box coordinates relative to a, each along its own axis so that they broadcast.
    z = np.arange(low[0], high[0], dtype=np.float32)[:, None, None] - a[0]
    y = np.arange(low[1], high[1], dtype=np.float32)[:, None] - a[1]
    x = np.arange(low[2], high[2], dtype=np.float32) - a[2]
    dz, dy, dx = b - a
    t = np.clip((z * dz + y * dy + x * dx) / max(dz * dz + dy * dy + dx * dx, 1e-9), 0.0, 1.0)
    distance2 = (z - t * dz) ** 2 + (y - t * dy) ** 2 + (x - t * dx) ** 2
    radius = radius_a + t * (radius_b - radius_a)
    box = tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))
    owner[box][distance2 <= radius**2] = value
    if depth is not None:  # below the surface is > 0 exactly inside; depth is >= 0 everywhere
        np.maximum(depth[box], radius - np.sqrt(distance2), out=depth[box])
