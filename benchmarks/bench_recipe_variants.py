"""Recipe variants side by side: the recipe and each ``--variant`` (the recipe plus option
overrides) trained on every ``--seed``, one training after another in one run, then every
checkpoint scored by ``bench_calibration`` (its ``oracle`` and one calibration rule, on the
dataset's test volumes and the outside probe). Prints one row per training and, per variant, the
mean over the seeds and the mean paired change from the recipe on the same seeds.

Why one run: a training is reproducible on one machine (same seed, same losses to the last digit),
but the recipe's seed 0 moved by ~0.06 on the demo's test mean and ~0.03 on the probe between two
sessions (benchmarks/README.md, "EMA, skeleton recall, surface Dice loss"). A variant is only
told from the recipe by trainings of one session, on several seeds; two torch processes at once
on 2 cores run ~13x slower each, so the trainings run one after another.

Runs go to ``--work``/<variant>/seed<k>: a rerun resumes an interrupted training and reuses a
finished one (``train``'s own resume; another config in the same folder is refused). Variants may
not change the validation volumes, which ``bench_calibration`` reads from the recipe.

    vessel-kit synth demo_out/data    # or any dataset with test volumes and solution.csv
    python benchmarks/bench_recipe_variants.py --data demo_out/data --work /tmp/variants --seeds 0 1 2 \\
        --variant 'surface_dice={"loss": [{"name": "dice", "weight": 1}, {"name": "bce", "weight": 1}, {"name": "surface_dice", "weight": 1}]}'
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

import _common  # noqa: E402
import bench_calibration  # noqa: E402
from vessel_kit.calibration import CALIBRATION_RULES, check_tolerance  # noqa: E402
from vessel_kit.polarity import POLARITIES  # noqa: E402

RECIPE = "recipe"  # the name of the unchanged recipe among the variants
VALIDATION_OPTIONS = ("val_volumes", "val_voxel_sizes_um", "data_root", "out_dir", "seed")
HEADERS = ("variant", "seed", "training s", "threshold / min component", "oracle test / probe",
           "test mean", "probe mean", "scores")
MEAN_HEADERS = ("variant", "seeds", "oracle test / probe", "test mean", "probe mean",
                "change vs recipe: test", "change vs recipe: probe")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vessel_kit.training import train

    print(_common.describe_machine(_common.machine_info()))
    runs = []  # (variant, seed, checkpoint, training seconds)
    for name, overrides in args.variants.items():
        for seed in args.seeds:
            started = time.perf_counter()
            result = train(_config(args, overrides, seed, args.work / name / f"seed{seed}"))
            seconds = time.perf_counter() - started
            print(f"{name} seed {seed}: best epoch {result.best_epoch}, {seconds:.0f} s", flush=True)
            runs.append((name, seed, result.best_checkpoint, seconds))

    with tempfile.TemporaryDirectory() as scratch:
        scored = Path(scratch) / "calibration.json"
        bench_calibration.main([*(str(checkpoint) for _, _, checkpoint, _ in runs), "--data", str(args.data),
                                "--recipe", args.recipe, "--rules", args.rule, "--tolerances", str(args.tolerance),
                                "--polarity", args.polarity, "--json", str(scored)])
        calibration = json.loads(scored.read_text())
    by_checkpoint = {r["checkpoint"]: r for r in calibration["results"]}
    oracles = {o["checkpoint"]: o for o in calibration["oracles"]}
    rows = [_run_row(name, seed, seconds, by_checkpoint[str(checkpoint)], oracles[str(checkpoint)])
            for name, seed, checkpoint, seconds in runs]
    print(f"\nrule {args.rule} at tolerance {args.tolerance:g}, one row per training:")
    _common.print_table(HEADERS, [row["cells"] for row in rows])
    means = _variant_means(rows)
    print("\nmeans over the seeds; changes paired by seed against the recipe:")
    _common.print_table(MEAN_HEADERS, [m["cells"] for m in means])
    _common.write_json(args.json, {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                   "runs": [row["record"] for row in rows],
                                   "means": [m["record"] for m in means], "calibration": calibration})
    return 0


def _config(args: argparse.Namespace, overrides: dict, seed: int, out_dir: Path):
    """The recipe with ``--set`` and the variant's overrides, at ``seed``, training into ``out_dir``."""
    from vessel_kit.recipes import merge_config
    from vessel_kit.train_config import TrainConfig

    options = merge_config(args.common, overrides)  # sections merged: --set crops + a variant's crops
    return TrainConfig.from_dict({"base": args.recipe, **options, "seed": seed,
                                  "data_root": str(args.data), "out_dir": str(out_dir)})


def _run_row(name: str, seed: int, seconds: float, result: dict, oracle: dict) -> dict:
    record = {"variant": name, "seed": seed, "training_s": seconds, "threshold": result["threshold"],
              "min_component_size": result["min_component_size"], "test_mean": result["test_mean"],
              "probe_mean": result["probe_mean"], "oracle_test_mean": oracle["test_mean"],
              "oracle_probe_mean": oracle["probe_mean"], "scores": result["scores"]}
    cells = (name, seed, f"{seconds:.0f}", f"{result['threshold']:g} / {result['min_component_size']}",
             f"{oracle['test_mean']:.3f} / {oracle['probe_mean']:.3f}", f"{result['test_mean']:.3f}",
             f"{result['probe_mean']:.3f}", " ".join(f"{k} {v:.3f}" for k, v in result["scores"].items()))
    return {"record": record, "cells": cells}


def _variant_means(rows: list[dict]) -> list[dict]:
    """Each variant's means over its seeds, and its mean change from the recipe on the same seeds."""
    records = [row["record"] for row in rows]
    recipe = {r["seed"]: r for r in records if r["variant"] == RECIPE}
    means = []
    for name in dict.fromkeys(r["variant"] for r in records):
        mine = [r for r in records if r["variant"] == name]
        mean = {key: float(np.mean([r[key] for r in mine]))
                for key in ("test_mean", "probe_mean", "oracle_test_mean", "oracle_probe_mean")}
        paired = all(r["seed"] in recipe for r in mine)  # not under --no-recipe
        change = {f"{key}_change": float(np.mean([r[key] - recipe[r["seed"]][key] for r in mine])) if paired else None
                  for key in ("test_mean", "probe_mean")}
        record = {"variant": name, "seeds": [r["seed"] for r in mine], **mean, **change}
        cells = (name, len(mine), f"{mean['oracle_test_mean']:.3f} / {mean['oracle_probe_mean']:.3f}",
                 f"{mean['test_mean']:.3f}", f"{mean['probe_mean']:.3f}",
                 *(f"{value:+.3f}" if paired else "-" for value in change.values()))
        means.append({"record": record, "cells": cells})
    return means


def _variant(text: str) -> tuple[str, dict]:
    """``NAME=JSON``: a variant's name and its option overrides (a JSON mapping)."""
    name, sep, overrides = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"a variant is NAME=JSON with NAME a plain identifier, got {text!r}")
    return name, _common.json_mapping(overrides, f"--variant {name}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("demo_out/data"),
                        help="dataset with the recipe's volumes, test volumes and solution.csv (default demo_out/data)")
    parser.add_argument("--work", type=Path, required=True, help="folder of the runs (<variant>/seed<k>)")
    parser.add_argument("--recipe", default="synthetic_cpu", help="the recipe every variant starts from")
    parser.add_argument("--variant", dest="variant_list", type=_variant, action="append", default=[],
                        metavar="NAME=JSON", help="a variant: the recipe with these option overrides (repeatable)")
    parser.add_argument("--no-recipe", action="store_true", help="leave the unchanged recipe out (no paired changes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--set", dest="common", type=lambda t: _common.json_mapping(t, "--set"), default={},
                        metavar="JSON", help="overrides for every run, the recipe's too (e.g. a short smoke run)")
    parser.add_argument("--rule", default="case_median", choices=CALIBRATION_RULES,
                        help="calibration rule of the scores (default case_median, the recipe's)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="its tolerance (default 0.01)")
    parser.add_argument("--polarity", default="auto", choices=POLARITIES,
                        help="polarity of the test masks, as bench_calibration's (default auto)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    variants = dict([] if args.no_recipe else [(RECIPE, {})])
    for name, overrides in args.variant_list:
        if name in variants:
            parser.error(f"variant name {name!r} given twice (or it is the reserved {RECIPE!r})")
        fixed = sorted(set(overrides) & set(VALIDATION_OPTIONS))
        if fixed:
            parser.error(f"--variant {name} sets {fixed}: every run shares the recipe's validation, data and "
                         "folders, and --seeds gives the seeds")
        variants[name] = overrides
    if not variants:
        parser.error("nothing to train: give a --variant, or drop --no-recipe")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}")
    try:
        check_tolerance(args.tolerance, "--tolerance")
    except ValueError as error:
        parser.error(str(error))
    if not (args.data / "solution.csv").is_file():
        parser.error(f"{args.data} has no solution.csv (the test volumes' truth): make it with `vessel-kit synth`")
    args.variants = variants
    del args.variant_list
    for name, overrides in variants.items():  # a bad option fails here, before hours of training
        try:
            _config(args, overrides, args.seeds[0], args.work / name)
        except (TypeError, ValueError) as error:
            parser.error(f"--variant {name}: {error}")
    return args


if __name__ == "__main__":
    raise SystemExit(main())
