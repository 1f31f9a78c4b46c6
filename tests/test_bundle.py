"""build_dataset.sh / vessel_kit.bundle: what goes into the Kaggle dataset, and every failure that
must stop the build (or the upload) before anything is written or sent."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from vessel_kit import atomic, bundle as bundle_module
from vessel_kit.bundle import MANIFEST_NAME, collect_checkpoints, main, read_bundle
from vessel_kit.models import ModelConfig, build_model, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
PINNED = REPO / "wheels" / "requirements-kaggle.txt"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("runs") / "fold0"
    run.mkdir()
    config = ModelConfig(arch="unet", encoder="resnet18", in_chans=3, voxel_size_um=50.0, tile_size=64)
    save_checkpoint(run / "best.safetensors", build_model("unet", "resnet18", in_chans=3), config,
                    metrics={"val_surface_dice": 0.5, "epoch": 3}, extra={"train_volumes": ["kidney_1_dense"]})
    return run / "best.safetensors"


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """Stand-ins named like the pinned wheels (the build copies and hashes them, never installs)."""
    house = tmp_path_factory.mktemp("wheels")
    for line in PINNED.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            (house / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(os.urandom(64))
    return house


def build(tmp_path, wheelhouse, *args) -> int:
    return main(["--no-download", "--wheels", str(wheelhouse), "--out", str(tmp_path / "bundle"), *args])


def test_build_writes_a_verified_manifest(tmp_path, wheelhouse, checkpoint, capsys):
    infer = tmp_path / "infer.yaml"
    infer.write_text("axes: [xy, xz]\ntta: d4\nthreshold: 0.4\n")
    assert build(tmp_path, wheelhouse, "--checkpoints", str(checkpoint.parent), "--kaggle-id", "me/vessels-v1",
                 "--infer-config", str(infer)) == 0
    bundle = read_bundle(tmp_path / "bundle")
    assert [p.name for p in bundle.checkpoints] == ["fold0.safetensors"]
    assert bundle.infer_options == {"axes": ["xy", "xz"], "tta": "d4", "threshold": 0.4}
    item = bundle.manifest["checkpoints"][0]
    assert (item["arch"], item["encoder"], item["voxel_size_um"], item["tile_size"]) == ("unet", "resnet18", 50.0, 64)
    assert item["trained_on"] == {"train_volumes": ["kidney_1_dense"]}
    requirements = (bundle.root / "requirements.txt").read_text().split()
    assert requirements[0].startswith("vessel_kit==") and requirements[1:] == [
        line for line in PINNED.read_text().splitlines() if line and not line.startswith("#")]
    assert set(bundle.manifest["files"]) == {p.name for p in bundle.root.iterdir()} - {MANIFEST_NAME}
    assert json.loads((bundle.root / "dataset-metadata.json").read_text())["id"] == "me/vessels-v1"
    assert "validation surface Dice 0.5000" in capsys.readouterr().out
    # Rebuilding replaces the old bundle; a corrupted file is caught by read_bundle.
    assert build(tmp_path, wheelhouse, "--checkpoints", str(checkpoint)) == 0
    assert [p.name for p in read_bundle(tmp_path / "bundle").checkpoints] == ["best.safetensors"]
    with open(tmp_path / "bundle" / "best.safetensors", "r+b") as file:
        file.seek(-1, os.SEEK_END)
        file.write(b"\x00")
    with pytest.raises(ValueError, match="does not match its sha256"):
        read_bundle(tmp_path / "bundle")


@pytest.mark.parametrize("case, message", [
    ("missing checkpoint", "does not exist"),
    ("broken checkpoint", "cannot be rebuilt"),
    ("missing wheel", "no wheel for timm=="),
    ("unknown option", "unknown inference options"),
    ("bad id", "--kaggle-id must be USER/SLUG"),
    ("upload without id", "--upload needs --kaggle-id"),
    ("not a bundle folder", "is not a vessel_kit bundle"),
])
def test_failures_stop_before_anything_is_written(tmp_path, wheelhouse, checkpoint, capsys, case, message):
    args = ["--checkpoints", str(checkpoint)]
    house = wheelhouse
    if case == "missing checkpoint":
        args = ["--checkpoints", str(tmp_path / "nope.safetensors")]
    elif case == "broken checkpoint":
        broken = tmp_path / "broken.safetensors"
        broken.write_bytes(checkpoint.read_bytes()[:-100])
        args = ["--checkpoints", str(broken)]
    elif case == "missing wheel":
        house = tmp_path / "partial"
        shutil.copytree(wheelhouse, house)
        next(house.glob("timm-*.whl")).unlink()
    elif case == "unknown option":
        (tmp_path / "infer.yaml").write_text("tiles: 3\n")
        args += ["--infer-config", str(tmp_path / "infer.yaml")]
    elif case == "bad id":
        args += ["--kaggle-id", "no-slash"]
    elif case == "upload without id":
        args += ["--upload"]
    elif case == "not a bundle folder":
        (tmp_path / "bundle").mkdir()
        (tmp_path / "bundle" / "notes.txt").write_text("mine")
    assert build(tmp_path, house, *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bundle" / MANIFEST_NAME).exists()


@pytest.mark.parametrize("option, text", [
    ("tta", "tta: rot90\n"),
    ("threshold", "threshold: 2\n"),
    ("overlap", "overlap: 1.5\n"),
    ("axes", "axes: [xy, zz]\n"),
    ("top_fraction", "top_fraction: 0.1\nhysteresis: [0.6, 0.4]\n"),
    ("device", "device: cpu\n"),  # predict_submission's own option
])
def test_bad_option_values_stop_the_build_before_anything_is_written(tmp_path, wheelhouse, checkpoint, capsys,
                                                                      option, text):
    """The values are checked by infer_volume's validator: on Kaggle (on_error="empty") a bad one
    would turn every mask empty."""
    (tmp_path / "infer.yaml").write_text(text)
    out = tmp_path / "dist" / "bundle"
    assert main(["--no-download", "--wheels", str(wheelhouse), "--out", str(out), "--checkpoints", str(checkpoint),
                 "--infer-config", str(tmp_path / "infer.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and option in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["infer.yaml"]


@pytest.fixture
def quick_wheel(monkeypatch):
    """A stand-in for the vessel_kit wheel (pip wheel takes ~10 s): for tests of the folder swap."""

    def build_own_wheel(source_dir, dest: Path) -> Path:
        wheel = dest / "vessel_kit-0.0.0-py3-none-any.whl"
        wheel.write_bytes(b"stand-in")
        return wheel

    monkeypatch.setattr(bundle_module, "_build_own_wheel", build_own_wheel)


def test_a_yaml_syntax_error_is_one_line_with_its_place(tmp_path, wheelhouse, checkpoint, capsys):
    infer = tmp_path / "infer.yaml"
    infer.write_text("threshold: 0.4\n  tta: d4\n")
    assert build(tmp_path, wheelhouse, "--checkpoints", str(checkpoint), "--infer-config", str(infer)) == 2
    assert capsys.readouterr().err == f"error: {infer}:2:6: mapping values are not allowed here\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["infer.yaml"]


def make_bundle(tmp_path, wheelhouse, checkpoint) -> dict:
    assert build(tmp_path, wheelhouse, "--checkpoints", str(checkpoint.parent)) == 0
    return read_bundle(tmp_path / "bundle").manifest


def test_a_failed_swap_keeps_the_previous_bundle(tmp_path, wheelhouse, checkpoint, capsys, monkeypatch, quick_wheel):
    before = make_bundle(tmp_path, wheelhouse, checkpoint)

    def failing_exchange(a, b):
        raise OSError(errno.EIO, "injected failure", str(b))

    monkeypatch.setattr(atomic, "_exchange", failing_exchange)
    assert build(tmp_path, wheelhouse, "--checkpoints", str(checkpoint)) == 2
    assert "could not move the new bundle" in capsys.readouterr().err
    assert read_bundle(tmp_path / "bundle").manifest == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # the staging folder is gone


def test_without_the_swap_a_failed_rename_restores_the_previous_bundle(tmp_path, wheelhouse, checkpoint, capsys,
                                                                        monkeypatch, quick_wheel):
    before = make_bundle(tmp_path, wheelhouse, checkpoint)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    real_rename, calls = os.rename, []

    def failing_second_rename(source, destination):
        calls.append(source)
        if len(calls) == 2:  # the new bundle moving in, after the old one moved aside
            raise OSError(errno.EIO, "injected failure", str(destination))
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", failing_second_rename)
    assert build(tmp_path, wheelhouse, "--checkpoints", str(checkpoint)) == 2
    assert "is left as it was" in capsys.readouterr().err
    assert read_bundle(tmp_path / "bundle").manifest == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_an_interrupted_build_leaves_the_previous_bundle(tmp_path, wheelhouse, checkpoint, capsys, monkeypatch,
                                                         quick_wheel):
    before = make_bundle(tmp_path, wheelhouse, checkpoint)
    real_copy = shutil.copyfile

    def interrupted_copy(source, destination):
        if Path(source) == checkpoint:  # the checkpoint copy, half way through the staging folder
            raise KeyboardInterrupt
        return real_copy(source, destination)

    monkeypatch.setattr(bundle_module.shutil, "copyfile", interrupted_copy)
    assert build(tmp_path, wheelhouse, "--checkpoints", str(checkpoint)) == 130
    assert capsys.readouterr().err.splitlines()[-1].startswith("interrupted")
    assert read_bundle(tmp_path / "bundle").manifest == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_collect_checkpoints_names(tmp_path, checkpoint):
    runs = tmp_path / "runs"
    for fold in ("a", "b"):
        (runs / fold).mkdir(parents=True)
        shutil.copyfile(checkpoint, runs / fold / "best.safetensors")
        shutil.copyfile(checkpoint, runs / fold / "last.safetensors")
    assert sorted(collect_checkpoints([runs])) == ["a.safetensors", "b.safetensors"]  # best only
    assert list(collect_checkpoints([runs / "a"])) == ["a.safetensors"]
    with pytest.raises(ValueError, match="would both be named"):
        collect_checkpoints([runs / "a" / "best.safetensors", runs / "b" / "best.safetensors"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints in"):
        collect_checkpoints([tmp_path / "empty"])


def test_upload_calls_the_kaggle_cli(tmp_path, wheelhouse, checkpoint, monkeypatch, capsys):
    """A fake ``kaggle`` on PATH records its calls: a new dataset is created, an existing one versioned."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    (bin_dir / "kaggle").write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        f'if [ "$2" = status ]; then [ -f {tmp_path}/exists ]; exit $?; fi\necho uploaded\n'
    )
    (bin_dir / "kaggle").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    common = ["--checkpoints", str(checkpoint), "--kaggle-id", "me/vessels-v1", "--upload"]
    assert build(tmp_path, wheelhouse, *common) == 0
    (tmp_path / "exists").touch()
    assert build(tmp_path, wheelhouse, *common, "--message", "second") == 0
    lines = calls.read_text().splitlines()
    bundle = tmp_path / "bundle"
    assert lines == [
        "datasets status me/vessels-v1", f"datasets create -p {bundle}",
        "datasets status me/vessels-v1", f"datasets version -m second -p {bundle}",
    ]


@pytest.mark.slow  # ~32s on 2 cores; the in-process builder is tested by default
def test_build_dataset_sh_runs_the_builder(tmp_path, wheelhouse, checkpoint):
    result = subprocess.run(
        [str(REPO / "build_dataset.sh"), "--no-download", "--wheels", str(wheelhouse), "--checkpoints", str(checkpoint),
         "--out", str(tmp_path / "bundle")], capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert read_bundle(tmp_path / "bundle").checkpoints[0].name == "best.safetensors"
    result = subprocess.run([str(REPO / "build_dataset.sh"), "--checkpoints", str(tmp_path / "none")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: checkpoint") and "Traceback" not in result.stderr
    (tmp_path / "infer.yaml").write_text("tta: rot90\n")
    result = subprocess.run(
        [str(REPO / "build_dataset.sh"), "--no-download", "--wheels", str(wheelhouse), "--checkpoints", str(checkpoint),
         "--out", str(tmp_path / "second"), "--infer-config", str(tmp_path / "infer.yaml")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: inference option tta='rot90'")
    assert not (tmp_path / "second").exists()


def test_a_wheel_that_cannot_be_fetched_stops_the_build(tmp_path, checkpoint, capsys):
    pinned = tmp_path / "requirements-kaggle.txt"
    pinned.write_text("timm==0.0.0\n")  # no such release: pip download fails
    status = main(["--checkpoints", str(checkpoint), "--out", str(tmp_path / "bundle"), "--wheels", str(tmp_path / "w"),
                   "--requirements", str(pinned)])
    assert status == 2
    assert "pip download of" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()
    pinned.write_text("timm>=1.0\n")
    assert main(["--checkpoints", str(checkpoint), "--requirements", str(pinned), "--no-download",
                 "--out", str(tmp_path / "bundle")]) == 2
    assert "is not pinned as name==version" in capsys.readouterr().err
