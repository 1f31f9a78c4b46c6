"""Anatomy check: vessel labels of the synthetic volumes against real kidney labels.

Not a speed benchmark: it compares what the labels look like, slice by slice (XY planes), for
the real ``kidney_3_dense`` label slices in ``--real`` (1706 x 1510, 50.16 µm) and for synthetic
volumes of every style family (``vessel_kit.synth.STYLES``) at ``--voxel-size`` µm, a few seeds
each, in the demo dataset's volume shapes. Per source it prints:

* ``fraction %``: vessel pixels / all pixels of the slices;
* in-plane vessel widths (µm), percentiles 10 / 50 / 90 and the maximum, sampled on the ridge of
  the 2D Euclidean distance transform (pixels that are a 3x3 local maximum of it), width =
  (2 * EDT - 1) * voxel size (exact for odd pixel widths; both sources are measured alike);
* connected components per slice (2D, 8-connectivity), and per megapixel of slice area, since a
  real slice holds ~40 times the pixels of a synthetic one.

Per-area figures are per slice area. A real slice holds the whole kidney cross-section and the
mounting medium around it (the kidney covers roughly a third to a half of it, judged from the
kidney's size; the labels alone do not tell), a synthetic slice mostly tissue: divide the real
fraction and component density by ~0.4 to compare them per tissue area.

    python benchmarks/bench_anatomy.py                  # ~1-3 min on 2 cores
    python benchmarks/bench_anatomy.py --seeds 0 1 --json /tmp/anatomy.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

import _common  # noqa: E402

REAL_DEFAULT = "/work/shared/data/real/kidney_3_dense_labels"
REAL_VOXEL_UM = 50.16
# The training and test shapes of the demo dataset (vessel_kit.synth.SYNTHETIC_VOLUMES, scale 1).
SHAPES = ((96, 256, 256), (64, 256, 224), (80, 224, 256), (40, 160, 160))
HEADERS = ("source", "slices", "fraction %", "width p10 µm", "p50", "p90", "max",
           "components/slice", "components/MP")


def slice_anatomy(mask: np.ndarray) -> dict:
    """The raw figures of one 2D bool mask: ridge widths (pixels), vessel pixels, 8-connected
    components."""
    as_uint8 = mask.astype(np.uint8)
    distance = cv2.distanceTransform(as_uint8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    ridge = mask & (distance >= ndimage.maximum_filter(distance, size=3))
    count, _ = cv2.connectedComponents(as_uint8, connectivity=8)
    return {"widths": 2 * distance[ridge] - 1, "pixels": int(mask.sum()), "components": count - 1}


def anatomy(volumes: list[tuple[np.ndarray, float]]) -> dict:
    """The figures of (Z, Y, X) bool label volumes with their voxel sizes (µm), measured on
    their XY slices, pooled."""
    slices = [(slice_anatomy(plane), voxel_size_um, plane.size) for labels, voxel_size_um in volumes for plane in labels]
    widths_um = np.concatenate([figures["widths"] * voxel for figures, voxel, _ in slices])
    total = {key: sum(figures[key] for figures, _, _ in slices) for key in ("pixels", "components")}
    area = sum(size for _, _, size in slices)
    p10, p50, p90 = np.percentile(widths_um, [10, 50, 90])
    return {
        "slices": len(slices),
        "fraction_percent": 100 * total["pixels"] / area,
        "width_um": {"p10": float(p10), "p50": float(p50), "p90": float(p90), "max": float(widths_um.max())},
        "components_per_slice": total["components"] / len(slices),
        "components_per_megapixel": total["components"] / (area / 1e6),
    }


def real_figures(folder: Path) -> dict:
    from vessel_kit.volume import read_labels

    return anatomy([(read_labels(folder, progress=False), REAL_VOXEL_UM)])


def synthetic_figures(style: str, seeds: list[int], voxel_size_um: float) -> dict:
    from vessel_kit.synth import make_synthetic_volume

    return anatomy([
        (make_synthetic_volume(shape, seed, voxel_size_um, style=style)[1], voxel_size_um)
        for seed in seeds
        for shape in SHAPES
    ])


def row(name: str, figures: dict) -> list:
    widths = figures["width_um"]
    return [name, figures["slices"], round(figures["fraction_percent"], 3),
            *(round(float(widths[key])) for key in ("p10", "p50", "p90", "max")),
            round(figures["components_per_slice"], 1), round(figures["components_per_megapixel"], 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, default=Path(REAL_DEFAULT), help="folder of real label slices")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="synthetic seeds")
    parser.add_argument("--voxel-size", type=float, default=50.0, help="synthetic voxel size, µm")
    parser.add_argument("--json", help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    from vessel_kit.synth import STYLES

    results = {"real kidney_3_dense": real_figures(args.real)}
    for style in STYLES:
        results[f"synthetic {style}"] = synthetic_figures(style, args.seeds, args.voxel_size)
    shapes = ", ".join("x".join(map(str, shape)) for shape in SHAPES)
    print(f"synthetic: shapes {shapes}, seeds {args.seeds}, {args.voxel_size} µm; real: {args.real}")
    _common.print_table(HEADERS, [row(name, figures) for name, figures in results.items()])
    _common.write_json(args.json, {"shapes": SHAPES, "seeds": args.seeds, "voxel_size_um": args.voxel_size,
                                   "sources": _common.source_digests("vessel_kit.synth.geometry"), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
