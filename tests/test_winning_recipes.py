"""The 2.5D winners as recipes (1st, 3rd, 5th place, the seed baseline): each smoke-trains and
predicts with its own inference settings; multi-member runs (members.py) train in turn, resume
at the member and epoch where they stopped, and make pseudo-labels as a step; bad recipes,
members and encoders are ValueErrors naming them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from vessel_kit.recipes import load_recipe
from vessel_kit.synth import make_synthetic_dataset, make_synthetic_volume
from vessel_kit.train_config import TrainConfig
from vessel_kit.training import train

from test_training import _smoke_infer, _smoke_train

TINY = "resnet18"  # stands in for the members' real encoders where those are too slow on 2 CPU cores


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("winners") / "data", scale=0.3, progress=False)


@pytest.fixture
def aot_eager(monkeypatch):
    """compile_model traces with aot_eager (no C++ build), as tests/test_compile.py does."""
    from vessel_kit import models

    monkeypatch.setattr(models, "COMPILE_BACKEND", "aot_eager")


def _tiny_members(recipe: str, *, reduced: bool = False) -> list[dict]:
    """The recipe's members with the tiny encoder, one step of 2 crops each, and the pseudo steps
    along xy only; everything else (names, order, archs, volumes, pseudo kind) as the recipe says.
    ``reduced``: only the first teacher, the pseudo step (reading from it) and the first student."""
    members = []
    for entry in load_recipe(recipe)["members"]:
        entry = dict(entry)
        if "pseudo" in entry:
            entry["pseudo"] = {**entry["pseudo"], "axes": ["xy"], "tta": "none"}
        else:
            entry.update(model={**entry.get("model", {}), "encoder": TINY}, batch_size=2, epochs=1)
            entry.pop("optim", None)
        members.append(entry)
    if reduced:
        split = next(i for i, entry in enumerate(members) if "pseudo" in entry)
        teacher, pseudo, student = members[0], members[split], members[split + 1]
        members = [teacher, {**pseudo, "pseudo": {**pseudo["pseudo"], "from": [teacher["name"]]}}, student]
    return members


_TINY_CROPS = {"crop_size": 32, "crops_per_epoch": 2}


@pytest.fixture(scope="module")
def first_place_run(data_root, tmp_path_factory):
    """1st_place smoke-trained: the real ConvNeXt-tiny with the GroupNorm/GELU decoder, one step
    on 64 px crops of the 1.5x-upscaled planes."""
    run_dir = tmp_path_factory.mktemp("first") / "run"
    yield _smoke_train("1st_place", data_root, run_dir,
                       crops={"crop_size": 64, "crops_per_epoch": 2}, optim={"accumulate_steps": 1})
    shutil.rmtree(run_dir)  # ~0.75 GB of ConvNeXt checkpoints and state: not kept to the end of the run


def _predict_carried(checkpoint, images, **overrides) -> np.ndarray:
    """``images`` (at 50 µm) predicted with the inference options the checkpoint carries."""
    from vessel_kit.infer import infer_volume
    from vessel_kit.infer_config import InferConfig
    from vessel_kit.models import read_checkpoint_metadata

    carried = read_checkpoint_metadata(checkpoint)["extra"]["infer"]
    options = InferConfig.from_dict({**carried, "tile_size": 32, "batch_size": 16, "progress": False, **overrides})
    return infer_volume(images, checkpoint, options, voxel_size_um=50.0)


def test_1st_place_smoke_trains_and_predicts_with_its_8_views_and_reversed_slices(first_place_run):
    """Predicted along xy with the carried d4 x reversed slices, uncompiled (3 axes and compile:
    the slow test below)."""
    import torch

    from vessel_kit.models import load_checkpoint, read_checkpoint_metadata

    config, result = first_place_run
    assert config.model.encoder == "tu-convnext_tiny" and config.model.normalization == {"mode": "unit"}
    assert config.crops.scale == 1.5 and (config.crops.rotate_p, config.crops.rotate_max_deg) == (0.3, 30.0)
    assert [part["name"] for part in config.loss] == ["focal", "dice", "boundary", "surface_dice"]
    model, model_config = load_checkpoint(result.best_checkpoint)
    assert model_config.voxel_size_um == pytest.approx(50.0 / 1.5)  # inference resamples 50 µm volumes 1.5x
    assert (model_config.in_chans, model_config.out_chans) == (3, 3)  # 3 slices in, 3 out
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.decoder.modules())
    assert any(isinstance(m, torch.nn.GELU) for m in model.decoder.modules())
    carried = read_checkpoint_metadata(result.best_checkpoint)["extra"]["infer"]
    assert carried == config.infer == {"axes": ["xy", "xz", "yz"], "tta": "d4", "reverse_slices": True,
                                       "threshold": 0.4, "compile": True, "overlap": 0.25}
    images, _ = make_synthetic_volume((8, 16, 16), seed=4)
    mask = _predict_carried(result.best_checkpoint, images, axes=["xy"], compile=False)
    assert mask.shape == images.shape and mask.dtype == bool


@pytest.mark.slow
def test_1st_place_predicts_with_all_its_inference_settings_compiled(first_place_run, aot_eager):
    """3 axes x 8 views x reversed slices, compiled (aot_eager: no C++ build); ~50 s on 2 cores."""
    _, result = first_place_run
    images, _ = make_synthetic_volume((12, 24, 24), seed=4)  # 18 x 36 x 36 at the model's voxel size
    with pytest.warns(UserWarning, match="no calibrated threshold"):
        mask = _predict_carried(result.best_checkpoint, images)
    assert mask.shape == images.shape


@pytest.mark.slow  # ~18s on 2 cores; the other recipes' smoke tests run by default
def test_seed_2p5d_smoke_trains_and_predicts_along_xy(data_root, tmp_path):
    """The real ResNeXt101-32x8d U-Net on 5 slices, one step on 32 px crops."""
    config, result = _smoke_train("seed_2p5d", data_root, tmp_path / "run", crops=_TINY_CROPS)
    assert (config.model.encoder, config.model.in_chans, config.loss) == ("resnext101_32x8d", 5, "dice")
    assert dict(config.crops.axes) == {"xy": 1.0} and config.optim.lr == 6e-5 and config.optim.ema_decay is None
    images, _ = make_synthetic_volume((8, 32, 32), seed=4)
    mask = _smoke_infer(config, result.best_checkpoint, images)
    assert mask.shape == images.shape


def test_5th_place_smoke_trains_a_teacher_soft_labels_and_a_student_then_predicts(data_root, tmp_path):
    """The 5th-place pipeline cut to one teacher, its soft labels and one student, with the tiny
    encoder standing in for MaxViT-base (slow on the CPU; the real encoders are checked to exist;
    the whole pipeline: the slow test below)."""
    from vessel_kit.models import read_checkpoint_metadata

    config, result = _smoke_train("5th_place", data_root, tmp_path / "run", crops=_TINY_CROPS,
                                  optim={"accumulate_steps": 1}, members=_tiny_members("5th_place", reduced=True))
    assert config.model.normalization == {"mode": "zscore"} and config.loss == "5th_place"
    assert list(result.members) == ["maxvit_base_teacher", "maxvit_base"]
    soft = result.pseudo_labels["soft_labels"]["kidney_3_sparse"]
    assert soft == tmp_path / "run" / "soft_labels" / "kidney_3_sparse.npy"
    values = np.load(soft)
    assert values.dtype == np.uint8 and len(np.unique(values)) > 2  # soft, never hardened
    assert result.checkpoints == [tmp_path / "run" / "maxvit_base" / "best.safetensors"]
    student = TrainConfig.from_yaml(tmp_path / "run" / "maxvit_base" / "config.yaml")
    assert student.soft_labels == {"kidney_3_sparse": str(soft)} and "kidney_3_sparse" in student.train_volumes
    carried = read_checkpoint_metadata(result.checkpoints[0])["extra"]["infer"]
    assert carried["threshold"] == 0.025 and carried["tta"] == "none" and carried["model_voxel_size_um"] == 50.0
    _predict_5th(result.checkpoints, carried)


def _predict_5th(checkpoints, carried) -> None:
    """A 63 µm volume predicted (resized to 50 µm inside) by the ensemble with its carried options."""
    from vessel_kit.infer import infer_volume
    from vessel_kit.infer_config import InferConfig

    images, _ = make_synthetic_volume((8, 32, 32), seed=4)
    mask = infer_volume(images, checkpoints, InferConfig.from_dict({**carried, "axes": ["xy"], "progress": False}),
                        voxel_size_um=63.08)
    assert mask.shape == images.shape


@pytest.mark.slow
def test_5th_place_whole_pipeline_smoke_trains_and_predicts_the_ensemble(data_root, tmp_path):
    """All seven steps with the tiny encoder (~35 s on 2 cores)."""
    from vessel_kit.models import list_encoders, read_checkpoint_metadata

    recipe = load_recipe("5th_place")
    assert {m["model"]["encoder"] for m in recipe["members"] if "model" in m} <= set(list_encoders())
    _, result = _smoke_train("5th_place", data_root, tmp_path / "run", crops=_TINY_CROPS,
                             optim={"accumulate_steps": 1}, members=_tiny_members("5th_place"))
    assert list(result.members) == ["maxvit_base_teacher", "effv2m_teacher", "dpn68_teacher",
                                    "maxvit_base", "effv2m", "dpn68"]
    assert result.checkpoints == [tmp_path / "run" / name / "best.safetensors" for name in ("maxvit_base", "effv2m", "dpn68")]
    _predict_5th(result.checkpoints, read_checkpoint_metadata(result.checkpoints[0])["extra"]["infer"])


def _check_densified(data_root, files: dict, coverages: dict) -> None:
    """Every annotated voxel kept, 0/255 only, and the vessel count the stated coverage gives."""
    from vessel_kit.layout import named_volumes

    for volume, coverage in coverages.items():
        dense = np.load(files[volume])
        sparse = named_volumes(data_root, [volume])[0].read_labels(progress=False)
        assert set(np.unique(dense)) <= {0, 255} and (dense[sparse] == 255).all()
        assert (dense == 255).sum() == round(sparse.sum() / coverage)


def test_3rd_place_smoke_trains_a_teacher_densifies_sparse_labels_and_trains_a_student(data_root, tmp_path):
    """The 3rd-place pipeline cut to one teacher, the densify step and one student, with the tiny
    encoder standing in for MaxViT-large and EfficientNetV2-S (slow on the CPU; the whole
    pipeline: the slow test below)."""
    config, result = _smoke_train("3rd_place", data_root, tmp_path / "run", crops=_TINY_CROPS,
                                  members=_tiny_members("3rd_place", reduced=True))
    assert config.model.normalization == {"mode": "clip_zscore", "low": 0.1, "high": 99.9}
    assert config.crops.zoom_range == (0.55, 1.05) and config.infer["threshold"] == 0.2 and config.loss == "dice"
    assert [p.parent.name for p in result.checkpoints] == ["effv2s"]
    _check_densified(data_root, result.pseudo_labels["densify"], {"kidney_2": 0.65, "kidney_3_sparse": 0.85})
    images, _ = make_synthetic_volume((8, 32, 32), seed=4)
    mask = _smoke_infer(config, result.checkpoints[0], images, axes=["xy"])
    assert mask.shape == images.shape


@pytest.mark.slow
def test_3rd_place_whole_pipeline_smoke_trains_and_predicts_the_students(data_root, tmp_path):
    """All seven steps with the tiny encoder (~35 s on 2 cores); the U-Net++ member keeps its arch."""
    config, result = _smoke_train("3rd_place", data_root, tmp_path / "run", crops=_TINY_CROPS,
                                  members=_tiny_members("3rd_place"))
    assert [p.parent.name for p in result.checkpoints] == ["effv2s", "effv2l_unetpp", "seresnext101", "maxvit_large"]
    _check_densified(data_root, result.pseudo_labels["densify"], {"kidney_2": 0.65, "kidney_3_sparse": 0.85})
    images, _ = make_synthetic_volume((8, 32, 32), seed=4)
    mask = _smoke_infer(config, result.checkpoints[1], images, axes=["xy"])
    assert mask.shape == images.shape


def test_hard_augmentation_of_z_scored_crops_stays_finite(data_root):
    """The "hard" set's gamma is NaN on negative values: z-scored crops (3rd/5th place) skip it."""
    from vessel_kit.data import CropConfig, CropDataset
    from vessel_kit.layout import load_train_volumes
    from vessel_kit.normalize import Normalization

    volumes = load_train_volumes(data_root, ["kidney_1_dense"], progress=False)
    for mode in ("zscore", "clip_zscore"):
        dataset = CropDataset(volumes, CropConfig(crop_size=32, crops_per_epoch=24, augment="hard"), Normalization(mode))
        images = np.stack([dataset[i]["image"].numpy() for i in range(len(dataset))])
        assert np.isfinite(images).all() and images.min() < 0  # negative values reached the pipeline


def _two_members(data_root, out_dir, **overrides) -> TrainConfig:
    return TrainConfig.from_dict({
        "data_root": str(data_root), "out_dir": str(out_dir), "train_volumes": ["kidney_1_dense"], "val_volumes": [],
        "model": {"encoder": TINY}, "crops": _TINY_CROPS, "batch_size": 2, "num_workers": 0, "progress": False,
        "loss": "dice", "members": [{"name": "a", "epochs": 1}, {"name": "b", "epochs": 2}], **overrides,
    })


def test_an_interrupted_multi_member_run_resumes_at_the_member_and_epoch_where_it_stopped(
        data_root, tmp_path, interrupt_training_at, monkeypatch):
    import vessel_kit.members as members_module
    from vessel_kit.bundle import collect_checkpoints

    config = _two_members(data_root, tmp_path / "run")
    resume = interrupt_training_at(1)  # member a has one epoch (0); member b stops at its second
    with pytest.raises(KeyboardInterrupt):
        train(config)
    run = tmp_path / "run"
    manifest = json.loads((run / "members.json").read_text())
    assert list(manifest["members"]) == ["a"] and manifest["checkpoints"] == []
    with pytest.raises(ValueError, match="has not finished"):
        collect_checkpoints([run])
    a_best = (run / "a" / "best.safetensors").stat().st_mtime_ns
    resume()
    trained = []
    real_train = members_module.train
    monkeypatch.setattr(members_module, "train", lambda c, **kw: trained.append(Path(c.out_dir).name) or real_train(c, **kw))
    result = train(config)
    assert trained == ["b"]  # a is not trained again
    assert (run / "a" / "best.safetensors").stat().st_mtime_ns == a_best
    epochs = [json.loads(line)["epoch"] for line in (run / "b" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]  # b resumed after its epoch 0
    assert result.checkpoints == [run / "a" / "best.safetensors", run / "b" / "best.safetensors"]
    assert list(collect_checkpoints([run]).values()) == result.checkpoints
    # a member's changed options are refused before anything trains
    changed = _two_members(data_root, run, members=[{"name": "a", "epochs": 1}, {"name": "b", "epochs": 3}])
    with pytest.raises(ValueError, match=r"run with another config \(epochs: 2 -> 3\)"):
        train(changed)
    assert trained == ["b"]


def test_a_soft_pseudo_label_step_writes_the_teachers_labels_once_and_students_train_on_them(data_root, tmp_path):
    from vessel_kit.layout import named_volumes
    from vessel_kit.pseudo import make_pseudo_labels

    pseudo = {"from": ["teacher"], "volumes": ["kidney_5"], "kind": "soft", "axes": ["xy"], "tta": "none"}
    config = _two_members(data_root, tmp_path / "run", members=[
        {"name": "teacher", "epochs": 1}, {"name": "labels", "pseudo": pseudo}, {"name": "student", "epochs": 1}])
    result = train(config)
    written = result.pseudo_labels["labels"]["kidney_5"]
    images = named_volumes(data_root, ["kidney_5"])[0].read_images(progress=False)
    expected = make_pseudo_labels([result.members["teacher"].best_checkpoint], images, tmp_path / "x.npy",
                                  axes=("xy",), tta="none", progress=False)
    np.testing.assert_array_equal(np.load(written), np.load(expected))
    assert result.checkpoints == [tmp_path / "run" / "student" / "best.safetensors"]  # the teacher is not submitted
    student = TrainConfig.from_yaml(tmp_path / "run" / "student" / "config.yaml")
    assert student.train_volumes == ["kidney_1_dense", "kidney_5"] and student.soft_labels == {"kidney_5": str(written)}
    stamp = written.stat().st_mtime_ns
    assert train(config).checkpoints == result.checkpoints and written.stat().st_mtime_ns == stamp  # kept
    changed = _two_members(data_root, tmp_path / "run", members=[
        {"name": "teacher", "epochs": 1}, {"name": "labels", "pseudo": {**pseudo, "tta": "flips"}},
        {"name": "student", "epochs": 1}])
    with pytest.raises(ValueError, match=r"pseudo step 'labels' made its labels in .* with other options .*'tta': 'none'"):
        train(changed)


# --- bad input --------------------------------------------------------------------------------


def test_an_unknown_recipe_is_a_value_error_listing_the_recipes():
    with pytest.raises(ValueError, match=r"unknown recipe '6th_place'; recipes: \[.*'1st_place'.*'seed_2p5d'"):
        TrainConfig.from_dict({"base": "6th_place", "data_root": "/d"})


def test_an_unknown_option_in_a_recipe_file_is_a_value_error_listing_the_valid_ones(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"base": "5th_place", "data_root": "/d", "memberz": []}))
    with pytest.raises(ValueError, match=r"unknown training options \['memberz'\]; valid options: .*'members'"):
        TrainConfig.from_yaml(path)
    bad_member = {"base": "5th_place", "data_root": "/d", "members": [{"name": "x", "crops": {"crop_sise": 64}}]}
    with pytest.raises(ValueError, match=r"members\[0\] \(x\): unknown training options \['crops.crop_sise'\]"):
        TrainConfig.from_dict(bad_member)
    bad_pseudo = {"base": "5th_place", "data_root": "/d",
                  "members": [{"name": "a"}, {"name": "p", "pseudo": {"from": ["b"], "volumes": ["kidney_2"]}}]}
    with pytest.raises(ValueError, match=r"members\[1\] \(p\): pseudo.from names \['b'\].*those are: \['a'\]"):
        TrainConfig.from_dict(bad_pseudo)
    with pytest.raises(ValueError, match=r"unknown pseudo options \['kinds'\]; valid: \['from'"):
        TrainConfig.from_dict({**bad_pseudo, "members": [{"name": "a"}, {"name": "p", "pseudo": {"kinds": "soft"}}]})
    with pytest.raises(ValueError, match=r"the name 'a' is used twice"):
        TrainConfig.from_dict({**bad_pseudo, "members": [{"name": "a"}, {"name": "a"}]})


def test_a_recipe_asking_for_an_encoder_timm_lacks_is_a_value_error_with_close_choices():
    members = [{"name": "maxvit", "model": {"encoder": "tu-maxvit_large_tf_521"}}]
    with pytest.raises(ValueError, match=r"members\[0\] \(maxvit\): unknown encoder 'tu-maxvit_large_tf_521'; "
                                         r"close matches: \[.*'tu-maxvit_large_tf_512'"):
        TrainConfig.from_dict({"base": "3rd_place", "data_root": "/d", "members": members})
    with pytest.raises(ValueError, match=r"unknown encoder 'convnext_tiny'; close matches: \['tu-convnext_tiny'"):
        TrainConfig.from_dict({"base": "1st_place", "data_root": "/d", "model": {"encoder": "convnext_tiny"}})


def test_every_encoder_the_new_recipes_name_exists():
    from vessel_kit.models import list_encoders

    valid = set(list_encoders())
    for name in ("1st_place", "3rd_place", "5th_place", "seed_2p5d"):
        recipe = load_recipe(name)
        encoders = {recipe["model"].get("encoder", "resnet34")}
        encoders |= {m["model"]["encoder"] for m in recipe.get("members", []) if "encoder" in m.get("model", {})}
        assert encoders <= valid, (name, encoders - valid)


# --- small fixes ------------------------------------------------------------------------------


def test_compile_is_a_runtime_option_a_resumed_run_may_change(tmp_path):
    from vessel_kit.runs import claim_run_dir

    config = TrainConfig.from_dict({"data_root": "/d", "out_dir": str(tmp_path)}).to_dict()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "state.pt").write_bytes(b"")
    assert claim_run_dir(tmp_path, {**config, "compile": True}) == "resume"
    with pytest.raises(ValueError, match="another config"):
        claim_run_dir(tmp_path, {**config, "epochs": 3})


def test_densify_label_is_exported_lazily():
    import vessel_kit
    from vessel_kit.pseudo import densify_label

    assert vessel_kit.densify_label is densify_label and "densify_label" in vessel_kit.__all__


def test_vessel_kit_recipes_lists_the_winners_with_their_members(capsys):
    from vessel_kit.cli import main

    assert main(["recipes"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert {"1st_place", "3rd_place", "5th_place", "seed_2p5d"} <= set(lines)
    assert "[members: maxvit_base_teacher, effv2m_teacher, dpn68_teacher, soft_labels (pseudo), maxvit_base" in lines["5th_place"]
    assert "members" not in lines["seed_2p5d"]
    assert "1st place (0.774 private), 2.5D U-Net (ConvNeXt-tiny encoder" in lines["1st_place"]
