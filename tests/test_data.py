"""2.5D crops: geometry per axis, edge replication, padding, sampling, augmentation alignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vessel_kit.data import (
    SLICE_AXIS,
    CropConfig,
    CropDataset,
    TrainVolume,
    build_augmentation,
    cache_volume,
    extract_crop,
)
from vessel_kit.augment import cutmix
from vessel_kit.layout import find_volumes
from vessel_kit.normalize import Normalization
from vessel_kit.synth import make_synthetic_dataset, make_synthetic_volume


def coordinate_volume(shape):
    """volume[z, y, x] = z * 10000 + y * 100 + x: every crop says where it came from."""
    z, y, x = np.indices(shape)
    return (z * 10000 + y * 100 + x).astype(np.int64)


@pytest.mark.parametrize(
    "axis, expected",
    [
        ("xy", lambda v, c, k: v[c[0] + k, c[1] - 4 : c[1] + 4, c[2] - 4 : c[2] + 4]),
        ("xz", lambda v, c, k: v[c[0] - 4 : c[0] + 4, c[1] + k, c[2] - 4 : c[2] + 4]),
        ("yz", lambda v, c, k: v[c[0] - 4 : c[0] + 4, c[1] - 4 : c[1] + 4, c[2] + k]),
    ],
)
def test_crop_geometry_and_channel_order(axis, expected):
    volume = coordinate_volume((12, 14, 16))
    centre = (6, 7, 8)
    crop, inside = extract_crop(volume, axis, centre, 8, 3)
    assert crop.shape == (3, 8, 8) and inside.all()
    for channel, offset in enumerate((-1, 0, 1)):
        np.testing.assert_array_equal(crop[channel], expected(volume, centre, offset))


def test_edges_replicate_and_windows_stay_inside():
    volume = coordinate_volume((5, 20, 20))
    crop, inside = extract_crop(volume, "xy", (0, 19, 0), 8, 5)
    # Slices -2, -1 replicate slice 0; the window shifts back inside the volume in y and x.
    np.testing.assert_array_equal(crop[:, 0, 0] // 10000, [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(crop[2], volume[0, 12:20, 0:8])
    assert inside.all()


def test_volume_smaller_than_the_crop_is_padded():
    volume = coordinate_volume((3, 5, 40)) + 1
    crop, inside = extract_crop(volume, "xy", (1, 2, 20), 32, 1)
    assert inside[:5].all() and not inside[5:].any()
    assert (crop[0, 5:] == 0).all()
    np.testing.assert_array_equal(crop[0, :5, :32], volume[1, :, 4:36])
    with pytest.raises(ValueError, match="axis must be one of"):
        extract_crop(volume, "zz", (0, 0, 0), 32, 1)


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_volume((32, 96, 96), seed=1)


def _dataset(volumes, **overrides):
    options = {"crop_size": 64, "in_chans": 3, "crops_per_epoch": 40, "augment": "none"}
    options.update(overrides)
    return CropDataset(volumes, CropConfig(**options), Normalization("unit"), seed=7)


def test_items_are_deterministic_per_epoch(synthetic):
    images, labels = synthetic
    dataset = _dataset([TrainVolume("a", images, labels)], augment="hard")
    item = dataset[5]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["target"].shape == item["valid"].shape == (1, 64, 64)
    assert torch.equal(item["image"], dataset[5]["image"])
    dataset.set_epoch(1)
    assert not torch.equal(item["image"], dataset[5]["image"])


def test_foreground_sampling_finds_vessels():
    images, labels = make_synthetic_volume((32, 256, 256), seed=3)
    volume = TrainVolume("a", images, labels)
    focused = _dataset([volume], foreground_fraction=1.0, crop_size=32)
    uniform = _dataset([volume], foreground_fraction=0.0, crop_size=32)
    mean_focused = np.mean([focused[i]["target"].mean().item() for i in range(40)])
    mean_uniform = np.mean([uniform[i]["target"].mean().item() for i in range(40)])
    assert mean_focused > 1.5 * mean_uniform
    assert all(focused[i]["target"].sum() > 0 for i in range(40))


def test_axes_weights_pick_the_views():
    volume = (np.indices((16, 64, 64))[0] * 1000).astype(np.uint16)  # intensity encodes z only
    labels = np.zeros(volume.shape, bool)
    xy_only = _dataset([TrainVolume("a", volume, labels)], axes={"xy": 1.0}, in_chans=3)
    for i in range(10):
        image = xy_only[i]["image"]
        # Along xy each channel is one z slice: constant in-plane, and z steps by one between channels.
        assert torch.all(image == image[:, :1, :1])
    xz_only = _dataset([TrainVolume("a", volume, labels)], axes={"xz": 1.0}, in_chans=3)
    image = xz_only[0]["image"]
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # neighbours along y
    assert len(torch.unique(image[0][:16, 0])) > 1  # z varies down the rows


def test_augmentation_keeps_image_and_target_aligned():
    labels = make_synthetic_volume((24, 96, 96), seed=2)[1]
    images = np.where(labels, 60000, 1000).astype(np.uint16)
    dataset = _dataset([TrainVolume("a", images, labels)], augment="hard", in_chans=1, foreground_fraction=1.0)
    intersection = union = 0
    for i in range(40):
        item = dataset[i]
        bright = item["image"][0] > 0.5
        vessel = item["target"][0] > 0.5
        intersection += (bright & vessel).sum().item()
        union += (bright | vessel).sum().item()
    assert intersection / union > 0.8


def test_valid_masks_padding_and_ignore():
    images = np.full((4, 40, 40), 30000, np.uint16)
    labels = np.zeros(images.shape, bool)
    ignore = np.ones(images.shape, bool)
    ignore[:, :, :20] = False  # left half unlabelled
    item = _dataset([TrainVolume("a", images, labels, valid=ignore)], crop_size=64, in_chans=1)[0]
    valid = item["valid"][0]
    assert valid[:40, 20:40].eq(1).all() and valid[:40, :20].eq(0).all() and valid[40:].eq(0).all()
    assert item["image"][0, 40:].eq(0).all()


def test_soft_labels():
    images = np.full((3, 32, 32), 30000, np.uint16)
    soft_uint8 = np.full(images.shape, 128, np.uint8)
    soft_float = np.full(images.shape, 0.3, np.float16)
    assert _dataset([TrainVolume("a", images, soft_uint8)], crop_size=32, in_chans=1)[0]["target"].mean().item() == pytest.approx(128 / 255)
    assert _dataset([TrainVolume("a", images, soft_float)], crop_size=32, in_chans=1)[0]["target"].mean().item() == pytest.approx(0.3, abs=1e-3)


def test_bad_configs_and_volumes():
    images = np.zeros((3, 8, 8), np.uint16)
    with pytest.raises(ValueError, match="crop_size must be a positive multiple of 32"):
        CropConfig(crop_size=100)
    with pytest.raises(ValueError, match="in_chans must be odd"):
        CropConfig(in_chans=4)
    with pytest.raises(ValueError, match="axes must map some of"):
        CropConfig(axes={"xy": 1.0, "zz": 1.0})
    with pytest.raises(ValueError, match="augment must be one of"):
        CropConfig(augment="medium")
    with pytest.raises(ValueError, match="target shape \\(3, 8, 9\\) differs from images \\(3, 8, 8\\)"):
        TrainVolume("a", images, np.zeros((3, 8, 9), bool))
    with pytest.raises(ValueError, match="images must be \\(Z, Y, X\\)"):
        TrainVolume("a", images[0], images[0] > 0)
    with pytest.raises(ValueError, match="at least one volume"):
        CropDataset([], CropConfig(), Normalization())
    with pytest.raises(ValueError, match="augmentation must be one of"):
        build_augmentation("wild")


ROBUST = {"rotate_p": 1.0, "zoom_p": 1.0, "lowres_p": 1.0, "intensity_p": 1.0, "invert_p": 0.5}


@pytest.mark.parametrize(
    "option, value",
    [
        ("rotate_p", -0.1), ("zoom_p", 1.5), ("lowres_p", 2.0), ("intensity_p", -1.0), ("invert_p", 1.01),
        ("rotate_max_deg", -1.0), ("rotate_max_deg", 91.0),
        ("zoom_range", (0.0, 1.0)), ("zoom_range", (1.2, 0.8)), ("zoom_range", (0.5,)),
    ],
)
def test_robustness_options_are_validated(option, value):
    with pytest.raises(ValueError, match=option):
        CropConfig(**{option: value})


def test_lowres_needs_a_zoom_range_below_one():
    with pytest.raises(ValueError, match="lowres_p needs zoom_range to reach below 1"):
        CropConfig(lowres_p=0.5, zoom_range=(1.0, 1.2))
    assert CropConfig(zoom_range=[0.6, 0.9]).zoom_range == (0.6, 0.9)  # YAML lists become tuples


def test_robustness_off_gives_todays_axis_crops(synthetic):
    images, labels = synthetic
    dataset = _dataset([TrainVolume("a", images, labels)], rotate_p=0.0, zoom_p=0.0, lowres_p=0.0)
    for index in range(8):
        # Replay the draws the dataset made before the options existed: volume, axis, centre.
        rng = np.random.default_rng(np.random.SeedSequence([7, 0, index]).generate_state(1)[0])
        rng.choice(1, p=[1.0])
        axis = dataset._axes[rng.choice(len(dataset._axes), p=dataset._axis_p)]
        centre = dataset._centre(rng, 0, SLICE_AXIS[axis])
        crop, inside = extract_crop(images, axis, centre, 64, 3)
        expected = np.where(inside, dataset.normalization.apply(crop, dataset.windows[0]), np.float32(0))
        item = dataset[index]
        np.testing.assert_array_equal(item["image"].numpy(), expected)
        np.testing.assert_array_equal(item["target"][0].numpy(), extract_crop(labels, axis, centre, 64, 1)[0][0])


@pytest.mark.parametrize(
    "options",
    [{"rotate_p": 1.0, "rotate_max_deg": 45.0}, {"zoom_p": 1.0}, {"lowres_p": 1.0}, ROBUST],
    ids=["rotate", "zoom", "lowres", "all"],
)
def test_resampled_crops_keep_image_and_target_aligned(options):
    labels = make_synthetic_volume((48, 96, 96), seed=2)[1]
    images = np.where(labels, 60000, 1000).astype(np.uint16)
    options = {**options, "intensity_p": 0.0, "invert_p": 0.0}  # geometry only: intensity changes are tested apart
    dataset = _dataset([TrainVolume("a", images, labels)], in_chans=3, foreground_fraction=1.0, **options)
    items = [dataset[i] for i in range(12)]
    valid = np.concatenate([item["valid"].numpy().ravel() for item in items]) > 0
    image = np.concatenate([item["image"][1].numpy().ravel() for item in items])[valid]
    target = np.concatenate([item["target"].numpy().ravel() for item in items])[valid]
    assert 0.02 < target.mean() < 0.98
    assert np.corrcoef(image, target)[0, 1] > 0.9


def test_zoomed_channels_are_one_over_f_slices_apart():
    images = (np.indices((64, 48, 48))[0] * 1000).astype(np.uint16)  # intensity encodes z
    labels = np.zeros(images.shape, bool)
    dataset = _dataset([TrainVolume("a", images, labels)], axes={"xy": 1.0}, zoom_p=1.0, zoom_range=(0.5, 0.5))
    steps = [np.diff(dataset[i]["image"][:, 32, 32].numpy()) * 65535 / 1000 for i in range(12)]
    # Channels 1/f = 2 slices apart, up to the ±5 % per-axis jitter (and edge clamping for a few).
    assert np.median(steps) == pytest.approx(2.0, rel=0.06)


def test_resampled_crops_mark_outside_and_ignored_pixels_invalid():
    images = (np.indices((24, 48, 48))[2] * 1000 + 1000).astype(np.uint16)  # intensity encodes x + 1
    labels = np.zeros(images.shape, bool)
    trusted = np.indices(images.shape)[2] >= 20
    dataset = _dataset([TrainVolume("a", images, labels, valid=trusted)], in_chans=1, rotate_p=1.0, rotate_max_deg=60.0)
    for i in range(10):
        item = dataset[i]
        x = item["image"][0].numpy() * 65535 / 1000 - 1  # -1 outside the volume (image 0)
        valid = item["valid"][0].numpy()
        assert (valid[x < -0.5] == 0).all()  # outside the volume
        assert (valid[(x > -0.5) & (x < 19.4)] == 0).all()  # ignored by the volume's valid mask
        assert (valid[x > 20.6] == 1).all()
    assert any((dataset[i]["image"] == 0).any() for i in range(10))  # the crops did leave the volume


def test_intensity_augmentation_leaves_target_and_valid_alone(synthetic):
    images, labels = synthetic
    volume = TrainVolume("a", images, labels)
    plain = _dataset([volume], rotate_p=0.5, zoom_p=0.5)
    augmented = _dataset([volume], rotate_p=0.5, zoom_p=0.5, intensity_p=1.0, invert_p=0.5, in_chans=3)
    changed = 0
    for i in range(8):
        a, b = plain[i], augmented[i]
        assert torch.equal(a["target"], b["target"]) and torch.equal(a["valid"], b["valid"])
        changed += not torch.equal(a["image"], b["image"])
    assert changed >= 6  # the chain's steps each have their own chance, so a crop may pass unchanged


def test_robust_items_are_deterministic_per_epoch(synthetic):
    images, labels = synthetic
    dataset = _dataset([TrainVolume("a", images, labels)], augment="hard", in_chans=5, **ROBUST)
    first = dataset[3]
    assert first["image"].shape == (5, 64, 64) and torch.isfinite(first["image"]).all()
    assert all(torch.equal(first[key], dataset[3][key]) for key in first)
    dataset.set_epoch(1)
    assert not torch.equal(first["image"], dataset[3]["image"])


def test_cache_volume_maps_once(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", scale=0.25, progress=False)
    info = next(v for v in find_volumes(root, "train") if v.name == "kidney_3_dense")
    images, labels = cache_volume(info, tmp_path / "cache", progress=False)
    assert isinstance(images, np.memmap) and images.dtype == np.uint16
    np.testing.assert_array_equal(images, info.read_images(progress=False))
    np.testing.assert_array_equal(labels, info.read_labels(progress=False))
    stamp = (tmp_path / "cache" / "kidney_3_dense_images.npy").stat().st_mtime_ns
    cache_volume(info, tmp_path / "cache", progress=False)
    assert (tmp_path / "cache" / "kidney_3_dense_images.npy").stat().st_mtime_ns == stamp


def test_cutmix_pastes_image_target_and_valid_alike():
    labels = make_synthetic_volume((24, 96, 96), seed=2)[1]
    images = np.where(labels, 60000, 1000).astype(np.uint16)
    ignore = np.ones(labels.shape, bool)
    ignore[:, :, :30] = False
    volumes = [TrainVolume("a", images, labels, valid=ignore)]
    plain = _dataset(volumes, in_chans=1, foreground_fraction=0.5)
    mixed = _dataset(volumes, in_chans=1, foreground_fraction=0.5, cutmix_p=1.0)
    changed = 0
    for i in range(20):
        item, base = mixed[i], plain[i]
        # The image still shows the vessels of the target, and valid 0 where the image is ignored.
        counted = item["valid"][0] > 0
        assert torch.equal((item["image"][0] > 0.5) & counted, (item["target"][0] > 0.5) & counted)
        changed += not torch.equal(item["image"], base["image"])
    assert changed > 10
    with pytest.raises(ValueError, match="cutmix_p is a probability"):
        CropConfig(crop_size=64, cutmix_p=1.5)


def test_cutmix_takes_one_box_from_the_second_item_in_every_array():
    rng = np.random.default_rng(0)
    first = (np.zeros((3, 32, 40), np.float32), np.zeros((32, 40), np.float32), np.zeros((32, 40), np.float32))
    second = tuple(np.ones_like(a) for a in first)
    for _ in range(10):
        image, target, valid = cutmix(first, second, rng)
        box = target == 1
        assert all(np.array_equal(channel == 1, box) for channel in image) and np.array_equal(valid == 1, box)
        rows, columns = np.nonzero(box.any(axis=1))[0], np.nonzero(box.any(axis=0))[0]
        assert box.sum() == len(rows) * len(columns)  # one rectangle
    assert not first[1].any()  # the inputs are not changed
