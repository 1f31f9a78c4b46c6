"""Smoke tests of the benchmark scripts in ``benchmarks/``: each runs end to end on its smallest
inputs and writes the figures it promises, so that a script does not rot between the runs that fill
``benchmarks/README.md`` (a shadowed variable once put the wrong rule's label on every row of
``bench_calibration``'s table). They check what the scripts compute, never how fast.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """``bench(name)``: the benchmark script ``benchmarks/<name>.py`` imported as a module (the
    scripts import their ``_common`` helper from their own folder)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_probe_volumes_are_reproducible_and_keep_their_polarity(bench):
    probe = bench("bench_outside_probe")
    for index, (variant, (contrast, *_)) in enumerate(probe.VARIANTS.items()):
        image, labels = probe.probe_volume(variant, 7 + index)
        again, same_labels = probe.probe_volume(variant, 7 + index)
        other, _ = probe.probe_volume(variant, 8 + index)
        assert image.dtype == np.uint16 and image.shape == labels.shape == probe.SHAPE
        assert np.array_equal(image, again) and np.array_equal(labels, same_labels)
        assert not np.array_equal(image, other)
        assert 0.001 < labels.mean() < 0.05, variant
        vessel_minus_tissue = image[labels].astype(float).mean() - image[~labels].astype(float).mean()
        assert np.sign(vessel_minus_tissue) == np.sign(contrast), variant


def test_outside_probe_scores_a_checkpoint_beside_its_oracle(bench, random_unet, tmp_path, monkeypatch):
    probe = bench("bench_outside_probe")
    monkeypatch.setattr(probe, "SHAPE", (12, 64, 64))
    checkpoint = random_unet(tmp_path / "random.safetensors")
    out = tmp_path / "probe.json"
    assert probe.main([str(checkpoint), "--variants", "bright_easy,dark_easy", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results] == ["bright_easy", "dark_easy"]
    for result in results:
        assert 0.0 <= result["model"] <= result["model_best_cut"] + 1e-9 <= 1.0 + 1e-9
        assert result["threshold_oracle"] > 0.3  # +-4 texture sd vessels: a fitted threshold finds them


def test_outside_probe_refuses_an_unknown_variant(bench, random_unet, tmp_path, capsys):
    probe = bench("bench_outside_probe")
    checkpoint = random_unet(tmp_path / "random.safetensors")
    with pytest.raises(SystemExit):
        probe.main([str(checkpoint), "--variants", "bright_easy,purple"])
    assert "purple" in capsys.readouterr().err


def test_anatomy_compares_every_family_with_the_real_labels(bench, real_data, tmp_path, monkeypatch):
    anatomy = bench("bench_anatomy")
    monkeypatch.setattr(anatomy, "SHAPES", ((16, 64, 64),))
    out = tmp_path / "anatomy.json"
    assert anatomy.main(["--real", str(real_data / "kidney_3_dense_labels"), "--seeds", "0", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    from vessel_kit.synth import STYLES

    results = figures["results"]
    assert set(results) == {"real kidney_3_dense", *(f"synthetic {family}" for family in STYLES)}
    real = results["real kidney_3_dense"]
    assert real["slices"] == 15 and 0 < real["fraction_percent"] < 5
    for name, source in results.items():
        widths = source["width_um"]
        assert 0 < widths["p10"] <= widths["p50"] <= widths["p90"] <= widths["max"], name


@pytest.mark.slow
def test_calibration_recuts_a_checkpoint_with_every_rule(bench, random_unet, tmp_path, monkeypatch):
    from vessel_kit.calibration import THRESHOLD_GRID
    from vessel_kit.synth import make_synthetic_dataset

    calibration = bench("bench_calibration")
    monkeypatch.setattr(bench("bench_outside_probe"), "SHAPE", (16, 96, 96))  # the probe volumes it scores
    data = make_synthetic_dataset(tmp_path / "data", scale=0.25, seed=0, progress=False)
    checkpoint = random_unet(tmp_path / "random.safetensors")
    out = tmp_path / "calibration.json"
    assert calibration.main([str(checkpoint), "--data", str(data), "--rules", "mean", "case_median",
                             "--tolerances", "0", "0.01", "--component-sizes", "7", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["rule"], r["tolerance"]) for r in results] == [("mean", 0), ("mean", 0.01), ("case_median", 0),
                                                              ("case_median", 0.01)]
    for result in results:
        assert result["threshold"] in THRESHOLD_GRID
        assert result["min_component_size"] == 7  # the only size the rules were given
        assert 0.0 <= result["test_mean"] <= 1.0 and 0.0 <= result["probe_mean"] <= 1.0
    oracle, = json.loads(out.read_text())["oracles"]  # each volume at its best cut: no rule beats it
    for result in results:
        for name, score in result["scores"].items():
            assert oracle["volumes"][name]["score"] >= score, (result["rule"], name)
        assert set(result["mirrored"]) <= set(result["scores"])  # polarity "auto": the volumes it mirrored
    assert {best["pass"] for best in oracle["volumes"].values()} <= {"as read", "mirrored"}


def test_calibration_chooses_the_polarity_pass_as_the_predictor_does(bench):
    """Under "auto" a volume takes its mirrored pass's mask only where the mask as read finds almost
    nothing (empty, or sparse and speckled) and the mirrored one is fuller, at most a tenth of the
    volume and less speckled (``polarity.asks_for_mirrored`` / ``keeps_mirrored``)."""
    from vessel_kit.polarity import MaskCount

    calibration = bench("bench_calibration")

    class CountsAsLogits:
        """A stand-in predictor whose 'logits' are (name, MaskCount) pairs: the mask is the name."""

        @staticmethod
        def to_mask(logits):
            return logits[0]

        @staticmethod
        def counted_mask(logits):
            return logits

    def count(name, kept, above):
        return name, MaskCount(kept, above, 100_000)

    empty, found, background = count("empty", 0, 0), count("found", 500, 550), count("background", 20_000, 20_000)
    speckle, sparse = count("speckle", 50, 1000), count("sparse", 50, 60)
    passes = {"as read": [empty, found, empty, speckle, sparse, speckle],
              "mirrored": [found, empty, background, found, found, count("speckle too", 80, 1000)]}
    chosen = [calibration._polarity_mask(CountsAsLogits, passes, index) for index in range(6)]
    assert chosen == [("found", "mirrored"), ("found", "as read"), ("empty", "as read"), ("found", "mirrored"),
                      ("sparse", "as read"), ("speckle", "as read")]
    assert calibration._polarity_mask(CountsAsLogits, {"as read": passes["as read"]}, 0) == ("empty", "as read")
    assert calibration._polarity_mask(CountsAsLogits, {"mirrored": passes["mirrored"]}, 1) == ("empty", "mirrored")


@pytest.mark.parametrize("script, argv, message", [
    ("bench_calibration", ["--component-sizes", "0", "-10"], "--component-sizes must be a non-empty list of ints >= 0"),
    ("bench_calibration", ["--polarity", "upside_down"], "--polarity: invalid choice: 'upside_down'"),
    ("bench_generalization", ["--set", "[1]"], "--set must be a JSON mapping of training options"),
    ("bench_generalization", ["--set", "{loss: dice}"], "--set: not JSON"),
    ("bench_generalization", ["--test-volumes", "0"], "--test-volumes must be >= 1"),
])
def test_calibration_and_generalization_refuse_bad_options(bench, random_unet, tmp_path, capsys, script, argv, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "solution.csv").write_text("id,rle,width,height,image,group,slice\n")
    before = [str(random_unet(tmp_path / "random.safetensors")), "--data", str(data)] if script == "bench_calibration" else []
    with pytest.raises(SystemExit):
        bench(script).parse_args([*before, *argv])
    assert re.search(message, capsys.readouterr().err)


def test_generalization_trains_the_recipe_with_the_options_set(bench, tmp_path, monkeypatch):
    """``--set`` reaches the fold's training config, merged section by section over the recipe's;
    the fold's own volumes and folders are not its to change."""
    from vessel_kit import training

    class Trained(Exception):
        """Raised by the stand-in trainer once it has the config."""

    def trainer(config):
        seen.append(config)
        raise Trained

    generalization = bench("bench_generalization")
    seen = []
    monkeypatch.setattr(training, "train", trainer)
    args = generalization.parse_args(["--set", '{"loss": "dice", "crops": {"crop_size": 64}, "train_volumes": ["x"]}',
                                      "--crops-per-epoch", "64"])
    with pytest.raises(Trained):
        generalization.train_model(tmp_path, tmp_path / "run", ["train_0_hipct"], ["val_hipct"], args)
    config, = seen
    assert config.loss == "dice" and config.train_volumes == ["train_0_hipct"]
    assert config.crops.crop_size == 64 and config.crops.crops_per_epoch == 64
    assert config.crops.rotate_p == 0.2  # the recipe's other crops options stay


@pytest.mark.slow
def test_generalization_runs_one_small_fold(bench, tmp_path, capsys):
    generalization = bench("bench_generalization")
    out = tmp_path / "generalization.json"
    argv = ["--families", "bright", "--epochs", "1", "--crops-per-epoch", "8", "--shape", "16x64x64",
            "--test-shape", "16x64x64", "--train-volumes", "2", "--test-volumes", "2", "--tta", "none",
            "--work", str(tmp_path / "work"), "--json", str(out)]
    assert generalization.main(argv) == 0
    fold, = json.loads(out.read_text())["folds"]
    assert fold["held_out"] == "bright"
    assert "bright" not in fold["train_styles"].values() and "bright" not in fold["val_styles"].values()
    assert set(fold["scores"]) == {"model", "threshold", "frangi"}
    assert fold["test_seeds"] == [0, 1] and len(fold["vessel_fraction"]) == 2
    assert fold["vessel_fraction"][0] != fold["vessel_fraction"][1]  # two different draws of the family
    for name, by_voxel in fold["scores"].items():
        assert set(by_voxel) == {"50.0", "63.08"} and all(0.0 <= s <= 1.0 for s in by_voxel.values())
        draws = fold["scores_per_volume"][name]
        assert len(draws) == 2
        for voxel, mean in by_voxel.items():  # the table's score is the mean over the draws
            assert mean == pytest.approx((draws[0][voxel] + draws[1][voxel]) / 2)
    assert set(fold["goals"]) == {"margin", "margin_met", "resolution_change", "resolution_met"}
    # a rerun in the same --work folder reuses the dataset and the finished training: same scores
    assert generalization.main([*argv, "--json", str(tmp_path / "again.json")]) == 0
    assert "reusing the fold's dataset" in capsys.readouterr().out
    assert json.loads((tmp_path / "again.json").read_text())["folds"][0]["scores"] == fold["scores"]
    with pytest.raises(ValueError, match="not written for this fold's volumes, shape and seed"):
        generalization.main([*argv, "--seed", "1"])


@pytest.mark.slow  # two short trainings and the calibration bench: ~45 s
def test_recipe_variants_trains_each_seed_and_pairs_the_changes(bench, tmp_path, monkeypatch):
    from vessel_kit.synth import make_synthetic_dataset

    variants = bench("bench_recipe_variants")
    monkeypatch.setattr(bench("bench_outside_probe"), "SHAPE", (16, 96, 96))
    data = make_synthetic_dataset(tmp_path / "data", scale=0.25, seed=0, progress=False)
    out = tmp_path / "variants.json"
    argv = ["--data", str(data), "--work", str(tmp_path / "work"), "--seeds", "0", "--json", str(out),
            "--set", '{"epochs": 1, "val_from_epoch": 0, "crops": {"crops_per_epoch": 16}}',
            "--variant", 'one_slice={"model": {"in_chans": 1}}']
    assert variants.main(argv) == 0
    results = json.loads(out.read_text())
    assert [(r["variant"], r["seed"]) for r in results["runs"]] == [("recipe", 0), ("one_slice", 0)]
    recipe, one_slice = results["means"]
    assert recipe["test_mean_change"] == 0.0 and recipe["probe_mean_change"] == 0.0
    run = results["runs"][1]
    assert one_slice["test_mean_change"] == pytest.approx(run["test_mean"] - results["runs"][0]["test_mean"])
    assert run["oracle_test_mean"] >= run["test_mean"] - 1e-12  # no rule beats each volume's best cut
    assert (tmp_path / "work" / "one_slice" / "seed0" / "best.safetensors").is_file()


def test_recipe_variants_pairs_changes_only_with_the_recipe_trained(bench):
    """Under --no-recipe there is nothing to pair: changes are None, not a KeyError after training."""
    def row(variant, seed, test, probe):
        return {"record": {"variant": variant, "seed": seed, "test_mean": test, "probe_mean": probe,
                           "oracle_test_mean": test + 0.1, "oracle_probe_mean": probe + 0.1}}

    variants = bench("bench_recipe_variants")
    paired = variants._variant_means([row("recipe", 0, 0.4, 0.3), row("recipe", 1, 0.5, 0.2),
                                      row("x", 0, 0.6, 0.2), row("x", 1, 0.4, 0.4)])
    assert [m["record"]["test_mean_change"] for m in paired] == [0.0, pytest.approx(0.05)]
    assert paired[1]["record"]["probe_mean_change"] == pytest.approx(0.05)
    alone, = variants._variant_means([row("x", 0, 0.6, 0.2)])
    assert alone["record"]["test_mean_change"] is None and alone["cells"][-2:] == ("-", "-")


@pytest.mark.parametrize("argv, message", [
    (["--variant", "x={not json}"], "--variant x: not JSON"),
    (["--variant", "x=[1]"], "--variant x must be a JSON mapping"),
    (["--variant", "recipe={}"], "variant name 'recipe' given twice"),
    (["--variant", 'x={"seed": 3}'], "--variant x sets \\['seed'\\]"),
    (["--variant", 'x={"loss": "dyce"}'], "--variant x: training option loss: unknown loss 'dyce'"),
    (["--seeds", "1", "1"], "--seeds repeats a seed"),
    (["--no-recipe"], "nothing to train"),
])
def test_recipe_variants_refuses_bad_options_before_training(bench, tmp_path, capsys, argv, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "solution.csv").write_text("id,rle,width,height,image,group,slice\n")
    with pytest.raises(SystemExit):
        bench("bench_recipe_variants").parse_args(["--data", str(data), "--work", str(tmp_path / "w"), *argv])
    assert re.search(message, capsys.readouterr().err)


def test_polarity_bench_scores_both_passes_and_auto_on_each_scan(bench, random_unet, tmp_path, monkeypatch):
    polarity = bench("bench_polarity")
    monkeypatch.setattr(polarity.bench_outside_probe, "SHAPE", (16, 48, 48))
    checkpoint = random_unet(tmp_path / "random.safetensors")
    out = tmp_path / "polarity.json"
    argv = [str(checkpoint), "--families", "bright", "--seeds", "5", "--shape", "16,48,48", "--json", str(out)]
    assert polarity.main(argv) == 0
    written = json.loads(out.read_text())
    results = written["results"]
    assert [r["volume"] for r in results] == [f"{variant}_{5 + index}" for index, variant in
                                              enumerate(polarity.bench_outside_probe.VARIANTS)] + ["bright_5"]
    for result in results:
        for name in ("as_read", "mirrored"):
            assert 0 <= result[name]["kept"] <= result[name]["volume"] and 0.0 <= result[name]["score"] <= 1.0
        assert result["auto_as_drawn"] == polarity._auto_choice(result["as_read"], result["mirrored"])
        assert result["auto_inverted"] == polarity._auto_choice(result["mirrored"], result["as_read"])
    assert written["summary"] == polarity.summarize(results)


def test_polarity_bench_summary_compares_auto_with_the_better_pass(bench):
    polarity = bench("bench_polarity")
    volume = 100_000

    def result(read, mirrored):
        (kept, above, score), (mirrored_kept, mirrored_above, mirrored_score) = read, mirrored
        return {"as_read": {"kept": kept, "above": above, "volume": volume, "score": score},
                "mirrored": {"kept": mirrored_kept, "above": mirrored_above, "volume": volume, "score": mirrored_score}}

    results = [result((500, 550, 0.6), (0, 900, 0.0)),   # bright vessels found as read; its inversion is speckle
               result((30, 900, 0.0), (400, 500, 0.5))]  # dark vessels: speckle as read, found mirrored
    for r in results:
        r["auto_as_drawn"] = polarity._auto_choice(r["as_read"], r["mirrored"])
        r["auto_inverted"] = polarity._auto_choice(r["mirrored"], r["as_read"])
    assert [(r["auto_as_drawn"], r["auto_inverted"]) for r in results] == [("as read", "mirrored"), ("mirrored", "as read")]
    summary = polarity.summarize(results)
    for scans in ("as drawn", "inverted"):
        assert summary[scans]["auto"] == pytest.approx(0.55) and summary[scans]["better"] == pytest.approx(0.55)
        assert summary[scans]["worse"] == 0 and summary[scans]["second_pass"] == 1
    assert summary["as drawn"]["as_read"] == pytest.approx(0.3)


def test_polarity_bench_refuses_an_unknown_family(bench, random_unet, tmp_path, capsys):
    polarity = bench("bench_polarity")
    checkpoint = random_unet(tmp_path / "random.safetensors")
    with pytest.raises(SystemExit):
        polarity.parse_args([str(checkpoint), "--families", "bright,marble"])
    assert "unknown families ['marble']" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["bench_calibration", "bench_outside_probe", "bench_polarity"])
def test_checkpoint_benches_refuse_a_missing_checkpoint_by_path(bench, tmp_path, capsys, script):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(SystemExit):
        bench(script).parse_args([str(missing)])
    assert f"no checkpoint file at ['{missing}']" in capsys.readouterr().err
