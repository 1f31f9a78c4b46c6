"""The vessel-kit command line: synth, validate, score, demo; errors as one line, exit status 2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from vessel_kit.cli import main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "data"
    assert main(["synth", str(root), "--scale", "0.4", "--seed", "3"]) == 0
    return root


def test_synth_score_and_validate(dataset, capsys):
    solution = pd.read_csv(dataset / "solution.csv", dtype=str, keep_default_na=False)
    perfect = dataset.parent / "perfect.csv"
    solution[["id", "rle"]].to_csv(perfect, index=False)
    assert main(["validate", str(perfect), str(dataset / "sample_submission.csv")]) == 0
    assert main(["score", str(dataset / "solution.csv"), str(perfect), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out.split("valid\n", 1)[1])
    assert scores == {"kidney_5": 1.0, "kidney_6": 1.0, "mean": 1.0}
    assert main(["score", str(dataset / "solution.csv"), str(dataset / "sample_submission.csv")]) == 0
    assert re.search(r"mean\s+0\.0000", capsys.readouterr().out)  # the all-empty sample scores 0


def test_errors_are_one_line(dataset, capsys):
    assert main(["synth", str(dataset)]) == 2  # refuses to write into a non-empty folder
    assert main(["score", str(dataset / "solution.csv"), str(dataset / "missing.csv")]) == 2
    bad = dataset.parent / "bad.csv"
    bad.write_text("id,rle\nkidney_5_0000,1 2 3\n")
    assert main(["validate", str(bad), str(dataset / "sample_submission.csv")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert "missing.csv does not exist" in errors[1]
    assert "kidney_5_0000: RLE has an odd number of values" in errors[2]


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--scale", "0.3", "--quick"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"kidney_5\s+0\.\d{4}", out) and re.search(r"kidney_6\s+0\.\d{4}", out)
    assert re.search(r"kidney_6: best threshold 0\.\d\d would give 0\.\d{4} \(predicted, 63\.08 µm\)", out)
    assert "qc.png" in out
    demo = tmp_path / "demo"
    assert (demo / "submission.csv").is_file() and (demo / "run" / "best.safetensors").is_file()
    assert (demo / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (demo / "logits").iterdir()) == ["kidney_5.npy", "kidney_6.npy"]


def test_console_script_is_installed():
    executable = shutil.which("vessel-kit", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert executable, "the vessel-kit console script is not installed next to this Python"
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, check=True)
    assert "synth" in result.stdout and "score" in result.stdout


def test_infer_writes_a_valid_submission(dataset, tmp_path, capsys):
    import torch

    from vessel_kit.models import ModelConfig, build_model, save_checkpoint
    from vessel_kit.normalize import Normalization

    torch.manual_seed(0)
    config = ModelConfig(arch="unet", encoder="resnet18", in_chans=3, normalization=Normalization("percentile"),
                         voxel_size_um=50.0, tile_size=64)
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", build_model("unet", "resnet18", in_chans=3), config)
    submission = tmp_path / "submission.csv"
    assert main(["infer", str(dataset), str(checkpoint), "--out", str(submission), "--axes", "xy,yz", "--tta", "none"]) == 0
    assert main(["validate", str(submission), str(dataset / "sample_submission.csv")]) == 0
    assert "kidney_6 done" in capsys.readouterr().err
    assert main(["infer", str(dataset), str(tmp_path / "nope.safetensors")]) == 2
    assert "checkpoints not found" in capsys.readouterr().err
    # A spent budget: no volume is started, every mask is empty, the file is still valid.
    budget = tmp_path / "budget.csv"
    assert main(["infer", str(dataset), str(checkpoint), "--out", str(budget), "--axes", "xy", "--tta", "none", "--time-budget", "0"]) == 0
    captured = capsys.readouterr()
    assert "kidney_5 empty (time budget), kidney_6 empty (time budget)" in captured.out
    assert "kidney_5: would not finish" in captured.err and "kidney_6: would not finish" in captured.err
    rows = pd.read_csv(budget, dtype=str, keep_default_na=False)
    assert set(rows["rle"]) == {"1 0"}
    assert main(["validate", str(budget), str(dataset / "sample_submission.csv")]) == 0
