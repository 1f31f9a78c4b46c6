"""The Kaggle notebooks run top to bottom (nbclient), on local paths given by environment variables."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from vessel_kit.synth import make_synthetic_dataset

NOTEBOOKS = Path(__file__).resolve().parents[1] / "kaggle"


def run_notebook(path: Path, env: dict[str, str], monkeypatch) -> nbformat.NotebookNode:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
    return notebook


def test_train_notebook(tmp_path, monkeypatch):
    data = make_synthetic_dataset(tmp_path / "data", scale=0.3, progress=False)
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({
        "recipe": "synthetic_cpu", "data_root": str(data), "out_dir": str(tmp_path / "run"),
        "crop_size": 64, "crops_per_epoch": 16, "batch_size": 8, "epochs": 1, "num_workers": 0, "progress": False,
    }))
    notebook = run_notebook(
        NOTEBOOKS / "train.ipynb",
        {"VESSEL_KIT_DATA": str(tmp_path / "absent"), "VESSEL_KIT_OUT": str(tmp_path), "VESSEL_KIT_TRAIN_CONFIG": str(config)},
        monkeypatch,
    )
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "best validation surface Dice" in printed
    assert (tmp_path / "run" / "best.safetensors").is_file()
    image_outputs = [o for o in notebook.cells[-1].outputs if "image/png" in o.get("data", {})]
    assert image_outputs, "the curves were not displayed"
