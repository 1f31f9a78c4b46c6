"""Synthetic HiP-CT-like kidney volumes with vessel labels, and a synthetic Kaggle-layout dataset.

They let the whole pipeline (I/O, training, inference, scoring) run and be tested on a CPU without
the 50 GB competition data. Arrays are (Z, Y, X).

Geometry: 3-5 vessel trees enter the volume through its faces. Each branch is a smooth cubic
Bezier tube, 3-7 radii long, that tapers slightly and splits into two children with Murray's
law radii (r0³ = r1³ + r2³, the larger child keeping 75-95 % of the parent radius) and Murray's
optimal branching angles. Radii are defined in micrometres — roots up to ``ROOT_RADIUS_UM``
(15 voxels at 50 µm), tips ``TIP_RADIUS_UM`` (1 voxel at 50 µm) — and converted with
``voxel_size_um``, so at 63.08 µm the same kind of anatomy has vessels 50/63.08 times as thick
in voxels (and shorter branches, so the trees differ in detail).
So that trees fit small volumes, root radii are multiplied by ``median(shape) / 512`` (clipped to
[0.25, 1]): a (128, 512, 512) volume at 50 µm has roots of up to 15 voxels, a (64, 256, 256) one
of up to 7.5. That factor depends on the shape only, never on the voxel size.

Intensities mimic HiP-CT: tissue around 18k-37k (uint16) with low-contrast texture at three scales,
a flat darker region outside an elliptical kidney outline, vessels a few thousand levels darker or
brighter than the tissue (each tree picks one) with blurred edges, ring artefacts around a centre
shared by every slice, a few streaks, and per-voxel noise.

Sparse annotation (``labelled_fraction < 1``) drops whole subtrees from the labels, never single
voxels, while the image still shows every vessel.
"""

from __future__ import annotations

import csv
import itertools
import math
import numbers
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from .atomic import atomic_output
from .layout import KNOWN_VOXEL_SIZES_UM
from .metric import SOLUTION_COLUMNS
from .rle import rle_encode, slice_id, write_submission
from .volume import write_volume

MIN_SIDE = 8  # the smallest volume side accepted

# Geometry. Root radii shrink by median(shape) / FULL_SIZE_SIDE in smaller volumes.
ROOT_RADIUS_UM = 750.0
TIP_RADIUS_UM = 50.0
FULL_SIZE_SIDE = 512
BRANCH_LENGTH_RADII = (3.0, 7.0)  # a branch is this many (start) radii long
MAX_BEND_DEGREES = 45.0  # the largest turn along one branch

# Intensities (uint16 levels).
TISSUE_LEVEL = (26_000.0, 29_000.0)  # mean tissue intensity, drawn per volume
OUTSIDE_LEVEL = 20_000.0  # the mounting medium around the kidney
VESSEL_CONTRAST = (2_500.0, 4_500.0)  # |vessel - tissue|, drawn per tree
TEXTURE = ((48, 2_200.0), (12, 1_300.0), (3, 600.0))  # (feature size in voxels, amplitude)
WHITE_NOISE = 500.0


@dataclass(frozen=True)
class SyntheticVolumeSpec:
    """One volume of the synthetic dataset, its shape at ``scale=1``.

    ``labelled_fraction`` is None for test volumes (no labels written). ``stem_digits`` is the
    zero-padded width of the slice file names. The voxel size is the Kaggle volume's of the same
    name (``layout.KNOWN_VOXEL_SIZES_UM``), so ``find_volumes`` reports what was generated.
    """

    name: str
    split: str
    shape: tuple[int, int, int]
    labelled_fraction: float | None
    stem_digits: int = 4

    @property
    def voxel_size_um(self) -> float:
        return KNOWN_VOXEL_SIZES_UM[self.name]


SYNTHETIC_VOLUMES: tuple[SyntheticVolumeSpec, ...] = (
    SyntheticVolumeSpec("kidney_1_dense", "train", (96, 256, 256), 1.0),
    SyntheticVolumeSpec("kidney_2", "train", (64, 256, 224), 0.65),
    SyntheticVolumeSpec("kidney_3_sparse", "train", (80, 224, 256), 0.85),
    SyntheticVolumeSpec("kidney_5", "test", (64, 256, 240), None),
    SyntheticVolumeSpec("kidney_6", "test", (48, 224, 224), None, stem_digits=5),
)

# kidney_3_dense ships dense labels only, for a consecutive sub-range of kidney_3_sparse's slices
# (the real one: slices 496-995 of 1035); its images are kidney_3_sparse's same-named files.
DENSE_SUBSET_NAME = "kidney_3_dense"
DENSE_SUBSET_SOURCE = "kidney_3_sparse"
DENSE_SUBSET_RANGE = (3 / 8, 7 / 8)  # as fractions of the source's slices

__all__ = [
    "SYNTHETIC_VOLUMES",
    "SyntheticVolumeSpec",
    "dataset_volume_seed",
    "make_synthetic_dataset",
    "make_synthetic_volume",
]


def make_synthetic_volume(
    shape: tuple[int, int, int],
    seed: int,
    voxel_size_um: float = 50.0,
    *,
    labelled_fraction: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A HiP-CT-like kidney volume: (image uint16 (Z, Y, X), vessel labels bool (Z, Y, X)).

    The same arguments always give identical arrays. ``labelled_fraction`` < 1 mimics sparse
    annotation: whole subtrees holding about ``1 - labelled_fraction`` of the vessel voxels are
    left unlabelled; the image, identical for any ``labelled_fraction``, still shows them.

    Raises ValueError for a shape that is not three ints >= 8, a voxel size that is not a positive
    number, or a ``labelled_fraction`` outside (0, 1].
    """
    image, _, labels = _synthesize(shape, seed, voxel_size_um, labelled_fraction)
    return image, labels


def make_synthetic_dataset(
    root: str | os.PathLike,
    *,
    scale: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a synthetic dataset in the Kaggle layout under ``root`` and return ``root``.

    Writes ``train/<volume>/{images,labels}`` and ``test/<volume>/images`` for the volumes of
    ``SYNTHETIC_VOLUMES`` (every side multiplied by ``scale``, at least 8), labels only for
    ``train/kidney_3_dense``, ``sample_submission.csv`` (``1 0`` for every test slice) and
    ``solution.csv`` (the test labels: ``id,rle,width,height,image,slice``). Volume ``name`` is
    generated with seed ``dataset_volume_seed(seed, name)``.

    Raises FileExistsError if ``root`` exists and is not an empty folder (datasets never mix),
    ValueError for a ``scale`` that is not a positive number.
    """
    if not (_is_number(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} already exists and is not empty; pick a new or empty folder")
    test_volumes = {}
    for spec in tqdm(SYNTHETIC_VOLUMES, desc="synthesize", unit="volume", disable=not progress):
        shape = tuple(max(MIN_SIDE, round(side * scale)) for side in spec.shape)
        volume_seed = dataset_volume_seed(seed, spec.name)
        fraction = spec.labelled_fraction or 1.0
        image, dense, labels = _synthesize(shape, volume_seed, spec.voxel_size_um, fraction)
        stems = [f"{i:0{spec.stem_digits}d}" for i in range(shape[0])]
        folder = root / spec.split / spec.name
        write_volume(image, folder / "images", stems)
        if spec.split == "test":
            test_volumes[spec.name] = (stems, labels)
            continue
        write_volume(labels, folder / "labels", stems)
        if spec.name == DENSE_SUBSET_SOURCE:
            _write_dense_subset(root / "train" / DENSE_SUBSET_NAME / "labels", dense, stems)
    _write_sample_submission(root / "sample_submission.csv", test_volumes)
    _write_solution(root / "solution.csv", test_volumes)
    return root


def dataset_volume_seed(seed: int, name: str) -> int:
    """The seed ``make_synthetic_dataset(seed=seed)`` generates volume ``name`` with.

    ``make_synthetic_volume(shape, dataset_volume_seed(seed, name), KNOWN_VOXEL_SIZES_UM[name],
    labelled_fraction=...)`` reproduces that volume, e.g. to get a test volume's labels back.
    """
    names = [spec.name for spec in SYNTHETIC_VOLUMES]
    if name not in names:
        raise ValueError(f"no synthetic volume is named {name!r}; they are {names}")
    return int(np.random.SeedSequence([seed, names.index(name)]).generate_state(1)[0])


@dataclass(frozen=True)
class _Branch:
    """One vessel branch: its tree, its parent branch (-1 for a root) and its tapered centreline."""

    tree: int
    parent: int
    points: np.ndarray  # (n, 3) centreline points, voxel coordinates (z, y, x)
    radii: np.ndarray  # (n,) radius in voxels at each point


def _synthesize(
    shape: tuple[int, int, int], seed: int, voxel_size_um: float, labelled_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, dense labels, labels): the work behind ``make_synthetic_volume``.

    Separate random streams for geometry, image and annotation keep the image and the dense
    labels the same whatever ``labelled_fraction`` is.
    """
    shape = _check_args(shape, voxel_size_um, labelled_fraction)
    geometry_rng, image_rng, label_rng = (
        np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(3)
    )
    kidney = _kidney_weight(geometry_rng, shape)
    branches = _grow_forest(geometry_rng, shape, voxel_size_um)
    owner = _rasterize(branches, shape)
    owner[kidney < 0.5] = 0
    counts = np.bincount(owner.ravel(), minlength=len(branches) + 1)[1:]
    labelled = _labelled_branches(label_rng, branches, counts, labelled_fraction)
    labelled = np.concatenate(([False], labelled))  # per owner value, 0 = no vessel
    image = _render_image(image_rng, kidney, _tree_contrasts(image_rng, branches)[owner])
    return image, owner > 0, labelled[owner]


def _check_args(
    shape: tuple[int, int, int], voxel_size_um: float, labelled_fraction: float
) -> tuple[int, int, int]:
    """Validate the arguments of ``make_synthetic_volume``; return the shape as plain ints."""
    sides = tuple(shape) if isinstance(shape, (tuple, list)) else ()
    integral = all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in sides)
    if len(sides) != 3 or not integral or min(sides) < MIN_SIDE:
        raise ValueError(f"shape must be three ints (Z, Y, X), each >= {MIN_SIDE}, got {shape!r}")
    if not (_is_number(voxel_size_um) and voxel_size_um > 0):
        raise ValueError(f"voxel_size_um must be a positive number, got {voxel_size_um!r}")
    if not (_is_number(labelled_fraction) and 0 < labelled_fraction <= 1):
        raise ValueError(f"labelled_fraction must be in (0, 1], got {labelled_fraction!r}")
    return tuple(int(n) for n in sides)


def _is_number(value: object) -> bool:
    """A finite real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# --- geometry -------------------------------------------------------------------------------------


def _grow_forest(
    rng: np.random.Generator, shape: tuple[int, int, int], voxel_size_um: float
) -> list[_Branch]:
    """Grow 3-5 vessel trees breadth-first; a parent always precedes its children in the list.

    A branch whose end leaves the volume gets no children; children thinner than the tip radius
    are not grown.
    """
    size_factor = min(1.0, max(0.25, float(np.median(shape)) / FULL_SIZE_SIDE))
    root_radius = ROOT_RADIUS_UM * size_factor / voxel_size_um
    tip_radius = TIP_RADIUS_UM / voxel_size_um
    last_voxel = np.array(shape) - 1
    queue = deque()
    for tree in range(rng.integers(3, 6)):
        start, direction = _root_pose(rng, shape)
        queue.append((tree, -1, start, direction, root_radius * rng.uniform(0.7, 1.0)))
    branches = []
    while queue:
        tree, parent, start, direction, radius = queue.popleft()
        points, radii, end_direction = _branch_path(rng, start, direction, radius)
        branches.append(_Branch(tree, parent, points, radii))
        end = points[-1]
        if np.all((end >= 0) & (end <= last_voxel)):
            for child_radius, child_direction in _split(rng, radii[-1], end_direction):
                if child_radius >= tip_radius:
                    queue.append((tree, len(branches) - 1, end, child_direction, child_radius))
    return branches


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


def _rasterize(branches: list[_Branch], shape: tuple[int, int, int]) -> np.ndarray:
    """The owner map: each voxel holds 1 + the index of the last branch covering it, or 0."""
    owner = np.zeros(shape, dtype=np.min_scalar_type(len(branches)))
    for index, branch in enumerate(branches, start=1):
        for a, b, radius_a, radius_b in zip(
            branch.points[:-1], branch.points[1:], branch.radii[:-1], branch.radii[1:], strict=True
        ):
            _paint_segment(owner, a, b, radius_a, radius_b, index)
    return owner


def _paint_segment(
    owner: np.ndarray, a: np.ndarray, b: np.ndarray, radius_a: float, radius_b: float, value: int
) -> None:
    """Set ``value`` where the distance to segment ab is within its linearly tapered radius.

    Only the segment's bounding box is touched.
    """
    reach = max(radius_a, radius_b) + 1
    low = np.maximum(np.floor(np.minimum(a, b) - reach), 0).astype(int)
    high = np.minimum(np.ceil(np.maximum(a, b) + reach), owner.shape).astype(int)
    if np.any(high <= low):
        return
    a, b = a.astype(np.float32), b.astype(np.float32)
    # Box coordinates relative to a, each along its own axis so that they broadcast.
    z = np.arange(low[0], high[0], dtype=np.float32)[:, None, None] - a[0]
    y = np.arange(low[1], high[1], dtype=np.float32)[:, None] - a[1]
    x = np.arange(low[2], high[2], dtype=np.float32) - a[2]
    dz, dy, dx = b - a
    t = np.clip((z * dz + y * dy + x * dx) / max(dz * dz + dy * dy + dx * dx, 1e-9), 0.0, 1.0)
    distance2 = (z - t * dz) ** 2 + (y - t * dy) ** 2 + (x - t * dx) ** 2
    inside = distance2 <= (radius_a + t * (radius_b - radius_a)) ** 2
    owner[low[0] : high[0], low[1] : high[1], low[2] : high[2]][inside] = value


def _labelled_branches(
    rng: np.random.Generator, branches: list[_Branch], counts: np.ndarray, fraction: float
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


# --- intensities ----------------------------------------------------------------------------------


def _tree_contrasts(rng: np.random.Generator, branches: list[_Branch]) -> np.ndarray:
    """Per owner value (0 = no vessel): the intensity offset of its tree, dark or bright."""
    trees = np.array([branch.tree for branch in branches])
    n_trees = trees.max() + 1
    per_tree = rng.uniform(*VESSEL_CONTRAST, n_trees) * rng.choice([-1.0, 1.0], n_trees)
    return np.concatenate(([0.0], per_tree[trees])).astype(np.float32)


def _kidney_weight(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """1 inside the kidney, 0 outside, a 3-voxel ramp between: an ellipse per slice, drifting in z.

    Its semi-axes are 0.9-1.2 half sides, so the corners of most slices lie outside the kidney.
    """
    depth, height, width = shape
    z = np.linspace(0.0, 1.0, depth, dtype=np.float32)[:, None, None]

    def drifting(low: float, high: float, side: int) -> np.ndarray:
        ends = rng.uniform(low, high, 2) * side
        return (ends[0] + (ends[1] - ends[0]) * z).astype(np.float32)

    centre_y, centre_x = drifting(0.4, 0.6, height), drifting(0.4, 0.6, width)
    axis_y, axis_x = drifting(0.45, 0.6, height), drifting(0.45, 0.6, width)
    y = np.arange(height, dtype=np.float32)[None, :, None]
    x = np.arange(width, dtype=np.float32)[None, None, :]
    radius = np.sqrt(((y - centre_y) / axis_y) ** 2 + ((x - centre_x) / axis_x) ** 2)
    inside_distance = (1.0 - radius) * np.minimum(axis_y, axis_x)
    return np.clip(0.5 + inside_distance / 3.0, 0.0, 1.0)


def _render_image(
    rng: np.random.Generator, kidney: np.ndarray, vessel_offset: np.ndarray
) -> np.ndarray:
    """The uint16 image: textured tissue and blurred vessels inside the kidney, flat outside, then
    rings, streaks and noise everywhere."""
    shape = kidney.shape
    image = np.full(shape, rng.uniform(*TISSUE_LEVEL), dtype=np.float32)
    for cell, amplitude in TEXTURE:
        image += amplitude * _smooth_noise(rng, shape, cell)
    image += _blur(vessel_offset, sigma=0.7)  # partial-volume edges
    image -= OUTSIDE_LEVEL
    image *= kidney
    image += OUTSIDE_LEVEL
    image += _rings(rng, shape)
    _add_streaks(rng, image)
    image += rng.standard_normal(shape, dtype=np.float32) * np.float32(WHITE_NOISE)
    return np.clip(np.rint(image), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], cell: int) -> np.ndarray:
    """Unit-variance smooth noise with features about ``cell`` voxels wide.

    Drawn on a grid ``cell`` times coarser, blurred there, then upsampled: cheap at any scale.
    """
    coarse = _blur(rng.standard_normal([side // cell + 2 for side in shape], dtype=np.float32), 0.8)
    coarse /= coarse.std()
    depth, height, width = shape
    planes = np.stack(
        [cv2.resize(plane, (width, height), interpolation=cv2.INTER_CUBIC) for plane in coarse]
    )
    columns = planes.reshape(len(coarse), height * width)  # one column per (y, x): resize along z
    upsampled = cv2.resize(columns, (height * width, depth), interpolation=cv2.INTER_LINEAR)
    return upsampled.reshape(shape)


def _blur(volume: np.ndarray, sigma: float) -> np.ndarray:
    """Separable 3D Gaussian blur of a float32 volume with OpenCV: XY per slice, then along z."""
    blurred = np.stack(
        [cv2.GaussianBlur(plane, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) for plane in volume]
    )
    kernel = cv2.getGaussianKernel(2 * math.ceil(3 * sigma) + 1, sigma, cv2.CV_32F)
    columns = blurred.reshape(len(volume), -1)
    identity = np.ones((1, 1), np.float32)
    columns[:] = cv2.sepFilter2D(columns, -1, identity, kernel, borderType=cv2.BORDER_REFLECT)
    return blurred


def _rings(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """(Z, Y, X) ring artefacts: 6-14 thin rings around one centre (the rotation axis), the same in
    every slice, their strength drifting slowly through the stack."""
    depth, height, width = shape
    centre = np.array([height, width]) * rng.uniform(0.4, 0.6, 2)
    y, x = np.ogrid[:height, :width]
    distance = np.hypot(y - centre[0], x - centre[1]).astype(np.float32)
    plane = np.zeros((height, width), dtype=np.float32)
    for _ in range(rng.integers(6, 15)):
        radius, half_width = rng.uniform(2, distance.max()), rng.uniform(0.6, 1.5)
        amplitude = rng.uniform(300, 1_200) * rng.choice([-1, 1])
        plane += amplitude * np.exp(-0.5 * ((distance - radius) / half_width) ** 2)
    phase = np.linspace(0, rng.uniform(1, 4) * np.pi, depth) + rng.uniform(0, 2 * np.pi)
    drift = (1.0 + 0.3 * np.sin(phase)).astype(np.float32)
    return plane[None] * drift[:, None, None]


def _add_streaks(rng: np.random.Generator, image: np.ndarray) -> None:
    """Add 2-5 straight bright or dark streaks across the slice, each through 1-4 slices."""
    depth, height, width = image.shape
    for _ in range(rng.integers(2, 6)):
        plane = np.zeros((height, width), dtype=np.float32)
        angle = rng.uniform(0, np.pi)
        through = np.array([width, height]) * rng.uniform(0.2, 0.8, 2)
        step = 2 * max(height, width) * np.array([np.cos(angle), np.sin(angle)])
        ends = [tuple(int(v) for v in through + sign * step) for sign in (-1, 1)]
        cv2.line(plane, ends[0], ends[1], color=1.0, thickness=int(rng.integers(1, 3)))
        amplitude = rng.uniform(800, 2_000) * rng.choice([-1, 1])
        first = rng.integers(depth)
        streak = amplitude * cv2.GaussianBlur(plane, (0, 0), 1.0)
        image[first : first + rng.integers(1, 5)] += streak


# --- dataset files --------------------------------------------------------------------------------


def _write_dense_subset(folder: Path, dense: np.ndarray, stems: list[str]) -> None:
    """kidney_3_dense's labels: the dense labels of a consecutive sub-range of the source slices."""
    first, stop = (round(len(stems) * fraction) for fraction in DENSE_SUBSET_RANGE)
    write_volume(dense[first:stop], folder, stems[first:stop])


def _write_sample_submission(
    path: Path, test_volumes: dict[str, tuple[list[str], np.ndarray]]
) -> None:
    """``id,rle`` with the empty mask ``1 0`` for every test slice, in volume and slice order."""
    empty = np.zeros((1, 1), dtype=bool)
    predictions = {
        name: (stems, itertools.repeat(empty, len(stems)))
        for name, (stems, _) in test_volumes.items()
    }
    write_submission(predictions, path)


def _write_solution(path: Path, test_volumes: dict[str, tuple[list[str], np.ndarray]]) -> None:
    """The test labels as ``id,rle,width,height,image,slice``, written atomically."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(SOLUTION_COLUMNS)
        for name, (stems, labels) in test_volumes.items():
            height, width = labels.shape[1:]
            for index, (stem, mask) in enumerate(zip(stems, labels, strict=True)):
                writer.writerow((slice_id(name, stem), rle_encode(mask), width, height, name, index))
