"""Tests of the synthetic vessel volumes, their style families, and the synthetic Kaggle-layout
dataset."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

import vessel_kit.synth.dataset as synth_dataset
from vessel_kit.atomic import TEMP_NAME
from vessel_kit.layout import KNOWN_VOXEL_SIZES_UM, find_volumes
from vessel_kit.rle import rle_decode, slice_id
from vessel_kit.synth import (
    LOOKS_PER_FAMILY,
    STYLES,
    SYNTHETIC_VOLUMES,
    Style,
    SyntheticVolumeSpec,
    dataset_volume_seed,
    make_synthetic_dataset,
    make_synthetic_volume,
)
from vessel_kit.volume import read_labels, read_volume, slice_ids

SHAPE = (48, 160, 160)
SMALL = (24, 96, 96)  # per-family checks
SCALE = 0.35
FAMILIES = sorted(STYLES)


@pytest.fixture(scope="module")
def volume() -> tuple[np.ndarray, np.ndarray]:
    return make_synthetic_volume(SHAPE, seed=0)


@pytest.fixture(scope="module")
def families() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One small volume per family, all with seed 0 (so all with the same trees)."""
    return {name: make_synthetic_volume(SMALL, seed=0, style=name) for name in FAMILIES}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    return make_synthetic_dataset(root, scale=SCALE, progress=False)


def ridge_radii(labels: np.ndarray) -> np.ndarray:
    """In-plane vessel radii (voxels) on the centrelines of every XY slice: local maxima of the 2D
    distance transform."""
    radii = []
    for plane in labels.astype(np.uint8):
        distance = cv2.distanceTransform(plane, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        radii.append(distance[(plane > 0) & (distance >= ndimage.maximum_filter(distance, size=3))])
    return np.concatenate(radii)


def local_contrast(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(contrast at vessel voxels, contrast at tissue voxels): each voxel minus the mean of the
    non-vessel voxels in its 9-voxel window."""
    image = image.astype(np.float32)
    background = (~ndimage.binary_dilation(labels, iterations=2)).astype(np.float32)
    weight = ndimage.uniform_filter(background, 9)
    contrast = image - ndimage.uniform_filter(image * background, 9) / np.maximum(weight, 1e-3)
    return contrast[labels], contrast[(background > 0) & (weight > 0.5)]


# --- make_synthetic_volume: the hipct family ------------------------------------------------------


def test_same_arguments_give_identical_arrays(volume):
    image, labels = make_synthetic_volume(SHAPE, seed=0)
    assert np.array_equal(image, volume[0])
    assert np.array_equal(labels, volume[1])


def test_another_seed_gives_another_volume(volume):
    image, labels = make_synthetic_volume(SHAPE, seed=1)
    assert not np.array_equal(labels, volume[1])
    assert np.mean(image != volume[0]) > 0.9


def test_dtypes_and_shapes():
    shape = (np.int64(20), 72, 96)
    image, labels = make_synthetic_volume(shape, seed=3, voxel_size_um=50.16)
    assert image.dtype == np.uint16 and labels.dtype == np.bool_
    assert image.shape == labels.shape == (20, 72, 96)


def test_intensities_look_like_hip_ct(volume):
    image, labels = volume
    assert 0 < image.min() and image.max() < np.iinfo(np.uint16).max  # nothing saturates
    assert np.mean((image >= 15_000) & (image <= 40_000)) > 0.99
    tissue = np.median(image[:, 60:100, 60:100])  # the centre of every slice is kidney
    assert 18_000 <= tissue <= 37_000
    corners = np.concatenate([image[:, :6, :6].ravel(), image[:, -6:, -6:].ravel()])
    assert np.median(corners) < tissue - 3_000  # outside the kidney: darker
    assert corners.std() < image[:, 60:100, 60:100].std()  # ... and flatter


def test_tissue_is_textured_not_white_noise(volume):
    image = volume[0].astype(np.float32)
    # Smooth texture survives a 5x5 mean; white noise alone would drop to a fifth of its spread.
    centre = image[:, 40:120, 40:120]
    smoothed = ndimage.uniform_filter(centre, size=(1, 5, 5))
    assert smoothed.std() > 0.6 * centre.std()
    assert centre.std() > 1_000


@pytest.mark.parametrize("seed", range(4))
def test_foreground_fraction_is_realistic(seed):
    _, labels = make_synthetic_volume(SHAPE, seed=seed)
    assert 0.003 <= labels.mean() <= 0.03


def test_vessels_span_scales_from_one_voxel_to_several():
    _, labels = make_synthetic_volume((32, 256, 256), seed=2)
    radii = ridge_radii(labels)
    assert radii.max() >= 5  # roots: 7.5 voxels at most for this shape at 50 µm
    assert np.mean(radii <= 1.5) > 0.15  # and a good part of the centreline is thin vessels


@pytest.mark.parametrize("seed", range(2))
def test_coarser_voxels_show_thinner_vessels(seed):
    _, fine = make_synthetic_volume(SHAPE, seed, voxel_size_um=50.0)
    _, coarse = make_synthetic_volume(SHAPE, seed, voxel_size_um=63.08)
    assert coarse.mean() < 0.8 * fine.mean()
    assert ridge_radii(coarse).max() < ridge_radii(fine).max()


def test_vessels_stand_out_from_their_surroundings():
    image, labels = make_synthetic_volume(SHAPE, seed=1)
    inside, tissue = local_contrast(image, labels)
    noise = np.std(np.diff(image.astype(np.float32), axis=0)[~(labels[1:] | labels[:-1])]) / math.sqrt(2)
    assert np.abs(inside).mean() > 3 * noise
    assert np.abs(inside).mean() > 3 * np.abs(tissue).mean()
    # This seed has both kinds of tree: bright lumens and dark lumens.
    assert np.mean(inside > 1_500) > 0.1 and np.mean(inside < -1_500) > 0.1


def test_partial_labels_drop_whole_subtrees(volume):
    image, full = volume
    sparse_image, sparse = make_synthetic_volume(SHAPE, seed=0, labelled_fraction=0.65)
    assert np.array_equal(sparse_image, image)  # the image still shows every vessel
    assert not np.any(sparse & ~full)
    assert 0.6 <= sparse.sum() / full.sum() <= 0.7
    # Whole branches, not scattered voxels: few unlabelled voxels touch a labelled one (dropping
    # random voxels, nearly all would).
    dropped = full & ~sparse
    touching = dropped & ndimage.binary_dilation(sparse)
    assert dropped.any() and touching.sum() < 0.2 * dropped.sum()


@pytest.mark.parametrize("fraction", [0.3, 0.85])
def test_labelled_fraction_is_met(volume, fraction):
    _, labels = make_synthetic_volume(SHAPE, seed=0, labelled_fraction=fraction)
    assert labels.sum() / volume[1].sum() == pytest.approx(fraction, abs=0.05)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"shape": (64, 64)}, "shape"),
        ({"shape": (8, 8, 8, 8)}, "shape"),
        ({"shape": (7, 64, 64)}, "shape"),
        ({"shape": (16, 0, 64)}, "shape"),
        ({"shape": (16.0, 64, 64)}, "shape"),
        ({"shape": (True, 64, 64)}, "shape"),
        ({"shape": "16,64,64"}, "shape"),
        ({"voxel_size_um": 0.0}, "voxel_size_um"),
        ({"voxel_size_um": -50.0}, "voxel_size_um"),
        ({"voxel_size_um": math.nan}, "voxel_size_um"),
        ({"voxel_size_um": math.inf}, "voxel_size_um"),
        ({"voxel_size_um": "50"}, "voxel_size_um"),
        ({"labelled_fraction": 0.0}, "labelled_fraction"),
        ({"labelled_fraction": -0.5}, "labelled_fraction"),
        ({"labelled_fraction": 1.01}, "labelled_fraction"),
        ({"labelled_fraction": math.nan}, "labelled_fraction"),
        ({"style": "hip-ct"}, "style"),
        ({"style": None}, "style"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, argument):
    arguments = {"shape": (16, 32, 32), "seed": 0, **kwargs}
    message = f"{argument} .*{re.escape(repr(kwargs[argument]))}"
    with pytest.raises(ValueError, match=message):
        make_synthetic_volume(**arguments)


# --- style families -------------------------------------------------------------------------------


def test_an_unknown_style_lists_the_families():
    with pytest.raises(ValueError, match=re.escape(f"styles: {FAMILIES}")):
        make_synthetic_volume(SMALL, seed=0, style="ct")
    assert {"hipct", "wall", "bright", "faint", "random"} <= set(FAMILIES)


@pytest.mark.parametrize("style", FAMILIES)
def test_each_family_is_reproducible_by_seed(families, style):
    image, labels = families[style]
    again = make_synthetic_volume(SMALL, seed=0, style=style)
    assert np.array_equal(again[0], image) and np.array_equal(again[1], labels)
    other_image, _ = make_synthetic_volume(SMALL, seed=1, style=style)
    assert np.mean(other_image != image) > 0.9


def test_families_look_different(families):
    """Same seed, same trees, different images: intensity statistics differ family to family."""
    stats = {}
    for name, (image, labels) in families.items():
        inside, tissue = local_contrast(image, labels)
        low, median, high = np.percentile(image, [1, 50, 99])
        stats[name] = (median, high - low, np.abs(inside).mean() / np.abs(tissue).mean())
    for a in FAMILIES:
        for b in FAMILIES:
            if a < b:
                assert not np.allclose(stats[a], stats[b], rtol=0.1), (a, b, stats[a], stats[b])
    assert stats["bright"][1] < 0.5 * stats["hipct"][1]  # narrow intensity range
    assert stats["faint"][2] < 0.6 * stats["hipct"][2]  # vessels closer to the texture


def test_the_geometry_is_the_same_in_every_family(families):
    _, hipct = families["hipct"]
    _, wall = families["wall"]  # no organ outline: nothing is cut off
    assert hipct.any()
    for name, (_, labels) in families.items():  # at most cut off by an organ outline
        assert not np.any(labels & ~wall) and labels.sum() > 0.5 * wall.sum(), name


def test_wall_family_has_bright_walls_around_dark_lumens():
    image, labels = make_synthetic_volume((32, 160, 160), seed=0, style="wall")
    image = image.astype(np.float32)
    core = ndimage.binary_erosion(labels, iterations=3)  # lumens of the thicker vessels
    rim = ndimage.binary_dilation(core, iterations=3) & labels & ~ndimage.binary_dilation(core)
    around = ndimage.binary_dilation(labels, iterations=3) & ~ndimage.binary_dilation(labels)
    assert core.sum() > 100
    assert image[core].mean() < image[around].mean() < image[rim].mean()


def test_bright_family_has_bright_vessels_in_a_narrow_range():
    for seed in range(3):
        image, labels = make_synthetic_volume(SMALL, seed=seed, style="bright")
        inside, _ = local_contrast(image, labels)
        low, high = np.percentile(image, [0.1, 99.9])
        assert np.median(inside) > 0 and high - low < 6_000


def test_a_family_without_outline_has_tissue_everywhere(families):
    image = families["wall"][0].astype(np.float32)
    assert STYLES["wall"].outline == 0.0
    corners = np.concatenate([image[:, :8, :8].ravel(), image[:, -8:, -8:].ravel()])
    centre = image[:, 32:64, 32:64]
    # Flat medium would be far darker and flatter than the tissue; here the corners are tissue.
    assert corners.std() > 0.3 * centre.std()
    assert abs(np.median(corners) - np.median(centre)) < 2 * centre.std()


def test_particles_are_not_labelled():
    shape = (24, 128, 128)
    plain = dataclasses.replace(STYLES["wall"], particles=(0.0, 0.0), flakes=(0.0, 0.0))
    dotted = dataclasses.replace(plain, particles=(10.0, 10.0), particle_um=(100.0, 100.0), particle_contrast=(8.0, 8.0))
    plain_image, plain_labels = make_synthetic_volume(shape, seed=4, style=plain)
    image, labels = make_synthetic_volume(shape, seed=4, style=dotted)
    assert np.array_equal(labels, plain_labels)
    # The particles: many small blobs of difference, once the intensity window (which they may
    # shift) is matched.
    gain, level = np.polyfit(plain_image.ravel().astype(np.float64), image.ravel(), 1)
    blobs = np.abs(image - (gain * plain_image.astype(np.float64) + level)) > 1_500
    count = ndimage.label(blobs)[1]
    expected = 10.0 * np.prod(shape) * (50.0 / 1000) ** 3  # per mm³ x mm³
    assert 0.3 * expected < count < 1.5 * expected
    assert blobs.mean() < 0.05


@pytest.mark.parametrize("voxel_size_um", [50.0, 63.08])
@pytest.mark.parametrize("style", FAMILIES)
def test_labels_are_sane_in_every_family(style, voxel_size_um):
    _, labels = make_synthetic_volume((32, 128, 128), seed=1, voxel_size_um=voxel_size_um, style=style)
    assert 0.002 <= labels.mean() <= 0.03
    assert ndimage.label(labels)[1] < 100  # trees, not speckle


def test_a_style_is_checked():
    with pytest.raises(ValueError, match=r"Style.contrast must be \(low, high\)"):
        Style(contrast=(5.0, 1.0))
    with pytest.raises(ValueError, match="Style.polarity must be a non-empty tuple of"):
        Style(polarity=("up",))
    with pytest.raises(ValueError, match=r"Style.outline must be a probability"):
        Style(outline=1.5)


# --- make_synthetic_dataset -----------------------------------------------------------------------


def scaled(spec) -> tuple[int, int, int]:
    return tuple(max(8, round(side * SCALE)) for side in spec.shape)


def spec_named(name: str):
    return next(spec for spec in SYNTHETIC_VOLUMES if spec.name == name)


def test_dataset_has_the_kaggle_layout(dataset):
    def tree(folder):
        return {p.relative_to(dataset).as_posix() for p in folder.iterdir()}

    assert tree(dataset) == {"train", "test", "sample_submission.csv", "solution.csv", "voxel_sizes.json"}
    extra = [f"synth_{family}_{look}" for family in ("wall", "bright", "random") for look in range(LOOKS_PER_FAMILY)]
    train = ["kidney_1_dense", "kidney_2", "kidney_3_dense", "kidney_3_sparse", *extra]
    assert tree(dataset / "train") == {f"train/{name}" for name in train}
    assert tree(dataset / "test") == {"test/kidney_5", "test/kidney_6"}
    for name in ["kidney_1_dense", "kidney_2", "kidney_3_sparse", *extra]:
        assert tree(dataset / "train" / name) == {f"train/{name}/images", f"train/{name}/labels"}
    assert tree(dataset / "train/kidney_3_dense") == {"train/kidney_3_dense/labels"}
    for name in ["kidney_5", "kidney_6"]:
        assert tree(dataset / "test" / name) == {f"test/{name}/images"}
    assert not [p for p in dataset.parent.iterdir() if TEMP_NAME.fullmatch(p.name)]


def test_default_dataset_mixes_families_with_several_looks_each():
    train = [spec.style for spec in SYNTHETIC_VOLUMES if spec.split == "train"]
    assert set(train) == set(FAMILIES) - {"faint"}  # faint vessels are not visible in a slice
    assert all(train.count(family) == LOOKS_PER_FAMILY for family in ("wall", "bright", "random"))
    assert {spec.style for spec in SYNTHETIC_VOLUMES if spec.split == "test"} == {"hipct"}


@pytest.mark.parametrize("spec", SYNTHETIC_VOLUMES, ids=lambda spec: spec.name)
def test_dataset_volumes_are_reproducible(dataset, spec):
    folder = dataset / spec.split / spec.name
    image = read_volume(folder / "images", progress=False)
    assert image.shape == scaled(spec)
    digits = 5 if spec.name == "kidney_6" else 4
    assert slice_ids(folder / "images") == [f"{i:0{digits}d}" for i in range(image.shape[0])]
    expected_image, expected_labels = make_synthetic_volume(
        image.shape,
        dataset_volume_seed(0, spec.name),
        spec.voxel_size_um,
        labelled_fraction=spec.labelled_fraction or 1.0,
        style=spec.style,
    )
    assert np.array_equal(image, expected_image)
    if spec.split == "train":
        assert np.array_equal(read_labels(folder / "labels", progress=False), expected_labels)


def test_kidney_3_dense_labels_a_sub_range_of_kidney_3_sparse(dataset):
    dense_stems = slice_ids(dataset / "train/kidney_3_dense/labels")
    sparse_stems = slice_ids(dataset / "train/kidney_3_sparse/images")
    first = sparse_stems.index(dense_stems[0])
    assert 0 < len(dense_stems) < len(sparse_stems)
    assert sparse_stems[first : first + len(dense_stems)] == dense_stems
    dense = read_labels(dataset / "train/kidney_3_dense/labels", progress=False)
    sparse = read_labels(dataset / "train/kidney_3_sparse/labels", progress=False)
    sparse = sparse[first : first + len(dense_stems)]
    spec = spec_named("kidney_3_sparse")
    _, full = make_synthetic_volume(scaled(spec), dataset_volume_seed(0, spec.name), 50.16, style=spec.style)
    assert np.array_equal(dense, full[first : first + len(dense_stems)])
    assert not np.any(sparse & ~dense) and sparse.sum() < dense.sum()


def test_sample_submission_lists_every_test_slice(dataset):
    sample = pd.read_csv(dataset / "sample_submission.csv", dtype=str, keep_default_na=False)
    assert list(sample.columns) == ["id", "rle"]
    expected = [
        slice_id(name, stem)
        for name in ["kidney_5", "kidney_6"]
        for stem in slice_ids(dataset / "test" / name / "images")
    ]
    assert sample["id"].tolist() == expected
    assert set(sample["rle"]) == {"1 0"}


def test_solution_decodes_to_the_test_labels(dataset):
    solution = pd.read_csv(dataset / "solution.csv", dtype={"id": str, "rle": str})
    assert list(solution.columns) == ["id", "rle", "width", "height", "image", "slice"]
    sample = pd.read_csv(dataset / "sample_submission.csv", dtype=str, keep_default_na=False)
    assert solution["id"].tolist() == sample["id"].tolist()
    for name, rows in solution.groupby("image", sort=False):
        shape = scaled(spec_named(name))
        assert rows["slice"].tolist() == list(range(shape[0]))
        assert set(rows["height"]) == {shape[1]} and set(rows["width"]) == {shape[2]}
        decoded = np.stack([rle_decode(rle, shape[1:]) for rle in rows["rle"]])
        seed = dataset_volume_seed(0, name)
        _, labels = make_synthetic_volume(shape, seed, KNOWN_VOXEL_SIZES_UM[name])
        assert labels.any() and np.array_equal(decoded, labels)


def test_dataset_refuses_a_non_empty_root(dataset):
    with pytest.raises(FileExistsError, match=re.escape(str(dataset))):
        make_synthetic_dataset(dataset, scale=SCALE, progress=False)


TINY = (
    SyntheticVolumeSpec("synth_a", "train", (8, 24, 24), 1.0, style="wall", voxel_size_um=50.0),
    SyntheticVolumeSpec("synth_b", "train", (8, 24, 24), 1.0, voxel_size_um=63.08),
    SyntheticVolumeSpec("kidney_6", "test", (8, 24, 24), None, stem_digits=5),
)


def test_dataset_accepts_an_existing_empty_root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    assert make_synthetic_dataset(root, seed=5, volumes=TINY, progress=False) == root
    assert read_volume(root / "test/kidney_6/images", progress=False).shape == (8, 24, 24)


def test_dataset_of_chosen_volumes_and_styles(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", volumes=TINY, styles={"synth_b": "faint"}, progress=False)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["synth_a", "synth_b"]
    for spec, style in [(TINY[0], "wall"), (TINY[1], "faint")]:
        expected, _ = make_synthetic_volume(spec.shape, dataset_volume_seed(0, spec.name), spec.voxel_size_um, style=style)
        assert np.array_equal(read_volume(root / "train" / spec.name / "images", progress=False), expected)
    one = make_synthetic_dataset(tmp_path / "one", volumes=TINY, styles="bright", progress=False)
    expected, _ = make_synthetic_volume((8, 24, 24), dataset_volume_seed(0, "synth_a"), 50.0, style="bright")
    assert np.array_equal(read_volume(one / "train/synth_a/images", progress=False), expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"styles": "ct"}, r"unknown style 'ct'; styles: \["),
        ({"styles": {"kidney_9": "wall"}}, r"styles names volumes \['kidney_9'\] that are not in the dataset"),
        ({"volumes": TINY[:1] * 2}, "unique names"),
        ({"scale": 0}, "scale"),
        ({"scale": -1.0}, "scale"),
        ({"scale": math.nan}, "scale"),
        ({"scale": "1"}, "scale"),
    ],
)
def test_dataset_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic_dataset(tmp_path / "data", **{"volumes": TINY, "progress": False, **kwargs})
    assert not (tmp_path / "data").exists()


def test_volume_specs_are_checked():
    with pytest.raises(ValueError, match="'synth_x' is not a Kaggle volume .*give its voxel_size_um"):
        SyntheticVolumeSpec("synth_x", "train", (8, 8, 8), 1.0)
    with pytest.raises(ValueError, match=r"unknown style 'glow'; styles: \["):
        SyntheticVolumeSpec("kidney_2", "train", (8, 8, 8), 1.0, style="glow")
    with pytest.raises(ValueError, match="split must be one of"):
        SyntheticVolumeSpec("kidney_2", "val", (8, 8, 8), 1.0)
    assert SyntheticVolumeSpec("kidney_6", "test", (8, 8, 8), None).voxel_size_um == 63.08


def test_an_interrupted_dataset_leaves_nothing_and_a_rerun_succeeds(tmp_path, monkeypatch):
    real_write = synth_dataset.write_volume
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(synth_dataset, "write_volume", failing_write)
    with pytest.raises(OSError, match="disk full"):
        make_synthetic_dataset(tmp_path / "data", volumes=TINY, progress=False)
    assert os.listdir(tmp_path) == []  # neither the dataset nor its partial folder
    monkeypatch.setattr(synth_dataset, "write_volume", real_write)
    # A partial folder left by a killed run (its process is gone) is removed by the next run.
    stale = tmp_path / f".data.vk-{2**31 - 1}-0123abcd.tmp"
    (stale / "train").mkdir(parents=True)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    root = make_synthetic_dataset(tmp_path / "data", volumes=TINY, progress=False)
    assert os.listdir(tmp_path) == ["data"]
    assert {v.name for v in find_volumes(root, "train")} == {"synth_a", "synth_b"}


def test_volume_seeds_are_distinct_and_derived_from_the_seed():
    names = [spec.name for spec in SYNTHETIC_VOLUMES]
    seeds = {dataset_volume_seed(seed, name) for seed in (0, 1) for name in names}
    assert len(seeds) == 2 * len(names)
    assert dataset_volume_seed(0, "kidney_2") == dataset_volume_seed(0, "kidney_2")
    with pytest.raises(ValueError, match="name"):
        dataset_volume_seed(0, "")


def test_find_volumes_reports_the_generated_voxel_sizes(dataset):
    found = {v.name: v.voxel_size_um for split in ("train", "test") for v in find_volumes(dataset, split)}
    assert {name: found[name] for name in KNOWN_VOXEL_SIZES_UM if name in found} == {
        "kidney_1_dense": 50.0,
        "kidney_2": 50.0,
        "kidney_3_sparse": 50.16,
        "kidney_3_dense": 50.16,
        "kidney_5": 50.28,
        "kidney_6": 63.08,
    }
    # Every other volume's size comes from the dataset's voxel_sizes.json, so a model trained on
    # it records its resolution (the synth_* volumes are not Kaggle names).
    specs = {spec.name: spec.voxel_size_um for spec in SYNTHETIC_VOLUMES}
    assert found == {**specs, "kidney_3_dense": 50.16} and None not in found.values()
