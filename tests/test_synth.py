"""Tests of the synthetic HiP-CT volumes and the synthetic Kaggle-layout dataset."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from vessel_kit.layout import KNOWN_VOXEL_SIZES_UM, find_volumes
from vessel_kit.rle import rle_decode, slice_id
from vessel_kit.synth import (
    SYNTHETIC_VOLUMES,
    dataset_volume_seed,
    make_synthetic_dataset,
    make_synthetic_volume,
)
from vessel_kit.volume import read_labels, read_volume, slice_ids

SHAPE = (48, 160, 160)
SCALE = 0.5


@pytest.fixture(scope="module")
def volume() -> tuple[np.ndarray, np.ndarray]:
    return make_synthetic_volume(SHAPE, seed=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    return make_synthetic_dataset(root, scale=SCALE, progress=False)


def ridge_radii(labels: np.ndarray) -> np.ndarray:
    """Vessel radii (voxels) sampled on centrelines: local maxima of the distance transform."""
    distance = ndimage.distance_transform_edt(labels)
    ridge = labels & (distance >= ndimage.maximum_filter(distance, size=3))
    return distance[ridge]


# --- make_synthetic_volume ------------------------------------------------------------------------


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
    _, labels = make_synthetic_volume((64, 256, 256), seed=2)
    radii = ridge_radii(labels)
    assert radii.max() >= 5  # roots: 7.5 voxels at most for this shape at 50 µm
    assert np.mean(radii <= 1.5) > 0.3  # but most of the centreline is thin vessels


@pytest.mark.parametrize("seed", range(3))
def test_coarser_voxels_show_thinner_vessels(seed):
    shape = (64, 192, 192)
    _, fine = make_synthetic_volume(shape, seed, voxel_size_um=50.0)
    _, coarse = make_synthetic_volume(shape, seed, voxel_size_um=63.08)
    assert coarse.mean() < 0.8 * fine.mean()
    assert ridge_radii(coarse).max() < ridge_radii(fine).max()


def test_vessels_stand_out_from_their_surroundings(volume):
    image, labels = volume
    image = image.astype(np.float32)
    # Local background: the mean of the non-vessel voxels in a 9-voxel window.
    background = (~ndimage.binary_dilation(labels, iterations=2)).astype(np.float32)
    weight = ndimage.uniform_filter(background, 9)
    contrast = image - ndimage.uniform_filter(image * background, 9) / np.maximum(weight, 1e-3)
    noise = np.std(np.diff(image, axis=0)[~(labels[1:] | labels[:-1])]) / math.sqrt(2)
    tissue = (background > 0) & (weight > 0.5)
    inside = contrast[labels]
    assert np.abs(inside).mean() > 3 * noise
    assert np.abs(inside).mean() > 3 * np.abs(contrast[tissue]).mean()
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
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, argument):
    arguments = {"shape": (16, 32, 32), "seed": 0, **kwargs}
    message = f"{argument} .*{re.escape(repr(kwargs[argument]))}"
    with pytest.raises(ValueError, match=message):
        make_synthetic_volume(**arguments)


# --- make_synthetic_dataset -----------------------------------------------------------------------


def scaled(spec) -> tuple[int, int, int]:
    return tuple(round(side * SCALE) for side in spec.shape)


def spec_named(name: str):
    return next(spec for spec in SYNTHETIC_VOLUMES if spec.name == name)


def test_dataset_has_the_kaggle_layout(dataset):
    def tree(folder):
        return {p.relative_to(dataset).as_posix() for p in folder.iterdir()}

    assert tree(dataset) == {"train", "test", "sample_submission.csv", "solution.csv"}
    train = ["kidney_1_dense", "kidney_2", "kidney_3_dense", "kidney_3_sparse"]
    assert tree(dataset / "train") == {f"train/{name}" for name in train}
    assert tree(dataset / "test") == {"test/kidney_5", "test/kidney_6"}
    for name in ["kidney_1_dense", "kidney_2", "kidney_3_sparse"]:
        assert tree(dataset / "train" / name) == {f"train/{name}/images", f"train/{name}/labels"}
    assert tree(dataset / "train/kidney_3_dense") == {"train/kidney_3_dense/labels"}
    for name in ["kidney_5", "kidney_6"]:
        assert tree(dataset / "test" / name) == {f"test/{name}/images"}


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
    _, full = make_synthetic_volume(
        scaled(spec_named("kidney_3_sparse")), dataset_volume_seed(0, "kidney_3_sparse"), 50.16
    )
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


def test_dataset_accepts_an_existing_empty_root(tmp_path):
    root = make_synthetic_dataset(tmp_path, scale=0.1, seed=5, progress=False)
    assert root == tmp_path
    assert read_volume(tmp_path / "test/kidney_6/images", progress=False).shape == (8, 22, 22)


@pytest.mark.parametrize("scale", [0, -1.0, math.nan, "1"])
def test_dataset_rejects_a_bad_scale(tmp_path, scale):
    with pytest.raises(ValueError, match="scale"):
        make_synthetic_dataset(tmp_path / "data", scale=scale, progress=False)
    assert not (tmp_path / "data").exists()


def test_volume_seeds_are_distinct_and_derived_from_the_seed():
    names = [spec.name for spec in SYNTHETIC_VOLUMES]
    seeds = {dataset_volume_seed(seed, name) for seed in (0, 1) for name in names}
    assert len(seeds) == 2 * len(names)
    assert dataset_volume_seed(0, "kidney_2") == dataset_volume_seed(0, "kidney_2")
    with pytest.raises(ValueError, match="kidney_4"):
        dataset_volume_seed(0, "kidney_4")


def test_find_volumes_reports_the_generated_voxel_sizes(dataset):
    found = {v.name: v.voxel_size_um for split in ("train", "test") for v in find_volumes(dataset, split)}
    assert found == {
        "kidney_1_dense": 50.0,
        "kidney_2": 50.0,
        "kidney_3_sparse": 50.16,
        "kidney_3_dense": 50.16,
        "kidney_5": 50.28,
        "kidney_6": 63.08,
    }
