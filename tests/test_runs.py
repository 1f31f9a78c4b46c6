"""claim_run_dir: a training run never silently replaces another run's checkpoints or metrics."""

from __future__ import annotations

import pytest
import yaml

from vessel_kit.runs import RUN_FILES, claim_run_dir

CONFIG = {"data_root": "/data", "out_dir": "runs/a", "encoder": "resnet18", "epochs": 3, "lr": 1e-3,
          "axes": {"xy": 1.0}, "loss": ["dice", "focal"], "zoom_range": [0.7, 1.15], "resume": True,
          "num_workers": 2, "device": None}


def make_run(folder, config=CONFIG, files=("state.pt", "best.safetensors", "last.safetensors", "metrics.jsonl")):
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for name in files:
        (folder / name).write_bytes(b"x")
    return folder


def listing(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_absent_empty_or_unstarted_folders_are_fresh(tmp_path):
    assert claim_run_dir(tmp_path / "absent", CONFIG) == "fresh"
    assert not (tmp_path / "absent").exists()  # nothing written by the check
    assert claim_run_dir(tmp_path, CONFIG) == "fresh"
    # a run that failed before its first epoch left only config.yaml: not a run
    unstarted = make_run(tmp_path / "unstarted", {**CONFIG, "encoder": "resnet50"}, files=())
    assert claim_run_dir(unstarted, CONFIG) == "fresh"


def test_the_same_run_resumes_whatever_its_runtime_options(tmp_path):
    run = make_run(tmp_path / "run")
    before = listing(run)
    runtime = {**CONFIG, "out_dir": "elsewhere/a", "num_workers": 0, "device": "cpu", "progress": False,
               "cache_dir": "/cache", "axes": {"xy": 1}, "zoom_range": (0.7, 1.15)}  # as TrainConfig holds them
    assert claim_run_dir(run, runtime) == "resume"
    assert listing(run) == before


def test_a_different_config_is_refused_naming_the_keys(tmp_path):
    run = make_run(tmp_path / "run")
    before = listing(run)
    with pytest.raises(ValueError, match=r"another config \(encoder: 'resnet18' -> 'resnet50'; "
                                         r"epochs: 3 -> 5\).*--overwrite.*another out_dir"):
        claim_run_dir(run, {**CONFIG, "encoder": "resnet50", "epochs": 5})
    assert listing(run) == before
    many = {**CONFIG, "encoder": "x", "epochs": 9, "lr": 1.0, "data_root": "/other", "seed": 4}
    with pytest.raises(ValueError, match=r"lr: 0.001 -> 1.0; and 1 more\)"):
        claim_run_dir(run, many)
    with pytest.raises(ValueError, match=r"\(seed: \(absent\) -> 4\)"):  # an option the old run did not have
        claim_run_dir(run, {**CONFIG, "seed": 4})


def test_run_files_without_config_or_state_are_refused(tmp_path):
    orphan = make_run(tmp_path / "orphan", config=None, files=("best.safetensors", "metrics.jsonl"))
    with pytest.raises(ValueError, match=r"run files \(best.safetensors, metrics.jsonl\) but no config.yaml"):
        claim_run_dir(orphan, CONFIG)
    stateless = make_run(tmp_path / "stateless", files=("best.safetensors", "metrics.jsonl"))
    with pytest.raises(ValueError, match="no state.pt to resume from"):
        claim_run_dir(stateless, CONFIG)
    with pytest.raises(ValueError, match="resume: false"):
        claim_run_dir(make_run(tmp_path / "run"), {**CONFIG, "resume": False})
    broken = make_run(tmp_path / "broken")
    (broken / "config.yaml").write_text("a: [1, 2")
    with pytest.raises(ValueError, match=r"config.yaml:1:.*; remove it or train with --overwrite"):
        claim_run_dir(broken, CONFIG)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        claim_run_dir(tmp_path / "file", CONFIG, overwrite=True)


def test_overwrite_removes_only_the_run_files(tmp_path):
    run = make_run(tmp_path / "run", files=RUN_FILES[1:])
    (run / "notes.txt").write_text("mine")
    (run / "encoder.safetensors").write_bytes(b"weights")
    assert claim_run_dir(run, {**CONFIG, "encoder": "resnet50"}, overwrite=True) == "fresh"
    assert sorted(p.name for p in run.iterdir()) == ["encoder.safetensors", "notes.txt"]
