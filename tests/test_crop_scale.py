"""crops.scale: crops resampled by a fixed factor (whole resized planes when they fit), and the
checkpoint's voxel size divided by it so that inference resamples alike."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from vessel_kit.data import CropConfig, CropDataset, TrainVolume
from vessel_kit.normalize import Normalization
from vessel_kit.training import TrainConfig, _model_voxel_size


def _dataset(volume: TrainVolume, **options) -> CropDataset:
    config = CropConfig(**{"crop_size": 64, "in_chans": 3, "crops_per_epoch": 12, "augment": "none", **options})
    return CropDataset([volume], config, Normalization("unit"), seed=3)


def test_scaled_crops_sample_the_volume_one_over_scale_voxels_apart():
    images = (np.indices((32, 64, 64))[2] * 500 + np.indices((32, 64, 64))[0] * 20).astype(np.uint16)
    dataset = _dataset(TrainVolume("a", images, np.zeros(images.shape, bool)), axes={"xy": 1.0}, scale=2.0)
    images = [dataset[index]["image"].numpy() * 65535 for index in range(8)]
    # x: 0.5 voxel per pixel; channels 0.5 slice apart (a few clamped at the volume's first/last slice)
    assert np.median([np.diff(image[1, 32, 20:44]) for image in images]) == pytest.approx(250, rel=1e-3)
    assert np.median([np.diff(image[:, 32, 32]) for image in images]) == pytest.approx(10, rel=1e-3)


def test_a_plane_that_fits_is_the_whole_resized_plane_centred():
    shape = (6, 40, 48)
    labels = np.zeros(shape, bool)
    labels[:, 10:30, 8:40] = True  # 20 x 32 per slice
    images = np.where(labels, 50000, 1000).astype(np.uint16)
    dataset = _dataset(TrainVolume("a", images, labels), axes={"xy": 1.0}, crop_size=96, scale=1.5, in_chans=1)
    for index in range(6):
        item = dataset[index]
        valid, target = item["valid"][0].numpy(), item["target"][0].numpy()
        rows, cols = np.nonzero(valid)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert 59 <= height <= 61 and 71 <= width <= 73 and rows.size == height * width  # 40 x 48 -> 60 x 72
        assert abs((rows.min() + rows.max()) / 2 - 47.5) <= 1 and abs((cols.min() + cols.max()) / 2 - 47.5) <= 1
        assert target.sum() == pytest.approx(20 * 32 * 1.5**2, rel=0.06)  # every vessel voxel of the slice, 1.5² as big


def test_scale_divides_the_recorded_voxel_size():
    config = TrainConfig(data_root="unused", crops={"crop_size": 64, "scale": 2.0})
    volume = TrainVolume("a", np.zeros((4, 8, 8), np.uint16), np.zeros((4, 8, 8), bool), voxel_size_um=50.0)
    assert _model_voxel_size(config, [volume]) == 25.0
    unknown = TrainVolume("b", volume.images, volume.target)
    with pytest.warns(UserWarning, match=r"unknown or different voxel sizes \{'a': 50.0, 'b': None\}"):
        assert _model_voxel_size(TrainConfig(data_root="unused"), [volume, unknown]) is None  # unscaled: as before
    with pytest.raises(ValueError, match=r"crops.scale 2.0 needs one known voxel size.*'b': None"), \
            pytest.warns(UserWarning, match="unknown or different"):
        _model_voxel_size(config, [volume, unknown])
    with pytest.raises(ValueError, match=r"scale must be in \[0.125, 8.0\]"):
        CropConfig(scale=0.0)


def test_the_recorded_voxel_size_is_the_mean_of_alike_sizes_and_none_for_different_ones():
    def volume(name, size):
        return TrainVolume(name, np.zeros((4, 8, 8), np.uint16), np.zeros((4, 8, 8), bool), voxel_size_um=size)

    config = TrainConfig(data_root="unused")
    alike = [volume("kidney_1_dense", 50.0), volume("kidney_3_sparse", 50.16)]  # within 2 %: one resolution
    assert _model_voxel_size(config, alike) == pytest.approx(50.08)
    with pytest.warns(UserWarning, match=r"'coarse': 63.08.*target_voxel_size_um"):
        assert _model_voxel_size(config, [*alike, volume("coarse", 63.08)]) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing known: nothing to warn about
        assert _model_voxel_size(config, [volume("a", None), volume("b", None)]) is None


def test_a_scaled_model_trains_and_predicts_at_its_scale(tmp_path, monkeypatch):
    from vessel_kit import predictor
    from vessel_kit.infer import infer_volume
    from vessel_kit.models import read_checkpoint_metadata
    from vessel_kit.synth import make_synthetic_dataset
    from vessel_kit.synth.dataset import SYNTHETIC_VOLUMES
    from vessel_kit.training import train

    first = [spec for spec in SYNTHETIC_VOLUMES if spec.name == "kidney_1_dense"]
    root = make_synthetic_dataset(tmp_path / "data", scale=0.2, volumes=first, progress=False)
    config = TrainConfig(
        data_root=str(root), out_dir=str(tmp_path / "run"), train_volumes=["kidney_1_dense"], val_volumes=[],
        model={"encoder": "resnet18", "in_chans": 3, "model_kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}},
        crops={"crop_size": 64, "crops_per_epoch": 4, "augment": "none", "scale": 2.0}, batch_size=2, epochs=1,
        loss="dice", num_workers=0, progress=False,
    )
    checkpoint = train(config).last_checkpoint
    assert read_checkpoint_metadata(checkpoint)["config"].voxel_size_um == 25.0
    shapes, resample = [], predictor.resample_volume
    monkeypatch.setattr(predictor, "resample_volume", lambda v, shape, **kw: shapes.append(shape) or resample(v, shape, **kw))
    volume = np.random.default_rng(0).integers(0, 65535, (4, 24, 28), dtype=np.uint16)
    logits = infer_volume(volume, checkpoint, voxel_size_um=50.0, axes=("xy",), tta="none", return_logits=True,
                          progress=False)
    assert logits.shape == volume.shape and np.isfinite(logits).all()
    assert tuple(shapes[0]) == (8, 48, 56)  # the model saw the volume at 25 µm: twice its size
