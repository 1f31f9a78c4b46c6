"""Leave-one-style-out generalisation: the trained model against classical baselines on a
synthetic style family it never saw, at the training resolution and at kidney_6's.

For each held-out family of ``vessel_kit.synth.STYLES`` (a fold), in one run:

1. a Kaggle-layout dataset under ``--work`` (default a temporary folder): ``--train-volumes``
   training volumes of the *other* families the demo trains on (cycling through them, so the
   styles mix; every volume a fresh look) and one validation volume of each of them, all
   ``--shape`` at 50 µm, fully labelled. ``faint`` is never trained on (as in the demo: its
   vessels are not visible in a slice), only held out;
2. the ``synthetic_cpu`` recipe trained on it (``--epochs`` overrides the recipe's epochs);
3. ``--test-volumes`` draws of the held-out family (seeds ``--seed``, ``--seed`` + 1, ...), each
   ``--test-shape`` and made in memory: at 50 µm, and the same anatomy resampled to 63.08 µm
   (kidney_6's voxel size: vessels appear 50/63.08 times as thick in voxels). A family is a
   distribution of looks: one draw can be invisible to every method (a ``random`` draw was), so
   the table shows the mean over the draws and the JSON each draw's score;
4. the model's masks from ``infer_volume(volume, best checkpoint, voxel_size_um=...)`` with its
   default threshold (the checkpoint's calibrated one, else 0.5); the 63.08 µm volume is
   resampled to the model's 50 µm and back;
5. both classical baselines (``vessel_kit.baselines``) fitted on the fold's training volumes only
   and applied to the same held-out volumes;
6. surface Dice (tolerance 0) of every mask.

Goals per fold: model >= the better baseline + 0.2 at 50 and at 63.08 µm, and
|model@63 - model@50| <= 0.05. Not a speed benchmark: every step runs in this process and its
wall time is recorded (the machine's load shows in ``machine``).

    python benchmarks/bench_generalization.py --json /tmp/generalization.json      # every family
    python benchmarks/bench_generalization.py --families wall --epochs 1 --crops-per-epoch 32 \
        --tta none --shape 32x96x96 --train-volumes 2                                 # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

import _common  # noqa: E402

from vessel_kit.tta import TTA_MODES  # noqa: E402

TRAIN_VOXEL_UM = 50.0
TEST_VOXEL_UM = (50.0, 63.08)
MARGIN_GOAL = 0.2
RESOLUTION_GOAL = 0.05
MEASURED_MODULES = ("vessel_kit.baselines", "vessel_kit.synth.geometry", "vessel_kit.synth.render",
                    "vessel_kit.synth.styles", "vessel_kit.training", "vessel_kit.data", "vessel_kit.infer")
HEADERS = ("held out", "model @50", "model @63", "threshold @50", "threshold @63", "Frangi @50", "Frangi @63",
           "margin @50", "margin @63", "fold s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vessel_kit.synth import STYLES, SYNTHETIC_VOLUMES

    families = list(STYLES)
    trained = sorted({spec.style for spec in SYNTHETIC_VOLUMES if spec.split == "train"})
    held_out = choose_folds(families, args.families, args.folds)
    machine = _common.machine_info()
    print(_common.describe_machine(machine))
    with nullcontext(args.work) if args.work else tempfile.TemporaryDirectory(prefix="bench_generalization_") as work:
        folds = [run_fold(family, trained, Path(work) / family, args) for family in held_out]
    print(f"\nshape {'x'.join(map(str, args.shape))} (held out: {args.test_volumes} x {'x'.join(map(str, args.test_shape))}, "
          f"scores their mean), "
          f"{args.train_volumes} training volumes per fold, seed {args.seed}, "
          f"epochs {args.epochs or 'recipe'}, crops per epoch {args.crops_per_epoch or 'recipe'}, tta {args.tta}")
    _common.print_table(HEADERS, [table_row(fold) for fold in folds])
    print()
    for fold in folds:
        for line in goal_lines(fold):
            print(line)
    _common.write_json(args.json, {
        "args": {**vars(args), "shape": list(args.shape)}, "families": families, "machine": machine,
        "sources": _common.source_digests(*MEASURED_MODULES),
        "goals": {"margin": MARGIN_GOAL, "resolution": RESOLUTION_GOAL}, "folds": folds,
    })
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="held-out families, comma separated (default: every style)")
    parser.add_argument("--folds", type=int, help="run at most this many folds")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the recipe's)")
    parser.add_argument("--crops-per-epoch", type=int, help="training crops per epoch (default: the recipe's)")
    parser.add_argument("--set", dest="overrides", type=lambda text: _common.json_mapping(text, "--set"), default={},
                        metavar="JSON", help="training options merged over the recipe's, e.g. a variant's loss")
    parser.add_argument("--tta", default="flips", choices=TTA_MODES, help="infer_volume's test-time augmentation")
    parser.add_argument("--shape", type=lambda text: _common.parse_shape(text, 3), default=(64, 256, 256),
                        help="every training and validation volume's shape Z x Y x X (default 64x256x256)")
    parser.add_argument("--test-shape", type=lambda text: _common.parse_shape(text, 3), default=(64, 256, 256),
                        help="the held-out volume's shape Z x Y x X (default 64x256x256)")
    parser.add_argument("--train-volumes", type=int, default=15, help="training volumes per fold (default 15)")
    parser.add_argument("--test-volumes", type=int, default=3,
                        help="held-out draws of the family per fold, scored and averaged (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the datasets and held-out volumes")
    parser.add_argument("--work", help="keep datasets and runs in this folder (default: a temporary one)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    if args.folds is not None and args.folds < 1:
        parser.error(f"--folds must be >= 1, got {args.folds}")
    for option in ("epochs", "crops_per_epoch", "train_volumes", "test_volumes"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    return args


def choose_folds(families: list[str], chosen: str | None, folds: int | None) -> list[str]:
    """The held-out families: ``chosen`` (comma separated) or all, at most ``folds`` of them."""
    if len(families) < 2:
        raise ValueError(f"leave-one-style-out needs at least 2 styles, got {families}")
    held_out = families if chosen is None else [name.strip() for name in chosen.split(",") if name.strip()]
    if not held_out or any(name not in families for name in held_out):
        raise ValueError(f"--families must name styles among {families}, got {chosen!r}")
    return held_out[:folds]


def fold_volumes(held_out: str, trained: list[str], n_train: int) -> tuple[dict[str, str], dict[str, str]]:
    """({training volume name: style}, {validation volume name: style}): the trained families but
    the held-out one, in turn; one validation volume of each of them, as the demo's recipe
    validates (and calibrates its threshold) on one unseen look of every family it trains on."""
    others = [family for family in trained if family != held_out]
    train = {f"train_{index}_{others[index % len(others)]}": others[index % len(others)] for index in range(n_train)}
    return train, {f"val_{family}": family for family in others}


def run_fold(held_out: str, families: list[str], folder: Path, args: argparse.Namespace) -> dict:
    """One fold: dataset, training, held-out volumes, model and baseline scores, wall times."""
    started = time.perf_counter()
    train_styles, val_styles = fold_volumes(held_out, families, args.train_volumes)
    print(f"\n== held out: {held_out}; training on {train_styles}, validating on {val_styles}", flush=True)
    seconds = {}
    with timed(seconds, "dataset"):
        root = write_dataset(folder / "data", {**train_styles, **val_styles}, args.shape, args.seed)
    with timed(seconds, "train"):
        checkpoint, training = train_model(root, folder / "run", list(train_styles), list(val_styles), args)
    with timed(seconds, "held_out_volumes"):
        test_seeds = [args.seed + index for index in range(args.test_volumes)]
        draws = [held_out_volumes(held_out, args.test_shape, seed) for seed in test_seeds]
    per_volume = {}
    with timed(seconds, "model_predict"):
        per_volume["model"] = [score_model(checkpoint, tests, args.tta) for tests in draws]
    with timed(seconds, "baselines_load"):
        images, labels = read_training_volumes(root, list(train_styles))
    fitted = {}
    for name, fit, predict in baseline_contenders():
        with timed(seconds, f"{name}_fit"):
            fitted[name] = fit(images, labels)
        with timed(seconds, f"{name}_predict"):
            per_volume[name] = [{voxel: score(truth, predict(image, fitted[name], voxel))
                                 for voxel, (image, truth) in tests.items()} for tests in draws]
    seconds["fold"] = time.perf_counter() - started
    result = {"held_out": held_out, "train_styles": train_styles, "val_styles": val_styles,
              "test_seeds": test_seeds,
              "scores": {name: mean_by_voxel(draw_scores) for name, draw_scores in per_volume.items()},
              "scores_per_volume": {name: [{str(voxel): value for voxel, value in draw.items()} for draw in draw_scores]
                                    for name, draw_scores in per_volume.items()},
              "training": training, "baselines": {name: asdict(params) for name, params in fitted.items()},
              "vessel_fraction": [{str(voxel): float(truth.mean()) for voxel, (_, truth) in tests.items()}
                                  for tests in draws],
              "seconds": seconds}
    result["goals"] = goals(result)
    print(f"   scores {result['scores']}\n   seconds { {k: round(v, 1) for k, v in seconds.items()} }", flush=True)
    return result


def mean_by_voxel(draws: list[dict[float, float]]) -> dict[str, float]:
    """{voxel size as str: the mean score over the held-out draws}."""
    return {str(voxel): float(np.mean([draw[voxel] for draw in draws])) for voxel in draws[0]}


@contextmanager
def timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall seconds of the block as ``seconds[name]``."""
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start


def write_dataset(root: Path, styles: dict[str, str], shape: tuple[int, int, int], seed: int) -> Path:
    """A Kaggle-layout dataset of fully labelled training-split volumes (name: style) at 50 µm.

    Written once per ``--work`` folder: a rerun (after an interruption) reuses it, and training
    then resumes its run, when ``dataset.json`` beside it says it was written for the same volumes,
    shape and seed; any other dataset there is refused.
    """
    from vessel_kit.synth import SyntheticVolumeSpec, make_synthetic_dataset

    spec = {"styles": styles, "shape": list(shape), "seed": seed, "voxel_size_um": TRAIN_VOXEL_UM}
    spec_path = root.parent / "dataset.json"
    if root.exists():
        written = json.loads(spec_path.read_text()) if spec_path.is_file() else None
        if written == spec:
            print(f"   reusing the fold's dataset {root}", flush=True)
            return root
        raise ValueError(f"{root} holds a dataset not written for this fold's volumes, shape and seed "
                         f"({spec_path} {'differs' if written else 'is missing'}): remove it or choose another --work")
    specs = [SyntheticVolumeSpec(name=name, split="train", shape=tuple(shape), labelled_fraction=1.0, style=style,
                                 voxel_size_um=TRAIN_VOXEL_UM) for name, style in styles.items()]
    make_synthetic_dataset(root, seed=seed, volumes=specs, progress=False)
    _common.write_json(spec_path, spec, quiet=True)
    return root


def train_model(root: Path, out_dir: Path, train: list[str], val: list[str], args: argparse.Namespace) -> tuple[Path, dict]:
    """Train the ``synthetic_cpu`` recipe (with ``--set``, ``--epochs`` and ``--crops-per-epoch`` when
    given); (best checkpoint, what the run reports)."""
    from vessel_kit.models import read_checkpoint_metadata
    from vessel_kit.recipes import merge_config
    from vessel_kit.training import TrainConfig, train as run_training

    options = merge_config(args.overrides, {"base": "synthetic_cpu", "data_root": str(root), "out_dir": str(out_dir),
                                            "train_volumes": train, "val_volumes": val, "volume_weights": {},
                                            "progress": False})
    if args.epochs is not None:
        options["epochs"] = args.epochs
    if args.crops_per_epoch is not None:
        options["crops"] = {**options.get("crops", {}), "crops_per_epoch": args.crops_per_epoch}
    result = run_training(TrainConfig.from_dict(options))
    metadata = read_checkpoint_metadata(result.best_checkpoint)
    return result.best_checkpoint, {
        "best_val_surface_dice": result.best_score, "best_epoch": result.best_epoch, "epochs": len(result.history),
        "threshold": metadata["threshold"], "checkpoint_voxel_size_um": metadata["config"].voxel_size_um,
        "epoch_seconds": [record.get("seconds") for record in result.history],
    }


def held_out_volumes(style: str, shape: tuple[int, int, int], seed: int) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """{voxel size: (image, labels)}: one seed of ``style`` at 50 µm, and the same anatomy
    resampled to each coarser test voxel size (images trilinear, labels linear then cut at 0.5,
    as ``vessel_kit.validation.validation_cases`` resamples)."""
    from vessel_kit.data import TrainVolume
    from vessel_kit.synth import make_synthetic_volume
    from vessel_kit.validation import validation_cases

    image, labels = make_synthetic_volume(tuple(shape), seed, TRAIN_VOXEL_UM, style=style)
    volume = TrainVolume(style, image, labels, voxel_size_um=TRAIN_VOXEL_UM)
    cases = validation_cases([volume], [v for v in TEST_VOXEL_UM if v != TRAIN_VOXEL_UM])
    return {case.voxel_size_um: (case.images, case.truth) for case in cases}


def score_model(checkpoint: Path, tests: dict[float, tuple[np.ndarray, np.ndarray]], tta: str) -> dict[float, float]:
    """{voxel size: surface Dice} of the checkpoint's masks (3 axes, ``tta``), at its default
    threshold."""
    from vessel_kit.infer import infer_volume

    return {voxel: score(truth, infer_volume(image, checkpoint, voxel_size_um=voxel, tta=tta,
                                             model_voxel_size_um=TRAIN_VOXEL_UM, progress=False))
            for voxel, (image, truth) in tests.items()}


def read_training_volumes(root: Path, names: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(images, labels) of the named training volumes, as written to the dataset."""
    from vessel_kit.layout import find_volumes

    infos = {info.name: info for info in find_volumes(root, "train")}
    return ([infos[name].read_images(progress=False) for name in names],
            [infos[name].read_labels(progress=False) for name in names])


def baseline_contenders() -> list[tuple]:
    """(name, fit(images, labels), predict(volume, fitted, voxel size)) of each classical baseline;
    the training volumes are all at ``TRAIN_VOXEL_UM``."""
    from vessel_kit import baselines

    return [
        ("threshold", baselines.fit_threshold, lambda volume, fitted, _voxel: baselines.predict_threshold(volume, fitted)),
        ("frangi", lambda images, labels: baselines.fit_frangi(images, labels, [TRAIN_VOXEL_UM] * len(images)),
         baselines.predict_frangi),
    ]


def score(truth: np.ndarray, prediction: np.ndarray) -> float:
    from vessel_kit.metric import surface_dice

    return float(surface_dice(truth, prediction))


def goals(fold: dict) -> dict:
    """The margin of the model over the better baseline per voxel size, its change between the
    voxel sizes, and whether each goal is met."""
    scores = fold["scores"]
    margins = {voxel: scores["model"][voxel] - max(scores["threshold"][voxel], scores["frangi"][voxel])
               for voxel in scores["model"]}
    low, high = (str(voxel) for voxel in TEST_VOXEL_UM)
    change = scores["model"][high] - scores["model"][low]
    return {"margin": margins, "margin_met": all(m >= MARGIN_GOAL for m in margins.values()),
            "resolution_change": change, "resolution_met": abs(change) <= RESOLUTION_GOAL}


def table_row(fold: dict) -> list:
    """Scores and margins as 3-decimal strings (margins signed), and the fold's wall time."""
    low, high = (str(voxel) for voxel in TEST_VOXEL_UM)
    scores, margins = fold["scores"], fold["goals"]["margin"]
    return [fold["held_out"], *(f"{scores[name][voxel]:.3f}" for name in ("model", "threshold", "frangi")
                                for voxel in (low, high)),
            f"{margins[low]:+.3f}", f"{margins[high]:+.3f}", round(fold["seconds"]["fold"], 1)]


def goal_lines(fold: dict) -> list[str]:
    verdict = {True: "met", False: "MISSED"}
    found = fold["goals"]
    margins = ", ".join(f"{margin:+.3f} @{voxel}" for voxel, margin in found["margin"].items())
    return [
        f"{fold['held_out']}: model >= better baseline + {MARGIN_GOAL} at 50 and 63.08 µm: "
        f"{verdict[found['margin_met']]} ({margins})",
        f"{fold['held_out']}: |model@63 - model@50| <= {RESOLUTION_GOAL}: "
        f"{verdict[found['resolution_met']]} ({found['resolution_change']:+.3f})",
    ]


if __name__ == "__main__":
    sys.exit(main())
