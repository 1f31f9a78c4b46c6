"""Oblique/zoomed/low-resolution crop sampling (oblique.py) and the augmentation draws (augment.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from vessel_kit.augment import (
    augment_intensity,
    build_intensity_augmentation,
    log_uniform,
    random_rotation,
    random_zoom,
    seed_pipeline,
)
from vessel_kit.data import SLICE_AXIS, extract_crop
from vessel_kit.oblique import plane_frame, rotation_matrix, sample_crop, sample_points

SHAPE = (64, 64, 64)
RADIUS = 4.0


def tube(point, direction, radius=RADIUS, shape=SHAPE):
    """(image, target): a straight cylinder around the line ``point + t * direction``, bright on dark."""
    direction = np.asarray(direction, float) / np.linalg.norm(direction)
    offset = np.indices(shape).reshape(3, -1).T - np.asarray(point, float)
    distance = np.linalg.norm(offset - np.outer(offset @ direction, direction), axis=1).reshape(shape)
    target = distance <= radius
    return np.where(target, 50000, 5000).astype(np.uint16), target


def correlation(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.mark.parametrize("axis", ["xy", "xz", "yz"])
def test_axis_frames_reproduce_extract_crop(axis):
    z, y, x = np.indices((12, 14, 16))
    volume = z * 10000 + y * 100 + x
    for order in (0, 1):
        crop, inside = sample_crop(volume, (6, 7, 8), plane_frame(SLICE_AXIS[axis]), 8, 3, order=order)
        np.testing.assert_array_equal(crop, extract_crop(volume, axis, (6, 7, 8), 8, 3)[0])
        assert inside.all()


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.bool_, np.float16, np.float32])
def test_gathers_match_scipy_map_coordinates(dtype, tmp_path):
    rng = np.random.default_rng(0)
    values = (rng.random((9, 10, 11)) * 200).astype(dtype)
    memmap = np.lib.format.open_memmap(tmp_path / "v.npy", mode="w+", dtype=dtype, shape=values.shape)
    memmap[:] = values
    points = rng.uniform(-3, 13, size=(3, 5, 7))
    clamped = np.clip(points, 0, np.array(values.shape)[:, None, None] - 1)
    as_float = values.astype(np.float32)
    for order in (0, 1):
        expected = ndimage.map_coordinates(as_float, clamped, order=order, mode="nearest")
        for volume in (values, np.asfortranarray(values), memmap):  # gathered directly / block copied / memmap
            np.testing.assert_allclose(sample_points(volume, points, order=order), expected, rtol=1e-5, atol=1e-4)


def test_rotation_matrix_convention():
    rotation = rotation_matrix((0, 0, 1), 90)  # about +x
    np.testing.assert_allclose(rotation @ [1, 0, 0], [0, 1, 0], atol=1e-12)  # +z turns towards +y
    arbitrary = rotation_matrix((0.3, -0.5, 0.8), 35)
    np.testing.assert_allclose(arbitrary @ arbitrary.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(arbitrary) == pytest.approx(1.0)
    assert np.degrees(np.arccos((np.trace(arbitrary) - 1) / 2)) == pytest.approx(35)
    with pytest.raises(ValueError, match="non-zero 3-vector"):
        rotation_matrix((0, 0, 0), 10)


def test_a_plane_tilted_along_a_tube_contains_all_of_it():
    angle, size = 25.0, 48
    direction = (np.cos(np.radians(angle)), np.sin(np.radians(angle)), 0.0)  # z tilted towards y
    image, target = tube((32, 32, 32), direction)
    flat = plane_frame(SLICE_AXIS["xz"])  # rows along z, columns along x, normal y
    tilted = rotation_matrix((0, 0, 1), angle) @ flat
    label, inside = sample_crop(target, (32, 32, 32), tilted, size, 1)
    label = label[0]
    assert inside.all()
    # The tube's centreline is the crop's centre column on every row; beyond RADIUS + 1.5 it is gone.
    assert (label[:, size // 2] > 0.99).all()
    columns = np.abs(np.arange(size) - size // 2)
    assert (label[:, columns > RADIUS + 1.5] < 0.01).all()
    assert correlation(sample_crop(image, (32, 32, 32), tilted, size, 1)[0][0], label) > 0.95
    # Untilted, the plane leaves the tube after ~RADIUS / sin(angle) rows: the tilt is what counts.
    untilted = sample_crop(target, (32, 32, 32), flat, size, 1)[0][0]
    assert untilted[0, size // 2] < 0.01 and untilted[-1, size // 2] < 0.01


def test_an_oblique_tube_crosses_each_channel_where_the_geometry_says():
    size = 48
    centre, point, direction = np.array([32.0, 32, 32]), np.array([30.0, 35, 29]), np.array([0.9, 0.3, -0.2])
    direction /= np.linalg.norm(direction)
    image, target = tube(point, direction)
    frame = rotation_matrix((0.3, -0.5, 0.8), 35) @ plane_frame(0)
    crop, inside = sample_crop(image, centre, frame, size, 3)
    label = sample_crop(target, centre, frame, size, 1)[0][0]
    assert inside.all()
    rows, columns = np.indices((size, size))
    cosine = abs(frame[:, 0] @ direction)  # the cross-section is an ellipse stretched by 1 / cosine
    for channel in range(3):
        # Solve centre + frame @ (channel - 1, u, v) = point + t * direction for the crossing (u, v).
        u, v, _ = np.linalg.solve(np.column_stack([frame[:, 1], frame[:, 2], -direction]),
                                  point - centre - (channel - 1) * frame[:, 0])
        distance = np.hypot(rows - (size // 2 + u), columns - (size // 2 + v))
        bright = crop[channel] > 27500  # halfway between dark and bright
        assert bright[distance < 0.5 * RADIUS].all()
        assert not bright[distance > RADIUS / cosine + 1.5].any()
        if channel == 1:
            assert (label[distance < 0.5 * RADIUS] > 0.99).all()
            assert (label[distance > RADIUS / cosine + 1.5] < 0.01).all()
    assert correlation(crop[1], label) > 0.95


@pytest.mark.parametrize("zoom", [0.7, 0.79, 1.4])
def test_zoom_scales_the_tube_cross_section(zoom):
    radius = 6.0
    image, target = tube((32, 32, 32), (1, 0, 0), radius=radius)
    area = {}
    for f in (1.0, zoom):
        label, _ = sample_crop(target, (32, 32, 32), plane_frame(0) / f, 64, 1)
        crop, _ = sample_crop(image, (32, 32, 32), plane_frame(0) / f, 64, 1)
        assert correlation(crop, label) > 0.99
        area[f] = label.sum()
    # Content appears f times its size: the cross-section's area scales by f^2 (within 6 %).
    assert area[zoom] / area[1.0] == pytest.approx(zoom**2, rel=0.06)


def test_zoomed_channels_are_one_over_f_voxels_apart():
    z = np.indices(SHAPE)[0].astype(np.float32)
    crop, _ = sample_crop(z, (32, 32, 32), rotation_matrix((1, 2, 3), 20) @ plane_frame(0) / 0.8, 32, 3)
    normal_z = (rotation_matrix((1, 2, 3), 20) @ plane_frame(0))[0, 0]
    np.testing.assert_allclose(crop[2] - crop[1], normal_z / 0.8, atol=1e-4)


def test_coarse_sampling_blurs_edges_but_keeps_linear_content():
    z, y, x = np.indices(SHAPE).astype(np.float32)
    frame = rotation_matrix((1, 1, 0), 20) @ plane_frame(0)
    ramp = 3 * z + 2 * y + x
    fine, inside = sample_crop(ramp, (32, 32, 32), frame, 32, 3)
    coarse, coarse_inside = sample_crop(ramp, (32, 32, 32), frame, 32, 3, coarsen=1.6)
    np.testing.assert_allclose(coarse, fine, atol=1e-3)  # linear interpolation reproduces a ramp
    np.testing.assert_array_equal(coarse_inside, inside)
    edge = (x >= 32).astype(np.float32)  # a step along x
    sharp = sample_crop(edge, (32, 32, 32), plane_frame(0), 32, 1)[0][0]
    blurred = sample_crop(edge, (32, 32, 32), plane_frame(0), 32, 1, coarsen=1.6)[0][0]
    assert ((blurred > 0.02) & (blurred < 0.98)).sum() > 2 * ((sharp > 0.02) & (sharp < 0.98)).sum()
    assert blurred[:, 12].max() < 0.02 and blurred[:, 20].min() > 0.98  # same edge (column 16), same place


def test_inside_marks_points_outside_the_volume():
    volume = np.ones((20, 30, 40), np.uint8)
    frame = rotation_matrix((0.2, 1, 0.5), 40) @ plane_frame(1)
    centre = np.array([3.0, 5, 30])
    crop, inside = sample_crop(volume, centre, frame, 32, 3)
    offsets = np.indices((32, 32)) - 16
    points = centre[:, None, None] + frame[:, 1, None, None] * offsets[0] + frame[:, 2, None, None] * offsets[1]
    expected = np.all((points >= 0) & (points <= np.array([19, 29, 39])[:, None, None]), axis=0)
    np.testing.assert_array_equal(inside, expected)
    assert 0 < inside.mean() < 1
    assert (crop == 1).all()  # outside, the edges are replicated (callers zero or mask them)


def test_bad_sampler_arguments():
    volume = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="frame must be a 3x3 matrix"):
        sample_crop(volume, (2, 2, 2), np.eye(2), 4, 1)
    with pytest.raises(ValueError, match="coarsen must be >= 1"):
        sample_crop(volume, (2, 2, 2), np.eye(3), 4, 1, coarsen=0.5)
    with pytest.raises(ValueError, match="order must be 0"):
        sample_points(volume, np.zeros((3, 2)), order=3)
    with pytest.raises(ValueError, match="slice_axis must be 0, 1 or 2"):
        plane_frame(3)


def test_random_draws_stay_in_their_ranges():
    rng = np.random.default_rng(0)
    angles = [np.degrees(np.arccos(np.clip((np.trace(random_rotation(rng, 30)) - 1) / 2, -1, 1))) for _ in range(200)]
    assert max(angles) <= 30 + 1e-6 and min(angles) < 5 and max(angles) > 25
    factors = [log_uniform(rng, 0.7, 1.15) for _ in range(200)]
    assert 0.7 <= min(factors) < 0.75 and 1.1 < max(factors) <= 1.15
    zooms = np.array([random_zoom(rng, 0.8, 0.8) for _ in range(50)])
    assert zooms.shape == (50, 3) and np.all(np.abs(zooms / 0.8 - 1) <= 0.052) and zooms.std() > 0


def test_inversion_maps_the_normalised_range_onto_itself():
    image = np.random.default_rng(1).random((3, 32, 32)).astype(np.float32)
    invert = build_intensity_augmentation(0.0, 1.0)
    np.testing.assert_array_equal(augment_intensity(invert, image, (0.0, 1.0)), 1.0 - image)
    zscored = (image - image.mean()) / image.std()  # no fixed range: the crop's own min and max
    inverted = augment_intensity(invert, zscored, None)
    np.testing.assert_allclose(inverted, zscored.min() + zscored.max() - zscored, atol=1e-5)
    assert build_intensity_augmentation(0.0, 0.0) is None


def test_intensity_chain_is_seeded_and_stays_in_range():
    image = np.random.default_rng(2).random((5, 32, 32)).astype(np.float32)
    chain = build_intensity_augmentation(1.0, 0.0)
    outputs = []
    for seed in (3, 3, 4):
        seed_pipeline(chain, seed)
        outputs.append(augment_intensity(chain, image, (0.0, 1.0)))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2])
    for out in outputs:
        assert out.shape == image.shape and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0 and not np.array_equal(out, image)


def test_seeded_pipelines_draw_their_transforms_independently():
    import albumentations as A

    pipeline = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    image = np.arange(16, dtype=np.float32).reshape(4, 4, 1)

    def flips(seed):
        seed_pipeline(pipeline, seed)
        corner = pipeline(image=image)["image"][0, 0, 0]
        return corner in (3, 15), corner in (12, 15)  # (flipped left-right, flipped up-down)

    assert len({flips(seed) for seed in range(64)}) == 4  # set_random_seed gives only "both" or "neither"
    assert all(flips(seed) == flips(seed) for seed in range(8))
