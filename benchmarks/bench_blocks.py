"""Benchmark: block-wise inference (``vessel_kit.blocks.infer_blocks``) on the CPU.

One model for every part: ``build_model("unet", "resnet18", in_chans=3, encoder_weights=None,
encoder_depth=3, decoder_channels=(16, 8, 4))`` in eval mode after ``torch.manual_seed(0)`` (a
2.5D U-Net small enough for 2 CPU cores), percentile normalisation, tiles 32 x 32, overlap 0.5,
batch 16. Input: ``vessel_kit.synth.make_synthetic_volume(shape, seed=0)[0]`` (uint16), written
by the parent to a zarr array (chunks 32^3) that every child reads lazily.

1. Equivalence. In-memory ``Predictor.logits`` + ``to_mask`` against ``infer_blocks(...,
   logits=True)`` (serial, blocks that do not divide the shape), with 3 axes x flips TTA, at the
   volume's voxel size and resampled (63.08 µm volume, 50 µm model). Reported: max |Δ logit|,
   logits that differ, mask voxels that differ (goal 0).
2. Overhead. ``infer_volume`` against ``infer_blocks`` (serial), 3 axes, no TTA, at two block
   sizes: blocked / in-memory wall time (goal <= 1.15). Tiles that reach two blocks are predicted
   by both, so the overhead falls with block side / tile step: about (1 + step / block) per
   in-plane side a block cuts.
3. Scaling. ``infer_blocks(executor="dask", workers=N)`` for N = 1, 2 (LocalCluster, one thread
   per worker, where infer_blocks sets one torch thread): throughput ratio (goal >= 1.7x on 2 idle
   cores), the workers' CPU seconds (user + system), which show the work each worker count adds
   whatever else holds the cores, and the cores they kept busy (CPU s / wall s). ``--prefetch``:
   the ``InferConfig.prefetch`` of these runs: auto (None, the library's default: off in these
   one-thread CPU workers, batches prepared in the model's thread), on (a background thread
   prepares the next batch: ~1.1 cores per worker), off, or both (off, then on).
4. Memory. A blocked run on a LocalCluster of one worker, on volumes of 1x, 4x and 16x the
   voxels at one block size, axis xy: the worker's peak RSS above its RSS after the imports (its
   RSS high-water mark, reset then; see _common.py). The models and the blocks' data are all
   that the worker holds. Goal: flat within 10 %.

Each part runs in its own child process (``_common.run_child``) with ``OMP_NUM_THREADS=1``.

    python benchmarks/bench_blocks.py                 # ~10 min on 2 idle cores
    python benchmarks/bench_blocks.py --quick         # ~2 min: smaller volumes
    python benchmarks/bench_blocks.py --parts equivalence,overhead --json out.json
    python benchmarks/bench_blocks.py --parts scaling --prefetch both   # the scaling with prefetch off and on
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

PARTS = ("equivalence", "overhead", "scaling", "memory")
PREFETCH = {"auto": None, "on": True, "off": False}  # --prefetch -> InferConfig.prefetch; "both": off, then on
TILE = 32
OPTIONS = dict(tile_size=TILE, overlap=0.5, batch_size=16, min_plane_side=8)
SIZES = {  # part -> (default shape(s), quick shape(s))
    "equivalence": ((32, 96, 96), (16, 48, 48)),
    "overhead": ((64, 192, 192), (32, 64, 64)),
    "scaling": ((32, 128, 128), (32, 64, 64)),
    "memory": (((32, 64, 64), (32, 128, 128), (32, 256, 256)), ((16, 32, 32), (16, 64, 64), (16, 128, 128))),
}


def build_ensemble():
    import torch

    from vessel_kit.ensemble import Ensemble
    from vessel_kit.models import build_model
    from vessel_kit.normalize import Normalization

    torch.manual_seed(0)
    model = build_model("unet", "resnet18", in_chans=3, encoder_weights=None, encoder_depth=3,
                        decoder_channels=(16, 8, 4)).eval()
    return Ensemble([model], [1.0], in_chans=3, normalization=Normalization("percentile"), tile_size=TILE,
                    voxel_size_um=None)


def write_volume(shape: tuple[int, int, int], folder: Path) -> Path:
    import zarr

    from vessel_kit.synth import make_synthetic_volume

    path = folder / ("volume_" + "x".join(map(str, shape)) + ".zarr")
    if not path.exists():
        zarr.create_array(str(path), data=make_synthetic_volume(shape, seed=0)[0], chunks=(32, 32, 32))
    return path


# --- children ----------------------------------------------------------------------------------


def child_equivalence(args) -> dict:
    import numpy as np

    from vessel_kit.blocks import infer_blocks
    from vessel_kit.infer_config import InferConfig
    from vessel_kit.ome_zarr import open_volume
    from vessel_kit.predictor import Predictor

    ensemble, rows = build_ensemble(), []
    for voxel_size_um, model_um in ((None, None), (63.08, 50.0)):
        config = InferConfig(tta="flips", axes=("xy", "xz", "yz"), progress=False, model_voxel_size_um=model_um, **OPTIONS)
        source = open_volume(args.volume, voxel_size_um=voxel_size_um)
        predictor = Predictor(ensemble, config)
        start = time.perf_counter()
        logits = predictor.logits(source)
        mask = predictor.to_mask(logits)
        whole_s = time.perf_counter() - start
        start = time.perf_counter()
        store = infer_blocks(source, ensemble, Path(args.work) / f"eq_{voxel_size_um}.zarr", config=config, block=args.block,
                             chunks=32, logits=True, progress=False, pyramid=False)
        blocked_s = time.perf_counter() - start
        whole, blocked = logits.array().astype(np.float32), store.logits[:].astype(np.float32)
        rows.append({"voxel_size_um": voxel_size_um, "model_voxel_size_um": model_um, "shape": list(source.shape),
                     "block": args.block, "max_abs_logit_diff": float(np.abs(whole - blocked).max()),
                     "logits_differing": int((whole != blocked).sum()),
                     "mask_mismatches": int((store.mask[:] != mask).sum()), "voxels": int(mask.size),
                     "in_memory_s": whole_s, "blocked_s": blocked_s})
    return {"rows": rows}


def child_overhead(args) -> dict:
    from vessel_kit.blocks import infer_blocks
    from vessel_kit.infer import infer_volume
    from vessel_kit.infer_config import InferConfig
    from vessel_kit.ome_zarr import open_volume

    ensemble = build_ensemble()
    config = InferConfig(tta="none", axes=("xy", "xz", "yz"), progress=False, **OPTIONS)
    source = open_volume(args.volume)
    start = time.perf_counter()
    infer_volume(source, ensemble, config)
    rows = [{"run": "infer_volume", "seconds": time.perf_counter() - start}]
    for block in args.blocks:
        start = time.perf_counter()
        infer_blocks(source, ensemble, Path(args.work) / f"over_{block}.zarr", config=config, block=block, chunks=32,
                     progress=False, pyramid=False)
        rows.append({"run": f"infer_blocks block={block}", "seconds": time.perf_counter() - start})
    for row in rows:
        row["ratio"] = row["seconds"] / rows[0]["seconds"]
    return {"shape": list(source.shape), "rows": rows}


def child_scaling(args) -> dict:
    from distributed import Client, LocalCluster

    from vessel_kit.blocks import infer_blocks
    from vessel_kit.infer_config import InferConfig

    ensemble = build_ensemble()
    rows = []
    for mode in ("off", "on") if args.prefetch == "both" else (args.prefetch,):
        config = InferConfig(tta="none", axes=("xy", "xz", "yz"), progress=False, prefetch=PREFETCH[mode], **OPTIONS)
        for workers in (1, 2):
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                    Client(cluster) as client:
                client.run(_warm_worker)
                cpu_before = sum(client.run(_cpu_seconds).values())
                start = time.perf_counter()
                infer_blocks(args.volume, ensemble, Path(args.work) / f"scale_{mode}_{workers}.zarr", config=config,
                             block=args.block, chunks=32, executor="dask", scheduler=cluster.scheduler_address,
                             progress=False, pyramid=False)
                seconds = time.perf_counter() - start
                rows.append({"prefetch": mode, "workers": workers, "seconds": seconds,
                             "worker_cpu_s": sum(client.run(_cpu_seconds).values()) - cpu_before})
    voxels = _voxels(args.volume)
    for row in rows:
        one_worker = next(other for other in rows if other["prefetch"] == row["prefetch"])
        row["mvoxel_per_s"] = voxels / row["seconds"] / 1e6
        row["speedup"] = one_worker["seconds"] / row["seconds"]
        row["cores_busy"] = row["worker_cpu_s"] / row["seconds"]
    return {"block": args.block, "rows": rows}


def child_memory(args) -> dict:
    from distributed import Client, LocalCluster

    from vessel_kit.blocks import infer_blocks
    from vessel_kit.infer_config import InferConfig

    ensemble = build_ensemble()
    config = InferConfig(tta="none", axes=("xy",), progress=False, **OPTIONS)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(_warm_worker)
        (baseline,) = client.run(_reset_peak).values()
        start = time.perf_counter()
        infer_blocks(args.volume, ensemble, Path(args.work) / "mem.zarr", config=config, block=args.block, chunks=32,
                     executor="dask", scheduler=cluster.scheduler_address, progress=False, pyramid=False, overwrite=True)
        seconds = time.perf_counter() - start
        (peak,) = client.run(_common.peak_rss_bytes).values()
    return {"voxels": _voxels(args.volume), "seconds": seconds, "baseline_rss_mib": baseline / _common.MiB,
            "peak_rss_mib": peak / _common.MiB, "peak_above_baseline_mib": (peak - baseline) / _common.MiB}


def _warm_worker() -> None:
    """The imports a block needs, done before the clock starts (infer_blocks itself sets one
    torch thread in these one-thread workers)."""
    import vessel_kit.blocks
    import vessel_kit.predictor  # noqa: F401


def _cpu_seconds() -> float:
    """In a worker: the CPU seconds (user + system) its process has used."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _reset_peak() -> int:
    """In a worker: reset its RSS high-water mark; its RSS now (the baseline)."""
    import gc

    gc.collect()
    if not _common.reset_peak_rss():
        raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs): the peak would be wrong")
    return _common.current_rss_bytes()


def _voxels(path: str) -> int:
    import math

    import zarr

    return math.prod(zarr.open_array(path, mode="r").shape)


CHILDREN = {"equivalence": child_equivalence, "overhead": child_overhead, "scaling": child_scaling, "memory": child_memory}


# --- parent ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--quick", action="store_true", help="smaller volumes (about 2 minutes)")
    parser.add_argument("--out", default=None, help="write the results table (markdown) here too")
    parser.add_argument("--overhead-shape", type=lambda text: _common.parse_shape(text, 3), default=None,
                        help="the overhead part's volume Z x Y x X (default 64x192x192; --quick 32x64x64)")
    parser.add_argument("--scaling-shape", type=lambda text: _common.parse_shape(text, 3), default=None,
                        help="the scaling part's volume Z x Y x X (default 32x128x128: 16 blocks of 32)")
    parser.add_argument("--prefetch", choices=(*PREFETCH, "both"), default="auto",
                        help="the scaling part's InferConfig.prefetch: auto (the library's default, off in one-thread "
                             "CPU workers), on, off, or both (off, then on)")
    parser.add_argument("--overhead-blocks", default=None,
                        help="the overhead part's block sides, comma separated (default 64,96; --quick 32,64)")
    parser.add_argument("--volume", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--block", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=lambda text: [int(b) for b in text.split(",")], default=[64, 128],
                        help=argparse.SUPPRESS)
    _common.add_child_options(parser)
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(1)
        _common.write_child_result(args.child_out, CHILDREN[args.child](args))
        return 0
    os.environ["OMP_NUM_THREADS"] = "1"
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    machine = _common.machine_info()
    print(_common.describe_machine(machine), flush=True)
    results: dict = {"machine": machine, "quick": args.quick, "command": " ".join(["python", *sys.argv])}
    with tempfile.TemporaryDirectory(prefix="bench_blocks_") as tmp:
        folder = Path(tmp)
        for part in parts:
            shapes = SIZES[part][1 if args.quick else 0]
            if part == "memory":
                results[part] = [_run(part, write_volume(shape, folder), folder, block=32 if args.quick else 64)
                                 for shape in shapes]
            elif part == "equivalence":
                results[part] = _run(part, write_volume(shapes, folder), folder, block=32 if args.quick else 64)
            elif part == "overhead":
                blocks = args.overhead_blocks or ("32,64" if args.quick else "64,96")
                results[part] = _run(part, write_volume(args.overhead_shape or shapes, folder), folder, blocks=blocks)
            else:
                results[part] = _run(part, write_volume(args.scaling_shape or shapes, folder), folder, block=32,
                                     prefetch=args.prefetch)
            print(f"{part}: done", flush=True)
    table = format_table(results)
    print(table)
    note = _common.interference_note({f"{p}": r for p, r in results.items() if isinstance(r, dict) and "child_wall_s" in r})
    if note:
        print(note)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _run(part: str, volume: Path, work: Path, **options) -> dict:
    args = ["--child", part, "--volume", str(volume), "--work", str(work)]
    for name, value in options.items():
        args += [f"--{name}", str(value)]
    print(f"{part}: running on {volume.name} ...", flush=True)
    return _common.run_child(__file__, args)


def format_table(results: dict) -> str:
    lines = [f"load average at start: {results['machine'].get('loadavg_at_start')}, "
             f"CPU idle before: {results['machine'].get('cpu_idle_pct_before')} %"]
    if "equivalence" in results:
        lines += ["", "| equivalence | shape | block | max abs Δ logit | logits differing | mask mismatches / voxels |",
                  "|---|---|---|---|---|---|"]
        for row in results["equivalence"]["rows"]:
            name = "resampled 63.08 -> 50 µm" if row["voxel_size_um"] else "same voxel size"
            lines.append(f"| {name} | {tuple(row['shape'])} | {row['block']} | {row['max_abs_logit_diff']:.3g} | "
                         f"{row['logits_differing']} | {row['mask_mismatches']} / {row['voxels']} |")
    if "overhead" in results:
        lines += ["", f"| overhead on {tuple(results['overhead']['shape'])} | seconds | / infer_volume |", "|---|---|---|"]
        lines += [f"| {row['run']} | {row['seconds']:.1f} | {row['ratio']:.2f}x |" for row in results["overhead"]["rows"]]
    if "scaling" in results:
        lines += ["", f"| prefetch | dask workers (block {results['scaling']['block']}) | seconds | Mvoxel/s | speed-up | "
                  "workers' CPU s | cores busy |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {row['prefetch']} | {row['workers']} | {row['seconds']:.1f} | {row['mvoxel_per_s']:.3f} | "
                  f"{row['speedup']:.2f}x | {row['worker_cpu_s']:.1f} | {row['cores_busy']:.2f} |"
                  for row in results["scaling"]["rows"]]
    if "memory" in results:
        rows = results["memory"]
        lines += ["", "| memory: voxels | x first | seconds | peak RSS above baseline (MiB) | x first |", "|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['voxels']:,} | {row['voxels'] / rows[0]['voxels']:.0f}x | {row['seconds']:.1f} | "
                         f"{row['peak_above_baseline_mib']:.1f} | "
                         f"{row['peak_above_baseline_mib'] / max(rows[0]['peak_above_baseline_mib'], 1e-9):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
