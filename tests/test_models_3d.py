"""3D networks (MONAI) through the model factory: building, stride, checkpoints, bad options, a
3D checkpoint predicted end to end, and the bundle's MONAI wheel."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vessel_kit.bundle import _describe_checkpoint, _read_pins, requirement_files
from vessel_kit.infer_config import InferConfig
from vessel_kit.models import (
    ModelConfig,
    build_model,
    build_model_from_config,
    load_checkpoint,
    model_stride,
    read_checkpoint_metadata,
    save_checkpoint,
)
from vessel_kit.normalize import Normalization
from vessel_kit.predictor import Predictor

torch.set_num_threads(1)
UNIT = Normalization("unit")
TINY = {
    "dynunet": {"filters": [4, 8, 16], "strides": [1, 2, 2]},
    "resunet": {"channels": [4, 8, 16], "num_res_units": 1},
}


def tiny_config(arch: str, **changes) -> ModelConfig:
    values = {"arch": arch, "spatial_dims": 3, "tile_size": (8, 16, 16), "normalization": UNIT,
              "voxel_size_um": 50.0, "model_kwargs": TINY[arch]}
    return ModelConfig(**{**values, **changes})


@pytest.mark.parametrize("arch", ["dynunet", "resunet"])
def test_3d_networks_are_built_by_the_factory_with_their_stride(arch):
    model = build_model_from_config(tiny_config(arch)).eval()
    assert model_stride(model) == 4  # two 2x downsamplings
    with torch.no_grad():
        assert model(torch.rand(2, 1, 8, 12, 16)).shape == (2, 1, 8, 12, 16)
    assert model_stride(build_model(arch, in_chans=1, spatial_dims=3)) == 16  # the defaults: four levels


@pytest.mark.parametrize("arch", ["dynunet", "resunet"])
def test_a_3d_checkpoint_round_trips_with_its_patch_size(tmp_path, arch):
    torch.manual_seed(0)
    config = tiny_config(arch)
    model = build_model_from_config(config).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, config, threshold=0.4)
    header = read_checkpoint_metadata(path)
    assert header["config"] == config and header["config"].tile_size == (8, 16, 16)
    assert header["config"].spatial_dims == 3
    loaded, loaded_config = load_checkpoint(path)
    x = torch.rand(1, 1, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert loaded_config == config


def test_a_channels_last_model_is_saved_and_stays_channels_last(tmp_path):
    """Training runs models channels last (``models.memory_format``); a checkpoint of one loads
    with the same outputs, and saving leaves the model's own layout alone."""
    torch.manual_seed(0)
    config = tiny_config("dynunet")
    model = build_model_from_config(config).eval().to(memory_format=torch.channels_last_3d)
    assert not all(p.is_contiguous() for p in model.parameters())
    path = save_checkpoint(tmp_path / "m.safetensors", model, config)
    assert not all(p.is_contiguous() for p in model.parameters())
    loaded, _ = load_checkpoint(path)
    x = torch.rand(1, 1, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ModelConfig(arch="unet", encoder="resnet18", spatial_dims=3), r"'unet' \(segmentation_models_pytorch\) is 2D.*set spatial_dims=2, or pick a 3D architecture"),
        (lambda: tiny_config("dynunet", spatial_dims=2, tile_size=16), r"'dynunet' \(MONAI\) is 3D: set spatial_dims=3"),
        (lambda: tiny_config("resunet", in_chans=3), "set in_chans=1"),
        (lambda: tiny_config("dynunet", model_kwargs={"deep_supervision": True}), r"model kwargs \['deep_supervision'\] are set by vessel_kit"),
        (lambda: tiny_config("resunet", model_kwargs={"chanels": [4, 8]}), r"\['chanels'\] are not options of MONAI's UNet"),
        (lambda: build_model_from_config(tiny_config("dynunet", model_kwargs={"strides": [1, 2], "kernel_size": [3]})),
         "do not build MONAI's DynUNet"),
        (lambda: tiny_config("dynunet", tile_size=(8, 16)), r"tile_size \(8, 16\) needs one side per spatial dimension \(3\)"),
        (lambda: build_model_from_config(tiny_config("dynunet", tile_size=(8, 16, 18))),
         r"tile_size \(8, 16, 18\) is not a multiple of 4, the input multiple of dynunet: make every side a multiple of 4"),
    ],
)
def test_bad_3d_model_options_name_the_option(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_3d_model_without_monai_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai.networks", None)  # what an uninstalled package looks like
    with pytest.raises(ImportError, match=r"3D models need MONAI: pip install vessel_kit\[3d\]"):
        tiny_config("dynunet")


def test_a_3d_checkpoint_predicts_a_volume_in_patches(tmp_path):
    torch.manual_seed(0)
    config = tiny_config("dynunet")
    path = save_checkpoint(tmp_path / "m.safetensors", build_model_from_config(config), config, threshold=0.5)
    volume = np.random.default_rng(0).integers(0, 65535, (10, 20, 24), dtype=np.uint16)
    predictor = Predictor(path, InferConfig(tta="none", progress=False))
    assert predictor.ensemble.spatial_dims == 3 and predictor.ensemble.tile_size == (8, 16, 16)
    logits = predictor.logits(volume, voxel_size_um=50.0).array()
    assert logits.shape == volume.shape and np.isfinite(logits).all()
    # A patch larger than the volume is padded: the whole volume is one window.
    bigger = Predictor(path, InferConfig(tta="none", progress=False, tile_size=32)).logits(volume).array()
    assert bigger.shape == volume.shape and np.isfinite(bigger).all()
    with pytest.raises(ValueError, match=r"multiple of the models' stride 4, got \(8, 12, 10\): use sides such as 4 or 8"):
        Predictor(path, InferConfig(tile_size=(8, 12, 10)))


def test_the_bundle_adds_monai_only_for_3d_checkpoints(tmp_path):
    wheels = Path(__file__).resolve().parents[1] / "wheels"
    base, extra = wheels / "requirements-kaggle.txt", wheels / "requirements-kaggle-3d.txt"
    config_3d = tiny_config("resunet")
    path_3d = save_checkpoint(tmp_path / "a.safetensors", build_model_from_config(config_3d), config_3d)
    config_2d = ModelConfig(arch="unet", encoder="resnet18", tile_size=64)
    path_2d = save_checkpoint(tmp_path / "b.safetensors", build_model_from_config(config_2d), config_2d)
    dims = {name: _describe_checkpoint(path)["spatial_dims"] for name, path in (("3d", path_3d), ("2d", path_2d))}
    assert dims == {"3d": 3, "2d": 2}

    def pins(spatial_dims):
        return [name for file in requirement_files(base, extra, spatial_dims) for name, _ in _read_pins(file)]

    assert "monai" not in pins([dims["2d"]])
    assert pins([dims["2d"], dims["3d"]]) == [*pins([dims["2d"]]), "monai"]
    with pytest.raises(ValueError, match="a 3D checkpoint needs the MONAI wheel"):
        requirement_files(base, None, [3])
