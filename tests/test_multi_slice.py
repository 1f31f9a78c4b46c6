"""Multi-slice output (k slices in, m out): crops carry the m target slices around the centre one,
models and checkpoints carry ``out_chans``, every loss takes (B, m, H, W), and the plane pass
blends each output plane back at its own plane, whole or block-wise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_model
from torch import nn

import vessel_kit.data as data_module
from vessel_kit import models
from vessel_kit import InferConfig, Normalization, Predictor
from vessel_kit.data import CropConfig, CropDataset, TrainVolume
from vessel_kit.ensemble import Ensemble
from vessel_kit.losses import LOSSES, boundary_weights, build_loss
from vessel_kit.models import (
    ModelConfig,
    build_model,
    build_model_from_config,
    load_checkpoint,
    read_checkpoint_metadata,
    register_architecture,
    save_checkpoint,
)
from vessel_kit.oblique import rotation_matrix

UNIT = Normalization("unit")
PERCENTILE = Normalization("percentile")
OFFSETS = (10.0, 20.0, 30.0)  # what the fake 3-out module adds to output planes 0, 1, 2


# --- crops -------------------------------------------------------------------------------------


def coordinates_volume(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 image, float32 label) that both encode each voxel's (z, y, x): v = 1 + flat index."""
    codes = 1 + np.arange(np.prod(shape)).reshape(shape)
    assert codes.max() < 65535
    return codes.astype(np.uint16), (codes / 65535).astype(np.float32)


def decode(values: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """(..., 3) voxel coordinates of unit-normalised codes."""
    return np.stack(np.unravel_index(np.rint(values * 65535).astype(np.int64) - 1, shape), axis=-1)


@pytest.mark.parametrize("axis", ["xy", "xz", "yz"])
def test_axis_crops_carry_the_slices_before_and_after_the_centre(axis):
    """Target slice j of a 3-out crop is the label's slice k - 1 + j along the crop's axis (k: the
    centre slice), pixel for pixel; a slice beyond the volume's ends has valid 0 everywhere."""
    shape = (5, 40, 36)
    images, label = coordinates_volume(shape)
    slice_axis = {"xy": 0, "xz": 1, "yz": 2}[axis]
    config = CropConfig(crop_size=32, in_chans=3, out_chans=3, axes={axis: 1.0}, augment="none", crops_per_epoch=16)
    dataset = CropDataset([TrainVolume("codes", images, label)], config, UNIT, seed=1)
    edges = 0
    for index in range(len(dataset)):
        item = dataset[index]
        image, target, valid = (item[k].numpy() for k in ("image", "target", "valid"))
        assert target.shape == valid.shape == (3, 32, 32)
        inside = image[1] > 0  # padding (the 5-voxel Z side of xz/yz planes) is 0
        centre = decode(image[1][inside], shape)
        k = centre[0, slice_axis]
        for j in range(3):
            if not 0 <= k - 1 + j < shape[slice_axis]:
                edges += 1
                assert not valid[j].any()
                continue
            np.testing.assert_array_equal(valid[j] > 0, inside)
            expected = centre.copy()
            expected[:, slice_axis] = k - 1 + j
            np.testing.assert_array_equal(decode(target[j][inside], shape), expected)
    if axis == "xy":
        assert edges > 0  # 5 slices: some centres are end slices


def test_augmentation_keeps_every_target_slice_on_its_image_slice():
    """5 in, 3 out, "light" augmentation (flips, rot90, brightness/contrast, slice-order
    reversal): target slice j stays on image slice j + 1, in-plane (same brightest pixel) and in
    order (a reversed image stack reverses the target stack)."""
    shape = (12, 40, 40)
    images, label = coordinates_volume(shape)
    config = CropConfig(crop_size=32, in_chans=5, out_chans=3, axes={"xy": 1.0}, augment="light", crops_per_epoch=24)
    dataset = CropDataset([TrainVolume("codes", images, label)], config, UNIT, seed=0)
    orders = set()
    for index in range(len(dataset)):
        item = dataset[index]
        image, target, valid = (item[k].numpy() for k in ("image", "target", "valid"))
        used = [j for j in range(3) if valid[j].any()]
        for j in used:
            assert np.argmax(target[j]) == np.argmax(image[j + 1])
        z = decode(target[used[0]].ravel()[:1], shape)[0, 0], decode(target[used[-1]].ravel()[:1], shape)[0, 0]
        if z[0] != z[1]:
            order = np.sign(z[1] - z[0])
            assert np.sign(image[used[-1] + 1].mean() - image[used[0] + 1].mean()) == order
            orders.add(order)
    assert orders == {-1, 1}  # both slice orders were drawn


def test_tilted_crops_put_the_outer_target_slices_where_the_geometry_says(monkeypatch):
    """Planes tilted 30° about X through a label that is linear in (z, y) (trilinear sampling
    reproduces it exactly): target slice j lies j - 1 voxels along the tilted normal
    (cos 30°, sin 30°, 0) from the centre slice, its rows along (-sin 30°, cos 30°, 0); where a
    slice leaves the volume its valid is 0, and each target slice equals its image slice."""
    shape = (48, 96, 96)
    zz, yy, _ = np.indices(shape)
    label = ((0.3 * zz + yy) / 150).astype(np.float32)
    monkeypatch.setattr(data_module, "random_rotation", lambda rng, max_deg: rotation_matrix((0.0, 0.0, 1.0), 30.0))
    config = CropConfig(crop_size=32, in_chans=3, out_chans=3, axes={"xy": 1.0}, augment="none", rotate_p=1.0,
                        foreground_fraction=0.0, crops_per_epoch=8)
    dataset = CropDataset([TrainVolume("ramp", np.rint(label * 65535).astype(np.uint16), label)], config, UNIT, seed=0)
    cos, sin = np.cos(np.radians(30.0)), np.sin(np.radians(30.0))
    along_normal, along_rows = (0.3 * cos + sin) / 150, (-0.3 * sin + cos) / 150
    cut_off = 0
    for index in range(len(dataset)):
        item = dataset[index]
        image, target, valid = (item[k].numpy() for k in ("image", "target", "valid"))
        inside = valid.min(axis=0) > 0  # every target slice's point is inside the volume
        assert inside.sum() > 100
        cut_off += int((valid[0] != valid[2]).any())
        np.testing.assert_allclose((target[0] - target[1])[inside], -along_normal, atol=1e-5)
        np.testing.assert_allclose((target[2] - target[1])[inside], along_normal, atol=1e-5)
        rows = inside[1:] & inside[:-1]
        np.testing.assert_allclose((target[1][1:] - target[1][:-1])[rows], along_rows, atol=1e-5)
        np.testing.assert_allclose(target[:, inside], image[:, inside], atol=1e-4)
    assert cut_off > 0  # some crops leave the volume on one outer slice and not the other


def test_one_out_crops_are_the_centre_slice_alone():
    config = CropConfig(crop_size=32, in_chans=3, augment="none", crops_per_epoch=4)
    images, label = coordinates_volume((6, 40, 40))
    item = CropDataset([TrainVolume("codes", images, label)], config, UNIT, seed=0)[0]
    assert item["target"].shape == item["valid"].shape == (1, 32, 32)
    np.testing.assert_allclose(item["target"][0], item["image"][1], atol=1e-6)


# --- losses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_takes_several_planes(name):
    """Three copies of one plane score as the plane alone (up to smoothing, made tiny), and the
    valid mask counts per plane: planes with valid 0 change nothing."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 24, 24, generator=generator, requires_grad=True)
    target = (torch.rand(2, 1, 24, 24, generator=generator) > 0.7).float()
    valid = (torch.rand(2, 1, 24, 24, generator=generator) > 0.2).float()
    spec = {"name": name, "smooth": 1e-6} if name in ("dice", "surface_dice", "skeleton_recall") else name
    loss = build_loss(spec)
    one = loss(logits, target, valid)
    three = loss(logits.repeat(1, 3, 1, 1), target.repeat(1, 3, 1, 1), valid.repeat(1, 3, 1, 1))
    assert torch.isfinite(three) and three.item() == pytest.approx(one.item(), rel=1e-4)
    noise = torch.randn(2, 2, 24, 24, generator=generator)
    ignored = loss(torch.cat([logits, noise], 1), torch.cat([target, 1 - target.repeat(1, 2, 1, 1)], 1),
                   torch.cat([valid, torch.zeros(2, 2, 24, 24)], 1))
    assert ignored.item() == pytest.approx(one.item(), rel=1e-4)
    three.backward()
    assert torch.isfinite(logits.grad).all()


def test_boundary_weights_are_found_per_plane():
    target = (torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(1)) > 0.6).float()
    stacked = boundary_weights(target)
    for j in range(3):
        torch.testing.assert_close(stacked[:, j : j + 1], boundary_weights(target[:, j : j + 1]))


# --- models and checkpoints --------------------------------------------------------------------


def tiny_unet(out_chans: int, in_chans: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("unet", "resnet18", in_chans=in_chans, out_chans=out_chans, encoder_depth=3,
                       decoder_channels=(16, 8, 4)).eval()


@pytest.mark.parametrize(("options", "words"), [
    (dict(in_chans=3, out_chans=2), "odd"),
    (dict(in_chans=3, out_chans=5), "exceeds in_chans=3"),
    (dict(in_chans=3, out_chans=0), "odd"),
    (dict(arch="dynunet", spatial_dims=3, out_chans=3, tile_size=(16, 32, 32)), "3D model"),
])
def test_bad_out_chans_is_refused_by_name(options, words):
    with pytest.raises(ValueError, match=f"out_chans.*{words}|{words}.*out_chans"):
        ModelConfig(**{"encoder": "resnet18", **options})


def test_an_architecture_without_multi_slice_refuses_several_planes(monkeypatch):
    monkeypatch.setattr(models, "ARCHITECTURES", dict(models.ARCHITECTURES))  # registered for this test only
    register_architecture("one_plane_net", lambda config: nn.Conv2d(config.in_chans, 1, 3, padding=1))
    ModelConfig(arch="one_plane_net", in_chans=3)
    with pytest.raises(ValueError, match="out_chans=3 needs one registered with multi_slice=True"):
        ModelConfig(arch="one_plane_net", in_chans=3, out_chans=3)


def test_a_three_out_model_trains_and_its_checkpoint_keeps_out_chans(tmp_path):
    """3 in, 3 out: two optimiser steps on 3-slice crops with the 1st place's loss parts (finite
    losses, weights changed), then the checkpoint rebuilds a 3-out model."""
    images, label = coordinates_volume((8, 48, 48))
    label = (label * 65535 % 7 < 2).astype(np.float32)  # some foreground
    crops = CropConfig(crop_size=32, in_chans=3, out_chans=3, augment="light", crops_per_epoch=4)
    dataset = CropDataset([TrainVolume("v", images, label)], crops, UNIT)
    batch = torch.utils.data.default_collate([dataset[index] for index in range(len(dataset))])
    config = ModelConfig(arch="unet", encoder="resnet18", in_chans=3, out_chans=3, tile_size=32,
                         model_kwargs={"encoder_depth": 3, "decoder_channels": [16, 8, 4]})
    torch.manual_seed(0)
    model = build_model_from_config(config)
    loss = build_loss([{"name": name, "weight": 1.0} for name in ("focal", "dice", "boundary", "surface_dice")])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        logits = model(batch["image"])
        assert logits.shape == batch["target"].shape == (4, 3, 32, 32)
        value = loss(logits, batch["target"], batch["valid"])
        assert torch.isfinite(value)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    path = save_checkpoint(tmp_path / "three.safetensors", model, config)
    assert read_checkpoint_metadata(path)["config"].out_chans == 3
    loaded, loaded_config = load_checkpoint(path)
    assert loaded_config == config and loaded(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_a_checkpoint_written_before_out_chans_loads_as_one_out(tmp_path):
    model = tiny_unet(1)
    config = ModelConfig(arch="unet", encoder="resnet18", in_chans=3, tile_size=32,
                         model_kwargs={"encoder_depth": 3, "decoder_channels": [16, 8, 4]})
    old = {key: value for key, value in config.to_dict().items() if key != "out_chans"}
    header = {"format_version": 1, "versions": {}, "config": old, "metrics": {}, "extra": {}}
    save_model(model, str(tmp_path / "old.safetensors"), metadata={"vessel_kit": json.dumps(header)})
    loaded, loaded_config = load_checkpoint(tmp_path / "old.safetensors")
    assert loaded_config.out_chans == 1 and loaded(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 32, 32)


# --- inference ---------------------------------------------------------------------------------


class ShiftedCopy(nn.Module):
    """Output plane j = input plane j + OFFSETS[j] (centred: 3 in, 3 out), or the middle input
    plane + 20 with one output: a window centred on plane p predicts plane p - 1 + j exactly."""

    def __init__(self, out_chans: int) -> None:
        super().__init__()
        self.out_chans = out_chans
        self.scale = nn.Parameter(torch.ones(()))  # a parameter, so modules move to devices as usual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offsets = torch.tensor(OFFSETS, dtype=x.dtype, device=x.device)[:, None, None]
        if self.out_chans == 1:
            return self.scale * x[:, 1:2] + offsets[1]
        return self.scale * x + offsets


def copy_predictor(out_chans: int, **options) -> Predictor:
    ensemble = Ensemble([ShiftedCopy(out_chans)], [1.0], in_chans=3, normalization=UNIT, tile_size=None,
                        voxel_size_um=None, out_chans=out_chans)
    settings = dict(tta="none", axes=("xy", "xz", "yz"), tile_size=32, overlap=0.5, min_plane_side=4, progress=False)
    return Predictor(ensemble, InferConfig(**{**settings, **options}))


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 65535, size=(7, 44, 40), dtype=np.uint16)


def expected_copy(volume: np.ndarray, offsets_per_plane) -> np.ndarray:
    """The unit-normalised volume plus, per axis, the mean offset of the windows predicting each
    plane (``offsets_per_plane(n)``: one value per plane of an axis of n planes), averaged over
    the three axes."""
    unit = volume.astype(np.float32) / 65535
    total = np.zeros(volume.shape, np.float32)
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = volume.shape[axis]
        total += np.reshape(offsets_per_plane(volume.shape[axis]), shape)
    return unit + total / 3


def assert_float16_close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual.astype(np.float32), expected, rtol=0, atol=float(np.spacing(np.float16(40))))


def three_out_offsets(n: int) -> np.ndarray:
    """Plane q is predicted by the windows centred on q + 1 (its plane 0: +10), q (+20) and q - 1
    (+30), those inside the volume: the first plane gets (10 + 20) / 2, the last (20 + 30) / 2."""
    offsets = np.full(n, 20.0, np.float32)
    offsets[0], offsets[-1] = 15.0, 25.0
    return offsets


def test_each_output_plane_is_blended_at_its_own_plane(volume):
    """3 out on every axis with flips: each plane is the mean of the m (at the ends, fewer)
    windows predicting it, each contributing its own output plane."""
    logits = copy_predictor(3, tta="flips").logits(volume).array()
    assert_float16_close(logits, expected_copy(volume, three_out_offsets))


def test_one_out_predicts_each_plane_once(volume):
    logits = copy_predictor(1).logits(volume).array()
    assert_float16_close(logits, expected_copy(volume, lambda n: np.full(n, 20.0, np.float32)))


def test_reversed_slices_reverse_the_output_planes(volume):
    """The reversed view's planes come out reversed and are put back: plane j of that view is
    input plane 2 - j + OFFSETS[j], so after reversal each plane gets (10 + 30) / 2 or 20 from
    either view: 20 everywhere, ends included."""
    logits = copy_predictor(3, reverse_slices=True).logits(volume).array()
    assert_float16_close(logits, expected_copy(volume, lambda n: np.full(n, 20.0, np.float32)))


def test_blocks_of_a_three_out_model_equal_the_whole_volume(volume, tmp_path):
    """Boxes cutting the volume along every axis: the windows centred one plane outside a box
    are run too, so each box gets the whole volume's logits (within one float16 step), and
    ``infer_blocks`` writes the whole volume's mask."""
    from vessel_kit.blocks import infer_blocks

    ensemble = Ensemble([tiny_unet(3)], [1.0], in_chans=3, normalization=PERCENTILE, tile_size=None,
                        voxel_size_um=None, out_chans=3)
    options = dict(tta="none", reverse_slices=True, tile_size=16, overlap=0.5, min_plane_side=4)
    run = Predictor(ensemble, InferConfig(**options, progress=False))
    volume = volume[:, :22, :20]
    whole = run.logits(volume)
    windows = run.intensity_windows(volume)
    step = np.spacing(np.abs(whole.array()).astype(np.float16)).astype(np.float32)
    for region in [(slice(0, 3), slice(5, 22), slice(4, 11)), (slice(3, 7), slice(0, 9), slice(11, 20))]:
        blocked = run.logits(volume, region=region, intensity_windows=windows).array()
        assert np.all(np.abs(blocked.astype(np.float32) - whole.array()[region].astype(np.float32)) <= step[region])
    store = infer_blocks(volume, ensemble, tmp_path / "out.zarr", block=(4, 16, 16), chunks=(4, 8, 8), progress=False,
                         pyramid=False, **options)
    np.testing.assert_array_equal(store.mask[:], run.to_mask(whole).astype(np.uint8))


def test_a_module_with_undeclared_planes_is_refused(volume):
    module = ShiftedCopy(3)
    ensemble = Ensemble([module], [1.0], in_chans=3, normalization=UNIT, tile_size=None, voxel_size_um=None)
    with pytest.raises(ValueError, match="output 3 channels, but the ensemble says out_chans=1"):
        Predictor(ensemble, InferConfig(tta="none", axes=("xy",), progress=False)).logits(volume)


@pytest.mark.slow
def test_training_a_three_out_model_validates_through_the_predictor(tmp_path):
    """``train`` with model.out_chans 3: crops of 3 target slices, validation and the final
    every-axis calibration predict the validation volume through the Predictor (which reads
    out_chans from the EMA module), and the best checkpoint is a 3-out model."""
    from vessel_kit.synth import make_synthetic_dataset
    from vessel_kit.training import TrainConfig, train

    data_root = make_synthetic_dataset(tmp_path / "data", scale=0.3, progress=False)
    config = TrainConfig(
        data_root=str(data_root), out_dir=str(tmp_path / "run"), train_volumes=["kidney_1_dense"],
        val_volumes=["kidney_3_dense"], model={"encoder": "resnet18", "in_chans": 3, "out_chans": 3},
        crops={"crop_size": 32, "crops_per_epoch": 4, "augment": "light"}, batch_size=2, epochs=1,
        optim={"ema_decay": 0.9}, num_workers=0, loss=[{"name": "dice", "weight": 1.0}, {"name": "bce", "weight": 1.0}],
        progress=False,
    )
    result = train(config)
    assert 0.0 <= result.history[0]["val_surface_dice"] <= 1.0
    model, model_config = load_checkpoint(result.best_checkpoint)
    assert model_config.out_chans == 3 and model(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    assert config.to_dict()["model"]["out_chans"] == 3 and "out_chans" not in config.to_dict()["crops"]
