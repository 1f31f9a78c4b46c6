"""End-to-end training on a tiny synthetic dataset: loss goes down, checkpoints rebuild, resume
continues exactly where an interrupted run stopped (also a run started before configs had
sections), pseudo-labels feed training, YAML configs, registered architectures and optimisers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from vessel_kit import models
from vessel_kit import training as train_module
from vessel_kit.layout import find_volumes
from vessel_kit.models import load_checkpoint, register_architecture
from vessel_kit.pseudo import make_pseudo_labels
from vessel_kit.synth import make_synthetic_dataset
from vessel_kit.training import TrainConfig, _selection_score, train


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("train") / "data", scale=0.3, progress=False)


def tiny_config(data_root, out_dir, *, crops_per_epoch=16, **overrides) -> TrainConfig:
    options = dict(
        data_root=str(data_root), out_dir=str(out_dir), train_volumes=["kidney_1_dense"],
        val_volumes=["kidney_3_dense"],
        # three encoder stages: a tenth of the weights, so steps, checkpoints and states are quick
        model={"encoder": "resnet18", "in_chans": 3, "model_kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}},
        crops={"crop_size": 64, "crops_per_epoch": crops_per_epoch, "augment": "light"},
        batch_size=4, epochs=2, optim={"lr": 2e-3, "ema_decay": 0.9}, num_workers=0,
        loss=[{"name": "dice", "weight": 0.5}, {"name": "bce", "weight": 0.5}], progress=False,
    )
    options.update(overrides)
    return TrainConfig(**options)


def test_short_run_learns_and_writes_checkpoints(data_root, tmp_path):
    config = tiny_config(data_root, tmp_path / "run", epochs=4, crops_per_epoch=32)
    result = train(config)
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(0.0 <= r["val_surface_dice"] <= 1.0 for r in result.history)
    assert result.best_checkpoint.is_file() and result.last_checkpoint.is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model, model_config = load_checkpoint(result.best_checkpoint)
    assert (model_config.arch, model_config.encoder, model_config.in_chans) == ("unet", "resnet18", 3)
    assert model_config.voxel_size_um == 50.0 and model_config.tile_size == 64
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_resume_continues_where_it_stopped(data_root, tmp_path, interrupt_training_at):
    straight = train(tiny_config(data_root, tmp_path / "straight"))

    resume = interrupt_training_at(1)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data_root, tmp_path / "resumed"))
    resume()
    resumed = train(tiny_config(data_root, tmp_path / "resumed"))

    assert [r["epoch"] for r in resumed.history] == [0, 1]
    a, _ = load_checkpoint(straight.last_checkpoint)
    b, _ = load_checkpoint(resumed.last_checkpoint)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


@pytest.mark.slow  # ~36s on 2 cores; soft pseudo-label training runs by default in tests/test_winning_recipes.py
def test_pseudo_labels_train_an_unlabelled_volume(data_root, tmp_path):
    first = train(tiny_config(data_root, tmp_path / "teacher", epochs=1))
    test_volume = next(v for v in find_volumes(data_root, "test") if v.name == "kidney_5")
    soft_path = make_pseudo_labels([first.best_checkpoint], test_volume.read_images(progress=False), tmp_path / "k5.npy", progress=False)
    soft = np.load(soft_path)
    assert soft.dtype == np.uint8 and soft.shape == test_volume.shape and len(np.unique(soft)) > 2
    student = train(tiny_config(
        data_root, tmp_path / "student", epochs=1, train_volumes=["kidney_5"],
        soft_labels={"kidney_5": str(soft_path)},
    ))
    assert np.isfinite(student.history[0]["train_loss"])


def test_config_from_yaml_and_errors(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("data_root: /data\nepochs: 3\nmodel: {encoder: resnet18}\ncrops: {axes: {xy: 1.0}}\n")
    config = TrainConfig.from_yaml(path)
    assert (config.epochs, config.model.encoder, config.crops.axes) == (3, "resnet18", {"xy": 1.0})
    path.write_text("data_root: /data\nepoch: 3\n")
    with pytest.raises(ValueError, match="unknown training options \\['epoch'\\]"):
        TrainConfig.from_yaml(path)
    recipe = TrainConfig.from_dict({"recipe": "synthetic_cpu", "data_root": "/d", "epochs": 2})
    assert (recipe.model.encoder, recipe.model.in_chans, recipe.epochs) == ("mobilenet_v2", 3, 2)
    with pytest.raises(ValueError, match=r"unknown recipe 'fast'; recipes: \[.*'kaggle_2p5d', 'seed_2p5d', 'synthetic_cpu'\]"):
        TrainConfig.from_dict({"recipe": "fast", "data_root": "/d"})
    with pytest.raises(ValueError, match="in both train_volumes and val_volumes"):
        TrainConfig(data_root="/d", train_volumes=["a"], val_volumes=["a"])
    with pytest.raises(ValueError, match="crop_size must be a positive multiple of 32"):
        TrainConfig(data_root="/d", crops={"crop_size": 100})
    with pytest.raises(ValueError, match="normalization mode must be one of"):
        TrainConfig(data_root="/d", model={"normalization": {"mode": "minmax"}})


def test_validation_on_trained_images_is_refused(data_root, tmp_path):
    with pytest.raises(ValueError, match="'kidney_3_dense' shares .* image files with the training volumes"):
        train(tiny_config(data_root, tmp_path / "x", train_volumes=["kidney_3_sparse"]))


def test_unknown_volume_names_the_available_ones(data_root, tmp_path):
    with pytest.raises(ValueError, match="volumes \\['kidney_9'\\] are not in .*available: \\['kidney_1_dense'"):
        train(tiny_config(data_root, tmp_path / "x", train_volumes=["kidney_9"]))


def test_simulated_private_validation_and_calibrated_threshold(data_root, tmp_path, monkeypatch):
    from vessel_kit.models import read_checkpoint_metadata

    result = train(tiny_config(data_root, tmp_path / "run", epochs=1, val_voxel_sizes_um=[63.08],
                               calibration_component_sizes=[7]))
    record = result.history[0]
    coarse = record["val_surface_dice_kidney_3_dense@63.08um"]
    assert record["val_surface_dice"] == pytest.approx((record["val_surface_dice_kidney_3_dense"] + coarse) / 2)
    header = read_checkpoint_metadata(result.best_checkpoint)
    # The final threshold is calibrated on every axis, as inference predicts by default.
    assert header["threshold"] == header["metrics"]["val_threshold_3axes"]
    assert header["metrics"]["val_threshold"] == record["val_threshold"]
    assert header["min_component_size"] == 7  # chosen from the config's sizes, the only one given
    # A rerun of the finished run resumes with nothing to do: no second calibration pass.
    monkeypatch.setattr(train_module, "_calibrate_on_every_axis", lambda *args: pytest.fail("calibrated twice"))
    train(tiny_config(data_root, tmp_path / "run", epochs=1, val_voxel_sizes_um=[63.08], calibration_component_sizes=[7]))
    with pytest.raises(ValueError, match="val_voxel_sizes_um must be positive"):
        tiny_config(data_root, tmp_path / "bad", val_voxel_sizes_um=[0])


def test_epochs_before_val_from_epoch_are_not_validated_nor_best(data_root, tmp_path):
    result = train(tiny_config(data_root, tmp_path / "run", epochs=3, val_from_epoch=2, val_score_smoothing=0.5))
    assert ["val_surface_dice" in r for r in result.history] == [False, False, True]
    assert ["selection_score" in r for r in result.history] == [False, False, True]
    assert result.best_epoch == 2
    # the epochs before count as 0 in the smoothing: the least trained validated epoch is not spared it
    assert result.history[2]["selection_score"] == pytest.approx(0.5 * result.history[2]["val_surface_dice"])
    assert (tmp_path / "run" / "curves.png").is_file()
    # a recipe's val_from_epoch beyond a shortened run: its last epoch is still validated, and best
    short = train(tiny_config(data_root, tmp_path / "short", epochs=1, val_from_epoch=4))
    assert "val_surface_dice" in short.history[0] and short.best_epoch == 0


@pytest.mark.parametrize("option, match", [
    ({"epochs": "ten"}, "training option epochs must be int, got 'ten'"),
    ({"batch_size": 2.5}, "training option batch_size must be int"),
    ({"resume": "yes"}, "training option resume must be bool"),
    ({"val_threshold": True}, "training option val_threshold must be float | None"),
    ({"optim": {"lr": -1.0}}, "lr must be a finite number"),
    ({"optim": {"lr": float("nan")}}, "lr must be a finite number"),
    ({"optim": {"ema_decay": 1.5}}, "ema_decay must be in \\(0, 1\\)"),
    ({"num_workers": -1}, "num_workers must be >= 0"),
    ({"crops": {"rotate_p": 1.5}}, "rotate_p is a probability"),
    ({"crops": {"zoom_range": [1.2, 0.8]}}, "zoom_range must be \\(low, high\\)"),
    ({"crops": {"crop_size": "big"}}, "training option crops.crop_size must be int, got 'big'"),
    ({"optim": {"accumulate_steps": 2.0}}, "training option optim.accumulate_steps must be int"),
    ({"model": {"in_chans": 4}}, "in_chans must be odd"),
    ({"model": {"encoder": "resnet-18"}}, "unknown encoder 'resnet-18'"),
    ({"crops": {"crops_per_epoch": 8}}, "crops.crops_per_epoch \\(8\\) must hold at least one optimiser step"),
    ({"val_score_smoothing": 1.0}, "val_score_smoothing must be in \\[0, 1\\), got 1.0"),
    ({"val_score_smoothing": -0.1}, "val_score_smoothing must be in"),
    ({"calibration_tolerance": -0.01}, "calibration_tolerance must be a surface Dice difference in \\[0, 1\\), got -0.01"),
    ({"calibration_tolerance": float("inf")}, "calibration_tolerance must be"),
    ({"calibration_rule": "median"}, "calibration_rule must be one of \\['mean', 'case_median'\\], got 'median'"),
    ({"val_from_epoch": -1}, "val_from_epoch must be an epoch number >= 0, got -1"),
    ({"calibration_component_sizes": []}, "calibration_component_sizes must be a non-empty list of ints >= 0"),
    ({"calibration_component_sizes": [0, -10]}, "calibration_component_sizes must be a non-empty list of ints >= 0"),
    ({"calibration_component_sizes": [0, 1.5]}, "calibration_component_sizes must be a non-empty list of ints >= 0"),
    ({"calibration_component_sizes": "300"}, "training option calibration_component_sizes must be list\\[int\\], got '300'"),
    ({"val_from_epoch": True}, "training option val_from_epoch must be int"),
    ({"loss": [{"name": "dice"}]}, "training option loss: composite loss parts must be \\{name: ..., weight: ...\\}"),
    ({"loss": "dyce"}, "training option loss: unknown loss 'dyce'; valid losses: dice, "),
    ({"loss": {"name": "skeleton_recall", "iterations": 0}}, "training option loss: iterations must be an int >= 1"),
])
def test_bad_option_values_are_named(option, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(data_root="/d", **option)


def test_the_best_checkpoint_is_chosen_on_the_smoothed_score():
    """The demo-seed trajectory that kept a barely trained epoch: epoch 1 0.1618, the last
    0.1607. Unsmoothed, epoch 1 wins; smoothed with 0.5, the last epoch does."""
    scores = [0.0238, 0.1618, 0.1556, 0.1517, 0.1434, 0.1544, 0.1607]

    def best_epoch(smoothing):
        history = []
        for epoch, value in enumerate(scores):
            record = {"epoch": epoch, "val_surface_dice": value, "train_loss": 1.0}
            record["selection_score"] = _selection_score(record, history, smoothing)
            history.append(record)
        return max(history, key=lambda r: r["selection_score"])["epoch"], history

    assert best_epoch(0.0)[0] == 1
    epoch, history = best_epoch(0.5)
    assert epoch == 6 and history[1]["selection_score"] == pytest.approx(0.5 * 0.0238 + 0.5 * 0.1618)
    assert _selection_score({"train_loss": 0.25}, [], 0.5) == -0.25  # no validation: minus the training loss
    # the first validated epoch after unvalidated ones (val_from_epoch) is smoothed against 0: the
    # fold whose epochs 4-7 scored 0.195, 0.146, 0.127, 0.139 keeps its last epoch, not its least trained
    history = [{"epoch": epoch, "train_loss": 1.0} for epoch in range(4)]
    for epoch, value in zip(range(4, 8), (0.195, 0.146, 0.127, 0.139), strict=True):
        record = {"epoch": epoch, "val_surface_dice": value, "train_loss": 1.0}
        record["selection_score"] = _selection_score(record, history, 0.5)
        history.append(record)
    assert max(history[4:], key=lambda r: r["selection_score"])["epoch"] == 7


class _TinyNet(nn.Module):
    """A registered non-smp architecture: a few convolutions."""

    def __init__(self, in_chans: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_registered_architecture_and_optimiser_train_from_a_config(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "ARCHITECTURES", dict(models.ARCHITECTURES))
    register_architecture("tiny_net", lambda config: _TinyNet(config.in_chans, **config.model_kwargs))
    config = TrainConfig.from_dict({
        **tiny_config(data_root, tmp_path / "run", epochs=1).to_dict(),
        "model": {"arch": "tiny_net", "encoder": "none", "in_chans": 3, "model_kwargs": {"width": 4}},
        "optim": {"optimizer": "sgd", "lr": 1e-2, "scheduler": "cosine", "scheduler_kwargs": {"eta_min": 1e-4},
                  "ema_decay": None},
    })
    result = train(config)
    assert result.history[0]["lr"] == pytest.approx(1e-4)  # the cosine schedule ran to its end
    model, model_config = load_checkpoint(result.best_checkpoint)
    assert isinstance(model, _TinyNet) and model_config.model_kwargs == {"width": 4}
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["arch"] == "tiny_net"


def test_a_run_with_a_flat_config_yaml_resumes(tmp_path):
    """A run folder written before configs had sections still resumes with the same options."""
    config = TrainConfig.from_dict({"base": "synthetic_cpu", "data_root": "/d", "out_dir": str(tmp_path)})
    flat = {key: value for key, value in config.to_dict().items() if key not in ("model", "crops", "optim")}
    for section in ("model", "crops", "optim"):
        flat.update(config.to_dict()[section])
    for new in ("spatial_dims", "max_foreground_points", "optimizer", "optimizer_kwargs", "scheduler", "scheduler_kwargs",
                "cutmix_p", "scale", "out_chans"):
        del flat[new]  # options the older version did not have
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(flat))
    (tmp_path / "state.pt").write_bytes(b"x")
    canonical = train_module.canonical_config
    assert train_module.claim_run_dir(tmp_path, config.to_dict(), canonical=canonical) == "resume"
    other = TrainConfig.from_dict({**config.to_dict(), "crops": {**config.to_dict()["crops"], "crop_size": 64}})
    with pytest.raises(ValueError, match=r"another config \(crops.crop_size: 96 -> 64\)"):
        train_module.claim_run_dir(tmp_path, other.to_dict(), canonical=canonical)



def _smoke_train(recipe: str, data_root, out_dir, **overrides) -> tuple[TrainConfig, object]:
    """A recipe trained for one step on the synthetic data, random weights, no validation."""
    config = TrainConfig.from_dict({
        "base": recipe, "data_root": str(data_root), "out_dir": str(out_dir), "train_volumes": ["kidney_1_dense"],
        "val_volumes": [], "epochs": 1, "batch_size": 2, "num_workers": 0, "progress": False, **overrides,
    })
    return config, train(config)


def _smoke_infer(config: TrainConfig, checkpoint, images, **overrides) -> np.ndarray:
    """The mask of ``images`` with the recipe's inference options (as the checkpoint carries them)."""
    from vessel_kit.infer import infer_volume
    from vessel_kit.infer_config import InferConfig
    from vessel_kit.models import read_checkpoint_metadata

    carried = read_checkpoint_metadata(checkpoint)["extra"]["infer"]
    assert carried == config.infer
    options = InferConfig.from_dict({**carried, "tta": "none", "progress": False, **overrides})
    return infer_volume(images, checkpoint, options)


_TINY_PATCHES = {"patch_size": [16, 32, 32], "patches_per_epoch": 2}


def test_recipe_2nd_place_3d_smoke_trains_and_predicts(data_root, tmp_path):
    from vessel_kit.synth import make_synthetic_volume

    config, result = _smoke_train("2nd_place_3d", data_root, tmp_path / "run", patches=_TINY_PATCHES,
                                  model={"model_kwargs": {"channels": [4, 8, 16], "strides": [2, 2]}})
    assert config.target_voxel_size_um == 63.08 and config.infer["top_fraction"] == 0.002
    images, _ = make_synthetic_volume((16, 48, 48), seed=4, voxel_size_um=63.08)
    mask = _smoke_infer(config, result.best_checkpoint, images, tile_size=[16, 32, 32])
    assert mask.shape == images.shape and mask.sum() <= round(0.002 * mask.size) + 1


def test_recipe_4th_place_2d_and_3d_smoke_train_and_predict_a_hull_gated_ensemble(data_root, tmp_path):
    from vessel_kit.hull import HullGate
    from vessel_kit.infer import infer_volume
    from vessel_kit.infer_config import InferConfig
    from vessel_kit.postprocess import hull_gate
    from vessel_kit.submit import carried_infer_config
    from vessel_kit.synth import make_synthetic_volume

    config_2d, result_2d = _smoke_train("4th_place_2d", data_root, tmp_path / "2d",
                                        crops={"crop_size": 32, "crops_per_epoch": 2})
    config_3d, result_3d = _smoke_train(
        "4th_place_3d", data_root, tmp_path / "3d", patches=_TINY_PATCHES,
        model={"model_kwargs": {"filters": [4, 8, 16], "strides": [1, 2, 2], "kernel_size": [3, 3, 3],
                                "upsample_kernel_size": [2, 2]}},
    )
    assert config_2d.crops.cutmix_p > 0 and config_2d.model.model_kwargs == {"decoder_attention_type": "scse"}
    pair = [result_2d.best_checkpoint, result_3d.best_checkpoint]
    carried = carried_infer_config(pair, log=lambda _: None)
    assert carried.threshold == 0.05 and carried.hull_gate == HullGate(10, "convex", "sum", 0.5)  # the pair agrees
    assert carried_infer_config(pair[:1], log=lambda _: None).hull_gate is None  # dropped for a lone member
    images, _ = make_synthetic_volume((16, 48, 48), seed=4)
    mask_2d = _smoke_infer(config_2d, result_2d.best_checkpoint, images, axes=["xy"], hull_gate=None)
    mask_3d = _smoke_infer(config_3d, result_3d.best_checkpoint, images, hull_gate=None)
    # a random 3D model at threshold 0.05 marks most voxels: gate with a threshold that leaves some out
    removed = []
    for rule in ({"threshold": 0.05}, {"top_fraction": 0.02}):  # random 2D weights mark ~all voxels at 0.05
        options = InferConfig.from_dict({**carried.to_dict(), "axes": ["xy"], "tta": "none", "progress": False,
                                         **rule, "hull_gate": 1})
        gated = infer_volume(images, pair, options)
        single = InferConfig(axes=("xy",), tta="none", progress=False, **rule)
        alone_3d = infer_volume(images, pair[1], single)
        np.testing.assert_array_equal(gated, hull_gate(alone_3d, infer_volume(images, pair[0], single), 1))
        removed.append(int(alone_3d.sum() - gated.sum()))
    assert max(removed) > 0  # the gate did remove 3D voxels far from the 2D mask
    assert mask_2d.shape == mask_3d.shape == images.shape
