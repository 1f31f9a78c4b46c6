"""Shared helpers for the benchmark scripts: child processes, peak memory, timing, tables, JSON.

Every contender runs in a fresh child process (``python <script> --child NAME ...``), so one
contender's allocations, caches and imports never colour another's memory figure. In the child:

    import everything -> load / build the inputs -> reset the peak -> baseline = current RSS
    -> run the contender --repeat times -> peak = highest RSS since the reset - baseline

The reset writes "5" to ``/proc/self/clear_refs`` (Linux >= 4.0), which sets the kernel's
resident-set high-water mark (VmHWM, also what ``getrusage(RUSAGE_SELF).ru_maxrss`` reports) to
the current RSS; the peak is then read from VmHWM. Where the reset is unavailable the peak falls
back to ``ru_maxrss`` minus the baseline, which can only overstate it, and the result says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

MiB = 1024 * 1024


# --- memory ---------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil  # not Linux: fall back to psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Set this process's RSS high-water mark to its current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Highest RSS of this process since start or since the last ``reset_peak_rss``."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class PeakMemory:
    """Context manager: peak RSS above the RSS at entry, in bytes (``.peak_above_baseline``)."""

    def __enter__(self) -> PeakMemory:
        import gc

        gc.collect()
        self.reset_ok = reset_peak_rss()
        self.baseline = current_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        self.peak = peak_rss_bytes()
        self.peak_above_baseline = max(0, self.peak - self.baseline)

    def as_dict(self) -> dict:
        return {
            "baseline_rss_mib": self.baseline / MiB,
            "peak_rss_mib": self.peak / MiB,
            "peak_above_baseline_mib": self.peak_above_baseline / MiB,
            "peak_reset": self.reset_ok,
        }


# --- timing ---------------------------------------------------------------------------------


def time_repeated(fn: Callable[[], object], repeat: int, before_each: Callable[[], None] | None = None):
    """Run ``fn`` ``repeat`` times; return (list of wall seconds, last result).

    ``before_each`` (e.g. dropping the page cache) runs outside the timed region.
    """
    times, result = [], None
    for _ in range(max(1, repeat)):
        if before_each is not None:
            before_each()
        result = None  # free the previous result before the next run
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def summarize(times: Sequence[float]) -> dict:
    return {"times_s": list(times), "best_s": min(times), "median_s": statistics.median(times)}


# --- child processes ------------------------------------------------------------------------


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine spent busy so far (from /proc/stat)."""
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:9]]
        return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def add_child_options(parser: argparse.ArgumentParser) -> None:
    """``--json`` and the hidden ``--child``/``--child-out`` that ``run_child`` passes to a child."""
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)


def run_child(script: str | Path, args: Sequence[str], timeout: float | None = None) -> dict:
    """Run ``python script --child-out FILE *args`` in a fresh interpreter; return its JSON.

    Adds ``other_cpu_s``: CPU seconds that processes other than the child (and this parent)
    spent while the child ran -- a sign that something else competed for the CPUs.
    """
    with tempfile.TemporaryDirectory(prefix="bench_child_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), *args, "--child-out", str(out)]
        busy0, own0 = _busy_cpu_seconds(), _own_cpu_seconds()
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
        wall = time.perf_counter() - start
        busy1, own1 = _busy_cpu_seconds(), _own_cpu_seconds()
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"child {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        result = json.loads(out.read_text())
    result["child_wall_s"] = wall
    if busy0 is not None and busy1 is not None:
        result["other_cpu_s"] = max(0.0, (busy1 - busy0) - (own1 - own0))
    return result


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (user + system)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def interference_note(results: dict) -> str | None:
    """A warning when other processes used more than 10 % of one CPU during some child's run."""
    noisy = [f"{name} ({r['other_cpu_s']:.1f} CPU s in {r['child_wall_s']:.1f} s)" for name, r in results.items()
             if r.get("other_cpu_s") is not None and r["other_cpu_s"] > 0.1 * r["child_wall_s"] + 0.05]
    if noisy:
        return "warning: other processes used the CPUs during " + ", ".join(noisy) + "; timings may be noisy"
    return None


def write_child_result(path: str | Path, result: dict) -> None:
    Path(path).write_text(json.dumps(result))


# --- machine, tables, JSON ------------------------------------------------------------------


def machine_info() -> dict:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total_ram = 0
    import numpy

    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(total_ram / 2**30, 1),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cpu_idle_pct_before": cpu_idle_percent(1.0),
    }


def cpu_idle_percent(seconds: float = 1.0) -> float | None:
    """Share of all CPUs' time that was idle over the next ``seconds`` (from /proc/stat)."""

    def sample():
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return values[3] + values[4], sum(values[:8])  # idle + iowait, total (without guest)

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 100.0 * (idle1 - idle0) / max(total1 - total0, 1)


def describe_machine(machine: dict) -> str:
    """One line for the console; warns when other work kept the CPUs busy just before the start."""
    line = (f"machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, {machine['ram_gib']} GiB RAM, "
            f"Python {machine['python']}, numpy {machine['numpy']}")
    idle = machine.get("cpu_idle_pct_before")
    if idle is not None:
        line += f"; CPUs {idle:.0f} % idle before the start"
        if idle < 90:
            line += " (other processes are busy: timings may be noisy)"
    return line


def source_digests(*modules: str) -> dict:
    """sha256 (first 12 hex digits) of the named modules' source files, e.g. "vessel_kit.metric".

    The package changes under the benchmarks; the digests tell which version a result measured.
    """
    import hashlib
    import importlib.util

    digests = {}
    for module in modules:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin or not Path(spec.origin).is_file():
            digests[module] = None
            continue
        digests[module] = hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()[:12]
    return digests


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
        return f"{value:.3e}"
    return str(value)


def write_json(path: str | Path | None, data: dict, *, quiet: bool = False) -> None:
    """Write ``data`` as JSON to ``path`` (if given) atomically: a killed run leaves the previous
    file or none, never half of one."""
    from vessel_kit.atomic import atomic_output

    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        if not quiet:
            print(f"\nresults written to {path}")


def parse_shape(text: str, ndim: int) -> tuple[int, ...]:
    parts = tuple(int(p) for p in text.lower().replace("x", ",").replace("×", ",").split(",") if p.strip())
    if len(parts) != ndim or min(parts) < 1:
        raise ValueError(f"expected {ndim} positive sizes like {'x'.join(['64'] * ndim)}, got {text!r}")
    return parts


def json_mapping(text: str, option: str) -> dict:
    """``text`` parsed as a JSON mapping of training options, for an argparse ``type``: a clear
    ArgumentTypeError naming ``option`` if it is not JSON or not a mapping."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{option}: not JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{option} must be a JSON mapping of training options, got {text!r}")
    return value


def refuse_missing_checkpoints(parser: argparse.ArgumentParser, checkpoints: Sequence[Path]) -> None:
    """``parser.error`` naming every path of ``checkpoints`` that is not a file."""
    missing = [str(path) for path in checkpoints if not path.is_file()]
    if missing:
        parser.error(f"no checkpoint file at {missing}")


def refuse_unknown(parser: argparse.ArgumentParser, kind: str, given: Sequence[str], known: Sequence[str]) -> None:
    """``parser.error`` naming the ``given`` names of ``kind`` (e.g. "variants") not in ``known``, and the known ones."""
    unknown = [name for name in given if name not in known]
    if unknown:
        parser.error(f"unknown {kind} {unknown}; {kind}: {list(known)}")
