"""The vessel-kit command line: synth, validate, score, demo; errors as one line, exit status 2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

from types import SimpleNamespace

import pandas as pd
import pytest

import vessel_kit.cli as cli
from vessel_kit.cli import main
from vessel_kit.layout import VolumeInfo


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
    assert re.search(r"calibrated threshold 0\.\d+, components under \d+ voxels", out)
    assert re.search(r"kidney_6: best threshold 0\.\d\d, no components removed, would give 0\.\d{4} \(predicted, 63\.08 µm\)", out)
    assert "qc.png" in out
    demo = tmp_path / "demo"
    assert (demo / "submission.csv").is_file() and (demo / "run" / "best.safetensors").is_file()
    assert (demo / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (demo / "logits").iterdir()) == ["kidney_5.json", "kidney_5.npy", "kidney_6.json", "kidney_6.npy"]


def test_console_script_is_installed():
    executable = shutil.which("vessel-kit", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert executable, "the vessel-kit console script is not installed next to this Python"
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, check=True)
    assert "synth" in result.stdout and "score" in result.stdout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, random_unet):
    return random_unet(tmp_path_factory.mktemp("ckpt") / "m.safetensors")


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The names of the volumes whose images are read (none, when a command stops early)."""
    names = []
    monkeypatch.setattr(VolumeInfo, "read_images", lambda self, **kwargs: names.append(self.name))
    return names


def test_infer_writes_a_valid_submission(dataset, checkpoint, tmp_path, capsys):
    submission = tmp_path / "submission.csv"
    assert main(["infer", str(dataset), str(checkpoint), "--out", str(submission), "--axes", "xy,yz", "--tta", "none"]) == 0
    assert main(["validate", str(submission), str(dataset / "sample_submission.csv")]) == 0
    assert "kidney_6 done" in capsys.readouterr().err
    assert main(["infer", str(dataset), str(tmp_path / "nope.safetensors")]) == 2
    assert "checkpoints not found" in capsys.readouterr().err
    # A spent budget: no volume is started, every mask is empty, the file is still valid.
    budget = tmp_path / "budget.csv"
    assert main(["infer", str(dataset), str(checkpoint), "--out", str(budget), "--axes", "xy", "--tta", "none", "--time-budget", "1e-9"]) == 0
    captured = capsys.readouterr()
    assert "kidney_5 empty (time budget), kidney_6 empty (time budget)" in captured.out
    assert "kidney_5: would not finish" in captured.err and "kidney_6: would not finish" in captured.err
    rows = pd.read_csv(budget, dtype=str, keep_default_na=False)
    assert set(rows["rle"]) == {"1 0"}
    assert main(["validate", str(budget), str(dataset / "sample_submission.csv")]) == 0


def test_infer_checks_its_output_paths_before_any_work(dataset, checkpoint, tmp_path, capsys, reads):
    folder = tmp_path / "folder"
    folder.mkdir()
    (tmp_path / "file").write_text("")
    infer = ["infer", str(dataset), str(checkpoint), "--device", "cpu"]
    assert main([*infer, "--out", str(folder)]) == 2
    assert main([*infer, "--out", str(tmp_path / "absent" / "s.csv")]) == 2
    assert main([*infer, "--out", str(tmp_path / "s.csv"), "--logits-dir", str(tmp_path / "file")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [f"error: out {folder} is a folder; give the submission's file path",
                      f"error: the folder of out {tmp_path / 'absent' / 's.csv'} does not exist",
                      f"error: logits_dir {tmp_path / 'file'} is a file; give a folder for the logits"]
    assert reads == [] and list(folder.iterdir()) == []


@pytest.mark.parametrize("flags, message", [
    (["--time-budget", "-10"], "argument --time-budget: time_budget_s must be a number of seconds > 0, got -10.0"),
    (["--time-budget", "nan"], "argument --time-budget: time_budget_s must be a number of seconds > 0, got nan"),
    (["--min-component-size", "-5"], "argument --min-component-size: inference option min_component_size=-5"),
    (["--tta", "rot", "--on-error", "empty"], "argument --tta: inference option tta='rot': must be one of"),
    (["--axes", "xy,zz"], "argument --axes: inference option axes=['xy', 'zz']"),
    (["--overlap", "half"], "argument --overlap: expected float, got 'half'"),
])
def test_bad_inference_options_name_the_flag(flags, message, dataset, checkpoint, capsys, reads):
    with pytest.raises(SystemExit) as stopped:
        main(["infer", str(dataset), str(checkpoint), *flags])
    assert stopped.value.code == 2 and message in capsys.readouterr().err and reads == []


def test_a_bad_device_stops_even_with_on_error_empty(dataset, checkpoint, tmp_path, capsys, reads):
    out = tmp_path / "s.csv"
    assert main(["infer", str(dataset), str(checkpoint), "--out", str(out), "--device", "tpu", "--on-error", "empty"]) == 2
    assert capsys.readouterr().err.startswith("error: device 'tpu' is not a device name")
    assert reads == [] and not out.exists()


@pytest.mark.parametrize("error, line", [
    (PermissionError(13, "Permission denied", "/data/s.csv"), "error: /data/s.csv: Permission denied"),
    (OSError(28, "No space left on device", "/tmp/x.tmp"), "error: /tmp/x.tmp: No space left on device"),
    (IsADirectoryError(21, "Is a directory", "/o/.s.csv.1.tmp", None, "/o/s.csv"), "error: /o/.s.csv.1.tmp -> /o/s.csv: Is a directory"),
    (OSError("Read-only file system"), "error: Read-only file system"),
    (KeyboardInterrupt(), "interrupted"),
])
def test_os_errors_are_one_line_and_debug_shows_the_traceback(error, line, monkeypatch, capsys):
    def fail(*args):
        raise error

    monkeypatch.setattr(cli, "validate_submission", fail)
    status = 130 if isinstance(error, KeyboardInterrupt) else 2
    assert main(["validate", "s.csv", "sample.csv"]) == status
    assert capsys.readouterr().err == line + "\n"
    assert main(["--debug", "validate", "s.csv", "sample.csv"]) == status
    shown = capsys.readouterr().err
    assert shown.startswith("Traceback (most recent call last):") and type(error).__name__ in shown


def test_train_passes_overwrite(dataset, tmp_path, monkeypatch):
    import vessel_kit.training as training

    calls = []

    def fake_train(config, *, overwrite=False):
        calls.append((config.out_dir, overwrite))
        return SimpleNamespace(best_score=0.5, best_epoch=1, best_checkpoint=tmp_path / "best.safetensors")

    monkeypatch.setattr(training, "train", fake_train)
    config = tmp_path / "c.yaml"
    config.write_text(f"data_root: {dataset}\nout_dir: {tmp_path / 'run'}\n")
    assert main(["train", "--config", str(config)]) == 0
    assert main(["train", "--config", str(config), "--overwrite"]) == 0
    assert calls == [(str(tmp_path / "run"), False), (str(tmp_path / "run"), True)]


def test_infer_flags_cover_every_inference_option():
    """The flags are generated from InferConfig: a new field without a flag fails here."""
    from vessel_kit.infer_config import InferConfig

    assert set(cli.INFER_FLAGS) | set(cli.COMMAND_SET_FIELDS) == set(InferConfig.field_names())
    parser = cli._build_parser()
    args = parser.parse_args(["infer", "d", "c.safetensors", "--tile-size", "32,64,64", "--axis-weights", "xy=2,yz=1",
                              "--reverse-slices", "true", "--hysteresis", "0.6,0.3"])
    assert cli._infer_options(args) == {"tile_size": (32, 64, 64), "axis_weights": {"xy": 2.0, "yz": 1.0},
                                        "reverse_slices": True, "hysteresis": (0.6, 0.3)}
    assert InferConfig.from_dict(cli._infer_options(args)).tile_size == (32, 64, 64)


def test_an_inference_config_file_is_checked_as_parsed(dataset, checkpoint, tmp_path, capsys, reads):
    bad = tmp_path / "infer.yaml"
    bad.write_text("tta: none\ntiles: 3\n")
    with pytest.raises(SystemExit):
        main(["infer", str(dataset), str(checkpoint), "--config", str(bad)])
    err = capsys.readouterr().err
    assert f"argument --config: {bad}: unknown inference options ['tiles']; valid: ['axes'" in err and reads == []
