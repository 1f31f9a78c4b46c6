"""Benchmark: vessel_kit.infer.infer_volume -- its overhead, MONAI's SliceInferer, memory scaling,
and the 3D sliding window against MONAI's sliding_window_inference.

One model for every contender: ``vessel_kit.models.build_model("unet", "resnet18", in_chans=1,
encoder_weights=None)`` in eval mode, random weights after ``torch.manual_seed(0)``. One input:
``vessel_kit.synth.make_synthetic_volume(shape, seed=0)[0]`` (uint16, (Z, Y, X)), built by the
parent and saved as .npy. Every contender runs in its own fresh child process (see
benchmarks/_common.py) with ``torch.set_num_threads(2)`` (``--threads``) under ``torch.inference_mode()``.

1. Overhead. ours = ``infer_volume(volume, model, axes=("xy",), tta="none", in_chans=1,
   normalization=Normalization("unit"), tile_size, overlap, batch_size)`` against the pure model
   forward on random (batch, 1, tile, tile) tensors, for exactly the tiles ours computes on the
   xy axis: Z x n(Y) x n(X), n(L) = ceil((L - tile) / step) + 1 windows per side if L > tile
   else 1, step = tile * (1 - overlap). Goal: ours / forward <= 1.10.
2. Peer: MONAI. ``monai.inferers.SliceInferer(roi_size=(tile, tile), sw_batch_size=batch,
   overlap=overlap, mode="gaussian", spatial_dim=d, progress=False)`` for d = 0, 1, 2 on the
   whole (1, 1, Z, Y, X) float32 tensor x / 65535, the three float32 logit volumes summed, then
   sigmoid(sum / 3) > 0.5; against ours with axes=("xy", "xz", "yz"), tta="none" (--monai-shapes,
   default --shape). After the timed runs the xy logits of both (ours return_logits=True,
   axes=("xy",); MONAI spatial_dim=0) are compared, once with MONAI's own importance map (clamped
   to >= 1e-3) and once with ours' (``vessel_kit.tiling.gaussian_importance``) set as MONAI's
   ``roi_weight_map``. Goals: ours faster, and ours' peak memory <= MONAI's / 3.
3. Memory scaling. ours with tta="flips", 1 axis and 3 axes, on two or more volume sizes
   (--mem-shapes; default 128^3 and 128x128x512, whose sides are all >= the tile so no compute
   goes to padding): peak memory / input bytes (the uint16 volume), and the least-squares fit
   peak = a + b * input bytes. Also tracemalloc's peak of the numpy buffers alive at once (the
   accumulator, the mask, per-plane buffers; torch's activations are not in it), which does
   not have RSS's +-20 MiB run-to-run noise. Goal: b <= 2.5.
4. 3D sliding window (--parts 3d). One 3D model, a MONAI DynUNet built by vessel_kit
   (``ModelConfig(arch="dynunet", spatial_dims=3, model_kwargs={"filters": [8, 16, 32, 64],
   "strides": [1, 2, 2, 2]})``, random weights after ``torch.manual_seed(0)``). ours =
   ``Predictor(model, InferConfig(tile_size=patch, overlap, tta="none", batch_size=batch_3d),
   in_chans=1, normalization=Normalization("unit")).predict(volume)``; MONAI =
   ``sliding_window_inference(x / 65535, roi_size=(patch,) * 3, sw_batch_size=batch_3d,
   predictor=model, overlap=overlap, mode="gaussian") > 0`` on the whole (1, 1, Z, Y, X) float32
   tensor. Same patches (patch 64, overlap 0.5), on --shapes-3d (default 64x128x128 and
   128x128x256), time and peak memory as MONAI / ours, and the masks' Dice. Goals: ours at least
   as fast, and ours' peak <= MONAI's / 2.
5. Heads and views (--parts heads). What the 1st place's choices cost per voxel: ours
   (``Predictor(model, InferConfig(axes=("xy",), tta, tile_size, overlap, batch_size),
   in_chans=3, normalization=Normalization("unit")).logits(volume)``) with a 2.5D model of 3
   slices in (``build_model("unet", "resnet18", in_chans=3, out_chans=m)``, random weights after
   ``torch.manual_seed(0)``): 3 in / 1 out against 3 in / 3 out (multi-slice output: each plane
   blended from the 3 windows predicting it), both tta="none"; and tta="d4" (8 views) against
   tta="flips" (4 views), both 3 in / 1 out. One child times the four in turn, --repeat rounds
   (interleaved: a change of load on the machine hits every case alike); seconds per voxel (best
   round) and the two ratios. No goal: the figures go in the README.

Peak memory is the child's highest RSS during the runs minus its RSS once the imports are done,
the model is built and the volume is loaded (see benchmarks/README.md). torch's 2 OpenMP threads
slow down 3-35x when another process holds a core, so before each child the parent waits for
idle CPUs (--wait-idle) and runs a disturbed child again (--retries). --profile also runs ours
(xy, tta none) once under cProfile and prints where the time goes.

    python benchmarks/bench_infer.py                     # defaults, ~5 min on 2 idle cores
    python benchmarks/bench_infer.py --parts overhead --shape 16x256x256 --repeat 3
    python benchmarks/bench_infer.py --parts monai --monai-shapes 128x128x128,128x128x512
    python benchmarks/bench_infer.py --parts memory --mem-shapes 128x128x128,128x128x512,128x128x1024
    python benchmarks/bench_infer.py --parts 3d --shapes-3d 64x128x128,128x128x256 --patch 64
    python benchmarks/bench_infer.py --parts heads --shape 8x128x128 --tile 64 --repeat 5 --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

import _common  # noqa: E402

GOAL_OVERHEAD = 1.10  # ours (xy, no TTA) / pure forward of the same tiles
GOAL_MEMORY_VS_MONAI = 3.0  # MONAI's peak / ours', 3 axes
GOAL_BYTES_PER_INPUT_BYTE = 2.5  # peak / input bytes beyond the fixed cost
GOAL_MEMORY_VS_MONAI_3D = 2.0  # MONAI's peak / ours', 3D sliding window
THREADS = 2
AXES_3 = ("xy", "xz", "yz")
PARTS = ("overhead", "monai", "memory", "3d", "heads")
HEAD_CASES = (  # (name, in_chans, out_chans, tta) of the heads part
    ("3 in / 1 out, tta none", 3, 1, "none"),
    ("3 in / 3 out, tta none", 3, 3, "none"),
    ("3 in / 1 out, tta flips", 3, 1, "flips"),
    ("3 in / 1 out, tta d4", 3, 1, "d4"),
)
MODEL_3D = {"filters": [8, 16, 32, 64], "strides": [1, 2, 2, 2]}  # a small DynUNet (stride 8)


# --- shared helpers -------------------------------------------------------------------------


def n_windows(length: int, tile: int, overlap: float) -> int:
    """Windows per side: evenly spread starts covering ``length`` (the rule ours uses)."""
    if length <= tile:
        return 1
    step = tile * (1.0 - overlap)
    return math.ceil((length - tile) / step - 1e-9) + 1


def xy_tiles(shape, tile: int, overlap: float) -> int:
    depth, height, width = shape
    return depth * n_windows(height, tile, overlap) * n_windows(width, tile, overlap)


def shape_text(shape) -> str:
    return "x".join(map(str, shape))


def volume_path(workdir: Path, shape) -> Path:
    return workdir / f"volume_{shape_text(shape)}.npy"


def build_volume(shape, seed: int, workdir: Path) -> dict:
    from vessel_kit.synth import make_synthetic_volume

    start = time.perf_counter()
    volume = make_synthetic_volume(tuple(shape), seed=seed)[0]
    elapsed = time.perf_counter() - start
    if volume.dtype != np.uint16 or volume.shape != tuple(shape):
        raise ValueError(f"synth gave {volume.dtype} {volume.shape}, expected uint16 {tuple(shape)}")
    np.save(volume_path(workdir, shape), volume)
    return {"shape": list(shape), "bytes": int(volume.nbytes), "mib": volume.nbytes / _common.MiB,
            "build_s": elapsed, "digest": hashlib.blake2b(volume.data, digest_size=8).hexdigest()}


# --- children -------------------------------------------------------------------------------


def _model(in_chans: int = 1, out_chans: int = 1):
    import torch

    from vessel_kit.models import build_model

    torch.manual_seed(0)
    return build_model("unet", "resnet18", in_chans=in_chans, out_chans=out_chans, encoder_weights=None).eval()


def _model_3d(args):
    import torch

    from vessel_kit.models import ModelConfig, build_model_from_config

    torch.manual_seed(0)
    config = ModelConfig(arch="dynunet", spatial_dims=3, tile_size=args.patch, model_kwargs=MODEL_3D)
    return build_model_from_config(config).eval()


def _make_ours_3d(args, model):
    from vessel_kit.infer_config import InferConfig
    from vessel_kit.normalize import Normalization
    from vessel_kit.predictor import Predictor

    config = InferConfig(tile_size=args.patch, overlap=args.overlap, tta="none", batch_size=args.batch_3d,
                         device="cpu", threshold=0.5, progress=False)
    predictor = Predictor(model, config, in_chans=1, normalization=Normalization("unit"))
    return lambda volume: predictor.predict(volume)


def _make_monai_3d(args, model):
    import torch
    from monai.inferers import sliding_window_inference

    def run(volume):
        x = torch.from_numpy(volume.astype(np.float32)[None, None])
        x /= 65535.0
        logits = sliding_window_inference(x, roi_size=(args.patch,) * 3, sw_batch_size=args.batch_3d,
                                          predictor=model, overlap=args.overlap, mode="gaussian")
        del x
        return (logits > 0)[0, 0].numpy()

    return run


def _make_ours(args, model):
    from vessel_kit.infer import infer_volume
    from vessel_kit.normalize import Normalization

    axes = tuple(args.axes.split(","))
    normalization = Normalization("unit")

    def run(volume, axes=axes, return_logits=False):
        return infer_volume(volume, model, axes=axes, tta=args.tta, tile_size=args.tile, overlap=args.overlap,
                            batch_size=args.batch, in_chans=1, normalization=normalization, device="cpu",
                            threshold=0.5, return_logits=return_logits, progress=False)

    return run


def _make_monai(args, model):
    import torch
    from monai.inferers import SliceInferer

    dims = {"xy": 0, "xz": 1, "yz": 2}  # spatial dims of (1, 1, Z, Y, X): slicing along Z, Y, X

    def inferer(axis, weight_map):
        inferer = SliceInferer(roi_size=(args.tile, args.tile), sw_batch_size=args.batch, overlap=args.overlap,
                               mode="gaussian", spatial_dim=dims[axis], progress=False)
        if weight_map is not None:  # only for the check after the measurement
            inferer.roi_weight_map = weight_map
        return inferer

    def run(volume, axes=tuple(args.axes.split(",")), return_logits=False, weight_map=None):
        x = torch.from_numpy(volume.astype(np.float32)[None, None])
        x /= 65535.0
        total = None
        for axis in axes:
            logits = inferer(axis, weight_map)(x, model)
            if total is None:
                total = logits
            else:
                total += logits
            del logits
        del x
        if return_logits:
            return (total / len(axes))[0, 0].numpy()
        return (torch.sigmoid(total / len(axes)) > 0.5)[0, 0].numpy()

    return run


def _forward_loop(args, model, shape):
    import torch

    n_tiles = xy_tiles(shape, args.tile, args.overlap)
    full, rest = divmod(n_tiles, args.batch)
    generator = torch.Generator().manual_seed(1)
    batch = torch.rand((args.batch, 1, args.tile, args.tile), generator=generator)
    last = batch[:rest].clone() if rest else None

    def run(volume):
        out = None
        for _ in range(full):
            out = model(batch)
        if last is not None:
            out = model(last)
        return out

    return run, {"n_tiles": n_tiles, "n_batches": full + (1 if rest else 0)}


def _time_heads(args, volume) -> dict:
    """Each of HEAD_CASES predicting ``volume`` in turn, ``--repeat`` rounds: seconds per case."""
    import torch

    from vessel_kit.infer_config import InferConfig
    from vessel_kit.normalize import Normalization
    from vessel_kit.predictor import Predictor

    runs = {}
    for name, in_chans, out_chans, tta in HEAD_CASES:
        config = InferConfig(axes=("xy",), tta=tta, tile_size=args.tile, overlap=args.overlap, batch_size=args.batch,
                             device="cpu", progress=False)
        runs[name] = Predictor(_model(in_chans, out_chans), config, in_chans=in_chans, normalization=Normalization("unit"))
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(args.repeat):
            for name, predictor in runs.items():
                start = time.perf_counter()
                predictor.logits(volume)
                times[name].append(time.perf_counter() - start)
    return {name: {"best_s": min(t), "median_s": float(np.median(t)), "times_s": t} for name, t in times.items()}


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    shape = _common.parse_shape(args.shape, 3)
    workdir = Path(args.workdir)
    if args.child == "heads":
        _common.write_child_result(args.child_out, {"cases": _time_heads(args, np.load(volume_path(workdir, shape)))})
        return
    model = _model_3d(args) if args.child in ("ours3d", "monai3d") else _model()
    extra = {}
    if args.child == "ours3d":
        run = _make_ours_3d(args, model)
    elif args.child == "monai3d":
        run = _make_monai_3d(args, model)
    elif args.child == "ours":
        run = _make_ours(args, model)
    elif args.child == "monai":
        run = _make_monai(args, model)
    elif args.child == "forward":
        run, extra = _forward_loop(args, model, shape)
    else:
        raise ValueError(f"unknown child {args.child!r}")
    volume = np.load(volume_path(workdir, shape))

    with torch.inference_mode():
        if args.profile:
            run(volume)  # warm-up, then one profiled run
            extra["profile"] = _profile(lambda: run(volume), args.profile_lines)
        if args.trace_numpy:  # numpy reports its buffers to tracemalloc; torch's allocator does not
            import tracemalloc

            tracemalloc.start(1)
        cpu0 = time.process_time()
        with _common.PeakMemory() as memory:
            if args.trace_numpy:
                tracemalloc.reset_peak()
                traced0 = tracemalloc.get_traced_memory()[0]
            times, result = _common.time_repeated(lambda: run(volume), args.repeat)
            if args.trace_numpy:
                extra["numpy_peak_mib"] = (tracemalloc.get_traced_memory()[1] - traced0) / _common.MiB
        extra["cpu_s_per_run"] = (time.process_time() - cpu0) / len(times)  # all threads of this process
        if args.trace_numpy:
            tracemalloc.stop()
        if args.save_mask:
            np.save(args.save_mask, np.asarray(result))
        if args.save_mask or args.save_xy_logits:
            extra["result_dtype"] = str(np.asarray(result).dtype)
            extra["foreground_pct"] = 100.0 * float(np.count_nonzero(result)) / result.size
        del result
        if args.save_xy_logits:  # after the measurement: not part of any figure
            np.save(args.save_xy_logits, np.asarray(run(volume, axes=("xy",), return_logits=True), np.float32))
            if args.child == "monai":  # and once with ours' importance map instead of MONAI's
                from vessel_kit.tiling import gaussian_importance

                weight_map = torch.from_numpy(gaussian_importance((args.tile, args.tile))[None])  # (1, T, T): dim 0
                logits = run(volume, axes=("xy",), return_logits=True, weight_map=weight_map)
                np.save(args.save_xy_logits.replace(".npy", "_ourmap.npy"), np.asarray(logits, np.float32))
    _common.write_child_result(args.child_out, {
        **_common.summarize(times), **memory.as_dict(), "repeat": args.repeat, "threads": torch.get_num_threads(),
        "volume_bytes": int(volume.nbytes), **extra,
    })


def _profile(fn, lines: int) -> dict:
    """One run of fn under cProfile: wall time and the top functions by own and cumulative time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(fn)
    wall = time.perf_counter() - start
    report = {"wall_s": wall}
    for key in ("tottime", "cumulative"):
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats(key).print_stats(lines)
        text = stream.getvalue()
        report[key] = text[text.find("   ncalls"):].rstrip() if "   ncalls" in text else text
    return report


# --- parent ---------------------------------------------------------------------------------


def _run(name: str, child: str, shape, args, workdir: Path, *, axes=("xy",), tta="none", repeat=None,
         extra=(), retries=None) -> dict:
    print(f"running {name} ...", flush=True)
    child_args = ["--child", child, "--threads", str(args.threads), "--shape", shape_text(shape), "--workdir", str(workdir),
                  "--axes", ",".join(axes),
                  "--tta", tta, "--tile", str(args.tile), "--overlap", str(args.overlap), "--batch", str(args.batch),
                  "--repeat", str(repeat or args.repeat), *extra]
    result, attempts = None, []
    retries = args.retries if retries is None else retries
    for attempt in range(1 + max(0, retries)):
        waited = wait_for_idle(args.wait_idle)
        candidate = _common.run_child(__file__, child_args)
        candidate["waited_for_idle_s"] = waited
        attempts.append({k: candidate.get(k) for k in ("best_s", "child_wall_s", "other_cpu_s", "waited_for_idle_s")})
        if result is None or _disturbance(candidate) < _disturbance(result):
            result = candidate
        if _disturbance(candidate) <= 0:
            break
        print(f"  other processes used {candidate['other_cpu_s']:.1f} CPU s during {candidate['child_wall_s']:.1f} s "
              f"(best {candidate['best_s']:.2f} s)" + ("; running it again" if attempt < retries else ""),
              flush=True)
    result.update(contender=child, shape=list(shape), axes=list(axes), tta=tta, attempts=attempts)
    print(f"  best {result['best_s']:.2f} s (median {result['median_s']:.2f} s, {len(result['times_s'])} runs), "
          f"peak {result['peak_above_baseline_mib']:.1f} MiB", flush=True)
    return result


def _disturbance(result: dict) -> float:
    """CPU seconds other processes used beyond what _common.interference_note tolerates (<= 0: clean)."""
    other = result.get("other_cpu_s")
    return 0.0 if other is None else other - (0.1 * result["child_wall_s"] + 0.05)


def wait_for_idle(limit_s: float, idle_pct: float = 90.0) -> float:
    """Wait (up to limit_s) until the CPUs are at least idle_pct idle over 2 s; the seconds waited.

    torch's OpenMP threads slow down 3-35x when another process holds one of the 2 cores, so a child
    started while the machine is busy measures the other process, not the contender.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        idle = _common.cpu_idle_percent(2.0)
        if idle is None or idle >= idle_pct:
            break
    return time.perf_counter() - start


def linear_fit(points) -> dict:
    """Least-squares peak = a + b * input bytes over (input bytes, peak bytes) points."""
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    b, a = np.polyfit(x, y, 1)
    return {"a_fixed_mib": a / _common.MiB, "b_bytes_per_input_byte": float(b),
            "max_residual_mib": float(np.abs(y - (a + b * x)).max()) / _common.MiB,
            "points": [{"input_mib": float(xi) / _common.MiB, "peak_mib": float(yi) / _common.MiB} for xi, yi in zip(x, y)]}


def logit_difference(ours: np.ndarray, peer: np.ndarray) -> dict:
    ours, peer = ours.astype(np.float64), peer.astype(np.float64)
    diff = np.abs(ours - peer)
    scale = float(np.mean(np.abs(peer)))
    return {
        "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
        "p99_abs_diff": float(np.percentile(diff, 99)), "mean_abs_logit_monai": scale,
        "std_logit_monai": float(peer.std()), "relative_mean_abs_diff": float(diff.mean()) / max(scale, 1e-12),
        "correlation": float(np.corrcoef(ours.ravel(), peer.ravel())[0, 1]),
        "sign_agreement_pct": 100.0 * float(np.mean((ours > 0) == (peer > 0))),
    }


def mask_agreement(a: np.ndarray, b: np.ndarray) -> dict:
    both = np.count_nonzero(a & b)
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return {"dice": 2.0 * both / total if total else 1.0, "differing_voxels_pct": 100.0 * float(np.mean(a != b))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="32x256x256", help="Z x Y x X for overhead and MONAI (default %(default)s)")
    parser.add_argument("--monai-shapes", help="shapes for the MONAI comparison, comma-separated (default: --shape); "
                                               "with two or more, peak memory is also fitted as a + b * input bytes")
    parser.add_argument("--mem-shapes", default="128x128x128,128x128x512",
                        help="two or more volume sizes for memory scaling, comma-separated (default %(default)s)")
    parser.add_argument("--tile", type=int, default=128, help="tile side (default %(default)s)")
    parser.add_argument("--overlap", type=float, default=0.5, help="tile overlap (default %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="tiles per forward (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs for overhead and MONAI (default %(default)s)")
    parser.add_argument("--mem-repeat", type=int, default=1, help="runs per memory-scaling child (default %(default)s)")
    parser.add_argument("--parts", default=",".join(PARTS), help="which parts to run (default %(default)s)")
    parser.add_argument("--profile", action="store_true", help="also profile ours (xy, tta none) with cProfile")
    parser.add_argument("--profile-lines", type=int, default=25, help=argparse.SUPPRESS)
    parser.add_argument("--wait-idle", type=float, default=300.0,
                        help="before each child, wait up to this many seconds for idle CPUs (default %(default)s)")
    parser.add_argument("--retries", type=int, default=2,
                        help="run a child again (up to this many times) when other processes used the CPUs "
                             "during it; the least disturbed run is kept (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="synth seed (default %(default)s)")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="torch threads per child (default %(default)s; 1 suffers less from a busy machine)")
    parser.add_argument("--shapes-3d", default="64x128x128,128x128x256",
                        help="volume sizes for the 3D part, comma-separated (default %(default)s)")
    parser.add_argument("--patch", type=int, default=64, help="3D patch side (default %(default)s)")
    parser.add_argument("--batch-3d", type=int, default=2, help="3D patches per forward (default %(default)s)")
    _common.add_child_options(parser)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--axes", default="xy", help=argparse.SUPPRESS)
    parser.add_argument("--tta", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--save-mask", help=argparse.SUPPRESS)
    parser.add_argument("--save-xy-logits", help=argparse.SUPPRESS)
    parser.add_argument("--trace-numpy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return 0

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    shape = _common.parse_shape(args.shape, 3)
    mem_shapes = [_common.parse_shape(s, 3) for s in args.mem_shapes.split(",")]
    monai_shapes = [_common.parse_shape(s, 3) for s in args.monai_shapes.split(",")] if args.monai_shapes else [shape]
    shapes_3d = [_common.parse_shape(s, 3) for s in args.shapes_3d.split(",")]
    if "memory" in parts and len(mem_shapes) < 2:
        parser.error("--mem-shapes needs at least two shapes")

    machine = _common.machine_info()
    print(_common.describe_machine(machine))
    import monai
    import torch

    versions = {"torch": torch.__version__, "monai": monai.__version__}
    try:
        import segmentation_models_pytorch as smp

        versions["segmentation_models_pytorch"] = smp.__version__
    except ImportError:
        pass
    sources = _common.source_digests("vessel_kit.infer", "vessel_kit.normalize", "vessel_kit.models",
                                     "vessel_kit.synth", "vessel_kit.predictor", "vessel_kit.windows",
                                     "vessel_kit.models_3d")
    print("sources (sha256): " + ", ".join(f"{m} {d}" for m, d in sources.items()))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"model: unet/resnet18, in_chans 1, random weights (seed 0); tile {args.tile}, overlap {args.overlap}, "
          f"batch {args.batch}, {args.threads} torch threads")
    if "3d" in parts:
        print(f"3D model: dynunet {MODEL_3D}, random weights (seed 0); patch {args.patch}, overlap {args.overlap}, "
              f"batch {args.batch_3d}")

    results, report = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        workdir = Path(tmp)
        inputs = {}
        for s in (([shape] if "overhead" in parts or "heads" in parts else []) + (monai_shapes if "monai" in parts else [])
                  + (mem_shapes if "memory" in parts else []) + (shapes_3d if "3d" in parts else [])):
            if shape_text(s) not in inputs:
                inputs[shape_text(s)] = build_volume(s, args.seed, workdir)
        for key, info in inputs.items():
            print(f"input {key}: uint16, {info['mib']:.2f} MiB, digest {info['digest']}")

        if "overhead" in parts:
            results["ours xy"] = _run("ours: axes=xy, tta=none", "ours", shape, args, workdir,
                                      extra=["--save-xy-logits", str(workdir / f"ours_xy_{shape_text(shape)}.npy")])
            results["forward"] = _run("pure forward of the same tiles", "forward", shape, args, workdir)
            if args.profile:
                prof = _run("ours: axes=xy, tta=none under cProfile", "ours", shape, args, workdir, repeat=1,
                            extra=["--profile"])
                report["profile"] = prof["profile"]
            ours, forward = results["ours xy"], results["forward"]
            report["overhead"] = {
                "ours_best_s": ours["best_s"], "forward_best_s": forward["best_s"],
                "ratio": ours["best_s"] / forward["best_s"], "n_tiles": forward["n_tiles"],
                "n_batches": forward["n_batches"], "ms_per_tile_forward": 1e3 * forward["best_s"] / forward["n_tiles"],
            }

        if "monai" in parts:
            report["monai"] = {}
            for s in monai_shapes:
                suffix = "" if len(monai_shapes) == 1 else f" {shape_text(s)}"
                tag = shape_text(s)
                ours_xy = workdir / f"ours_xy_{tag}.npy"
                ours_key, peer_key = "ours 3 axes" + suffix, "monai 3 axes" + suffix
                results[ours_key] = _run(f"ours: axes=xy,xz,yz, tta=none, {tag}", "ours", s, args, workdir,
                                         axes=AXES_3, extra=["--save-mask", str(workdir / f"ours_mask_{tag}.npy")])
                if not ours_xy.exists():  # the overhead part saved it when it ran on this shape
                    results["ours xy (check)" + suffix] = _run(f"ours: xy logits for the check, {tag}", "ours", s,
                                                               args, workdir, repeat=1, retries=0,
                                                               extra=["--save-xy-logits", str(ours_xy)])
                monai_xy = workdir / f"monai_xy_{tag}.npy"
                results[peer_key] = _run(f"MONAI SliceInferer: spatial_dim 0,1,2, {tag}", "monai", s, args, workdir,
                                         axes=AXES_3, extra=["--save-mask", str(workdir / f"monai_mask_{tag}.npy"),
                                                             "--save-xy-logits", str(monai_xy)])
                ours, peer = results[ours_key], results[peer_key]
                ours_logits = np.load(ours_xy)
                report["monai"][tag] = {
                    "ours_best_s": ours["best_s"], "monai_best_s": peer["best_s"],
                    "speedup": peer["best_s"] / ours["best_s"],
                    "ours_peak_mib": ours["peak_above_baseline_mib"], "monai_peak_mib": peer["peak_above_baseline_mib"],
                    "memory_ratio": peer["peak_above_baseline_mib"] / max(ours["peak_above_baseline_mib"], 1e-9),
                    "input_mib": ours["volume_bytes"] / _common.MiB,
                    "xy_logits": logit_difference(ours_logits, np.load(monai_xy)),
                    "xy_logits_monai_with_our_map": logit_difference(ours_logits, np.load(str(monai_xy).replace(
                        ".npy", "_ourmap.npy"))),
                    "masks_3_axes": mask_agreement(np.load(workdir / f"ours_mask_{tag}.npy"),
                                                   np.load(workdir / f"monai_mask_{tag}.npy")),
                    "ours_foreground_pct": ours["foreground_pct"], "monai_foreground_pct": peer["foreground_pct"],
                }
            if len(monai_shapes) >= 2:
                report["monai_memory_fit"] = {
                    name: linear_fit([(r["volume_bytes"], r["peak_above_baseline_mib"] * _common.MiB)
                                      for key, r in results.items() if key.startswith(prefix + " 3 axes")])
                    for name, prefix in (("ours", "ours"), ("monai", "monai"))}

        if "memory" in parts:
            fits = {}
            for n_axes, axes in ((1, ("xy",)), (3, AXES_3)):
                points = []
                for s in mem_shapes:
                    key = f"ours flips {n_axes} ax {shape_text(s)}"
                    results[key] = _run(f"ours: axes={','.join(axes)}, tta=flips, {shape_text(s)}", "ours", s, args,
                                        workdir, axes=axes, tta="flips", repeat=args.mem_repeat, extra=["--trace-numpy"])
                    r = results[key]
                    r["peak_per_input_byte"] = r["peak_above_baseline_mib"] * _common.MiB / r["volume_bytes"]
                    r["numpy_peak_per_input_byte"] = r["numpy_peak_mib"] * _common.MiB / r["volume_bytes"]
                    points.append((r["volume_bytes"], r["peak_above_baseline_mib"] * _common.MiB,
                                   r["numpy_peak_mib"] * _common.MiB))
                fits[f"{n_axes} axes"] = linear_fit([(x, rss) for x, rss, _ in points])
                fits[f"{n_axes} axes, numpy arrays only"] = linear_fit([(x, traced) for x, _, traced in points])
            report["memory"] = fits

        if "3d" in parts:
            report["3d"] = {}
            extra = ["--patch", str(args.patch), "--batch-3d", str(args.batch_3d)]
            for s in shapes_3d:
                tag = shape_text(s)
                ours = results[f"ours 3d {tag}"] = _run(f"ours: 3D patches {args.patch}, {tag}", "ours3d", s, args, workdir,
                                                        axes=("3d",), extra=[*extra, "--save-mask", str(workdir / f"o3_{tag}.npy")])
                peer = results[f"monai 3d {tag}"] = _run(f"MONAI sliding_window_inference, {tag}", "monai3d", s, args,
                                                         workdir, axes=("3d",),
                                                         extra=[*extra, "--save-mask", str(workdir / f"m3_{tag}.npy")])
                report["3d"][tag] = {
                    "ours_best_s": ours["best_s"], "monai_best_s": peer["best_s"], "speedup": peer["best_s"] / ours["best_s"],
                    "ours_peak_mib": ours["peak_above_baseline_mib"], "monai_peak_mib": peer["peak_above_baseline_mib"],
                    "memory_ratio": peer["peak_above_baseline_mib"] / max(ours["peak_above_baseline_mib"], 1e-9),
                    "input_mib": ours["volume_bytes"] / _common.MiB,
                    "masks": mask_agreement(np.load(workdir / f"o3_{tag}.npy"), np.load(workdir / f"m3_{tag}.npy")),
                }

        if "heads" in parts:
            print(f"running heads: {', '.join(name for name, *_ in HEAD_CASES)}, {args.repeat} rounds ...", flush=True)
            waited = wait_for_idle(args.wait_idle)
            child = _common.run_child(__file__, ["--child", "heads", "--threads", str(args.threads),
                                                 "--shape", shape_text(shape), "--workdir", str(workdir),
                                                 "--tile", str(args.tile), "--overlap", str(args.overlap),
                                                 "--batch", str(args.batch), "--repeat", str(args.repeat)])
            voxels = math.prod(shape)
            cases = {name: {**case, "us_per_voxel": 1e6 * case["best_s"] / voxels} for name, case in child["cases"].items()}
            per_voxel = {name: case["us_per_voxel"] for name, case in cases.items()}
            report["heads"] = {
                "shape": list(shape), "voxels": voxels, "cases": cases, "waited_for_idle_s": waited,
                "child_wall_s": child.get("child_wall_s"), "other_cpu_s": child.get("other_cpu_s"),
                "3_out_vs_1_out": per_voxel["3 in / 3 out, tta none"] / per_voxel["3 in / 1 out, tta none"],
                "d4_vs_flips": per_voxel["3 in / 1 out, tta d4"] / per_voxel["3 in / 1 out, tta flips"],
            }

    # --- console report -------------------------------------------------------------------
    print()
    if results:
        _common.print_table(
            ["contender", "shape", "axes", "tta", "best s", "median s", "runs", "peak MiB", "peak/input",
             "numpy peak MiB", "numpy peak/input"],
            [[name, shape_text(r["shape"]), ",".join(r["axes"]) if r["contender"] != "forward" else "-",
              r["tta"] if r["contender"] != "forward" else "-", r["best_s"], r["median_s"], len(r["times_s"]),
              r["peak_above_baseline_mib"], r["peak_above_baseline_mib"] * _common.MiB / r["volume_bytes"],
              r.get("numpy_peak_mib", "-"),
              r["numpy_peak_mib"] * _common.MiB / r["volume_bytes"] if "numpy_peak_mib" in r else "-"]
             for name, r in results.items()],
        )
    goals = {}
    if "overhead" in report:
        o = report["overhead"]
        print(f"\noverhead: ours {o['ours_best_s']:.3f} s / forward {o['forward_best_s']:.3f} s "
              f"({o['n_tiles']} tiles in {o['n_batches']} batches, {o['ms_per_tile_forward']:.2f} ms/tile) "
              f"= {o['ratio']:.3f}")
        goals[f"overhead <= {GOAL_OVERHEAD}"] = o["ratio"] <= GOAL_OVERHEAD
    for tag, m in report.get("monai", {}).items():
        print(f"MONAI, 3 axes, {tag}: ours {m['ours_best_s']:.2f} s vs {m['monai_best_s']:.2f} s -> ours "
              f"{m['speedup']:.2f}x as fast; peak {m['ours_peak_mib']:.1f} vs {m['monai_peak_mib']:.1f} MiB -> "
              f"MONAI/ours {m['memory_ratio']:.2f}x")
        for label, key in (("MONAI's importance map", "xy_logits"), ("ours' importance map", "xy_logits_monai_with_our_map")):
            d = m[key]
            print(f"  xy logits ours vs MONAI ({label}): mean |diff| {d['mean_abs_diff']:.3g} (p99 {d['p99_abs_diff']:.3g},"
                  f" max {d['max_abs_diff']:.3g}), mean |logit| {d['mean_abs_logit_monai']:.3g} -> relative "
                  f"{d['relative_mean_abs_diff']:.3%}; correlation {d['correlation']:.6f}; sign agreement "
                  f"{d['sign_agreement_pct']:.3f} %")
        k = m["masks_3_axes"]
        print(f"  3-axis masks: Dice {k['dice']:.5f}, {k['differing_voxels_pct']:.4f} % of voxels differ "
              f"(foreground ours {m['ours_foreground_pct']:.2f} %, MONAI {m['monai_foreground_pct']:.2f} %)")
        goals[f"ours faster than MONAI (3 axes, {tag})"] = m["speedup"] > 1.0
        goals[f"MONAI peak / ours >= {GOAL_MEMORY_VS_MONAI:g} ({tag})"] = m["memory_ratio"] >= GOAL_MEMORY_VS_MONAI
    for tag, m in report.get("3d", {}).items():
        print(f"3D, {tag} ({m['input_mib']:.0f} MiB input), patch {args.patch}: ours {m['ours_best_s']:.2f} s vs MONAI "
              f"{m['monai_best_s']:.2f} s -> ours {m['speedup']:.2f}x as fast; peak {m['ours_peak_mib']:.1f} vs "
              f"{m['monai_peak_mib']:.1f} MiB -> MONAI/ours {m['memory_ratio']:.2f}x; masks Dice {m['masks']['dice']:.5f}")
        goals[f"3D ours at least as fast as MONAI ({tag})"] = m["speedup"] >= 1.0
        goals[f"3D MONAI peak / ours >= {GOAL_MEMORY_VS_MONAI_3D:g} ({tag})"] = m["memory_ratio"] >= GOAL_MEMORY_VS_MONAI_3D
    if "heads" in report:
        h = report["heads"]
        for name, case in h["cases"].items():
            print(f"heads, {name}: best {case['best_s']:.2f} s (median {case['median_s']:.2f} s) for {h['voxels']} "
                  f"voxels = {case['us_per_voxel']:.2f} µs/voxel")
        other = "" if h["other_cpu_s"] is None else (f" (other processes used {h['other_cpu_s']:.1f} CPU s during the "
                                                    f"child's {h['child_wall_s']:.1f} s)")
        print(f"heads: 3 out / 1 out = {h['3_out_vs_1_out']:.3f}x per voxel; d4 / flips = {h['d4_vs_flips']:.3f}x per voxel"
              + other)
    for name, fit in report.get("monai_memory_fit", {}).items():
        print(f"MONAI comparison, peak of {name} (3 axes, tta none) = {fit['a_fixed_mib']:.1f} MiB + "
              f"{fit['b_bytes_per_input_byte']:.2f} x input bytes (max residual {fit['max_residual_mib']:.1f} MiB)")
    if "memory" in report:
        for name, fit in report["memory"].items():
            print(f"memory, tta=flips, {name}: peak = {fit['a_fixed_mib']:.1f} MiB + "
                  f"{fit['b_bytes_per_input_byte']:.2f} x input bytes (max residual {fit['max_residual_mib']:.1f} MiB)")
            label = name.replace(", numpy arrays only", " (numpy arrays)") if "numpy" in name else f"{name} (RSS)"
            goals[f"{label}: b <= {GOAL_BYTES_PER_INPUT_BYTE}"] = fit["b_bytes_per_input_byte"] <= GOAL_BYTES_PER_INPUT_BYTE
        print("  (the RSS peak's fixed part moves by +-20 MiB from run to run with the same input -- allocator and "
              "activation memory -- so the RSS slope b is only rough over these sizes; the numpy-array slope is exact)")
    if goals:
        print("goals: " + ", ".join(f"{g}: {'met' if ok else 'MISSED'}" for g, ok in goals.items()))
    if "profile" in report:
        print(f"\ncProfile of ours (xy, tta none), one run after a warm-up ({report['profile']['wall_s']:.2f} s "
              "under the profiler), by own time:")
        print(report["profile"]["tottime"])
    note = _common.interference_note(results)
    if note:
        print(note)
    print("peak MiB = highest RSS during the runs minus RSS after imports, building the model and loading the "
          "volume; peak/input = that over the uint16 volume's bytes; numpy peak = tracemalloc's peak of the "
          "numpy buffers alive at once (torch's own allocations, e.g. activations, are not in it)")

    _common.write_json(args.json, {
        "benchmark": "infer", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"), "machine": machine, "versions": versions, "sources": sources,
        "settings": {"tile": args.tile, "overlap": args.overlap, "batch": args.batch, "threads": args.threads,
                     "patch_3d": args.patch, "batch_3d": args.batch_3d, "model_3d": MODEL_3D,
                     "repeat": args.repeat, "mem_repeat": args.mem_repeat, "seed": args.seed,
                     "wait_idle_s": args.wait_idle, "retries": args.retries},
        "inputs": inputs, "results": results, "report": report, "goals": goals,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
