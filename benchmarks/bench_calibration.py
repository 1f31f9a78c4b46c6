"""Calibration rules compared on trained checkpoints: each ``--rules`` x ``--tolerances`` pair
recalibrates the threshold and the smallest component kept, as training's final calibration does (3-axis
validation logits of the recipe's validation volumes, at their own voxel size and at the
recipe's ``val_voxel_sizes_um``), then scores the dataset's test volumes (truth from its
``solution.csv``) and the outside probe (``bench_outside_probe``) with that rule.

It is how ``calibration_tolerance: 0.01`` and ``calibration_rule: case_median`` of the
synthetic_cpu recipe were chosen: rule ``mean`` at tolerance 0 is the best mean validation score; a
tolerance t > 0 takes the lowest threshold, then the smallest component size, within t of it;
``case_median`` takes the median of the cases' own cuts (``vessel_kit.calibration``). Each checkpoint's validation and test logits are predicted once;
the rules only re-cut them. Test masks follow ``--polarity`` as ``infer_volume`` does
(``vessel_kit.polarity``; default "auto": a volume whose mask as read is almost empty takes its
mirrored pass's mask where that one is kept; the scores say "(mirrored)" there), so the figures
are what a user gets; ``--polarity as_given`` scores the scans as read only (the figures of
stops 20-31). Checkpoints of the same recipe trained with other seeds or options tell a rule that
transfers from one that fits one model.

Each checkpoint also gets an ``oracle`` row: every test and probe volume at its own best cut and
component size (``THRESHOLD_GRID`` x ``COMPONENT_SIZE_GRID``, chosen on its truth), in its better
pass under "auto". No rule can beat it: the gap from a rule's row to it is what calibration could
still gain, and an oracle under a goal says that the model, not its calibration, falls short.

    vessel-kit demo --out demo_out   # or: vessel-kit synth demo_out/data && vessel-kit train ...
    python benchmarks/bench_calibration.py demo_out/run/best.safetensors --data demo_out/data --json /tmp/cal.json
    python benchmarks/bench_calibration.py CKPT... --rules mean case_median --tolerances 0.01
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

import _common  # noqa: E402
from bench_outside_probe import VARIANTS, VOXEL_SIZE_UM, probe_volume  # noqa: E402
from vessel_kit.calibration import CALIBRATION_RULES, check_component_sizes, check_tolerance  # noqa: E402
from vessel_kit.polarity import POLARITIES, asks_for_mirrored, keeps_mirrored, mirrored  # noqa: E402

if TYPE_CHECKING:
    from vessel_kit.predictor import LogitVolume, Predictor

AS_READ, MIRRORED = "as read", "mirrored"  # the two passes a test volume may be predicted in
HEADERS = ("checkpoint", "rule", "tolerance", "threshold", "min component", "validation", "test mean", "probe mean", "scores")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from vessel_kit.axes import AXES
    from vessel_kit.infer_config import InferConfig
    from vessel_kit.layout import find_volumes, load_train_volumes
    from vessel_kit.metric import surface_dice
    from vessel_kit.predictor import Predictor
    from vessel_kit.qc import read_solution_volume
    from vessel_kit.train_config import TrainConfig
    from vessel_kit.validation import calibrated_record, validation_cases, validation_logits

    print(_common.describe_machine(_common.machine_info()))
    recipe = TrainConfig.from_dict({"base": args.recipe, "data_root": str(args.data), "out_dir": "unused",
                                    "progress": False})
    val_volumes = load_train_volumes(args.data, recipe.val_volumes, soft_labels=recipe.soft_labels, progress=False)
    cases = validation_cases(val_volumes, recipe.val_voxel_sizes_um)
    component_sizes = args.component_sizes or recipe.calibration_component_sizes
    tests = [(volume.name, volume.read_images(), read_solution_volume(args.data / "solution.csv", volume.name),
              volume.voxel_size_um) for volume in find_volumes(args.data, "test")]
    tests += [(variant, *probe_volume(variant, args.probe_seed + index), VOXEL_SIZE_UM)
              for index, variant in enumerate(VARIANTS)]
    probe_names = set(VARIANTS)
    infer_config = InferConfig.load(args.config).replace(progress=False)
    if args.tile_size is not None:
        infer_config = infer_config.replace(tile_size=args.tile_size)
    device = torch.device("cpu")

    rows, results, oracles = [], [], []
    for checkpoint in args.checkpoints:
        started = time.perf_counter()
        predictor = Predictor(checkpoint, infer_config)  # loads the checkpoint once, for both passes
        ensemble = predictor.ensemble
        val_logits = validation_logits(ensemble.models[0], cases, in_chans=ensemble.in_chans,
                                       normalization=ensemble.normalization, model_voxel_size_um=ensemble.voxel_size_um,
                                       device=device, batch_size=recipe.val_batch_size, axes=AXES,
                                       pad_planes_to=recipe.sample_size)
        passes = _test_passes(predictor, tests, args.polarity)
        oracle = _oracle(predictor, tests, passes)
        oracle_means = _means({name: best["score"] for name, best in oracle.items()}, probe_names)
        oracles.append({"checkpoint": str(checkpoint), **oracle_means, "volumes": oracle})
        rows.append((_short(checkpoint), "oracle", "", "per volume", "per volume", "",
                     f"{oracle_means['test_mean']:.3f}", f"{oracle_means['probe_mean']:.3f}",
                     " ".join(f"{name} {best['score']:.3f} ({best['threshold']:g} / {best['min_component_size']}"
                              f"{', mirrored' if best['pass'] == MIRRORED else ''})" for name, best in oracle.items())))
        for rule, tolerance in _rules(args):
            record = calibrated_record(val_logits, cases, model_voxel_size_um=ensemble.voxel_size_um,
                                       component_sizes=component_sizes, calibration_tolerance=tolerance,
                                       calibration_rule=rule)
            threshold, size = record["val_threshold"], record["val_min_component_size"]
            # the checkpoint as training would have written it with this rule (the component size
            # is counted at the model's resolution and scales with each volume's voxel size)
            recut = _recut(predictor, threshold, size)
            scores, mirrored_passes = {}, []
            for index, (name, _, truth, _) in enumerate(tests):
                mask, chosen = _polarity_mask(recut, passes, index)
                scores[name] = float(surface_dice(truth, mask))
                if chosen == MIRRORED:
                    mirrored_passes.append(name)
            means = _means(scores, probe_names)
            results.append({"checkpoint": str(checkpoint), "rule": rule, "tolerance": tolerance, "threshold": threshold,
                            "min_component_size": size, "validation": record["val_surface_dice_cleaned"],
                            **means, "scores": scores, "mirrored": mirrored_passes})
            rows.append((_short(checkpoint), rule, f"{tolerance:g}", f"{threshold:g}", size,
                         f"{record['val_surface_dice_cleaned']:.3f}", f"{means['test_mean']:.3f}",
                         f"{means['probe_mean']:.3f}",
                         " ".join(f"{name} {score:.3f}{' (mirrored)' if name in mirrored_passes else ''}"
                                  for name, score in scores.items())))
        print(f"{checkpoint}: {time.perf_counter() - started:.0f} s", flush=True)
    _common.print_table(HEADERS, rows)
    _print_changes(results, _rules(args))
    sources = _common.source_digests("vessel_kit.calibration", "vessel_kit.validation", "vessel_kit.predictor")
    _common.write_json(args.json, {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                   "results": results, "oracles": oracles, "sources": sources})
    return 0


def _test_passes(predictor: Predictor, tests: list[tuple], polarity: str) -> dict[str, list[LogitVolume]]:
    """The test volumes' logits of each pass ``polarity`` may use (``AS_READ`` and / or
    ``MIRRORED``), one list per pass in the order of ``tests``."""
    wanted = {"as_given": [AS_READ], "inverted": [MIRRORED], "auto": [AS_READ, MIRRORED]}[polarity]
    return {name: [predictor.logits(mirrored(image) if name == MIRRORED else image, voxel_size_um=size)
                   for _, image, _, size in tests] for name in wanted}


def _polarity_mask(predictor: Predictor, passes: dict[str, list[LogitVolume]], index: int) -> tuple[np.ndarray, str]:
    """Test volume ``index``'s mask and the pass it comes from, chosen between ``passes`` as
    ``Predictor.prediction`` chooses under the polarity that made them."""
    first, *others = passes
    if not others:
        return predictor.to_mask(passes[first][index]), first
    mask, as_read = predictor.counted_mask(passes[first][index])
    if not asks_for_mirrored(as_read):
        return mask, first
    other, mirrored_count = predictor.counted_mask(passes[MIRRORED][index])
    if keeps_mirrored(as_read, mirrored_count):
        return other, MIRRORED
    return mask, first


def _oracle(predictor: Predictor, tests: list[tuple], passes: dict[str, list[LogitVolume]]) -> dict[str, dict]:
    """Each volume's best surface Dice over every pass, grid cut and component size, and where:
    masks as ``Predictor.to_mask`` makes them (components counted at the model's resolution)."""
    from vessel_kit.calibration import COMPONENT_SIZE_GRID, THRESHOLD_GRID, scaled_component_size
    from vessel_kit.metric import surface_dice
    from vessel_kit.postprocess import remove_small_components

    best = {}
    for pass_name, pass_logits in passes.items():
        for (name, _, truth, _), logits in zip(tests, pass_logits, strict=True):
            for threshold in THRESHOLD_GRID:
                mask = _recut(predictor, threshold, 0).to_mask(logits)
                for size in COMPONENT_SIZE_GRID:
                    kept = mask if size <= 1 else remove_small_components(
                        mask, scaled_component_size(size, logits.voxels_per_model_voxel),
                        connectivity=predictor.config.connectivity)
                    score = float(surface_dice(truth, kept))
                    if name not in best or score > best[name]["score"]:
                        best[name] = {"score": score, "threshold": threshold, "min_component_size": size,
                                      "pass": pass_name}
    return best


def _recut(predictor: Predictor, threshold: float, min_component_size: int) -> Predictor:
    """``predictor``'s models and config with another calibration, as training would have written
    it into the checkpoint (the component size counted at the model's resolution)."""
    from vessel_kit.predictor import Predictor

    return Predictor(dataclasses.replace(predictor.ensemble, threshold=threshold, min_component_size=min_component_size),
                     predictor.config)


def _means(scores: dict[str, float], probe_names: set[str]) -> dict[str, float]:
    """The mean score of the dataset's test volumes and of the probe's."""
    return {"test_mean": float(np.mean([s for name, s in scores.items() if name not in probe_names])),
            "probe_mean": float(np.mean([s for name, s in scores.items() if name in probe_names]))}


def _rules(args: argparse.Namespace) -> list[tuple[str, float]]:
    """The (rule, tolerance) pairs compared, the first one the reference."""
    return [(rule, tolerance) for rule in args.rules for tolerance in args.tolerances]


def _print_changes(results: list[dict], rules: list[tuple[str, float]]) -> None:
    """Each rule's mean change of the test and probe means against the first rule, over the
    checkpoints (what the recipe's choice rests on)."""
    def picked(rule: tuple[str, float]) -> list[dict]:
        return [r for r in results if (r["rule"], r["tolerance"]) == rule]

    base = {r["checkpoint"]: r for r in picked(rules[0])}
    for rule in rules[1:]:
        rows = picked(rule)
        test = [r["test_mean"] - base[r["checkpoint"]]["test_mean"] for r in rows]
        probe = [r["probe_mean"] - base[r["checkpoint"]]["probe_mean"] for r in rows]
        print(f"{rule[0]} at tolerance {rule[1]:g} vs {rules[0][0]} at {rules[0][1]:g}: test mean {np.mean(test):+.3f} "
              f"({min(test):+.3f} to {max(test):+.3f}), probe mean {np.mean(probe):+.3f} ({min(probe):+.3f} to "
              f"{max(probe):+.3f})")


def _short(checkpoint: Path) -> str:
    """The checkpoint's last three path parts (``<experiment>/<run folder>/<file>``): checkpoints
    are told apart by their run."""
    return "/".join(checkpoint.resolve().parts[-3:])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints (.safetensors) of one recipe")
    parser.add_argument("--data", type=Path, default=Path("demo_out/data"),
                        help="the dataset they were trained on: its validation volumes, test volumes and "
                             "solution.csv (default demo_out/data)")
    parser.add_argument("--recipe", default="synthetic_cpu", help="recipe naming the validation volumes and "
                        "voxel sizes (default synthetic_cpu)")
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.0, 0.005, 0.01, 0.02],
                        help="calibration tolerances to compare; the first is the reference (default 0 0.005 0.01 0.02)")
    parser.add_argument("--rules", nargs="+", default=["mean"], choices=CALIBRATION_RULES,
                        help="calibration rules to compare, each at every tolerance; the first rule at the first "
                             "tolerance is the reference (default mean)")
    parser.add_argument("--component-sizes", type=int, nargs="+", help="smallest-component sizes the rules choose from "
                        "(default: the recipe's calibration_component_sizes); the oracle always tries the full grid")
    parser.add_argument("--config", default="cpu", help="named InferConfig for the test volumes (default cpu)")
    parser.add_argument("--tile-size", type=int, help="inference tile for the test volumes (default: the "
                        "config's, else each checkpoint's training crop)")
    parser.add_argument("--polarity", default="auto", choices=POLARITIES,
                        help="polarity of the test masks, as infer_volume's (default auto)")
    parser.add_argument("--probe-seed", type=int, default=100, help="seed of the first probe volume (default 100)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    _common.refuse_missing_checkpoints(parser, args.checkpoints)
    if not (args.data / "solution.csv").is_file():
        parser.error(f"{args.data} has no solution.csv (the test volumes' truth)")
    if args.tile_size is not None and args.tile_size < 16:
        parser.error(f"--tile-size must be at least 16 pixels, got {args.tile_size}")
    try:
        for tolerance in args.tolerances:
            check_tolerance(tolerance, "--tolerances")  # training's own checks of the options
        if args.component_sizes is not None:
            check_component_sizes(args.component_sizes, "--component-sizes")
    except ValueError as error:
        parser.error(str(error))
    return args


if __name__ == "__main__":
    raise SystemExit(main())
