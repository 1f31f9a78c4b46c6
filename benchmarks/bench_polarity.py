"""Polarity "auto" on both polarities: each volume predicted as read and mirrored, what "auto" keeps.

A rule that picks between a scan as read and its mirrored intensities (``vessel_kit.polarity``)
can only be judged on scans of both polarities. Each volume here (the outside probe's variants,
``make_synthetic_volume`` draws of every style family, and optionally a dataset's test volumes)
is predicted as read and mirrored; the mirrored scan of a volume is the inverted volume read as
is, so one pair of passes scores the rule twice: on the volume as drawn and on its inversion
(where a bright-vessel scan becomes one of dark vessels). For each pass the table gives the mask
(after the checkpoint's calibrated cut and component filter), the share of the voxels above the
cut that the component filter kept (``MaskCount.kept_share``) and surface Dice; then the pass
"auto" keeps on each of the two scans (``asks_for_mirrored`` and ``keeps_mirrored``, as
``Predictor.prediction`` decides). The summary compares "auto" with the scan as read and with the
better pass of each volume, and counts the scans where "auto" ran the second pass (its cost).

Nothing is fitted here; the volumes' seeds default to ones no recipe trains on.

    python benchmarks/bench_polarity.py a.safetensors b.safetensors --seeds 300 301 --data demo_out/data --json F
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

import _common  # noqa: E402
import bench_outside_probe  # noqa: E402
from vessel_kit.polarity import MaskCount, asks_for_mirrored, keeps_mirrored, mirrored  # noqa: E402

SHAPE = (64, 192, 192)
HEADERS = ("checkpoint", "volume", "truth", "as read: mask / kept share / score", "mirrored: mask / kept share / score",
           "auto as drawn", "auto on the inverted scan")
SUMMARY_HEADERS = ("scans", "count", "as read", "auto", "better pass", "second pass run", "auto took the worse pass")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vessel_kit.infer_config import InferConfig
    from vessel_kit.predictor import Predictor

    config = InferConfig.load(args.config).replace(progress=False)
    volumes = _volumes(args)
    print(_common.describe_machine(_common.machine_info()))
    rows, results = [], []
    for checkpoint in args.checkpoints:
        predictor = Predictor(checkpoint, config)
        for name, image, truth, voxel_size_um in volumes:
            started = time.perf_counter()
            passes = {key: _pass(predictor, scan, truth, voxel_size_um)
                      for key, scan in (("as_read", image), ("mirrored", mirrored(image)))}
            drawn = _auto_choice(passes["as_read"], passes["mirrored"])
            inverted = _auto_choice(passes["mirrored"], passes["as_read"])
            results.append({"checkpoint": str(checkpoint), "volume": name, "truth": float(np.mean(truth)), **passes,
                            "auto_as_drawn": drawn, "auto_inverted": inverted,
                            "seconds": time.perf_counter() - started})
            rows.append((_short(checkpoint), name, f"{np.mean(truth):.2%}", _cell(passes["as_read"]),
                         _cell(passes["mirrored"]), drawn, inverted))
            print(f"{_short(checkpoint)} {name}: as read {passes['as_read']['score']:.3f}, "
                  f"mirrored {passes['mirrored']['score']:.3f}, auto {drawn} / {inverted}", flush=True)
    _common.print_table(HEADERS, rows)
    summary = summarize(results)
    _common.print_table(SUMMARY_HEADERS, [(scans, s["count"], f"{s['as_read']:.3f}", f"{s['auto']:.3f}",
                                           f"{s['better']:.3f}", s["second_pass"], f"{s['worse']} (−{s['lost']:.3f})")
                                          for scans, s in summary.items()])
    sources = _common.source_digests("vessel_kit.polarity", "vessel_kit.predictor")
    _common.write_json(args.json, {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                   "results": results, "summary": summary, "sources": sources})
    return 0


def _volumes(args: argparse.Namespace) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(name, uint16 image, bool truth, voxel size) of every volume: the dataset's test volumes,
    the outside probe's variants (seeds from ``seeds[0]``), ``--families`` x ``--seeds``."""
    from vessel_kit.synth import make_synthetic_volume

    volumes = []
    if args.data is not None:
        from vessel_kit.layout import find_volumes
        from vessel_kit.qc import read_solution_volume

        volumes += [(volume.name, volume.read_images(), read_solution_volume(args.data / "solution.csv", volume.name),
                     volume.voxel_size_um) for volume in find_volumes(args.data, "test")]
    volumes += [(f"{variant}_{args.seeds[0] + index}", *bench_outside_probe.probe_volume(variant, args.seeds[0] + index),
                 bench_outside_probe.VOXEL_SIZE_UM) for index, variant in enumerate(bench_outside_probe.VARIANTS)]
    for family in args.families:
        for seed in args.seeds:
            image, truth = make_synthetic_volume(args.shape, seed, style=family)[:2]
            volumes.append((f"{family}_{seed}", image, truth, 50.0))
    return volumes


def _pass(predictor, scan: np.ndarray, truth: np.ndarray, voxel_size_um: float) -> dict:
    """One pass's mask count and surface Dice at the checkpoint's calibration."""
    from vessel_kit.metric import surface_dice

    mask, count = predictor.counted_mask(predictor.logits(scan, voxel_size_um=voxel_size_um))
    return {"kept": count.kept, "above": count.above, "volume": count.volume, "score": float(surface_dice(truth, mask))}


def _auto_choice(as_read: dict, mirrored: dict) -> str:
    """The pass polarity "auto" keeps for a scan whose passes are ``as_read`` and ``mirrored``."""
    first, second = _count(as_read), _count(mirrored)
    return "mirrored" if asks_for_mirrored(first) and keeps_mirrored(first, second) else "as read"


def _count(result: dict) -> MaskCount:
    return MaskCount(result["kept"], result["above"], result["volume"])


def summarize(results: list[dict]) -> dict[str, dict]:
    """Per kind of scan ("as drawn", "inverted"): mean surface Dice as read, under "auto" and of the
    better pass; scans where "auto" ran the second pass; scans where it kept the worse one and the
    surface Dice so lost."""
    summary = {}
    for scans, first, second, choice in (("as drawn", "as_read", "mirrored", "auto_as_drawn"),
                                          ("inverted", "mirrored", "as_read", "auto_inverted")):
        read = [r[first]["score"] for r in results]
        auto = [r[second]["score"] if r[choice] == "mirrored" else r[first]["score"] for r in results]
        better = [max(r[first]["score"], r[second]["score"]) for r in results]
        asked = sum(asks_for_mirrored(_count(r[first])) for r in results)
        losses = [b - a for a, b in zip(auto, better) if b - a > 1e-9]
        summary[scans] = {"count": len(results), "as_read": float(np.mean(read)), "auto": float(np.mean(auto)),
                          "better": float(np.mean(better)), "second_pass": int(asked), "worse": len(losses),
                          "lost": float(sum(losses))}
    return summary


def _cell(result: dict) -> str:
    return f"{result['kept'] / result['volume']:.3%} / {_count(result).kept_share:.2f} / {result['score']:.3f}"


def _short(checkpoint: Path) -> str:
    return f"{checkpoint.parent.name}/{checkpoint.name}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from vessel_kit.synth import STYLES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints (.safetensors)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[300, 301],
                        help="draws of each family (default 300 301); the probe's variants from the first")
    parser.add_argument("--families", type=lambda text: text.split(","), default=list(STYLES),
                        help=f"comma-separated style families (default all: {','.join(STYLES)})")
    parser.add_argument("--shape", type=lambda text: _common.parse_shape(text, 3), default=SHAPE,
                        help="Z,Y,X of the family draws (default 64,192,192)")
    parser.add_argument("--data", type=Path, default=None, help="also a dataset's test volumes (with solution.csv)")
    parser.add_argument("--config", default="cpu", help="named InferConfig (default cpu: 3 axes, no flips)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    _common.refuse_unknown(parser, "families", args.families, list(STYLES))
    _common.refuse_missing_checkpoints(parser, args.checkpoints)
    if args.data is not None and not (args.data / "solution.csv").is_file():
        parser.error(f"--data {args.data}: no solution.csv there")
    return args


if __name__ == "__main__":
    sys.exit(main())
