"""Recipes as files, ``base:`` inheritance, the nested config shape and the flat keys of older
configs, and ``vessel-kit recipes``."""

from __future__ import annotations

import warnings
from importlib import resources
from pathlib import Path

import pytest
import yaml

from vessel_kit.cli import main
from vessel_kit.recipes import LEGACY_KEYS, list_recipes, load_recipe
from vessel_kit.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]

# The synthetic_cpu recipe written in the flat form of configs before sections.
_LOOKS = [f"synth_{family}_{look}" for family in ("wall", "bright", "random") for look in range(5)]
FLAT_SYNTHETIC_CPU = {
    "train_volumes": ["kidney_1_dense", "kidney_2", *_LOOKS],
    "val_volumes": ["kidney_3_dense", "synth_wall_5", "synth_bright_5", "synth_random_5"], "val_voxel_sizes_um": [63.08], "val_score_smoothing": 0.5,
    "calibration_tolerance": 0.01, "calibration_rule": "case_median", "val_from_epoch": 4,
    "volume_weights": {"kidney_2": 0.6, **dict.fromkeys(_LOOKS, 0.1)},
    "encoder": "mobilenet_v2", "in_chans": 3, "crop_size": 96, "model_kwargs": {"decoder_channels": [128, 64, 32, 16, 8]},
    "foreground_fraction": 0.5, "crops_per_epoch": 1024, "augment": "light", "epochs": 10, "batch_size": 8,
    "loss": [{"name": "dice", "weight": 1.0}, {"name": "bce", "weight": 1.0}, {"name": "surface_dice", "weight": 1.0}],
    "lr": 2e-3, "ema_decay": 0.98, "rotate_p": 0.2, "rotate_max_deg": 30.0, "zoom_p": 0.25, "zoom_range": [0.7, 1.15],
    "lowres_p": 0.15, "intensity_p": 0.4, "invert_p": 0.1,
}


def write(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def test_recipes_ship_in_the_package_with_descriptions():
    files = {entry.name for entry in resources.files("vessel_kit.configs.recipes").iterdir()}
    assert {"synthetic_cpu.yaml", "kaggle_2p5d.yaml"} <= files
    recipes = list_recipes()
    assert list(recipes) == ["1st_place", "2nd_place_3d", "3rd_place", "4th_place_2d", "4th_place_3d", "5th_place",
                             "kaggle_2p5d", "seed_2p5d", "synthetic_cpu"]
    assert all(description and "\n" not in description for description in recipes.values())
    setup = (REPO / "setup.cfg").read_text()
    assert "vessel_kit.configs.recipes = *.yaml" in setup


def test_a_recipe_is_nested_and_loads_by_name():
    recipe = load_recipe("kaggle_2p5d")
    assert "description" not in recipe
    assert recipe["model"] == {"encoder": "tu-maxvit_base_tf_512", "in_chans": 1}
    assert recipe["optim"] == {"accumulate_steps": 4, "lr": 6e-5, "ema_decay": 0.999}
    with pytest.raises(ValueError, match=r"unknown recipe 'fast'; recipes: \[.*'kaggle_2p5d', 'seed_2p5d', 'synthetic_cpu'\]"):
        load_recipe("fast")


def test_the_flat_form_warns_naming_the_new_keys_and_gives_the_same_config():
    with pytest.warns(FutureWarning, match=r"crop_size is now crops\.crop_size.*lr is now optim\.lr") as caught:
        flat = TrainConfig.from_dict({**FLAT_SYNTHETIC_CPU, "data_root": "/d"})
    assert len(caught) == 1  # one warning per file, naming every moved key
    assert all(f"{key} is now {LEGACY_KEYS[key]}.{key}" in str(caught[0].message) for key in ("encoder", "ema_decay"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the nested form and the recipe warn about nothing
        nested = TrainConfig.from_dict({"base": "synthetic_cpu", "data_root": "/d"})
        assert TrainConfig.from_dict({**nested.to_dict()}) == nested
    assert flat == nested
    assert (nested.model.encoder, nested.crops.crop_size, nested.crops.in_chans, nested.optim.lr) == ("mobilenet_v2", 96, 3, 2e-3)


@pytest.mark.filterwarnings("ignore:.*deprecated flat training options:FutureWarning")
def test_a_flat_key_and_its_nested_key_together_are_refused():
    with pytest.raises(ValueError, match=r"crop_size and crops\.crop_size are both given; keep crops\.crop_size"):
        TrainConfig.from_dict({"data_root": "/d", "crop_size": 64, "crops": {"crop_size": 96}})


def test_base_chain_sections_merge_and_other_values_are_replaced(tmp_path):
    (tmp_path / "team").mkdir()
    write(tmp_path / "team" / "shared.yaml", {
        "description": "the team's defaults", "base": "synthetic_cpu", "crops": {"crop_size": 96}, "optim": {"lr": 1e-3},
    })
    child = write(tmp_path / "run.yaml", {
        "base": "team/shared.yaml", "data_root": "/d", "crops": {"axes": {"xy": 1.0}},
        "model": {"model_kwargs": {}}, "volume_weights": {}, "epochs": 2,
    })
    config = TrainConfig.from_yaml(child)
    assert config.crops.crop_size == 96 and config.crops.axes == {"xy": 1.0}  # both levels' crops options
    assert config.crops.rotate_p == 0.2 and config.optim.lr == 1e-3 and config.optim.ema_decay == 0.98
    assert config.model.encoder == "mobilenet_v2" and config.model.model_kwargs == {}  # replaced whole: cleared
    assert config.volume_weights == {} and config.epochs == 2
    # `recipe:` is an alias of `base:`; a recipe's options are overridden by the config's.
    recipe = TrainConfig.from_dict({"recipe": "synthetic_cpu", "data_root": "/d", "epochs": 2})
    assert (recipe.model.encoder, recipe.model.in_chans, recipe.epochs) == ("mobilenet_v2", 3, 2)


def test_base_cycles_and_bad_bases_are_named(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml", "data_root": "/d"})
    write(tmp_path / "b.yaml", {"base": "./a.yaml"})
    with pytest.raises(ValueError, match=r"base cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        TrainConfig.from_yaml(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", {"base": "self.yaml"})
    with pytest.raises(ValueError, match="base cycle"):
        TrainConfig.from_yaml(tmp_path / "self.yaml")
    with pytest.raises(ValueError, match=r"unknown recipe 'synthetic'; recipes: \[.*'kaggle_2p5d', 'seed_2p5d', 'synthetic_cpu'\]"):
        TrainConfig.from_dict({"base": "synthetic", "data_root": "/d"})
    with pytest.raises(FileNotFoundError, match="base config .*missing.yaml does not exist"):
        TrainConfig.from_dict({"base": str(tmp_path / "missing.yaml"), "data_root": "/d"})
    with pytest.raises(ValueError, match="give base or recipe"):
        TrainConfig.from_dict({"base": "synthetic_cpu", "recipe": "kaggle_2p5d", "data_root": "/d"})
    with pytest.raises(ValueError, match="base must be a recipe name or a YAML path, got 3"):
        TrainConfig.from_dict({"base": 3, "data_root": "/d"})


def test_section_errors_name_the_option():
    with pytest.raises(ValueError, match=r"unknown training options \['crops\.size'\]; valid options: \['crops\.augment'"):
        TrainConfig.from_dict({"data_root": "/d", "crops": {"size": 64}})
    with pytest.raises(ValueError, match="training option crops.in_chans: crops take the model's channels; set model.in_chans"):
        TrainConfig.from_dict({"data_root": "/d", "crops": {"in_chans": 3}})
    with pytest.raises(ValueError, match="training option optim must be a mapping of options, got 'adamw'"):
        TrainConfig.from_dict({"data_root": "/d", "optim": "adamw"})


def test_repo_configs_are_short_user_configs_over_recipes():
    for name in ("synthetic_cpu", "kaggle_2p5d"):
        path = REPO / "configs" / f"{name}.yaml"
        assert yaml.safe_load(path.read_text())["base"] == name
        config = TrainConfig.from_yaml(path)
        recipe = TrainConfig.from_dict({"base": name, "data_root": config.data_root, "out_dir": config.out_dir,
                                        "cache_dir": config.cache_dir})
        assert config == recipe


def test_cli_lists_the_recipes(capsys):
    assert main(["recipes"]) == 0
    from vessel_kit.infer_config import list_infer_presets

    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines if line.startswith("  ")]
    assert listed == [*list_recipes(), *list_infer_presets()]
    assert all(description in "\n".join(lines) for description in list_recipes().values())
