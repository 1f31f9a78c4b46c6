"""3D training patches: geometry, sampling, augmentation alignment, labels and masks, training at
a target voxel size, and 3D training through ``train()`` with a tiny registered 3D network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vessel_kit import models
from vessel_kit.data import TrainVolume
from vessel_kit.infer import infer_volume
from vessel_kit.models import load_checkpoint, register_architecture
from vessel_kit.normalize import Normalization
from vessel_kit.patches import PatchConfig, PatchDataset, extract_box
from vessel_kit.synth import make_synthetic_dataset, make_synthetic_volume
from vessel_kit.train_config import TrainConfig
from vessel_kit.train_resolution import at_voxel_size
from vessel_kit.training import train


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_volume((24, 64, 64), seed=1)


def _dataset(volumes, **overrides) -> PatchDataset:
    options = {"patch_size": (8, 32, 32), "patches_per_epoch": 12}
    options.update(overrides)
    return PatchDataset(volumes, PatchConfig(**options), Normalization("unit"), seed=5)


def test_box_stays_inside_and_pads_small_volumes():
    volume = np.arange(4 * 10 * 12, dtype=np.uint16).reshape(4, 10, 12)
    box, inside = extract_box(volume, (0, 9, 11), (2, 4, 4))
    np.testing.assert_array_equal(box, volume[0:2, 6:10, 8:12])  # shifted inside, not padded
    assert inside.all()
    box, inside = extract_box(volume, (2, 5, 6), (8, 4, 4))
    assert box.shape == (8, 4, 4) and inside[:4].all() and not inside[4:].any() and (box[4:] == 0).all()


def test_items_have_the_3d_shapes_and_are_deterministic_per_epoch(synthetic):
    images, labels = synthetic
    dataset = _dataset([TrainVolume("a", images, labels)], rotate_p=0.5, zoom_p=0.5, intensity_p=0.5)
    item = dataset[3]
    assert {k: (tuple(v.shape), v.dtype) for k, v in item.items()} == {
        key: ((1, 8, 32, 32), torch.float32) for key in ("image", "target", "valid")
    }
    dataset.set_epoch(1)
    first = [dataset[i]["image"] for i in range(4)]
    assert all(torch.equal(a, dataset[i]["image"]) for i, a in enumerate(first))
    dataset.set_epoch(2)
    assert not all(torch.equal(a, dataset[i]["image"]) for i, a in enumerate(first))


def test_foreground_sampling_and_volume_weights(synthetic):
    images, labels = synthetic
    empty = TrainVolume("empty", images, np.zeros_like(labels), weight=1e-9)
    dataset = _dataset([TrainVolume("a", images, labels), empty], foreground_fraction=1.0, flips=False)
    assert all(dataset[i]["target"].sum() > 0 for i in range(len(dataset)))


@pytest.mark.parametrize("options", [{"rotate_p": 1.0, "rotate_max_deg": 180.0}, {"zoom_p": 1.0}])
def test_rotated_and_zoomed_patches_keep_image_and_target_aligned(options):
    labels = make_synthetic_volume((24, 64, 64), seed=2)[1]
    images = np.where(labels, 60000, 1000).astype(np.uint16)
    dataset = _dataset([TrainVolume("a", images, labels)], foreground_fraction=1.0, **options)
    intersection = union = 0
    for i in range(len(dataset)):
        item = dataset[i]
        counted = item["valid"][0] > 0
        bright, vessel = (item["image"][0] > 0.5) & counted, (item["target"][0] > 0.5) & counted
        intersection += (bright & vessel).sum().item()
        union += (bright | vessel).sum().item()
        assert set(item["target"].unique().tolist()) <= {0.0, 1.0}  # bool labels stay hard
    assert intersection / union > 0.8


def test_rotation_marks_the_outside_invalid_and_zeroes_it():
    images = np.full((8, 24, 24), 40000, np.uint16)
    dataset = _dataset([TrainVolume("a", images, np.zeros(images.shape, bool))], patch_size=(8, 32, 32),
                       rotate_p=1.0, rotate_max_deg=90.0)
    item = dataset[0]
    outside = item["valid"][0] == 0
    assert outside.any() and (item["image"][0][outside] == 0).all()


def test_sparse_valid_mask_and_soft_labels():
    images = np.full((8, 32, 32), 30000, np.uint16)
    soft = np.full(images.shape, 128, np.uint8)
    ignore = np.ones(images.shape, bool)
    ignore[:, :, :16] = False
    item = _dataset([TrainVolume("a", images, soft, valid=ignore)], flips=False)[0]
    assert torch.allclose(item["target"], torch.full_like(item["target"], 128 / 255))
    assert item["valid"][0, :, :, 16:].eq(1).all() and item["valid"][0, :, :, :16].eq(0).all()


@pytest.mark.parametrize(("option", "match"), [
    ({"patch_size": (8, 32)}, "patch_size must be 3 positive ints"),
    ({"rotate_max_deg": 200.0}, "rotate_max_deg must be in \\[0, 180\\]"),
    ({"zoom_p": 2.0}, "zoom_p is a probability"),
    ({"zoom_range": (1.2, 0.8)}, "zoom_range must be"),
    ({"patches_per_epoch": 0}, "patches_per_epoch must be >= 1"),
])
def test_bad_patch_options_are_named(option, match):
    with pytest.raises(ValueError, match=match):
        PatchConfig(**option)


def test_training_volumes_at_a_target_voxel_size_are_cached(synthetic, tmp_path):
    images, labels = synthetic
    volume = TrainVolume("a", images, labels, valid=np.ones(images.shape, np.uint8), voxel_size_um=50.0)
    coarse = at_voxel_size(volume, 100.0, cache_dir=tmp_path)
    assert coarse.images.shape == (12, 32, 32) and coarse.voxel_size_um == 100.0
    assert coarse.target.dtype == np.bool_ and coarse.valid.dtype == np.bool_ and coarse.valid.all()
    assert 0.5 < coarse.target.mean() / labels.mean() < 2.0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["a@100um_images.npy", "a@100um_target.npy", "a@100um_valid.npy"]
    again = at_voxel_size(volume, 100.0, cache_dir=tmp_path)
    assert isinstance(again.images, np.memmap) and np.array_equal(again.target, coarse.target)
    assert at_voxel_size(volume, 50.0) is volume
    with pytest.raises(ValueError, match="target_voxel_size_um: volume 'b' has no known voxel size"):
        at_voxel_size(TrainVolume("b", images, labels), 63.08)


def test_a_config_refuses_the_section_of_the_other_kind_of_model():
    with pytest.raises(ValueError, match="crops is for 2D models"):
        TrainConfig(data_root="/d", model=_TINY_3D, crops={"crop_size": 64})
    with pytest.raises(ValueError, match="patches is for 3D models"):
        TrainConfig(data_root="/d", patches={"patch_size": [8, 32, 32]})
    with pytest.raises(ValueError, match="patches.patches_per_epoch \\(4\\) must hold at least one optimiser step"):
        TrainConfig(data_root="/d", model=_TINY_3D, patches={"patches_per_epoch": 4}, batch_size=8)
    with pytest.raises(ValueError, match="unknown training options \\['patches.size'\\]"):
        TrainConfig(data_root="/d", model=_TINY_3D, patches={"size": 4})
    config = TrainConfig.from_dict({"data_root": "/d", "model": _TINY_3D, "patches": {"patch_size": [8, 32, 32]}})
    assert config.crops is None and config.patches.patch_size == (8, 32, 32)
    assert "crops" not in config.to_dict() and TrainConfig.from_dict(config.to_dict()) == config


class _Tiny3D(nn.Module):
    """A tiny 3D network (a custom module: sides must be multiples of models.DEFAULT_STRIDE)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv3d(1, width, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose3d(width, 1, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


_TINY_3D = {"arch": "tiny_3d", "encoder": "none", "spatial_dims": 3, "in_chans": 1}


@pytest.fixture(autouse=True)
def _tiny_3d_registered(monkeypatch):
    monkeypatch.setattr(models, "ARCHITECTURES", dict(models.ARCHITECTURES))
    register_architecture("tiny_3d", lambda config: _Tiny3D(**config.model_kwargs))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("patches") / "data", scale=0.2, progress=False)


def test_train_drives_3d_patches_with_validation_resume_and_a_target_resolution(data_root, tmp_path, interrupt_training_at):
    options = dict(
        data_root=str(data_root), out_dir=str(tmp_path / "run"), train_volumes=["kidney_1_dense"],
        val_volumes=["kidney_3_dense"], model=_TINY_3D, target_voxel_size_um=63.08,
        patches={"patch_size": [32, 32, 32], "patches_per_epoch": 4, "rotate_p": 0.5},
        loss=[{"name": "focal", "weight": 1.0}, {"name": "boundary_dou", "weight": 1.0}],
        batch_size=2, epochs=2, optim={"lr": 1e-2, "ema_decay": 0.9}, num_workers=0, progress=False,
        cache_dir=str(tmp_path / "cache"),
    )
    resume = interrupt_training_at(1)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**options))
    resume()
    result = train(TrainConfig(**options))  # resumes after epoch 0
    assert [r["epoch"] for r in result.history] == [0, 1]
    record = result.history[-1]
    assert np.isfinite(record["train_loss"]) and 0.0 <= record["val_surface_dice"] <= 1.0
    assert any(p.name.startswith("kidney_1_dense@63.08um") for p in (tmp_path / "cache").iterdir())
    _, config = load_checkpoint(result.best_checkpoint)
    assert (config.spatial_dims, config.voxel_size_um) == (3, 63.08)
    assert tuple(config.tile_size) == (32, 32, 32)
    images, _ = make_synthetic_volume((12, 40, 40), seed=3)
    mask = infer_volume(images, result.best_checkpoint, tta="none", progress=False)
    assert mask.shape == images.shape and mask.dtype == np.bool_
