"""torch.compile as an option: the compiled model agrees with eager, inference and training use
it when asked (checkpoints keep plain keys, EMA still averages), and missing pieces are named."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from safetensors import safe_open

from vessel_kit import cli, models
from vessel_kit.infer import infer_volume
from vessel_kit.infer_config import InferConfig
from vessel_kit.models import build_model, compile_model, load_checkpoint
from vessel_kit.normalize import Normalization

TINY = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}


def _backend(monkeypatch, name: str):
    monkeypatch.setattr(models, "COMPILE_BACKEND", name)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def aot_eager(monkeypatch):
    """compile_model traces with aot_eager: dynamo's and AOTAutograd's graphs, no C++ build."""
    yield from _backend(monkeypatch, "aot_eager")


@pytest.fixture
def dynamo_eager(monkeypatch):
    """compile_model captures graphs with dynamo and runs them eagerly (the cheapest compile)."""
    yield from _backend(monkeypatch, "eager")


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("unet", "resnet18", in_chans=3, **TINY).eval()


def test_compiled_model_matches_eager(aot_eager):
    model = _tiny_model()
    x = torch.randn(2, 3, 64, 64)
    compiled = compile_model(model, "cpu")
    assert models.unwrap_model(compiled) is model
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_inductor_on_the_cpu_matches_eager():
    """The real default backend (builds C++ kernels: ~tens of seconds on 2 cores)."""
    torch._dynamo.reset()
    model = _tiny_model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compile_model(model, "cpu")(x), model(x), rtol=1e-3, atol=1e-3)


def _spy(monkeypatch, module) -> list:
    """Record the models ``module.compile_model`` compiles (and compile them)."""
    compiled, real = [], module.compile_model
    monkeypatch.setattr(module, "compile_model", lambda model, device: compiled.append(model) or real(model, device))
    return compiled


def test_inference_with_compile_gives_the_eager_logits(aot_eager, monkeypatch):
    from vessel_kit import predictor

    compiled_models = _spy(monkeypatch, predictor)
    volume = np.random.default_rng(0).integers(0, 65535, (3, 40, 48), dtype=np.uint16)
    options = dict(in_chans=3, normalization=Normalization("zscore"), axes=("xy",), tta="none",
                   return_logits=True, progress=False)
    eager = infer_volume(volume, _tiny_model(), **options)
    assert not compiled_models
    compiled = infer_volume(volume, _tiny_model(), compile=True, **options)
    assert len(compiled_models) == 1
    np.testing.assert_allclose(compiled.astype(np.float32), eager.astype(np.float32), atol=2e-3)


def test_training_with_compile_keeps_plain_checkpoint_keys_and_ema(tmp_path, dynamo_eager, monkeypatch):
    from vessel_kit import training
    from vessel_kit.synth import make_synthetic_dataset
    from vessel_kit.synth.dataset import SYNTHETIC_VOLUMES
    from vessel_kit.training import TrainConfig, train

    first = [spec for spec in SYNTHETIC_VOLUMES if spec.name == "kidney_1_dense"]
    root = make_synthetic_dataset(tmp_path / "data", scale=0.2, volumes=first, progress=False)
    config = TrainConfig(
        data_root=str(root), out_dir=str(tmp_path / "run"), train_volumes=["kidney_1_dense"], val_volumes=[],
        model={"encoder": "resnet18", "in_chans": 3, "model_kwargs": TINY},
        crops={"crop_size": 32, "crops_per_epoch": 4, "augment": "none"}, batch_size=2, epochs=1,
        optim={"lr": 1e-3, "ema_decay": 0.5}, loss="dice", num_workers=0, progress=False, compile=True,
    )
    compiled_models = _spy(monkeypatch, training)
    result = train(config)
    assert len(compiled_models) == 1
    with safe_open(str(result.last_checkpoint), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and not any("_orig_mod" in key for key in keys)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert not any("_orig_mod" in key for key in state["model"])
    model, _ = load_checkpoint(result.last_checkpoint)  # the EMA weights, rebuilt strictly
    trained = {k: v for k, v in state["model"].items() if v.is_floating_point() and "running" not in k}
    ema = model.state_dict()
    assert any(not torch.equal(ema[k], v) for k, v in trained.items())  # an average, not a copy


def test_compile_option_is_checked_everywhere():
    assert InferConfig(compile=True).to_dict()["compile"] is True
    assert InferConfig().compile is False
    with pytest.raises(ValueError, match="inference option compile='yes': must be true or false"):
        InferConfig(compile="yes")
    parser = argparse.ArgumentParser()
    cli._add_infer_config_flags(parser)
    assert parser.parse_args(["--compile", "true"]).compile is True
    assert parser.parse_args([]).compile is None  # not given: the config's (off)


def test_missing_compile_pieces_are_named(monkeypatch):
    model = _tiny_model()
    monkeypatch.setattr(models.shutil, "which", lambda name: None)
    with pytest.raises(ImportError, match="needs a C\\+\\+ compiler"):
        compile_model(model, "cpu")
    monkeypatch.delattr(torch, "compile")
    with pytest.raises(ImportError, match="needs torch.compile"):
        compile_model(model, "cpu")
