"""find_volumes on Kaggle-layout trees, including the kidney_3_dense quirk, and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from vessel_kit.layout import KNOWN_VOXEL_SIZES_UM, VOXEL_SIZES_FILE, find_volumes
from vessel_kit.volume import write_volume


def _volume(root, split, name, depth=4, shape=(6, 5), labels=True, images=True, stems=None, first=0):
    stems = stems or [f"{first + i:04d}" for i in range(depth)]
    rng = np.random.default_rng(len(name))
    if images:
        write_volume(rng.integers(0, 65535, (len(stems), *shape), dtype=np.uint16), root / split / name / "images", stems)
    if labels:
        write_volume(rng.random((len(stems), *shape)) < 0.2, root / split / name / "labels", stems)
    return stems


@pytest.fixture
def kaggle_root(tmp_path):
    _volume(tmp_path, "train", "kidney_1_dense", depth=5)
    _volume(tmp_path, "train", "kidney_3_sparse", depth=8)
    _volume(tmp_path, "train", "kidney_3_dense", depth=3, images=False, first=2)
    _volume(tmp_path, "test", "kidney_5", labels=False, depth=3)
    _volume(tmp_path, "test", "kidney_6", labels=False, stems=["00000", "00001"])
    return tmp_path


def test_train_volumes_and_the_dense_labels_quirk(kaggle_root):
    volumes = {v.name: v for v in find_volumes(kaggle_root, "train")}
    assert list(volumes) == ["kidney_1_dense", "kidney_3_dense", "kidney_3_sparse"]
    dense = volumes["kidney_3_dense"]
    assert dense.stems == ["0002", "0003", "0004"]
    assert all(p.parent == kaggle_root / "train" / "kidney_3_sparse" / "images" for p in dense.image_paths)
    np.testing.assert_array_equal(dense.read_images(progress=False), volumes["kidney_3_sparse"].read_images(progress=False)[2:5])
    assert dense.read_labels(progress=False).shape == (3, 6, 5)
    assert dense.voxel_size_um == KNOWN_VOXEL_SIZES_UM["kidney_3_dense"] == 50.16
    assert volumes["kidney_1_dense"].shape == (5, 6, 5)


def test_test_volumes(kaggle_root):
    volumes = find_volumes(kaggle_root, "test", voxel_sizes={"kidney_5": 42.0})
    assert [(v.name, v.label_paths, v.voxel_size_um) for v in volumes] == [("kidney_5", None, 42.0), ("kidney_6", None, 63.08)]
    assert volumes[1].stems == ["00000", "00001"]
    with pytest.raises(ValueError, match="'kidney_5' has no labels"):
        volumes[0].read_labels()


def test_real_placeholder_layout(tmp_path, real_data):
    """The 3-slice public test placeholder, laid out as Kaggle ships it."""
    (tmp_path / "test" / "kidney_5").mkdir(parents=True)
    (tmp_path / "test" / "kidney_5" / "images").symlink_to(real_data / "kidney_test_placeholder")
    (volume,) = find_volumes(tmp_path, "test")
    assert volume.stems == ["0000", "0001", "0002"] and volume.shape == (3, 1303, 912)


def test_unknown_volume_has_no_voxel_size(tmp_path):
    _volume(tmp_path, "train", "spleen_1")
    assert find_volumes(tmp_path)[0].voxel_size_um is None


def test_a_dataset_records_its_voxel_sizes(tmp_path):
    _volume(tmp_path, "train", "spleen_1")
    _volume(tmp_path, "train", "kidney_2")
    (tmp_path / VOXEL_SIZES_FILE).write_text('{"spleen_1": 25, "kidney_2": 51.5, "absent": 7}')
    assert {v.name: v.voxel_size_um for v in find_volumes(tmp_path)} == {"spleen_1": 25.0, "kidney_2": 51.5}
    overridden = find_volumes(tmp_path, voxel_sizes={"spleen_1": 30.0})  # the caller's word wins
    assert [v.voxel_size_um for v in overridden] == [51.5, 30.0]


@pytest.mark.parametrize("text, error", [
    ("[50]", "holds a list"),
    ('{"spleen_1": -1}', r"positive numbers of µm, got \{'spleen_1': -1\}"),
    ('{"spleen_1": "50"}', "positive numbers"),
    ('{"spleen_1": true}', "positive numbers"),
    ("{spleen", "not readable JSON"),
])
def test_a_bad_voxel_sizes_file_is_named(tmp_path, text, error):
    _volume(tmp_path, "train", "spleen_1")
    (tmp_path / VOXEL_SIZES_FILE).write_text(text)
    with pytest.raises(ValueError, match=f"voxel_sizes.json.*{error}"):
        find_volumes(tmp_path)


def test_bad_layouts(tmp_path):
    with pytest.raises(ValueError, match="split must be one of \\('train', 'test'\\), got 'val'"):
        find_volumes(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="train does not exist"):
        find_volumes(tmp_path)
    (tmp_path / "train" / "empty_volume").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no volumes"):
        find_volumes(tmp_path)


def test_labels_that_do_not_match_images(tmp_path):
    _volume(tmp_path, "train", "kidney_2", depth=4, labels=False)
    _volume(tmp_path, "train", "kidney_2", stems=["0001", "0002", "0003", "0004"], images=False)
    with pytest.raises(ValueError, match="'kidney_2': labels don't match images.*unlabelled e.g. \\['0000'\\].*without image e.g. \\['0004'\\]"):
        find_volumes(tmp_path)


def test_labels_of_another_shape(tmp_path):
    _volume(tmp_path, "train", "kidney_2", labels=False)
    _volume(tmp_path, "train", "kidney_2", images=False, shape=(6, 4))
    with pytest.raises(ValueError, match="label slice .*0000.tif is \\(6, 4\\) but image slice .*0000.tif is \\(6, 5\\)"):
        find_volumes(tmp_path)


def test_labels_only_volume_without_images_anywhere(tmp_path):
    _volume(tmp_path, "train", "kidney_3_sparse", depth=2)
    _volume(tmp_path, "train", "kidney_3_dense", images=False, first=5)
    with pytest.raises(ValueError, match="'kidney_3_dense' has labels but no images/ folder.*e.g. 0005.tif"):
        find_volumes(tmp_path)


def test_rgb_image_slice_is_named(tmp_path):
    images = tmp_path / "test" / "kidney_5" / "images"
    images.mkdir(parents=True)
    tifffile.imwrite(images / "0000.tif", np.zeros((6, 5, 3), np.uint8), photometric="rgb")
    (volume,) = find_volumes(tmp_path, "test")
    with pytest.raises(ValueError, match="0000.tif: expected a 2D grayscale slice, got shape \\(6, 5, 3\\)"):
        volume.shape


def test_unreadable_images_folder_is_named(tmp_path, monkeypatch):
    _volume(tmp_path, "train", "kidney_2")
    images = tmp_path / "train" / "kidney_2" / "images"
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == images:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(ValueError, match=f"cannot list slice folder {images}: Permission denied"):
        find_volumes(tmp_path)


def test_dangling_label_link_is_named(tmp_path):
    _volume(tmp_path, "train", "kidney_2")
    link = tmp_path / "train" / "kidney_2" / "labels" / "0004.tif"
    link.symlink_to(tmp_path / "elsewhere" / "0004.tif")
    with pytest.raises(ValueError, match=f"{link} is a dangling symbolic link"):
        find_volumes(tmp_path)


@pytest.mark.parametrize("entry", ["volume", "images"])
def test_broken_volume_or_images_link_is_named(tmp_path, entry):
    _volume(tmp_path, "test", "kidney_5", labels=False)
    link = tmp_path / "test" / "kidney_6"
    if entry == "images":
        link.mkdir()
        link = link / "images"
    link.symlink_to(tmp_path / "unmounted")
    with pytest.raises(ValueError, match=f"{link} is a dangling symbolic link"):
        find_volumes(tmp_path, "test")


def test_images_that_is_a_file(tmp_path):
    (tmp_path / "test" / "kidney_5").mkdir(parents=True)
    (tmp_path / "test" / "kidney_5" / "images").write_text("not a folder")
    with pytest.raises(ValueError, match="kidney_5/images is a file; expected a folder of TIFF slices"):
        find_volumes(tmp_path, "test")
