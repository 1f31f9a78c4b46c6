"""Model building, the architecture registry, the input-size rule, local encoder weights,
checkpoints, training state and EMA."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import vessel_kit
from vessel_kit import models
from vessel_kit.ema import ModelEMA
from vessel_kit.models import (
    ModelConfig,
    build_model,
    build_model_from_config,
    load_checkpoint,
    model_stride,
    read_checkpoint_metadata,
    register_architecture,
    save_checkpoint,
)
from vessel_kit.normalize import Normalization
from vessel_kit.training_state import load_training_state, save_training_state

torch.set_num_threads(2)


def _forward(model: nn.Module, batch: int, chans: int, side: int) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(batch, chans, side, side))


def _encoder_tensors_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.encoder.state_dict(), b.encoder.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def config() -> ModelConfig:
    return ModelConfig(
        arch="unet", encoder="resnet18", in_chans=3, normalization=Normalization("percentile", 5.0, 99.5),
        voxel_size_um=50.16, tile_size=64, model_kwargs={"decoder_channels": (64, 32, 16, 8, 8)},
    )


@pytest.fixture
def trained(config) -> nn.Module:
    """A model whose BatchNorm statistics moved away from their defaults."""
    model = build_model_from_config(config)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64) * 3 + 1)
    return model.eval()


# --- building --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["unet", "unetplusplus", "fpn"])
@pytest.mark.parametrize("in_chans", [1, 3, 5])
def test_each_arch_maps_to_one_logit_channel(arch, in_chans):
    model = build_model(arch, "resnet18", in_chans)
    assert isinstance(model, models.SMP_ARCHITECTURES[arch])
    assert model.encoder.conv1.in_channels == in_chans
    out = _forward(model, 2, in_chans, 64)
    assert out.shape == (2, 1, 64, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert model_stride(model) == 32


def test_arch_names_are_case_insensitive():
    assert isinstance(build_model("UnetPlusPlus", "resnet18"), smp.UnetPlusPlus)
    assert isinstance(build_model("FPN", "resnet18"), smp.FPN)


@pytest.mark.parametrize("encoder", ["tu-resnet10t", "tu-convnext_atto", "efficientnet-b0", "tu-efficientnet_b0"])
def test_timm_and_smp_encoders(encoder):
    model = build_model("unet", encoder, in_chans=1)
    assert _forward(model, 1, 1, 64).shape == (1, 1, 64, 64)
    assert model_stride(model) == 32


def test_stride_follows_encoder_depth():
    model = build_model("unet", "resnet18", encoder_depth=4, decoder_channels=(32, 16, 8, 8))
    assert model_stride(model) == 16
    assert _forward(model, 1, 1, 48).shape == (1, 1, 48, 48)


def test_fpn_rejects_sides_off_the_stride():
    with pytest.raises(RuntimeError, match="divisible by 32"):
        _forward(build_model("fpn", "resnet18"), 1, 1, 80)


def test_maxvit_needs_multiples_of_its_image_size():
    # maxvit_pico_rw_256 partitions every stage into 8x8 windows/grids: sides must be multiples of 8 * 32.
    model = build_model("unet", "tu-maxvit_pico_rw_256", in_chans=1)
    assert model_stride(model) == 256
    assert _forward(model, 1, 1, 256).shape == (1, 1, 256, 256)
    with pytest.raises(AssertionError, match="divisible"):
        _forward(model, 1, 1, 128)
    # img_size=64 shrinks the partitions to 2x2: multiples of 64 work, 96 (a multiple of 32) does not.
    small = build_model("fpn", "tu-maxvit_pico_rw_256", in_chans=3, img_size=64)
    assert model_stride(small) == 64
    assert _forward(small, 2, 3, 64).shape == (2, 1, 64, 64)
    with pytest.raises(AssertionError, match="divisible"):
        _forward(small, 1, 3, 96)
    assert model_stride(build_model("unet", "tu-maxvit_tiny_tf_224")) == 224


@pytest.mark.slow
def test_default_maxvit_base_runs_at_512():
    model = build_model()
    assert model_stride(model) == 512
    assert _forward(model, 1, 1, 512).shape == (1, 1, 512, 512)


def test_unknown_arch_and_encoder():
    with pytest.raises(ValueError, match=r"unknown architecture 'segnet'.*'dynunet', 'fpn', 'resunet', 'unet', 'unetplusplus'"):
        build_model("segnet", "resnet18")
    with pytest.raises(ValueError, match=r"unknown encoder 'resnet-18'.*'resnet18'.*list_encoders\(\)"):
        build_model("unet", "resnet-18")
    with pytest.raises(ValueError, match=r"'tu-maxvit_base_tf_512'"):
        build_model("unet", "tu-maxvit_base_tf512")
    assert "resnet18" in models.list_encoders() and "tu-maxvit_base_tf_512" in models.list_encoders()
    with pytest.raises(ValueError, match="set by vessel_kit"):
        build_model("unet", "resnet18", classes=2)
    with pytest.raises(ValueError, match="in_chans"):
        build_model("unet", "resnet18", in_chans=0)


@pytest.mark.parametrize("weights", ["imagenet", True, "ssl"])
def test_named_weights_are_refused_offline(weights):
    with pytest.raises(ValueError, match="never downloads"):
        build_model("unet", "resnet18", encoder_weights=weights)


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("unet", "resnet18", encoder_weights=tmp_path / "nope.pth")


# --- local encoder weights -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_encoder_weights_from_a_local_file(tmp_path, suffix):
    source = build_model("unet", "resnet18", in_chans=1)
    path = tmp_path / f"encoder{suffix}"
    state = source.encoder.state_dict()
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    loaded = build_model("fpn", "resnet18", in_chans=1, encoder_weights=path)
    assert _encoder_tensors_equal(source, loaded)
    assert not _encoder_tensors_equal(source, build_model("fpn", "resnet18", in_chans=1))


def test_encoder_weights_from_a_wrapped_full_model(tmp_path):
    source = build_model("unet", "tu-resnet10t", in_chans=1)
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    all_loaded_decoder_unused = r"loaded (\d+)/\1 encoder tensors; \d+ file tensors unused \(e\.g\. \['module\.decoder"
    with pytest.warns(UserWarning, match=all_loaded_decoder_unused):
        loaded = build_model("unet", "tu-resnet10t", in_chans=1, encoder_weights=path)
    assert _encoder_tensors_equal(source, loaded)


def test_timm_classifier_weights_adapt_the_stem(tmp_path):
    classifier = timm.create_model("resnet10t")  # 3-channel stem and a classification head
    path = tmp_path / "resnet10t.safetensors"
    save_file(classifier.state_dict(), path)
    with pytest.warns(UserWarning, match=r"loaded (\d+)/\1 encoder tensors; 2 file tensors unused .*'fc\.weight'"):
        model = build_model("unet", "tu-resnet10t", in_chans=1, encoder_weights=path)
    stem = model.encoder.model.conv1[0].weight
    assert stem.shape[1] == 1
    torch.testing.assert_close(stem, classifier.conv1[0].weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.encoder.model.layer4[0].conv2.weight, classifier.layer4[0].conv2.weight)


def test_unusable_weight_files(tmp_path):
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"head.weight": torch.zeros(2, 2)}, unrelated)
    with pytest.raises(ValueError, match="no tensor matches the encoder"):
        build_model("unet", "resnet18", encoder_weights=unrelated)
    state = build_model("unet", "resnet18").encoder.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    wrong_shape = tmp_path / "wrong.pt"
    torch.save(state, wrong_shape)
    with pytest.raises(ValueError, match=r"wrong shape.*layer1\.0\.conv1\.weight"):
        build_model("unet", "resnet18", encoder_weights=wrong_shape)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="cannot read weights"):
        build_model("unet", "resnet18", encoder_weights=garbage)


# --- config ----------------------------------------------------------------------------------


def test_config_round_trips_through_json(config):
    values = json.loads(json.dumps(config.to_dict()))
    assert ModelConfig.from_dict(values) == config
    assert config.model_kwargs == {"decoder_channels": [64, 32, 16, 8, 8]}
    assert ModelConfig.from_dict({}) == ModelConfig()


def test_config_errors(config):
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({**config.to_dict(), "lr": 1e-3})
    with pytest.raises(ValueError, match="unknown architecture"):
        ModelConfig(arch="segnet")
    with pytest.raises(ValueError, match="voxel_size_um"):
        ModelConfig(voxel_size_um=-1.0)
    with pytest.raises(ValueError, match="JSON"):
        ModelConfig(model_kwargs={"act": nn.ReLU})
    with pytest.raises(ValueError, match="tile_size 80 is not a multiple of 32"):
        build_model_from_config(ModelConfig(encoder="resnet18", tile_size=80))


# --- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path, config, trained):
    path = save_checkpoint(
        tmp_path / "best.safetensors", nn.DataParallel(trained), config,
        metrics={"surface_dice": np.float32(0.75), "epoch": 4}, extra={"volumes": ("kidney_1",)},
    )
    model, loaded_config = load_checkpoint(path)
    assert loaded_config == config
    assert not model.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    meta = read_checkpoint_metadata(path)
    assert meta["config"] == config
    assert meta["metrics"] == {"surface_dice": 0.75, "epoch": 4}
    assert meta["extra"] == {"volumes": ["kidney_1"]}
    assert meta["format_version"] == models.CHECKPOINT_FORMAT_VERSION
    assert meta["versions"]["vessel_kit"] == vessel_kit.__version__
    assert meta["versions"]["torch"] == torch.__version__


def test_bad_checkpoint_files(tmp_path, config, trained):
    good = save_checkpoint(tmp_path / "good.safetensors", trained, config)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    foreign = tmp_path / "foreign.safetensors"
    save_file(trained.state_dict(), foreign)
    for path, problem in [(truncated, "not a readable safetensors"), (garbage, "not a readable safetensors"),
                          (foreign, "not a vessel_kit checkpoint")]:
        with pytest.raises(ValueError, match=problem) as info:
            load_checkpoint(path)
        assert path.name in str(info.value)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        read_checkpoint_metadata(tmp_path / "missing.safetensors")


def test_weights_that_do_not_fit_the_config(tmp_path, config, trained):
    path = save_checkpoint(tmp_path / "m.safetensors", trained, ModelConfig(**{**vars(config), "encoder": "resnet34"}))
    with pytest.raises(ValueError, match=r"missing \(e\.g\. \['encoder\.layer1\.2\."):
        load_checkpoint(path)
    narrower = ModelConfig(**{**vars(config), "model_kwargs": {"decoder_channels": [32, 16, 8, 8, 8]}})
    path = save_checkpoint(tmp_path / "n.safetensors", trained, narrower)
    with pytest.raises(ValueError, match="wrong shapes"):
        load_checkpoint(path)


def test_interrupted_save_leaves_the_old_file(tmp_path, config, trained, monkeypatch):
    path = save_checkpoint(tmp_path / "last.safetensors", trained, config, metrics={"epoch": 1})

    def crash(model, filename, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, trained, config, metrics={"epoch": 2})
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "new.safetensors", trained, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]
    assert read_checkpoint_metadata(path)["metrics"] == {"epoch": 1}


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.decoder = nn.Linear(4, 4), nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def test_tied_tensors_are_stored_once(tmp_path, config, monkeypatch):
    tied = _Tied()
    path = save_checkpoint(tmp_path / "tied.safetensors", tied, config)
    monkeypatch.setattr(models, "build_model_from_config", lambda config: _Tied())
    model, _ = load_checkpoint(path)
    x = torch.randn(3, 4)
    assert torch.equal(model(x), tied(x))
    assert model.decoder.weight is model.encoder.weight


# --- EMA -------------------------------------------------------------------------------------


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))


def _set_params(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.randn_like(p) + value * (i + 1))


def test_ema_matches_the_hand_computed_average():
    model = _tiny()
    start = [p.detach().clone() for p in model.parameters()]
    ema = ModelEMA(model, decay=0.9, warmup_steps=0)
    _set_params(model, 1.0)
    first = [p.detach().clone() for p in model.parameters()]
    ema.update(model)
    _set_params(model, -2.0)
    model[1].running_mean.fill_(3.0)
    ema.update(model)
    for e, s, a, b in zip(ema.module.parameters(), start, first, model.parameters()):
        expected = 0.9 * (0.9 * s + 0.1 * a) + 0.1 * b
        torch.testing.assert_close(e, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(ema.module[1].running_mean, torch.full((4,), 3.0))
    assert ema.step == 2


def test_ema_warmup():
    model = _tiny()
    start = [p.detach().clone() for p in model.parameters()]
    ema = ModelEMA(model, decay=0.999, warmup_steps=10)
    assert ema.current_decay == pytest.approx(0.1)
    _set_params(model, 1.0)
    ema.update(model)
    for e, s, p in zip(ema.module.parameters(), start, model.parameters()):
        torch.testing.assert_close(e, 0.1 * s + 0.9 * p, rtol=1e-6, atol=1e-6)
    assert ema.current_decay == pytest.approx(2 / 11)
    ema.step = 100_000
    assert ema.current_decay == 0.999


def test_ema_module_is_a_frozen_eval_copy():
    model = _tiny().train()
    ema = ModelEMA(model)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    _set_params(model, 5.0)
    assert not torch.equal(ema.module[0].weight, model[0].weight)
    with pytest.raises(ValueError):
        ema.update(nn.Sequential(nn.Linear(3, 4)))


def test_ema_state_dict_round_trip():
    model = _tiny()
    ema = ModelEMA(model, decay=0.5)
    for value in (1.0, 2.0, 3.0):
        _set_params(model, value)
        ema.update(model)
    restored = ModelEMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.step == 3
    restored_state, state = restored.module.state_dict(), ema.module.state_dict()
    assert all(torch.equal(restored_state[k], state[k]) for k in state)


# --- training state --------------------------------------------------------------------------


def _training_objects():
    model = _tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=10)
    return model, optimizer, scheduler, ModelEMA(model, decay=0.9)


def test_training_state_round_trip(tmp_path):
    model, optimizer, scheduler, ema = _training_objects()
    for _ in range(3):
        loss = model(torch.randn(8, 3)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        ema.update(model)
    extra = {"best": {"score": 0.5, "epoch": 1}, "history": [{"loss": 1.0}], "rng": torch.get_rng_state()}
    path = save_training_state(tmp_path / "state.pt", model, optimizer, scheduler=scheduler, ema=ema,
                               epoch=1, step=3, extra=extra)
    model2, optimizer2, scheduler2, ema2 = _training_objects()
    state = load_training_state(path, model2, optimizer2, scheduler=scheduler2, ema=ema2)
    assert state["epoch"] == 1 and state["step"] == 3
    assert state["extra"]["best"] == extra["best"] and torch.equal(state["extra"]["rng"], extra["rng"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    for p, p2 in zip(model.parameters(), model2.parameters()):
        s, s2 = optimizer.state[p], optimizer2.state[p2]
        assert torch.equal(s["exp_avg"], s2["exp_avg"]) and torch.equal(s["step"], s2["step"])
    assert scheduler2.last_epoch == 3 and scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert ema2.step == 3 and torch.equal(ema2.module[0].weight, ema.module[0].weight)


def test_training_state_errors(tmp_path):
    model, optimizer, scheduler, _ = _training_objects()
    with pytest.raises(ValueError, match="float32"):
        save_training_state(tmp_path / "s.pt", model, optimizer, epoch=0, extra={"loss": np.float32(1.0)})
    assert not (tmp_path / "s.pt").exists()
    path = save_training_state(tmp_path / "s.pt", model, optimizer, epoch=0)
    with pytest.raises(ValueError, match="no scheduler state"):
        load_training_state(path, model, optimizer, scheduler=scheduler)
    with pytest.raises(FileNotFoundError):
        load_training_state(tmp_path / "missing.pt", model)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1024))
    with pytest.raises(ValueError, match="not a readable training state"):
        load_training_state(garbage, model)


# --- the architecture registry ---------------------------------------------------------------


class _PlaneNet(nn.Module):
    """A non-smp architecture: one conv, with an ``encoder`` so encoder weights can load."""

    def __init__(self, in_chans: int, width: int) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(in_chans, width, 3, padding=1)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


@pytest.fixture
def plane_net(monkeypatch):
    """``plane_net`` registered for this test only; its width comes from model_kwargs."""
    monkeypatch.setattr(models, "ARCHITECTURES", dict(models.ARCHITECTURES))
    checked = []

    def check(config: ModelConfig) -> None:
        checked.append(config.encoder)
        if config.encoder != "none":
            raise ValueError(f"plane_net has no encoder choice, got {config.encoder!r}")

    register_architecture("Plane_Net", lambda config: _PlaneNet(config.in_chans, **config.model_kwargs), check=check)
    return checked


def test_a_registered_architecture_builds_checks_and_round_trips(tmp_path, plane_net):
    config = ModelConfig(arch="plane_net", encoder="none", in_chans=3, tile_size=64, model_kwargs={"width": 4})
    assert plane_net == ["none"]  # checked when the config is made, not at build time
    model = build_model_from_config(config)
    assert isinstance(model, _PlaneNet) and model_stride(model) == models.DEFAULT_STRIDE
    assert _forward(model, 2, 3, 64).shape == (2, 1, 64, 64)
    path = save_checkpoint(tmp_path / "plane.safetensors", model, config)
    loaded, loaded_config = load_checkpoint(path)
    assert loaded_config == config and isinstance(loaded, _PlaneNet)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="plane_net has no encoder choice, got 'resnet18'"):
        ModelConfig(arch="plane_net", encoder="resnet18")
    # Encoder weights load into the module's encoder.
    weights = tmp_path / "encoder.pth"
    torch.save(_PlaneNet(3, 4).encoder.state_dict(), weights)
    assert build_model_from_config(config, encoder_weights=weights).encoder.weight.shape == (4, 3, 3, 3)


def test_registering_twice_needs_replace(plane_net):
    with pytest.raises(ValueError, match="'PLANE_NET' is registered already; pass replace=True"):
        register_architecture("PLANE_NET", lambda config: nn.Identity())
    register_architecture("plane_net", lambda config: "not a module", replace=True)
    with pytest.raises(TypeError, match="returned a str, not a module"):
        build_model("plane_net", "none")
    with pytest.raises(ValueError, match="must be callables"):
        register_architecture("other", "unet")


def test_a_checkpoint_of_an_unregistered_architecture_says_so(tmp_path, plane_net, monkeypatch):
    config = ModelConfig(arch="plane_net", encoder="none", tile_size=64, model_kwargs={"width": 2})
    path = save_checkpoint(tmp_path / "plane.safetensors", build_model_from_config(config), config)
    monkeypatch.delitem(models.ARCHITECTURES, "plane_net")
    with pytest.raises(ValueError, match="unknown architecture 'plane_net'.*register_architecture"):
        load_checkpoint(path)


@pytest.mark.parametrize("in_chans", [0, 2, 4, True, 3.0])
def test_in_chans_must_be_odd_wherever_a_model_is_made(in_chans):
    with pytest.raises(ValueError, match=r"in_chans must be odd \(1, 3, 5, ...\)"):
        ModelConfig(encoder="resnet18", in_chans=in_chans)
    with pytest.raises(ValueError, match="in_chans must be odd"):
        build_model("unet", "resnet18", in_chans=in_chans)


def test_a_checkpoint_with_even_in_chans_is_refused(tmp_path, config, trained):
    path = save_checkpoint(tmp_path / "m.safetensors", trained, config)
    header = read_checkpoint_metadata(path)
    header["config"] = {**header["config"].to_dict(), "in_chans": 2}
    tensors = {k: v.contiguous() for k, v in trained.state_dict().items()}
    save_file(tensors, str(path), metadata={"vessel_kit": json.dumps(header)})
    with pytest.raises(ValueError, match="bad vessel_kit checkpoint metadata: in_chans must be odd"):
        load_checkpoint(path)


def test_spatial_dims(tmp_path, config, trained):
    assert config.spatial_dims == 2 and config.to_dict()["spatial_dims"] == 2
    with pytest.raises(ValueError, match=r"spatial_dims must be one of \(2, 3\), got 4"):
        ModelConfig(encoder="resnet18", spatial_dims=4)
    with pytest.raises(ValueError, match="'unet' \\(segmentation_models_pytorch\\) is 2D"):
        ModelConfig(encoder="resnet18", spatial_dims=3)
    # A checkpoint written before spatial_dims existed loads as 2D.
    path = save_checkpoint(tmp_path / "old.safetensors", trained, config)
    header = read_checkpoint_metadata(path)
    old_config = header["config"].to_dict()
    del old_config["spatial_dims"]
    header["config"] = old_config
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path),
              metadata={"vessel_kit": json.dumps(header)})
    assert load_checkpoint(path)[1] == config

