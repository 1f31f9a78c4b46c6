"""GroupNorm/GELU (and other) decoder variants of the smp networks: the swapped layers, the
untouched encoder, checkpoint round trips and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vessel_kit.decoder_layers import DECODER_ACTIVATIONS, DECODER_NORMS, apply_decoder_variant
from vessel_kit.models import ModelConfig, build_model, build_model_from_config, load_checkpoint, save_checkpoint

SMALL = {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}


def _types(module: nn.Module) -> set[type]:
    return {type(m) for m in module.modules()}


@pytest.mark.parametrize("arch", ["unet", "unetplusplus", "fpn"])
def test_decoder_gets_group_norm_and_gelu_and_the_encoder_is_unchanged(arch):
    kwargs = {} if arch == "fpn" else SMALL
    torch.manual_seed(0)
    plain = build_model(arch, "resnet18", in_chans=3, **kwargs)
    torch.manual_seed(0)
    varied = build_model(arch, "resnet18", in_chans=3, decoder_norm="group", decoder_activation="gelu", **kwargs)
    decoder = _types(varied.decoder)
    assert nn.GroupNorm in decoder and nn.GELU in decoder
    assert nn.BatchNorm2d not in decoder
    # ReLU survives only where it does not follow a norm (the FPN has none left, the U-Nets too).
    assert nn.ReLU not in decoder
    assert _types(varied.encoder) == _types(plain.encoder)
    assert all(torch.equal(a, b) for a, b in zip(plain.encoder.state_dict().values(), varied.encoder.state_dict().values()))
    assert varied(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_group_count_divides_the_channels_and_attention_keeps_its_relu():
    model = build_model("unet", "resnet18", decoder_norm="group", decoder_attention_type="scse",
                        encoder_depth=3, decoder_channels=[48, 32, 16])
    groups = {(m.num_groups, m.num_channels) for m in model.decoder.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {(16, 48), (32, 32), (16, 16)}
    assert nn.ReLU in _types(model.decoder)  # inside scSE: not a conv-norm-activation block
    assert nn.BatchNorm2d not in _types(model.decoder)


@pytest.mark.parametrize("norm", sorted(DECODER_NORMS))
@pytest.mark.parametrize("activation", sorted(DECODER_ACTIVATIONS))
def test_every_variant_runs_and_round_trips_through_a_checkpoint(tmp_path, norm, activation):
    config = ModelConfig(arch="unet", encoder="resnet18", in_chans=1, tile_size=64,
                         model_kwargs={**SMALL, "decoder_norm": norm, "decoder_activation": activation})
    model = build_model_from_config(config).eval()
    with torch.no_grad():
        for parameter in model.decoder.parameters():  # away from the init so a mismatch would show
            parameter.add_(0.1 * torch.randn_like(parameter))
    x = torch.randn(2, 1, 64, 64)
    path = save_checkpoint(tmp_path / "m.safetensors", model, config)
    loaded, loaded_config = load_checkpoint(path)
    assert loaded_config == config
    assert _types(loaded.decoder) == _types(model.decoder)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_unknown_variants_name_the_valid_values():
    with pytest.raises(ValueError, match=r"decoder_norm='batchnorm' is unknown; valid: \['batch', 'group', 'instance', 'layer'\]"):
        ModelConfig(arch="unet", encoder="resnet18", model_kwargs={"decoder_norm": "batchnorm"})
    with pytest.raises(ValueError, match=r"decoder_activation='mish' is unknown; valid: \['gelu', 'relu', 'silu'\]"):
        ModelConfig(arch="unet", encoder="resnet18", model_kwargs={"decoder_activation": "mish"})
    with pytest.raises(ValueError, match="give one"):
        ModelConfig(arch="unet", encoder="resnet18", model_kwargs={"decoder_norm": "group", "decoder_use_norm": "batchnorm"})
    with pytest.raises(ValueError, match="no decoder module"):
        apply_decoder_variant(nn.Conv2d(1, 1, 3), norm="group")
