"""The ``vessel-kit`` command line: ``synth``, ``train``, ``recipes``, ``infer``, ``score``, ``validate``, ``demo``.

A thin layer: parse arguments, call the library, print results. Bad input and file-system
errors (a missing or unwritable path, a full disk) surface as a one-line ``error: ...`` message
and exit status 2, not a traceback (``vessel-kit --debug ...`` shows the traceback); Ctrl-C
exits with status 130. Inference options are checked as they are parsed, naming the flag.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from .layout import KNOWN_VOXEL_SIZES_UM
from .metric import score_submission
from .rle import validate_submission

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FloatingPointError, OSError) as error:
        return _report(f"error: {_describe(error)}", 2, args.debug)
    except KeyboardInterrupt:
        return _report("interrupted", 130, args.debug)


def _describe(error: Exception) -> str:
    """One line: ``PATH: reason`` for an OSError that names its file, else the message."""
    if isinstance(error, OSError) and error.filename is not None:
        where = str(error.filename) if error.filename2 is None else f"{error.filename} -> {error.filename2}"
        return f"{where}: {error.strerror or error}"
    return str(error) or type(error).__name__


def _report(line: str, status: int, debug: bool) -> int:
    """Print the traceback being handled (with --debug) or ``line``; return ``status``."""
    if debug:
        traceback.print_exc()
    else:
        print(line, file=sys.stderr)
    return status


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vessel-kit", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write a synthetic dataset in the Kaggle layout")
    synth.add_argument("root", type=Path, help="output folder (must not exist or be empty)")
    synth.add_argument("--scale", type=float, default=1.0, help="size factor of every volume (default 1.0)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--style", default=None,
                       help="one style family for every volume (vessel_kit.synth.STYLES; default: the demo's mix)")
    synth.set_defaults(run=_run_synth)

    train = commands.add_parser("train", help="train a model from a YAML config (see vessel_kit.training.TrainConfig)")
    train.add_argument("--config", type=Path, required=True, help="YAML file of TrainConfig options")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run files in out_dir (a run with another config, or without state.pt)")
    train.set_defaults(run=_run_train)

    recipes = commands.add_parser("recipes", help="list the training recipes (base: NAME) and inference presets (infer --config NAME)")
    recipes.set_defaults(run=_run_recipes)

    infer = commands.add_parser("infer", help="predict every test volume of a Kaggle layout into a submission")
    infer.add_argument("data_root", type=Path,
                       help="dataset root holding test/<volume>/images, or one OME-Zarr, zarr or N5 volume, or "
                            "hoa:<NAME>, a Human Organ Atlas dataset (pip install 'vessel_kit[hoa]') "
                            "(predicted into the OME-Zarr store --out NAME.zarr)")
    infer.add_argument("checkpoints", type=Path, nargs="+", help="one or more .safetensors checkpoints (an ensemble)")
    infer.add_argument("--out", type=Path, default=Path("submission.csv"), help="submission CSV (default submission.csv)")
    infer.add_argument("--split", default="test", choices=("train", "test"), help="which split to predict (default test)")
    infer.add_argument("--config", type=_checked_config, default=None,
                       help="inference preset (see vessel-kit recipes) or YAML file of InferConfig options; flags override it")
    _add_infer_config_flags(infer)
    infer.add_argument("--time-budget", type=_checked("time_budget_s", float), default=None,
                       help="seconds (> 0); later volumes get empty masks past it")
    infer.add_argument("--device", default=None,
                       help="cpu, cuda:N, comma-separated devices, or auto (default: every working GPU, else cpu)")
    infer.add_argument("--logits-dir", type=Path, default=None, help="also keep each volume's float16 logits there (.npy)")
    infer.add_argument("--on-error", default="raise", choices=("raise", "empty"), help="empty: a failing volume gets empty masks")
    infer.add_argument("--voxel-size", dest="voxel_size_um", type=_positive_float, default=None,
                       help="the input's (full-resolution) voxel size in µm; overrides its metadata and the Kaggle names")
    infer.add_argument("--level", type=int, default=None,
                       help="OME-Zarr/N5 input: the pyramid level to read (default: the one nearest the models' voxel size)")
    infer.add_argument("--blocks", action="store_true",
                       help="predict one volume (zarr, N5 or TIFF folder) block by block into --out NAME.zarr: "
                            "any size, resumable, the same result as in memory (vessel_kit.blocks)")
    infer.add_argument("--block", type=int, default=256,
                       help="--blocks: block side in voxels, a multiple of 128 or below it (default 256; chunks of 128)")
    infer.add_argument("--workers", type=int, default=None, help="--blocks: run on a dask LocalCluster of N worker processes")
    infer.add_argument("--scheduler", default=None, help="--blocks: run on the dask cluster at this address (tcp://host:8786)")
    infer.add_argument("--overwrite", action="store_true", help="--blocks: replace an --out store made with other settings")
    infer.add_argument("--store-logits", action="store_true", help="--blocks: also store the float16 logits")
    infer.set_defaults(run=_run_infer)

    score = commands.add_parser("score", help="score a submission against a solution CSV")
    score.add_argument("solution", type=Path, help="CSV with id,rle,width,height,image,slice")
    score.add_argument("submission", type=Path, help="CSV with id,rle")
    score.add_argument("--json", action="store_true", help="print the scores as JSON")
    score.set_defaults(run=_run_score)

    validate = commands.add_parser("validate", help="check a submission against the sample submission")
    validate.add_argument("submission", type=Path)
    validate.add_argument("sample_submission", type=Path)
    validate.set_defaults(run=_run_validate)

    demo = commands.add_parser("demo", help="synthesise a dataset, train, predict the test volumes, score")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    demo.add_argument("--scale", type=float, default=1.0, help="size factor of the synthetic volumes")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    demo.add_argument("--quick", action="store_true", help="a one-minute smoke run: 1 epoch of 64 crops")
    demo.add_argument("--overwrite", action="store_true", help="start the training over (another config than before)")
    demo.set_defaults(run=_run_demo)
    return parser


def _add_infer_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--<field>`` for every InferConfig field in ``INFER_FLAGS``, each checked as parsed."""
    from .infer_config import InferConfig

    defaults = InferConfig().to_dict()
    for name in InferConfig.field_names():
        if name in COMMAND_SET_FIELDS:
            continue
        convert, help_text = INFER_FLAGS[name]
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, type=_checked(name, convert), default=None,
                            help=f"{help_text} (InferConfig.{name}; default {defaults[name]})")


def _infer_options(args: argparse.Namespace) -> dict[str, object]:
    """The InferConfig options given as flags."""
    return {name: getattr(args, name) for name in INFER_FLAGS if getattr(args, name) is not None}


def _checked_config(text: str) -> object:
    """An argparse type: the InferConfig of a preset name or a YAML file (its errors name the
    file and the key)."""
    from .infer_config import InferConfig

    try:
        return InferConfig.load(text)
    except (ValueError, OSError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _checked(name: str, convert: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type: ``convert`` the text, then check the value as ``predict_submission``'s
    option ``name``, so a bad value stops the command at once with the flag named."""

    def parse(text: str) -> object:
        from .submit import check_submission_options

        try:
            value = convert(text)
        except ValueError:
            kind = convert.__name__.strip("_").replace("_", " ")  # float, int, comma list, float pair, ...
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        try:
            check_submission_options({name: value})
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    return parse


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",")]


def _float_pair(text: str) -> tuple[float, ...]:
    return tuple(float(item) for item in text.split(","))


def _int_or_ints(text: str) -> int | tuple[int, ...]:
    sides = tuple(int(item) for item in text.split(","))
    return sides[0] if len(sides) == 1 else sides


def _weights(text: str) -> dict[str, float]:
    pairs = [item.split("=") for item in text.split(",")]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(text)
    return {axis.strip(): float(weight) for axis, weight in pairs}


def _hull_gate(text: str) -> int | dict[str, object]:
    """An int (the dilation) or key=value pairs of ``hull.HullGate`` fields."""
    if "=" not in text:
        return int(text)
    pairs = dict(part.split("=", 1) for part in text.split(","))
    numbers = {"dilation": int, "threshold_3d": float}
    return {key.strip(): numbers.get(key.strip(), str)(value.strip()) for key, value in pairs.items()}


def _boolean(text: str) -> bool:
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


# One flag per InferConfig field (except device and progress, which the command sets itself):
# how its text converts and what it means. Defaults are InferConfig's (a flag not given is not
# passed on). tests/test_cli.py checks that this table covers every field.
INFER_FLAGS: dict[str, tuple[Callable[[str], object], str]] = {
    "axes": (_comma_list, "comma-separated axes, e.g. xy,xz,yz"),
    "axis_weights": (_weights, "axis weights, e.g. xy=2,xz=1,yz=1 (default equal)"),
    "tile_size": (_int_or_ints, "tile side, or D,H,W for 3D patches (default: the checkpoint's)"),
    "overlap": (float, "fraction of a tile shared with its neighbour, in [0, 1)"),
    "min_plane_side": (int, "skip an axis whose planes are thinner than this"),
    "pad_planes_to": (int, "with whole planes (no tile size): pad each side up to at least this"),
    "tta": (str, "test-time augmentation: none, flips or d4"),
    "reverse_slices": (_boolean, "true: also feed the 2.5D slices in reverse order"),
    "model_voxel_size_um": (float, "the models' voxel size in µm (default: the checkpoints')"),
    "batch_size": (int, "tiles per batch"),
    "amp": (_boolean, "true/false: float16 autocast on CUDA (default on)"),
    "compile": (_boolean, "true: torch.compile the models (slower start, faster tiles on GPUs)"),
    "prefetch": (_boolean, "true/false: prepare batches in a background thread while the model runs "
                           "(default on, off in one-thread dask workers on the CPU)"),
    "threshold": (float, "probability threshold (default: the checkpoints' calibrated one, else 0.5)"),
    "hysteresis": (_float_pair, "HIGH,LOW: voxels above HIGH seed the mask, which grows in 3D through voxels above LOW"),
    "top_fraction": (float, "keep this fraction of voxels instead of a threshold"),
    "min_component_size": (int, "drop 3D components smaller than this (default: the checkpoints' calibrated size; 0 keeps all)"),
    "connectivity": (int, "neighbourhood of those components: 6, 18 or 26 (default: 8 in-plane plus above/below)"),
    "hull_gate": (_hull_gate, "2D + 3D ensembles: DILATION (keep the 3D mask within this many voxels of the 2D mask), "
                              "or dilation=10,shape=convex,rule=sum,threshold_3d=0.5 (the 4th-place rule)"),
    "polarity": (str, "as_given, inverted (mirror the intensities: dark vessels), or auto (the mirrored scan too "
                      "when the scan as read gives an almost empty or speckled mask; the default, block by block as_given)"),
}
COMMAND_SET_FIELDS = ("device", "progress")  # --device is predict_submission's; progress always shows


def _run_synth(args: argparse.Namespace) -> int:
    from .synth import make_synthetic_dataset

    root = make_synthetic_dataset(args.root, scale=args.scale, seed=args.seed, styles=args.style)
    print(f"synthetic dataset written to {root}")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train

    result = train(TrainConfig.from_yaml(args.config), overwrite=args.overwrite)
    for name, member in getattr(result, "members", {"": result}).items():  # a multi-member run: each member
        print(f"{name + ': ' if name else ''}best validation score {member.best_score:.4f} at epoch "
              f"{member.best_epoch}: {member.best_checkpoint}")
    if hasattr(result, "checkpoints"):
        print(f"ensemble ({result.manifest}): {' '.join(map(str, result.checkpoints))}")
    return 0


def _run_recipes(args: argparse.Namespace) -> int:
    from .infer_config import list_infer_presets
    from .recipes import list_recipes, recipe_members

    recipes = {name: description + (f" [members: {', '.join(members)}]" if (members := recipe_members(name)) else "")
               for name, description in list_recipes().items()}
    for title, listing in (("training recipes (base: NAME)", recipes),
                           ("inference presets (vessel-kit infer --config NAME)", list_infer_presets())):
        print(f"{title}:")
        width = max(map(len, listing), default=0)
        for name, description in listing.items():
            print(f"  {name:<{width}}  {description}")
    return 0


def _run_infer(args: argparse.Namespace) -> int:
    from .ome_zarr import is_volume_store
    from .submit import predict_submission

    block_flags = [flag for flag, given in (("--workers", args.workers), ("--scheduler", args.scheduler),
                                            ("--overwrite", args.overwrite), ("--store-logits", args.store_logits)) if given]
    if block_flags and not args.blocks:
        raise ValueError(f"{', '.join(block_flags)}: only with --blocks (block-wise inference into --out NAME.zarr)")
    if is_volume_store(args.data_root) or args.blocks:
        return _run_infer_volume(args)
    if args.level is not None:
        raise ValueError(f"--level is for an OME-Zarr or N5 volume; {args.data_root} is a dataset root")
    status = predict_submission(
        args.data_root, args.checkpoints, args.out, split=args.split, time_budget_s=args.time_budget,
        device=args.device, on_error=args.on_error, logits_dir=args.logits_dir, config=args.config,
        voxel_size_um=args.voxel_size_um, **_infer_options(args),
    )
    print(f"submission written to {args.out}: " + ", ".join(f"{name} {state}" for name, state in status.items()))
    return 0


def _run_infer_volume(args: argparse.Namespace) -> int:
    """One zarr/N5 volume (``open_volume``: the level nearest the models' voxel size) predicted in
    memory into the OME-Zarr store ``--out`` (mask and its pyramid)."""
    from .infer import infer_volume
    from .models import read_checkpoint_metadata
    from .ome_zarr import open_volume
    from .ome_zarr_out import create_output
    from .submit import carried_infer_config

    if args.out.suffix != ".zarr":
        raise ValueError(f"--out {args.out}: a zarr or N5 volume is predicted into an OME-Zarr store: give --out NAME.zarr")
    unused = [flag for flag, given in (("--split", args.split != "test"), ("--time-budget", args.time_budget),
                                       ("--logits-dir", args.logits_dir), ("--on-error", args.on_error != "raise")) if given]
    if unused:
        raise ValueError(f"{', '.join(unused)}: for a dataset root only, not for the volume {args.data_root}")
    config = (args.config or carried_infer_config(args.checkpoints, _log)).replace(**_infer_options(args))
    if args.device:
        config = config.replace(device=args.device)
    trained_at = {read_checkpoint_metadata(path)["config"].voxel_size_um for path in args.checkpoints}
    model_um = config.model_voxel_size_um or (trained_at.pop() if len(trained_at) == 1 else None)
    if args.blocks:
        from .blocks import infer_blocks

        store = infer_blocks(args.data_root, [str(path) for path in args.checkpoints], args.out, config=config,
                             block=args.block, chunks=min(128, args.block), voxel_size_um=args.voxel_size_um, level=args.level,
                             executor="dask" if args.workers or args.scheduler else "serial", workers=args.workers,
                             scheduler=args.scheduler, overwrite=args.overwrite, logits=args.store_logits)
        print(f"mask written to {store.path}/mask (OME-Zarr, {store.voxel_size_um} µm), block by block")
        return 0
    source = open_volume(args.data_root, voxel_size_um=args.voxel_size_um, level=args.level, model_voxel_size_um=model_um)
    print(f"{source!r}: {source.voxel_size_um} µm")
    mask = infer_volume(source, [str(path) for path in args.checkpoints], config)
    store = create_output(args.out, source.shape, voxel_size_um=source.voxel_size_um)
    store.write_block((slice(None),) * 3, mask)
    store.build_pyramid()
    print(f"mask written to {store.path}/mask (OME-Zarr, {store.voxel_size_um} µm)")
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _run_score(args: argparse.Namespace) -> int:
    scores = score_submission(args.solution, args.submission)
    print(json.dumps(scores, indent=2) if args.json else _format_scores(scores))
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    validate_submission(args.submission, args.sample_submission)
    print(f"{args.submission}: valid")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    """The built-in default job: synthesise a dataset, train the ``synthetic_cpu`` recipe, predict
    the test volumes, write and validate a submission, score it. Reruns reuse the dataset and
    resume the training."""
    from .infer_config import InferConfig
    from .models import read_checkpoint_metadata
    from .qc import qc_report
    from .submit import predict_submission
    from .synth import make_synthetic_dataset
    from .training import TrainConfig, train

    started = time.perf_counter()
    data_root = args.out / "data"
    if not (data_root / "train").is_dir():
        make_synthetic_dataset(data_root, scale=args.scale, seed=args.seed)
    options = {"base": "synthetic_cpu", "data_root": str(data_root), "out_dir": str(args.out / "run")}
    if args.quick:
        options.update(epochs=1, crops={"crops_per_epoch": 64})
    if args.epochs:
        options["epochs"] = args.epochs
    result = train(TrainConfig.from_dict(options), overwrite=args.overwrite)
    submission, logits_dir = args.out / "submission.csv", args.out / "logits"
    status = predict_submission(data_root, [result.best_checkpoint], submission, logits_dir=logits_dir,
                                config=InferConfig.load("cpu"))  # 3 axes; flips would cost 4x the time on 2 CPU cores
    scores = score_submission(data_root / "solution.csv", submission, progress=False)
    header = read_checkpoint_metadata(result.best_checkpoint)
    threshold, min_size = header["threshold"], header["min_component_size"]
    curves = qc_report(data_root, submission, logits_dir, args.out / "qc.png", threshold=threshold)
    print(f"\nsurface Dice of the test volumes at the calibrated threshold {threshold}, components under "
          f"{min_size or 0} voxels (at the model's resolution) removed (model: {result.best_checkpoint}):")
    print(_format_scores(scores))
    for name, curve in curves.items():
        best = max(curve, key=lambda point: point[1])
        print(f"  {name}: best threshold {best[0]:.2f}, no components removed, would give {best[1]:.4f} "
              f"({status[name]}, {KNOWN_VOXEL_SIZES_UM.get(name)} µm)")
    print(f"\ndone in {time.perf_counter() - started:.0f} s. Outputs in {args.out}: data/ (synthetic dataset), "
          f"run/ (checkpoints, curves.png, metrics.jsonl), submission.csv, logits/, qc.png (overlays, score vs threshold)")
    return 0


def _format_scores(scores: dict[str, float]) -> str:
    width = max(len(name) for name in scores)
    return "\n".join(f"  {name:<{width}}  {value:.4f}" for name, value in scores.items())


if __name__ == "__main__":
    raise SystemExit(main())
