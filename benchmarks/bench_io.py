"""Benchmark: vessel_kit.volume.read_volume against the usual ways of reading a TIFF slice stack.

All contenders read the same folder of uncompressed single-strip uint16 TIFFs (written with
vessel_kit.volume.write_volume, one per slice, like the competition's) into a (Z, Y, X) array:

    ours:                  vessel_kit.volume.read_volume(folder)         (default threads)
    cv2.imread loop:       np.stack([cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in files])
    tifffile.imread(list): tifffile.imread(files)                        (tifffile defaults)
    tifffile.imread loop:  np.stack([tifffile.imread(p) for p in files])

Listing the folder (sorted glob) is inside every timing. Each contender runs in its own fresh
child process (benchmarks/_common.py) --repeat times, with the page cache warm (files read just
before) and, where the page cache can be dropped (root: ``sync; echo 3 > /proc/sys/vm/drop_caches``
before every run, outside the timing), cold. Reported: MB/s (10^6 bytes of pixel data per second,
best run), best and median time, the ratio ours/peer, peak RSS above the baseline (MiB; it
includes the returned volume itself), and whether every reader returned the identical array.
The real slices in --real (default: the 3-slice kidney_test_placeholder) are checked for
equality only.

    python benchmarks/bench_io.py                          # 200 slices of 1303x912, ~20 s
    python benchmarks/bench_io.py --slices 50 --cache warm --json out/bench_io.json
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

import _common  # noqa: E402

REAL_DEFAULT = "/work/shared/data/real/kidney_test_placeholder"
CONTENDERS = ("ours", "cv2.imread loop", "tifffile.imread(list)", "tifffile.imread loop")
CHILD_NAMES = {"ours": "ours", "cv2.imread loop": "cv2-loop", "tifffile.imread(list)": "tifffile-list",
               "tifffile.imread loop": "tifffile-loop"}
PEER = "cv2.imread loop"  # the ratio column is against this one


# --- readers --------------------------------------------------------------------------------


def list_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.tif"))


def make_reader(name: str):
    """The contender as a function folder -> (Z, Y, X) array; imports happen here, not in timing."""
    if name == "ours":
        from vessel_kit.volume import read_volume

        return lambda folder: read_volume(folder, progress=False)
    if name == "cv2-loop":
        import cv2

        return lambda folder: np.stack([cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in list_files(folder)])
    if name == "tifffile-list":
        import tifffile

        return lambda folder: tifffile.imread(list_files(folder))
    if name == "tifffile-loop":
        import tifffile

        return lambda folder: np.stack([tifffile.imread(p) for p in list_files(folder)])
    raise ValueError(f"unknown contender {name!r}")


# --- page cache -----------------------------------------------------------------------------


def drop_page_cache() -> str | None:
    """Drop the whole page cache; None on success, else why not."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("3\n")
        return None
    except OSError as error:
        return f"cannot drop the page cache ({error.strerror or error}; needs root)"


def resident_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' pages that sit in the page cache (mincore), None if unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        page = mmap.PAGESIZE
        resident = total = 0
        for path in files:
            size = path.stat().st_size
            if size == 0:
                continue
            with open(path, "rb") as handle:
                address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, handle.fileno(), 0)
                if address in (None, ctypes.c_void_p(-1).value):
                    return None
                try:
                    pages = (size + page - 1) // page
                    vector = ctypes.create_string_buffer(pages)
                    if libc.mincore(address, size, vector) != 0:
                        return None
                    resident += sum(b & 1 for b in vector.raw)
                    total += pages
                finally:
                    libc.munmap(address, size)
        return resident / total if total else None
    except (OSError, AttributeError):
        return None


def warm_up(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


# --- children -------------------------------------------------------------------------------


def child_main(args) -> None:
    folder = Path(args.folder)
    reader = make_reader(args.child)
    files = list_files(folder)
    cold = args.cache == "cold"
    residency = []

    def before_each() -> None:
        if cold:
            problem = drop_page_cache()
            if problem:
                raise SystemExit(problem)
        residency.append(resident_fraction(files))

    with _common.PeakMemory() as memory:
        times, volume = _common.time_repeated(lambda: reader(folder), args.repeat, before_each)
    digest = hashlib.blake2b(np.ascontiguousarray(volume).data, digest_size=16).hexdigest()
    _common.write_child_result(args.child_out, {
        **_common.summarize(times), **memory.as_dict(), "repeat": args.repeat,
        "shape": list(volume.shape), "dtype": str(volume.dtype), "digest": digest, "nbytes": int(volume.nbytes),
        "resident_before_runs": residency,
    })


# --- parent ---------------------------------------------------------------------------------


def filesystem_of(path: Path) -> str:
    """'device on mountpoint type fstype' of the mount holding path (from /proc/mounts)."""
    best = ("?", "/", "?")
    try:
        target = str(path.resolve())
        with open("/proc/mounts") as mounts:
            for line in mounts:
                device, mountpoint, fstype = line.split()[:3]
                if (target == mountpoint or target.startswith(mountpoint.rstrip("/") + "/")) and len(
                        mountpoint) >= len(best[1]):
                    best = (device, mountpoint, fstype)
    except OSError:
        pass
    return f"{best[0]} on {best[1]} type {best[2]}"


def check_real(folder: Path) -> dict:
    """Read the real slices with every contender in-process; are the arrays identical?"""
    if not folder.is_dir() or not list_files(folder):
        return {"folder": str(folder), "checked": False, "reason": "folder missing or holds no .tif"}
    arrays = {name: make_reader(CHILD_NAMES[name])(folder) for name in CONTENDERS}
    reference = arrays["ours"]
    equal = {name: bool(a.dtype == reference.dtype and np.array_equal(a, reference)) for name, a in arrays.items()}
    return {"folder": str(folder), "checked": True, "slices": int(reference.shape[0]),
            "shape": list(reference.shape), "dtype": str(reference.dtype), "identical": equal,
            "all_identical": all(equal.values())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=200, help="number of slices (default %(default)s)")
    parser.add_argument("--shape", default="1303x912", help="Y x X of a slice (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per contender and cache state (default %(default)s)")
    parser.add_argument("--cache", choices=("both", "warm", "cold"), default="both",
                        help="page-cache states to measure (default %(default)s; cold needs root)")
    parser.add_argument("--dir", help="where to write the synthetic stack (default: a new temp folder, deleted after)")
    parser.add_argument("--real", default=REAL_DEFAULT, help="real slices to check for equality (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="pixel-value seed (default %(default)s)")
    _common.add_child_options(parser)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return 0

    from vessel_kit.volume import write_volume

    height, width = _common.parse_shape(args.shape, 2)
    machine = _common.machine_info()
    print(_common.describe_machine(machine))
    sources = _common.source_digests("vessel_kit.volume")
    print("sources (sha256): " + ", ".join(f"{m} {d}" for m, d in sources.items()))

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_io_"))
    folder = base / "stack"
    if folder.exists():
        shutil.rmtree(folder)
    try:
        rng = np.random.default_rng(args.seed)
        volume = rng.integers(18_000, 37_001, size=(args.slices, height, width), dtype=np.uint16)
        start = time.perf_counter()
        files = write_volume(volume, folder)
        write_s = time.perf_counter() - start
        expected = hashlib.blake2b(volume.data, digest_size=16).hexdigest()
        nbytes = volume.nbytes
        del volume
        file_bytes = sum(p.stat().st_size for p in files)
        fs = filesystem_of(folder)
        print(f"data: {args.slices} slices of {height}x{width} uint16 = {nbytes / 1e6:.0f} MB of pixels in "
              f"{file_bytes / 1e6:.0f} MB of files, written in {write_s:.1f} s to {folder} ({fs})")

        states = ["warm", "cold"] if args.cache == "both" else [args.cache]
        cold_problem = None
        if "cold" in states:
            cold_problem = drop_page_cache()
            if cold_problem:
                print(f"cold cache: {cold_problem}; reporting warm cache only")
                states.remove("cold")
                if not states:
                    return 1

        results: dict[str, dict[str, dict]] = {}
        for state in states:
            results[state] = {}
            for name in CONTENDERS:
                if state == "warm":
                    warm_up(files)
                print(f"running {name} ({state} cache) x{args.repeat} ...", flush=True)
                results[state][name] = _common.run_child(__file__, [
                    "--child", CHILD_NAMES[name], "--folder", str(folder), "--cache", state,
                    "--repeat", str(args.repeat)])
        real = check_real(Path(args.real))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)

    identical = True
    for state, by_name in results.items():
        peer = by_name[PEER]
        for result in by_name.values():
            result["mb_per_s"] = nbytes / result["best_s"] / 1e6
            result["ours_speedup"] = result["best_s"] / by_name["ours"]["best_s"]
            result["identical"] = (result["digest"] == expected and result["dtype"] == "uint16"
                                   and result["shape"] == [args.slices, height, width])
            identical &= result["identical"]
        by_name["ours"]["speedup_vs_peer"] = peer["best_s"] / by_name["ours"]["best_s"]
        print(f"\n{state} page cache ({'files read just before' if state == 'warm' else 'dropped before every run'}):")
        _common.print_table(
            ["contender", "MB/s", "best s", "median s", "runs", "ours faster by", "peak MiB", "identical"],
            [[name, r["mb_per_s"], r["best_s"], r["median_s"], len(r["times_s"]), f"{r['ours_speedup']:.2f}x",
              r["peak_above_baseline_mib"], "yes" if r["identical"] else "NO"] for name, r in by_name.items()],
        )
        note = _common.interference_note(by_name)
        if note:
            print("  " + note)
        resident = [f for r in by_name.values() for f in r["resident_before_runs"] if f is not None]
        if resident:
            print(f"  files resident in the page cache before each run: {min(resident):.0%}..{max(resident):.0%}")
    print(f"\npeak MiB = highest RSS during the runs minus RSS after imports (the returned volume alone is "
          f"{nbytes / _common.MiB:.0f} MiB)")
    if real["checked"]:
        print(f"real slices {real['folder']}: {real['slices']} x {real['shape'][1:]} {real['dtype']}, "
              f"all readers identical: {'yes' if real['all_identical'] else 'NO ' + str(real['identical'])}")
    else:
        print(f"real slices {real['folder']}: not checked ({real['reason']})")
    identical &= real.get("all_identical", True)

    _common.write_json(args.json, {
        "benchmark": "io", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"), "machine": machine,
        "sources": sources,
        "data": {"slices": args.slices, "shape": [args.slices, height, width], "dtype": "uint16",
                 "pixel_bytes": nbytes, "file_bytes": file_bytes, "filesystem": fs, "write_s": write_s,
                 "seed": args.seed},
        "cold_cache": "measured" if "cold" in states else (cold_problem or "not requested"),
        "peer": PEER, "results": results, "real": real, "all_identical": identical,
    })
    if not identical:
        print("\nFAIL: the readers did not all return the written volume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
