"""Crops on planes of any orientation and scale: a volume sampled at ``centre + frame @ offsets``.

A crop is ``in_chans`` parallel planes of ``size x size`` points. Point (c, i, j) lies at
``centre + frame @ (c - in_chans // 2, i - size // 2, j - size // 2)`` in voxel coordinates
(z, y, x): the columns of ``frame`` are the steps between channels (along the plane's normal),
between rows and between columns. ``plane_frame`` gives the axis-aligned frames that
``data.extract_crop`` cuts; a rotation ``R`` and per-axis spacings ``s`` compose as
``R @ plane_frame(axis) @ diag(s)``, so a tilted, zoomed crop costs one trilinear interpolation
and its image, labels and masks stay aligned through the same map.

Only the voxels around the points are read, so volumes can be memmaps larger than memory.
``coarsen > 1`` samples on a grid that many times sparser in all three directions and interpolates
it linearly back onto the crop grid: what a model sees of a coarser scan after it was resampled to
the training resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["plane_frame", "rotation_matrix", "sample_box", "sample_crop", "sample_points"]

_EDGE_TOLERANCE = 1e-6  # points this close outside the volume count as inside (float round-off)


def plane_frame(slice_axis: int) -> np.ndarray:
    """Unit frame (columns: normal, row, column) of the axis-aligned crop slicing along array
    axis ``slice_axis``: rows and columns follow the other two axes in order, as in ``extract_crop``."""
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
    order = [slice_axis] + [a for a in range(3) if a != slice_axis]
    return np.eye(3)[:, order]


def rotation_matrix(axis: Sequence[float], angle_deg: float) -> np.ndarray:
    """Rotation by ``angle_deg`` about ``axis`` (a (z, y, x) vector), by Rodrigues' formula.

    The sense is right-handed in (z, y, x) order: about +x, +z turns towards +y.
    """
    k = np.asarray(axis, dtype=float)
    norm = np.linalg.norm(k)
    if k.shape != (3,) or not norm > 0:
        raise ValueError(f"rotation axis must be a non-zero 3-vector, got {axis!r}")
    k = k / norm
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    angle = np.radians(angle_deg)
    return np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross


def sample_crop(
    volume: np.ndarray,
    centre: Sequence[float],
    frame: np.ndarray,
    size: int,
    in_chans: int,
    *,
    coarsen: float = 1.0,
    order: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """A (in_chans, size, size) float32 crop of ``volume`` on the plane ``frame`` through ``centre``.

    Values are interpolated (``order`` 1: trilinear, 0: nearest) with the volume's edges
    replicated beyond it. With ``coarsen > 1`` the volume is sampled on a grid ``coarsen`` times
    sparser and resampled linearly onto the crop grid. Returns (crop, inside), ``inside`` a
    (size, size) bool mask of the centre plane's points that lie inside the volume.
    """
    frame = np.asarray(frame, dtype=float)
    if frame.shape != (3, 3):
        raise ValueError(f"frame must be a 3x3 matrix, got shape {frame.shape}")
    if size < 1 or in_chans < 1:
        raise ValueError(f"size and in_chans must be >= 1, got {size}, {in_chans}")
    if not coarsen >= 1.0:
        raise ValueError(f"coarsen must be >= 1 (a sparser grid), got {coarsen}")
    grids = [_axis_grid(n, coarsen) for n in (in_chans, size, size)]
    points = _points(centre, frame, [offsets for offsets, _ in grids])
    crop = sample_points(volume, points, order=order)
    if coarsen == 1.0:
        centre_plane = points[:, in_chans // 2]
    else:
        crop = _upsample(crop, [positions for _, positions in grids])
        fine = np.arange(size) - size // 2
        centre_plane = _points(centre, frame, [np.zeros(1), fine, fine])[:, 0]
    return crop, _inside(centre_plane, volume.shape)


def sample_box(
    volume: np.ndarray, centre: Sequence[float], frame: np.ndarray, shape: Sequence[int], *, order: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """A ``shape`` (D, H, W) float32 block of ``volume`` whose point (d, h, w) lies at
    ``centre + frame @ (d - D // 2, h - H // 2, w - W // 2)``: a rotated and/or scaled 3D patch.

    Interpolated as ``sample_points`` does; returns (block, inside), ``inside`` a ``shape`` bool
    mask of the points that lie inside the volume.
    """
    frame = np.asarray(frame, dtype=float)
    if frame.shape != (3, 3) or len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"need a 3x3 frame and a (D, H, W) shape, got {frame.shape} and {tuple(shape)}")
    points = _points(centre, frame, [np.arange(n) - n // 2 for n in shape])
    return sample_points(volume, points, order=order), _inside(points, volume.shape)


def sample_points(volume: np.ndarray, points: np.ndarray, *, order: int = 1) -> np.ndarray:
    """``volume`` interpolated at ``points`` ((3, ...) voxel coordinates) as float32.

    ``order`` 1 is trilinear (as ``scipy.ndimage.map_coordinates(order=1)``), 0 nearest. Points
    outside are clamped onto the volume (edge replication). Only the voxels around the points are
    read: a C-contiguous volume (array or memmap) is gathered from directly, any other is first
    copied as the points' bounding block.
    """
    if points.shape[0] != 3:
        raise ValueError(f"points must be (3, ...) voxel coordinates, got shape {points.shape}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order!r}")
    flat = np.clip(points.reshape(3, -1), 0.0, np.array(volume.shape, dtype=float)[:, None] - 1)
    data, origin, shape = _voxels_around(volume, flat)
    local = flat - origin[:, None]
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    if order == 0:
        values = data.take(strides @ np.rint(local).astype(np.intp)).astype(np.float32)
    else:
        values = _trilinear(data, local, shape, strides)
    return values.reshape(points.shape[1:])


def _axis_grid(n: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of a grid ``step`` times sparser than an n-point crop axis and covering it, and the
    crop's points as fractional indices on that grid. ``step`` 1 gives the crop axis itself."""
    fine = np.arange(n) - n // 2
    first = np.floor(fine[0] / step)
    last = np.ceil(fine[-1] / step)
    return np.arange(first, last + 1) * step, fine / step - first


def _points(centre: Sequence[float], frame: np.ndarray, offsets: Sequence[np.ndarray]) -> np.ndarray:
    """(3, C, R, K) voxel coordinates ``centre + frame @ (c, r, k)`` over the offset grids."""
    channel, row, column = offsets
    return (
        np.asarray(centre, dtype=float)[:, None, None, None]
        + frame[:, 0, None, None, None] * channel[:, None, None]
        + frame[:, 1, None, None, None] * row[:, None]
        + frame[:, 2, None, None, None] * column
    )


def _voxels_around(volume: np.ndarray, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(1D voxels, origin, shape) covering the (3, N) in-volume points: the volume itself when
    C-contiguous (a gather then touches only the pages it needs), else a copy of their bounding block."""
    if volume.flags.c_contiguous:
        return volume.reshape(-1), np.zeros(3, dtype=int), np.array(volume.shape)
    start = np.floor(flat.min(axis=1)).astype(int)
    stop = np.minimum(np.floor(flat.max(axis=1)).astype(int) + 2, volume.shape)
    block = np.ascontiguousarray(volume[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]])
    return block.reshape(-1), start, stop - start


def _trilinear(data: np.ndarray, local: np.ndarray, shape: np.ndarray, strides: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of the C-ordered voxels ``data`` of ``shape`` at (3, N) in-range points."""
    low = np.minimum(local.astype(np.intp), np.maximum(shape - 2, 0)[:, None])
    fz, fy, fx = (local - low).astype(np.float32)
    base = strides @ low
    step_z, step_y, step_x = np.where(shape > 1, strides, 0)  # a 1-voxel axis has no second neighbour

    def corner(offset: int) -> np.ndarray:
        return data.take(base + offset).astype(np.float32)

    def lerp(a: np.ndarray, b: np.ndarray, fraction: np.ndarray) -> np.ndarray:
        return a + fraction * (b - a)

    def row(offset: int) -> np.ndarray:  # along x, then the two rows blended along y
        return lerp(corner(offset), corner(offset + step_x), fx)

    near = lerp(row(0), row(step_y), fy)
    far = lerp(row(step_z), row(step_z + step_y), fy)
    return lerp(near, far, fz)


def _inside(points: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Which of the (3, ...) points lie within the volume's voxel centres."""
    upper = np.array(shape, dtype=float).reshape(3, *([1] * (points.ndim - 1))) - 1
    return np.all((points >= -_EDGE_TOLERANCE) & (points <= upper + _EDGE_TOLERANCE), axis=0)


def _upsample(values: np.ndarray, positions: Sequence[np.ndarray]) -> np.ndarray:
    """``values`` interpolated linearly, axis by axis, at fractional indices ``positions`` (clamped)."""
    for axis, where in enumerate(positions):
        n = values.shape[axis]
        where = np.clip(where, 0, n - 1)
        left = np.minimum(np.floor(where).astype(int), max(n - 2, 0))
        fraction = (where - left).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(values.ndim)])
        low = np.take(values, left, axis=axis)
        high = np.take(values, np.minimum(left + 1, n - 1), axis=axis)
        values = low + fraction * (high - low)
    return values
