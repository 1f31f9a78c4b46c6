"""Benchmark: vessel_kit.metric.surface_dice against DeepMind's surface-distance (the oracle).

Both score the same pair of vessel-like (Z, Y, X) bool masks, surface Dice at tolerance 0:

    ours:    vessel_kit.metric.surface_dice(truth, pred)               (default workers, and workers=1)
    oracle:  surface_distance.metrics.compute_surface_dice_at_tolerance(
                 compute_surface_distances(truth, pred, (1, 1, 1)), 0.0)   (PyPI surface-distance)

Every contender runs in its own fresh child process (see benchmarks/_common.py), which loads the
masks from .npy files, then runs the contender --repeat times. Reported: both scores and their
absolute difference (the script exits 1 if it is >= 1e-6), best and median wall time, the
speed-up ours/oracle, ours in M voxels/s, and peak RSS above the loaded inputs (MiB).

Inputs: truth = vessel_kit.synth.make_synthetic_volume labels where that module exists and is
quick enough (--truth auto/synth), otherwise a deterministic random branching tube tree (--truth
tubes, ~0.7 % foreground at the default size); prediction = truth with realistic errors (a band
shifted by one voxel, a band dilated, a band eroded, missed pieces, false-positive blobs).

    python benchmarks/bench_metric.py                        # 64x1024x1024, ~40 s on 2 cores
    python benchmarks/bench_metric.py --shape 32x512x512 --repeat 5 --json out/bench_metric.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

import _common  # noqa: E402

TOLERANCE = 1e-6  # |ours - oracle| must stay below this
GOAL_SPEEDUP = 100.0  # ours (default workers) vs oracle, best of each
GOAL_MVOX_S = 150.0  # ours (default workers), M voxels per second
SYNTH_TIMEOUT_S = 120.0  # --truth auto falls back to tubes when synth takes longer


# --- inputs ---------------------------------------------------------------------------------

_BALLS: dict[float, np.ndarray] = {}


def _ball(radius: float) -> np.ndarray:
    key = round(radius * 4) / 4
    if key not in _BALLS:
        n = int(np.ceil(key))
        grid = np.arange(-n, n + 1)
        zz, yy, xx = np.meshgrid(grid, grid, grid, indexing="ij")
        _BALLS[key] = zz**2 + yy**2 + xx**2 <= key * key + 1e-9
    return _BALLS[key]


def _stamp(volume: np.ndarray, center, ball: np.ndarray) -> None:
    """volume |= ball centred at ``center``, clipped to the volume."""
    n = ball.shape[0] // 2
    target, source = [], []
    for c, size in zip(center, volume.shape):
        low = int(round(c)) - n
        a, b = max(low, 0), min(low + 2 * n + 1, size)
        if a >= b:
            return
        target.append(slice(a, b))
        source.append(slice(a - low, b - low))
    volume[tuple(target)] |= ball[tuple(source)]


def vessel_tree(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Deterministic branching tubes entering from the Y/X edges, radius ~5 tapering to ~1 voxel.

    Each tube is a persistent random walk (mostly in-plane, reflecting off the Z faces) rasterised
    as balls; it branches now and then into thinner children. ~0.7 % foreground at 64x1024x1024.
    """
    rng = np.random.default_rng(seed)
    depth, height, width = shape
    volume = np.zeros(shape, dtype=bool)
    stack = []
    for _ in range(max(1, round(10 * height * width / 1024**2))):
        side = int(rng.integers(4))
        t = rng.uniform(0.1, 0.9)
        y, x = [(0, t * width), (height - 1, t * width), (t * height, 0), (t * height, width - 1)][side]
        direction = np.array([0.0, [1, -1, 0, 0][side], [0, 0, 1, -1][side]])
        direction[1:] += rng.normal(0, 0.3, 2)
        start = np.array([rng.uniform(0.2, 0.8) * depth, y, x])
        stack.append((start, direction / np.linalg.norm(direction), rng.uniform(3.5, 5.5)))
    while stack:
        point, direction, radius = stack.pop()
        for _ in range(4000):
            if radius < 0.9:
                break
            _stamp(volume, point, _ball(radius))
            step = max(0.7, 0.5 * radius)
            direction = direction + rng.normal(0, 0.12, 3) * np.array([0.5, 1.0, 1.0])
            direction[0] *= 0.9
            direction /= np.linalg.norm(direction)
            point = point + step * direction
            if not radius * 0.5 <= point[0] <= depth - 1 - radius * 0.5:
                direction[0] = -direction[0]
                point[0] = np.clip(point[0], 0, depth - 1)
            if not (0 <= point[1] < height and 0 <= point[2] < width):
                break
            radius *= 0.9985
            if rng.random() < 0.012 * step:
                angle = rng.uniform(0.5, 1.2) * rng.choice([-1, 1])
                c, s = np.cos(angle), np.sin(angle)
                child = np.array([direction[0] + rng.normal(0, 0.2), c * direction[1] - s * direction[2],
                                  s * direction[1] + c * direction[2]])
                stack.append((point.copy(), child / np.linalg.norm(child), radius * rng.uniform(0.55, 0.8)))
                radius *= 0.92
    return volume


def _on_band(operation, mask: np.ndarray, a: int, b: int) -> np.ndarray:
    """operation(mask[:, a:b]) computed with one row of context on each side."""
    low, high = max(a - 1, 0), min(b + 1, mask.shape[1])
    return operation(mask[:, low:high])[:, a - low:b - low]


def perturb(truth: np.ndarray, seed: int) -> np.ndarray:
    """A plausible prediction: truth with the kinds of error a segmentation model makes."""
    from scipy import ndimage

    rng = np.random.default_rng(seed + 1)
    depth, height, width = truth.shape
    pred = truth.copy()
    # misregistration: a band of columns shifted down by one row
    a, b = int(0.10 * width), int(0.24 * width)
    pred[:, :, a:b] = np.roll(truth[:, :, a:b], 1, axis=1)
    # over-segmentation: a band of rows dilated by one voxel (6-connected)
    a, b = int(0.30 * height), int(0.38 * height)
    pred[:, a:b] = _on_band(ndimage.binary_dilation, truth, a, b)
    # under-segmentation: a band of rows eroded by one voxel
    a, b = int(0.60 * height), int(0.66 * height)
    pred[:, a:b] = _on_band(lambda m: ndimage.binary_erosion(m, border_value=1), truth, a, b)
    # missed pieces: boxes of vessel left out
    half = np.array([max(depth // 4, 1), max(height // 24, 1), max(width // 24, 1)])
    for _ in range(6):
        center = rng.integers(0, truth.shape)
        low, high = np.maximum(center - half, 0), center + half
        pred[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = False
    # false-positive blobs
    for _ in range(40):
        _stamp(pred, rng.uniform(0, 1, 3) * np.array(truth.shape), _ball(rng.uniform(1.5, 4.0)))
    return pred


def synth_truth(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Labels of vessel_kit.synth.make_synthetic_volume as a bool mask (API looked up loosely)."""
    from vessel_kit.synth import make_synthetic_volume

    result = make_synthetic_volume(shape, seed, voxel_size_um=50.0)
    labels = None
    if isinstance(result, dict):
        labels = next((result[k] for k in ("labels", "label", "mask", "masks") if k in result), None)
    elif hasattr(result, "labels"):
        labels = result.labels
    elif isinstance(result, tuple):
        candidates = [a for a in result if isinstance(a, np.ndarray) and a.shape == tuple(shape)]
        labels = next((a for a in candidates if a.dtype == np.bool_), None)
        if labels is None and len(candidates) >= 2:
            labels = candidates[1]  # (image, labels) by convention
    if labels is None or np.shape(labels) != tuple(shape):
        raise ValueError(f"cannot find (Z, Y, X) labels of shape {shape} in synth output {type(result)}")
    return np.asarray(labels) != 0


def build_inputs(shape, seed: int, truth_source: str, workdir: Path) -> dict:
    """Write truth.npy and pred.npy into workdir; return facts about them."""
    info = {"requested_truth": truth_source}
    truth = None
    start = time.perf_counter()
    if truth_source in ("auto", "synth"):
        args = ["--child", "build-synth", "--shape", "x".join(map(str, shape)), "--seed", str(seed),
                "--workdir", str(workdir)]
        try:
            child = _common.run_child(__file__, args, timeout=SYNTH_TIMEOUT_S if truth_source == "auto" else None)
            truth = np.load(workdir / "truth.npy")
            info.update(truth_source="vessel_kit.synth.make_synthetic_volume", build_s=child["build_s"])
        except Exception as error:  # noqa: BLE001 -- any failure means: fall back or stop
            if truth_source == "synth":
                raise
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            info["synth_fallback_reason"] = reason[:300]
            print(f"vessel_kit.synth unavailable or too slow ({reason[:120]}); using the tube tree")
    if truth is None:
        start = time.perf_counter()
        truth = vessel_tree(shape, seed)
        info.update(truth_source="tubes (bench_metric.vessel_tree)", build_s=time.perf_counter() - start)
    pred = perturb(truth, seed)
    np.save(workdir / "truth.npy", truth)
    np.save(workdir / "pred.npy", pred)
    info.update(
        shape=list(shape), voxels=int(truth.size), seed=seed,
        truth_foreground_pct=100.0 * np.count_nonzero(truth) / truth.size,
        pred_foreground_pct=100.0 * np.count_nonzero(pred) / pred.size,
        input_mib=(truth.nbytes + pred.nbytes) / _common.MiB,
        # tells whether a later run scored the same masks (vessel_kit.synth may change)
        truth_digest=hashlib.blake2b(truth.data, digest_size=8).hexdigest(),
        pred_digest=hashlib.blake2b(pred.data, digest_size=8).hexdigest(),
    )
    return info


# --- children -------------------------------------------------------------------------------


def child_main(args) -> None:
    workdir = Path(args.workdir)
    if args.child == "build-synth":
        start = time.perf_counter()
        truth = synth_truth(_common.parse_shape(args.shape, 3), args.seed)
        elapsed = time.perf_counter() - start
        np.save(workdir / "truth.npy", truth)
        _common.write_child_result(args.child_out, {"build_s": elapsed})
        return

    if args.child == "oracle":
        # surface-distance 0.1 still uses np.Inf, an alias numpy 2 removed; restore it.
        np.Inf = np.inf
        from surface_distance import metrics

        def run(truth, pred):
            distances = metrics.compute_surface_distances(truth, pred, (1, 1, 1))
            return metrics.compute_surface_dice_at_tolerance(distances, 0.0)
    else:
        from vessel_kit.metric import surface_dice

        workers = None if args.child == "ours" else int(args.child.split("=")[1])

        def run(truth, pred):
            return surface_dice(truth, pred, workers=workers)

    truth = np.load(workdir / "truth.npy")
    pred = np.load(workdir / "pred.npy")
    with _common.PeakMemory() as memory:
        times, score = _common.time_repeated(lambda: run(truth, pred), args.repeat)
    _common.write_child_result(args.child_out, {
        "score": float(score), **_common.summarize(times), **memory.as_dict(), "repeat": args.repeat,
    })


# --- parent ---------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="64x1024x1024", help="Z x Y x X of the masks (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="input seed (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of ours (default %(default)s)")
    parser.add_argument("--oracle-repeat", type=int, default=3,
                        help="timed runs of the oracle (default %(default)s; 1 saves ~30 s)")
    parser.add_argument("--truth", choices=("auto", "synth", "tubes"), default="auto",
                        help="truth masks: vessel_kit.synth if available (auto), required (synth), or "
                             "the built-in tube tree (tubes); default %(default)s")
    _common.add_child_options(parser)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return 0

    shape = _common.parse_shape(args.shape, 3)
    machine = _common.machine_info()
    print(_common.describe_machine(machine))
    sources = _common.source_digests("vessel_kit.metric", "vessel_kit.synth")
    print("sources (sha256): " + ", ".join(f"{m} {d}" for m, d in sources.items()))
    with tempfile.TemporaryDirectory(prefix="bench_metric_") as tmp:
        workdir = Path(tmp)
        inputs = build_inputs(shape, args.seed, args.truth, workdir)
        print(f"inputs: {'x'.join(map(str, shape))} = {inputs['voxels'] / 1e6:.1f} M voxels, truth from "
              f"{inputs['truth_source']} ({inputs['build_s']:.1f} s), foreground truth "
              f"{inputs['truth_foreground_pct']:.2f} % / pred {inputs['pred_foreground_pct']:.2f} %, digests "
              f"{inputs['truth_digest']} / {inputs['pred_digest']}")
        common = ["--workdir", str(workdir)]
        results = {}
        for name, repeat in (("ours", args.repeat), ("ours workers=1", args.repeat), ("oracle", args.oracle_repeat)):
            child = "ours" if name == "ours" else ("oracle" if name == "oracle" else "workers=1")
            print(f"running {name} x{repeat} ...", flush=True)
            results[name] = _common.run_child(__file__, ["--child", child, "--repeat", str(repeat), *common])

    voxels = inputs["voxels"]
    oracle, ours, ours1 = results["oracle"], results["ours"], results["ours workers=1"]
    difference = abs(ours["score"] - oracle["score"])
    difference_w1 = abs(ours1["score"] - oracle["score"])
    for result in results.values():
        result["mvox_per_s"] = voxels / result["best_s"] / 1e6
        result["speedup_vs_oracle"] = oracle["best_s"] / result["best_s"]
    speedup = ours["speedup_vs_oracle"]
    default_workers = min(os.cpu_count() or 1, 8)

    print()
    _common.print_table(
        ["contender", "score", "best s", "median s", "runs", "M vox/s", "vs oracle", "peak MiB"],
        [[name, f"{r['score']:.9f}", r["best_s"], r["median_s"], len(r["times_s"]), r["mvox_per_s"],
          f"{r['speedup_vs_oracle']:.1f}x", r["peak_above_baseline_mib"]] for name, r in results.items()],
    )
    print(f"\n|ours - oracle| = {difference:.3e} (workers=1: {difference_w1:.3e}); must be < {TOLERANCE:g}")
    print(f"speed-up of ours with default workers ({default_workers}) over workers=1: "
          f"{ours1['best_s'] / ours['best_s']:.2f}x")
    goals = {
        f"speed-up >= {GOAL_SPEEDUP:g}x": speedup >= GOAL_SPEEDUP,
        f">= {GOAL_MVOX_S:g} M voxels/s": ours["mvox_per_s"] >= GOAL_MVOX_S,
    }
    print("goals: " + ", ".join(f"{goal}: {'met' if ok else 'MISSED'}" for goal, ok in goals.items())
          + f" (speed-up {speedup:.1f}x, {ours['mvox_per_s']:.0f} M voxels/s)")
    note = _common.interference_note(results)
    if note:
        print(note)
    print("peak MiB = highest RSS during the runs minus RSS after imports and loading both masks "
          f"(inputs: {inputs['input_mib']:.0f} MiB)")

    ok = difference < TOLERANCE and difference_w1 < TOLERANCE
    _common.write_json(args.json, {
        "benchmark": "metric", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"), "machine": machine, "inputs": inputs,
        "sources": sources,
        "default_workers": default_workers, "results": results, "abs_difference": difference,
        "abs_difference_workers1": difference_w1, "tolerance": TOLERANCE, "scores_agree": ok,
        "speedup": speedup, "goals": goals,
    })
    if not ok:
        print(f"\nFAIL: scores differ from the oracle by {max(difference, difference_w1):.3e} >= {TOLERANCE:g}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
