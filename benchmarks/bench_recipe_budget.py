"""Benchmark: the Kaggle time budget of the winning recipes -- a paper estimate for a T4, and our
inference overhead measured on the CPU.

Overhead (measured). For each recipe, each inference member's architecture is built with random
weights (``build_model(arch, encoder, in_chans, **model_kwargs)``; MaxViT with ``img_size`` set to
the tile, so a small tile fits it) and ``infer_volume`` predicts a synthetic (Z, Y, X) volume
(``make_synthetic_volume(--shape, seed=0)``) with the recipe's own view settings (axes, tta,
reverse_slices, overlap; compile off) at ``--tile``. The model's forward is wrapped to sum its
own time; overhead = infer_volume time / forward time - 1 (tiling, normalisation, blending, TTA
flips, thresholding). Also the forward time per voxel-view, the architectures' relative cost.

T4 estimate (paper). The only reported inference time of the four: the 5th place's ensemble
(MaxViT-base + EfficientNetV2-M + DPN68, 3 axes, no TTA, 512 tiles overlapping 256) took ~8 h on
the public + private test (write-up section A8). The hidden volumes: kidney_5 1012 x 1330 x 1598
at 50.28 µm, kidney_6 501 x 1028 x 1257 at 63.08 µm (resampled to 50 µm by them). That gives a
throughput in member-voxel-views per second; a recipe's estimate is its member-voxel-views
(volumes at its model voxel size x views x members x its window overlap factor / theirs) divided
by it, times its members' CPU forward time per tile pixel relative to the 5th place's three (a
crude stand-in for the GPU ratio). The 5th place's own overhead is inside their 8 h, so ours is
reported beside the estimate, not multiplied in.

    python benchmarks/bench_recipe_budget.py [--shape 16 64 64] [--tile 64]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch

from vessel_kit.infer import infer_volume
from vessel_kit.infer_config import InferConfig
from vessel_kit.models import build_model
from vessel_kit.normalize import Normalization
from vessel_kit.recipes import load_recipe
from vessel_kit.synth import make_synthetic_volume

RECIPES = ("1st_place", "3rd_place", "5th_place", "seed_2p5d")
# The hidden test volumes (Z, Y, X, voxel µm), from the competition data page (design.md).
TEST_VOLUMES = (((1012, 1330, 1598), 50.28), ((501, 1028, 1257), 63.08))
FIFTH_PLACE_SECONDS = 8 * 3600  # "about 8 hours for both public + private" (5th-place write-up, A8)
FIFTH_PLACE_OVERLAP = 0.5  # 512 tiles every 256 px


def inference_members(name: str) -> list[dict]:
    """The model options of each member the recipe submits (the whole recipe for one model)."""
    recipe = load_recipe(name)
    shared = {k: v for k, v in recipe.items() if k != "members"}
    entries = recipe.get("members") or [{}]
    teachers = {t for e in entries if "pseudo" in e for t in e["pseudo"]["from"]}
    members = []
    for entry in entries:
        if "pseudo" in entry or entry.get("name") in teachers:
            continue
        members.append({**shared.get("model", {}), **entry.get("model", {})})
    return members


class TimedModel(torch.nn.Module):
    """``model`` whose forward time is summed in ``seconds``, the tile pixels it saw in ``pixels``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.seconds, self.pixels = model, 0.0, 0

    def forward(self, x):
        started = time.perf_counter()
        out = self.model(x)
        self.seconds += time.perf_counter() - started
        self.pixels += x.shape[0] * x.shape[-2] * x.shape[-1]
        return out


def measure(name: str, shape, tile: int) -> dict:
    recipe = load_recipe(name)
    infer = recipe.get("infer", {})
    views = {"axes": tuple(infer.get("axes", ("xy", "xz", "yz"))), "tta": infer.get("tta", "flips"),
             "reverse_slices": infer.get("reverse_slices", False), "overlap": infer.get("overlap", 0.5)}
    volume, _ = make_synthetic_volume(tuple(shape), seed=0)
    total = forward = pixels = 0.0
    for options in inference_members(name):
        print(f"  {name}: {options['encoder']}", flush=True)
        kwargs = dict(options.get("model_kwargs", {}))
        if "maxvit" in options["encoder"]:
            kwargs["img_size"] = tile
        torch.manual_seed(0)
        model = TimedModel(build_model(options.get("arch", "unet"), options["encoder"],
                                       in_chans=options.get("in_chans", 1), **kwargs).eval())
        config = InferConfig(tile_size=tile, batch_size=8, progress=False, device="cpu", **views)
        started = time.perf_counter()
        infer_volume(volume, model, config, in_chans=options.get("in_chans", 1),
                     normalization=Normalization.from_dict(options.get("normalization", {"mode": "unit"})))
        total += time.perf_counter() - started
        forward += model.seconds
        pixels += model.pixels
    flips = {"none": 1, "flips": 4, "d4": 8}[views["tta"]] * (2 if views["reverse_slices"] else 1)
    return {"members": len(inference_members(name)), "views": len(views["axes"]) * flips, "overlap": views["overlap"],
            "seconds": total, "forward": forward, "overhead": total / forward - 1, "per_pixel": forward / pixels,
            "voxel_scale": recipe.get("crops", {}).get("scale", 1.0),
            "infer_voxel_um": infer.get("model_voxel_size_um", 50.0)}


def voxels_at(model_voxel_um: float) -> float:
    """The hidden test's voxels resampled to ``model_voxel_um``."""
    return sum(np.prod(shape) * (size / model_voxel_um) ** 3 for shape, size in TEST_VOLUMES)


def overlap_factor(overlap: float) -> float:
    """How many times a window grid predicts each pixel of a plane (2D): 1 / (1 - overlap)^2."""
    return 1.0 / (1.0 - overlap) ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[16, 64, 64])
    parser.add_argument("--tile", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {}
    for name in RECIPES:
        results[name] = measure(name, args.shape, args.tile)
        print(f"{name}: {results[name]}", flush=True)
    # forward seconds per tile pixel (mean over the members), relative to the 5th place's three
    cost = {n: r["per_pixel"] / results["5th_place"]["per_pixel"] for n, r in results.items()}
    fifth = results["5th_place"]
    throughput = (voxels_at(50.0) * fifth["views"] * fifth["members"] * overlap_factor(FIFTH_PLACE_OVERLAP)
                  / FIFTH_PLACE_SECONDS)
    planes_5th = sum(sum(np.array(shape) * size / 50.0) for shape, size in TEST_VOLUMES) * fifth["members"]
    print(f"5th place on Kaggle: {planes_5th / FIFTH_PLACE_SECONDS:.2f} planes/s per member-axis, "
          f"{throughput / 1e6:.2f} M member-voxel-views/s (with their 4x window overlap)")
    print("recipe     members views overlap  CPU s  forward s  overhead  rel. cost  T4 estimate h")
    for name, r in results.items():
        model_voxel = r["infer_voxel_um"] / r["voxel_scale"]
        work = voxels_at(model_voxel) * r["views"] * r["members"] * overlap_factor(r["overlap"])
        hours = work / throughput * cost[name] / 3600
        print(f"{name:<10} {r['members']:>7} {r['views']:>5} {r['overlap']:>7} {r['seconds']:>6.1f} {r['forward']:>10.1f} "
              f"{r['overhead']:>8.0%} {cost[name]:>10.2f} {hours:>14.1f}")


if __name__ == "__main__":
    main()
