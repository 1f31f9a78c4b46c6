"""Fault injection: the commands are interrupted at several points, with SIGINT (Ctrl-C, a clean
stop) and SIGKILL (a killed machine: no clean-up at all), then rerun.

Each test runs one command as a subprocess in its own process group (as a terminal would), stops
it when a file or log line shows it reached a point, checks what is left, and reruns it; the last
rerun completes. Required:
- after SIGINT the command exits with status 130 and one line, no traceback;
- no partial file is ever left under a final name: every file under a final name is complete
  (or, for deterministic outputs, identical to the uninterrupted run's); temporary names
  (``atomic.TEMP_NAME``) may be left by SIGKILL;
- the completed rerun gives exactly the uninterrupted run's outputs.
The uninterrupted reference runs in this process through the same entry points.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vessel_kit import bundle, cli
from vessel_kit.atomic import STALE_AFTER_S, TEMP_NAME
from vessel_kit.bundle import read_bundle
from vessel_kit.models import ModelConfig, build_model, save_checkpoint
from vessel_kit.synth import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
VESSEL_KIT = [sys.executable, "-m", "vessel_kit.cli"]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
TINY_ENCODER = "tu-test_efficientnet"  # a 1.5 M-parameter U-Net: small checkpoints, fast steps
WAIT_S = 900  # the longest wait for a point or an exit (a loaded 2-core machine is slow)


# --- running and stopping commands ----------------------------------------------------------------


@pytest.fixture
def launch(tmp_path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start a command in its own process group, output to a log file; killed at teardown."""
    started = []

    def start(args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=tmp_path,
                                       start_new_session=True, preexec_fn=_default_sigint)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, so Python turns it into
    KeyboardInterrupt even when the test run itself ignores it (started in the background by a
    non-interactive shell, which sets SIGINT to 'ignore' for its children)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(process: subprocess.Popen, reached: Callable[[], bool], sig: signal.Signals, point: str,
              log: Path) -> bool:
    """Poll until ``reached()``, send ``sig`` to the process group and check how the command
    stopped: SIGINT gives status 130 and one line, no traceback. False when it ended first."""
    deadline = time.monotonic() + WAIT_S
    while not reached():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"{point} not reached in {WAIT_S} s"
        time.sleep(0.01)
    os.killpg(process.pid, sig)
    status, text = process.wait(timeout=WAIT_S), log.read_text()
    if sig == signal.SIGKILL:
        assert status == -signal.SIGKILL, text
    else:
        assert status == 130 and "Traceback" not in text, text
        assert text.strip().splitlines()[-1].startswith("interrupted"), text
    return True


def interrupted(process: subprocess.Popen, reached: Callable[[], bool], sig: signal.Signals, point: str,
                log: Path) -> None:
    """``interrupt``, for a command that must not end before ``point``."""
    assert interrupt(process, reached, sig, point, log), \
        f"the command ended (status {process.returncode}) before {point}; make the job bigger:\n{log.read_text()}"


def finish(process: subprocess.Popen, log: Path) -> None:
    assert process.wait(timeout=WAIT_S) == 0, log.read_text()


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its sha256; temporary names left out."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(TEMP_NAME.fullmatch(part) for part in path.relative_to(folder).parts):
            found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).digest()
    return found


def assert_subset_of_reference(folder: Path, reference: Path, when: str) -> None:
    """Every file under a final name in ``folder`` is the reference's (never a partial one)."""
    if not folder.exists():
        return
    expected = files_under(reference)
    for name, digest in files_under(folder).items():
        assert expected.get(name) == digest, f"{when}: {folder / name} is partial or wrong"


def file_exists(folder: Path, pattern: str) -> Callable[[], bool]:
    return lambda: folder.is_dir() and any(folder.rglob(pattern))


def log_says(log: Path, text: str) -> Callable[[], bool]:
    return lambda: log.is_file() and text in log.read_text()


def age(paths: list[Path]) -> None:
    """Make temporary files look older than the stale limit (their writers were killed)."""
    old = time.time() - STALE_AFTER_S - 60
    for path in paths:
        os.utime(path, (old, old))


# --- vessel-kit synth -----------------------------------------------------------------------------


@pytest.mark.slow  # ~20s on 2 cores; tests/test_synth.py checks the atomic dataset write by default
def test_synth_interrupted_then_rerun(tmp_path, launch):
    """SIGINT at the first slice, SIGKILL in the test split: the dataset folder only ever holds
    the complete dataset, and the rerun writes exactly the uninterrupted one."""
    args = ["--scale", "0.4", "--seed", "3"]  # ~5 s of synthesis: at 0.15 (0.5 s) a quiet machine finished before SIGINT
    assert cli.main(["synth", str(tmp_path / "reference"), *args]) == 0
    work = tmp_path / "work"
    work.mkdir()
    root, log = work / "data", tmp_path / "synth.log"
    for sig, point, reached in [
        (signal.SIGINT, "the first slice", file_exists(work, "*.tif")),
        (signal.SIGKILL, "the test split", lambda: any("test" in p.parts for p in work.rglob("*.tif"))),
    ]:
        interrupted(launch([*VESSEL_KIT, "synth", str(root), *args], log), reached, sig, point, log)
        assert not root.exists() or not any(root.iterdir()), f"{sig.name} at {point} left a partial dataset in {root}"
    finish(launch([*VESSEL_KIT, "synth", str(root), *args], log), log)
    assert files_under(root) == files_under(tmp_path / "reference")


# --- vessel-kit train -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("faults") / "data", scale=0.25, seed=1, progress=False)


def train_config(path: Path, data_root: Path, out_dir: Path) -> Path:
    options = dict(
        data_root=str(data_root), out_dir=str(out_dir), train_volumes=["kidney_1_dense"], val_volumes=[],
        encoder=TINY_ENCODER, in_chans=3, crop_size=64, crops_per_epoch=8, batch_size=4, epochs=3, lr=2e-3,
        num_workers=0, augment="light", loss="dice", ema_decay=None, progress=False,
    )
    path.write_text(yaml.safe_dump(options))
    return path


def _safetensors(path: Path) -> None:
    load_file(path)


def _zip(path: Path) -> None:
    assert zipfile.ZipFile(path).testzip() is None


def _png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")


def _jsonl(path: Path) -> None:
    text = path.read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())


def _yaml(path: Path) -> None:
    assert isinstance(yaml.safe_load(path.read_text()), dict)


COMPLETE = {".safetensors": _safetensors, ".pt": _zip, ".png": _png, ".jsonl": _jsonl, ".yaml": _yaml}


def assert_run_folder_complete(run: Path, when: str) -> None:
    """Every file of a training run under a final name reads whole."""
    for name in files_under(run):
        check = COMPLETE.get(Path(name).suffix)
        assert check is not None, f"no completeness check for {run / name}: add one to COMPLETE"
        try:
            check(run / name)
        except Exception as error:
            raise AssertionError(f"{when}: {run / name} is partial ({error!r})") from None


def epochs_and_losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(record["epoch"], record["train_loss"]) for record in records]


def run_training(launch, command: list[str], log: Path, stop: tuple | None = None) -> None:
    """Run ``vessel-kit train`` to the end, or until ``stop`` = (trigger factory, signal, point).
    A run folder it may not resume (checkpoints but no saved state: stopped before the first
    state was saved) must be refused in one line naming ``--overwrite``; it is then rerun so."""
    process = launch(command, log)
    if stop is None and process.wait(timeout=WAIT_S) == 0:
        return
    if stop is not None and interrupt(process, stop[0](), *stop[1:], log):
        return
    text = log.read_text()
    assert process.returncode == 2 and text.startswith("error: ") and text.count("\n") == 1, text
    assert "--overwrite" in text, text
    process = launch([*command, "--overwrite"], log)
    if stop is None:
        finish(process, log)
    else:
        interrupted(process, stop[0](), *stop[1:], log)


@pytest.mark.slow  # 35-90 s: three or four runs of the command
def test_train_interrupted_then_resumed(tmp_path, dataset, launch):
    """SIGINT once the first epoch's state is being saved, SIGKILL while a later one is: every
    file in the run folder stays whole, and the resumed run ends with the uninterrupted run's
    weights and one metrics line per epoch."""
    assert cli.main(["train", "--config", str(train_config(tmp_path / "ref.yaml", dataset, tmp_path / "ref"))]) == 0
    run, log = tmp_path / "run", tmp_path / "train.log"
    command = [*VESSEL_KIT, "train", "--config", str(train_config(tmp_path / "run.yaml", dataset, run))]
    state = run / "state.pt"

    def next_state_save() -> Callable[[], bool]:
        before = state.stat().st_mtime_ns if state.exists() else None
        return lambda: (any(run.glob(".state.pt.*.tmp"))
                        or (state.exists() and state.stat().st_mtime_ns != before))

    for sig, point in [(signal.SIGINT, "the first state save"), (signal.SIGKILL, "the next state save")]:
        run_training(launch, command, log, (next_state_save, sig, point))
        assert_run_folder_complete(run, f"{sig.name} at {point}")
    run_training(launch, command, log)

    assert epochs_and_losses(run) == epochs_and_losses(tmp_path / "ref")
    for name in ("last.safetensors", "best.safetensors"):
        expected, got = load_file(tmp_path / "ref" / name), load_file(run / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[key], got[key]) for key in expected), name
    assert_run_folder_complete(run, "after the rerun")


# --- vessel-kit infer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors"
    config = ModelConfig(arch="unet", encoder=TINY_ENCODER, in_chans=3, voxel_size_um=50.0, tile_size=64)
    save_checkpoint(path, build_model("unet", TINY_ENCODER, in_chans=3), config)
    return path


@pytest.mark.slow  # 35-90 s: three or four runs of the command
def test_infer_interrupted_then_rerun(tmp_path, dataset, checkpoint, launch):
    """SIGINT while the first volume is predicted, SIGKILL while the second is: no submission and
    no partial logits under final names, and the rerun writes exactly the uninterrupted files."""
    def infer(out: Path, logits: Path) -> list[str]:
        return ["infer", str(dataset), str(checkpoint), "--out", str(out), "--logits-dir", str(logits),
                "--axes", "xy", "--tta", "none", "--batch-size", "4"]

    reference = tmp_path / "reference"
    reference.mkdir()
    assert cli.main(infer(reference / "submission.csv", reference / "logits")) == 0
    work, log = tmp_path / "work", tmp_path / "infer.log"
    work.mkdir()
    command = [*VESSEL_KIT, *infer(work / "submission.csv", work / "logits")]
    for sig, point, reached in [
        (signal.SIGINT, "the first volume", file_exists(work / "logits", "*")),
        (signal.SIGKILL, "the second volume", log_says(log, "kidney_6:")),
    ]:
        interrupted(launch(command, log), reached, sig, point, log)
        assert not (work / "submission.csv").exists(), f"{sig.name} at {point} left a submission"
        assert_subset_of_reference(work, reference, f"{sig.name} at {point}")
    finish(launch(command, log), log)
    assert files_under(work) == files_under(reference)


# --- build_dataset.sh -----------------------------------------------------------------------------


@pytest.fixture
def wheelhouse(tmp_path) -> Path:
    """Stand-ins named like the pinned wheels (the build copies and hashes them, never installs)."""
    house = tmp_path / "wheels"
    house.mkdir()
    for line in (REPO / "wheels" / "requirements-kaggle.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            (house / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(os.urandom(64))
    return house


def comparable(manifest: dict) -> dict:
    """A manifest less what differs between two builds of the same inputs: the time, and the
    vessel_kit wheel's hash (its archive holds build times)."""
    files = {name: record for name, record in manifest["files"].items() if not name.startswith("vessel_kit-")}
    return {**manifest, "created": None, "files": files}


@pytest.mark.slow  # 35-90 s: three or four runs of the command
def test_build_dataset_interrupted_then_rerun(tmp_path, checkpoint, wheelhouse, launch):
    """A rebuild stopped with SIGINT while staging, then with SIGKILL while copying: the previous
    bundle stays whole in place; the killed build's staging folder is cleaned by a later build,
    which then equals the first."""
    dist = tmp_path / "dist"
    options = ["--no-download", "--wheels", str(wheelhouse), "--checkpoints", str(checkpoint),
               "--out", str(dist / "bundle")]
    assert bundle.main(options) == 0
    first = read_bundle(dist / "bundle").manifest
    log = tmp_path / "build.log"
    command = [str(REPO / "build_dataset.sh"), *options]
    for sig, point, reached in [
        (signal.SIGINT, "the staging folder", lambda: any(p.name != "bundle" for p in dist.iterdir())),
        (signal.SIGKILL, "the copies into staging",
         lambda: any(p.parent != dist / "bundle" for p in dist.rglob(checkpoint.name))),
    ]:
        interrupted(launch(command, log), reached, sig, point, log)
        assert read_bundle(dist / "bundle").manifest == first, f"{sig.name} at {point} changed the bundle"
        left = [p for p in dist.iterdir() if p.name != "bundle"]
        assert all(TEMP_NAME.fullmatch(p.name) for p in left), left
        assert bool(left) == (sig == signal.SIGKILL), f"{sig.name} at {point} left {left}"
    age(left)
    finish(launch(command, log), log)
    assert [p.name for p in dist.iterdir()] == ["bundle"]
    assert comparable(read_bundle(dist / "bundle").manifest) == comparable(first)
