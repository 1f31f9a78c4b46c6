"""Outside-source probe: checkpoints on vessel volumes drawn by code that shares nothing with
``vessel_kit.synth``, against a smoothed-intensity threshold fitted on each probe volume itself.

``bench_generalization`` holds out one of *our* style families; every family still comes from
the same generator (its trees, its texture octaves, its artefacts). This probe draws volumes the
way an unrelated source might: vessels are random-walk tubes of constant radius (1.5-9 voxels,
a few shrinking on the way) with a soft edge, on a texture of gaussian-filtered noise at two
scales, plus white noise, in a field of view wholly inside tissue (no organ outline), each
variant with its own polarity, contrast and uint16 range:

* ``bright_easy``: bright vessels (+4 texture sd), values near 100 (an 8-bit-like range);
* ``dark_easy``: dark vessels (-4 sd) around 30000;
* ``bright_grainy``: +2.5 sd with stronger noise;
* ``bright_bigrange``: +3 sd over a wide gain (3000 levels per sd).

The threshold baseline (``vessel_kit.baselines.fit_threshold``) is fitted on the probe volume's
own labels: an oracle, the bar the model should reach without ever seeing the probe. Nothing in
vessel_kit is trained or tuned on these volumes; the probe is a sanity check against tuning to
our own generator, not a target. Every checkpoint predicts with ``InferConfig.load(--config)``
(default "cpu": 3 axes, no flips, as the demo) at its calibrated threshold, in the config's
polarity (default "auto": the mirrored scan too where the scan as read gives almost nothing;
``--polarity as_given`` for the scan as read only); the "pass" column says which pass the mask
comes from. Beside that score,
the same logits' best score over ``calibration.THRESHOLD_GRID`` (no components removed) tells a
model that cannot find the vessels from one whose calibrated rule does not transfer.

    python benchmarks/bench_outside_probe.py old.safetensors new.safetensors --json /tmp/probe.json
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
from vessel_kit.polarity import POLARITIES  # noqa: E402

SHAPE = (48, 192, 192)
# variant: (vessel contrast in texture sd, white-noise sd, uint16 level, uint16 levels per sd)
VARIANTS = {
    "bright_easy": (4.0, 0.7, 100.0, 20.0),
    "dark_easy": (-4.0, 0.7, 30000.0, 800.0),
    "bright_grainy": (2.5, 1.2, 5000.0, 300.0),
    "bright_bigrange": (3.0, 0.5, 20000.0, 3000.0),
}
TUBES = 6
RADIUS_RANGE = (1.5, 9.0)
VOXEL_SIZE_UM = 50.0
HEADERS = ("variant", "checkpoint", "model", "threshold (oracle)", "margin", "predicted / true voxels",
           "model at its best cut", "pass", "seconds")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vessel_kit.baselines import fit_threshold, predict_threshold
    from vessel_kit.calibration import THRESHOLD_GRID, threshold_scores
    from vessel_kit.infer_config import InferConfig
    from vessel_kit.metric import surface_dice
    from vessel_kit.predictor import Predictor

    config = InferConfig.load(args.config).replace(progress=False)
    if args.polarity is not None:
        config = config.replace(polarity=args.polarity)
    print(_common.describe_machine(_common.machine_info()))
    rows, results = [], []
    for index, variant in enumerate(args.variants):
        image, truth = probe_volume(variant, args.seed + index)
        oracle = surface_dice(truth, predict_threshold(image, fit_threshold([image], [truth])))
        for checkpoint in args.checkpoints:
            started = time.perf_counter()
            predictor = Predictor(checkpoint, config)  # what infer_volume does, keeping the logits
            logits, mask = predictor.prediction(image, voxel_size_um=VOXEL_SIZE_UM)
            seconds = time.perf_counter() - started
            score = surface_dice(truth, mask)
            ratio = float(mask.sum() / max(truth.sum(), 1))
            by_cut = threshold_scores([logits.array()], [truth])[:, 0]
            best_cut = THRESHOLD_GRID[int(np.argmax(by_cut))]
            results.append({"variant": variant, "checkpoint": str(checkpoint), "model": score, "threshold_oracle": oracle,
                            "predicted_over_true": ratio, "model_best_cut": float(by_cut.max()),
                            "best_cut": best_cut, "mirrored": logits.mirrored, "seconds": seconds})
            rows.append((variant, Path(checkpoint).parent.parent.name + "/" + Path(checkpoint).name, f"{score:.3f}",
                         f"{oracle:.3f}", f"{score - oracle:+.3f}", f"{ratio:.2f}",
                         f"{by_cut.max():.3f} @{best_cut:g}", "mirrored" if logits.mirrored else "as read",
                         f"{seconds:.0f}"))
            print(f"{variant} {checkpoint}: model {score:.4f}, threshold {oracle:.4f}", flush=True)
    _common.print_table(HEADERS, rows)
    sources = _common.source_digests("vessel_kit.baselines", "vessel_kit.calibration", "vessel_kit.predictor")
    _common.write_json(args.json, {"args": vars(args), "shape": list(SHAPE), "variants": VARIANTS, "results": results,
                                   "sources": sources})
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints (.safetensors) to compare")
    parser.add_argument("--variants", type=lambda text: text.split(","), default=list(VARIANTS),
                        help=f"comma-separated variants (default all: {','.join(VARIANTS)})")
    parser.add_argument("--config", default="cpu", help="named InferConfig (default cpu: 3 axes, no flips)")
    parser.add_argument("--seed", type=int, default=100, help="seed of the first variant's volume (default 100)")
    parser.add_argument("--polarity", choices=POLARITIES, default=None,
                        help="override the config's polarity (default: the config's, auto for the cpu preset)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    _common.refuse_unknown(parser, "variants", args.variants, list(VARIANTS))
    _common.refuse_missing_checkpoints(parser, args.checkpoints)
    return args


def probe_volume(variant: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 image, bool labels) of one probe variant, ``SHAPE``, deterministic by ``seed``."""
    from scipy import ndimage

    contrast, noise, level, gain = VARIANTS[variant]
    rng = np.random.default_rng(seed)
    labels = random_walk_tubes(rng, SHAPE, TUBES, RADIUS_RANGE)
    texture = ndimage.gaussian_filter(rng.normal(size=SHAPE), 4) * 6 + ndimage.gaussian_filter(rng.normal(size=SHAPE), 1.2) * 1.5
    texture /= texture.std()
    vessels = ndimage.gaussian_filter(labels.astype(np.float32), 0.8)  # a soft (partial-volume) edge
    image = texture + contrast * vessels + rng.normal(size=SHAPE) * noise
    return np.clip(level + gain * image, 0, 65535).astype(np.uint16), labels


def random_walk_tubes(rng: np.random.Generator, shape: tuple[int, int, int], count: int,
                      radius_range: tuple[float, float]) -> np.ndarray:
    """``count`` tubes, each a random walk of 1.5-voxel steps with slowly turning direction from a
    random start, painted as balls of its radius (which shrinks by 0.8 with 1 % chance per step)
    until it leaves the volume."""
    labels = np.zeros(shape, bool)
    bounds = np.array(shape, float)
    for _ in range(count):
        point = rng.uniform(0, 1, 3) * bounds
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        radius = rng.uniform(*radius_range)
        for _ in range(400):
            direction += rng.normal(scale=0.08, size=3)
            direction /= np.linalg.norm(direction)
            point = point + 1.5 * direction
            if np.any(point < -5) or np.any(point > bounds + 5):
                break
            low = np.maximum(0, (point - radius - 1).astype(int))
            high = np.minimum(shape, (point + radius + 2).astype(int))
            if np.any(high <= low):
                continue
            box = tuple(slice(a, b) for a, b in zip(low, high))
            z, y, x = np.ogrid[box]
            labels[box] |= (z - point[0]) ** 2 + (y - point[1]) ** 2 + (x - point[2]) ** 2 <= radius**2
            if rng.uniform() < 0.01:
                radius = max(1.0, radius * 0.8)
    return labels


if __name__ == "__main__":
    raise SystemExit(main())
