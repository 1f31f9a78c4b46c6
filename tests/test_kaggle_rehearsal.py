"""The offline Kaggle rehearsal: build the dataset, install it with no index into a fresh venv that
stands in for Kaggle's image, run kaggle/infer.ipynb there, check and score its submission.

The stand-in image is a new virtual environment that sees the test environment's packages
through a ``.pth`` file, except those the bundle must bring (vessel_kit, segmentation-models-pytorch,
timm, safetensors): if the bundle lacked one, the notebook would fail to import it. pip runs with
``--no-index`` and an unreachable index URL, as on Kaggle. Building the bundle downloads the pinned
wheels through pip's registry, as on a user's machine.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from vessel_kit import read_bundle, score_submission, validate_submission
from vessel_kit.bundle import main as build_dataset
from vessel_kit.submit import predict_submission
from vessel_kit.synth import make_synthetic_dataset
from vessel_kit.training import TrainConfig, train

# About 5 minutes on 2 cores (training, the bundle's wheels, two fresh venvs, the notebook): outside
# the default suite to keep it near 10 minutes; `make rehearsal` runs every test of this file.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUNDLED = ("vessel_kit", "segmentation_models_pytorch", "timm", "safetensors")
INFER_OPTIONS = {"axes": ["xy", "xz", "yz"], "tta": "none", "tile_size": 128, "progress": False}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, real_data):
    """Everything up to the notebook runs: checkpoint, bundle, fake /kaggle/input, stand-in image."""
    tmp = tmp_path_factory.mktemp("rehearsal")
    data = make_synthetic_dataset(tmp / "input" / "blood-vessel-segmentation", scale=0.5, seed=3, progress=False)
    _add_placeholder(data, real_data / "kidney_test_placeholder")
    result = train(TrainConfig.from_dict({
        "recipe": "synthetic_cpu", "data_root": str(data), "out_dir": str(tmp / "runs" / "tiny"), "crop_size": 96,
        "crops_per_epoch": 256, "batch_size": 16, "epochs": 6, "num_workers": 0, "progress": False,
        # What the notebook gets is under test here, not robustness: the hipct volumes, no extra augmentation.
        "train_volumes": ["kidney_1_dense", "kidney_2"], "val_voxel_sizes_um": [], "rotate_p": 0.0, "zoom_p": 0.0,
        "lowres_p": 0.0, "intensity_p": 0.0, "invert_p": 0.0, "model_kwargs": {},
    }))
    infer_config = tmp / "infer.yaml"
    infer_config.write_text(json.dumps(INFER_OPTIONS))
    bundle_dir = tmp / "input" / "vessel-kit-bundle"
    status = build_dataset([
        "--checkpoints", str(tmp / "runs" / "tiny"), "--out", str(bundle_dir), "--wheels", str(tmp / "wheels"),
        "--kaggle-id", "someone/vessel-kit-rehearsal", "--infer-config", str(infer_config),
    ])
    assert status == 0
    return {"tmp": tmp, "data": data, "bundle": bundle_dir, "image": _kaggle_image(tmp), "checkpoint": result.best_checkpoint}


def test_the_venv_stands_in_for_kaggle(rehearsal):
    python = _kaggle_like_venv(rehearsal, "probe") / "bin" / "python"
    assert _imports(python, "torch, numpy, cv2, tifffile, pandas, ipykernel")
    for module in BUNDLED:
        assert not _imports(python, module), f"{module} must come from the bundle, not the stand-in image"


def test_bundle_holds_what_the_notebook_needs(rehearsal):
    bundle = read_bundle(rehearsal["bundle"])
    assert [p.name for p in bundle.checkpoints] == ["tiny.safetensors"]
    assert bundle.infer_options == INFER_OPTIONS
    assert bundle.manifest["checkpoints"][0]["trained_on"]["train_volumes"] == ["kidney_1_dense", "kidney_2"]
    assert bundle.manifest["checkpoints"][0]["voxel_size_um"] == 50.0
    wheels = sorted(p.name.split("-")[0] for p in rehearsal["bundle"].glob("*.whl"))
    assert wheels == ["safetensors", "segmentation_models_pytorch", "timm", "vessel_kit"]
    metadata = json.loads((rehearsal["bundle"] / "dataset-metadata.json").read_text())
    assert metadata["id"] == "someone/vessel-kit-rehearsal"


def test_infer_notebook_offline(rehearsal, monkeypatch):
    tmp, data = rehearsal["tmp"], rehearsal["data"]
    out = tmp / "working-infer"
    printed = _run_offline("infer.ipynb", rehearsal, out, {"VESSEL_KIT_DATA": str(data)}, monkeypatch)
    assert "tiny.safetensors" in printed and "devices: cpu" in printed

    submission = out / "submission.csv"
    validate_submission(submission, data / "sample_submission.csv")
    rows = pd.read_csv(submission, keep_default_na=False)
    assert rows["id"].str.startswith("kidney_placeholder_").sum() == 3

    # The same prediction in this process: the bundle reproduces the library exactly.
    reference = tmp / "reference.csv"
    predict_submission(data, [rehearsal["checkpoint"]], reference, device="cpu", **INFER_OPTIONS)
    assert submission.read_text() == reference.read_text()
    scores = score_submission(data / "solution.csv", submission, progress=False)
    assert set(scores) == {"kidney_5", "kidney_6", "mean"}
    # A sanity check that the masks are not empty or noise: the tiny model (6 short epochs) scores
    # about 0.02 on the current synthetic test volumes (kidney_5 0.046, kidney_6 0.002 measured).
    assert scores["mean"] > 0.01, f"the tiny model should find some vessels: {scores}"


def test_train_notebook_offline(rehearsal, monkeypatch):
    """kaggle/train.ipynb installs from the bundle too (into its own fresh venv) and trains."""
    tmp = rehearsal["tmp"]
    config = tmp / "train.yaml"
    config.write_text(json.dumps({
        "recipe": "synthetic_cpu", "data_root": str(rehearsal["data"]), "out_dir": str(tmp / "runs" / "notebook"),
        "crop_size": 64, "crops_per_epoch": 16, "batch_size": 8, "epochs": 1, "num_workers": 0, "progress": False,
    }))
    printed = _run_offline("train.ipynb", rehearsal, tmp / "working-train", {"VESSEL_KIT_TRAIN_CONFIG": str(config)}, monkeypatch)
    assert "best validation surface Dice" in printed
    assert (tmp / "runs" / "notebook" / "best.safetensors").is_file()


def test_infer_notebook_offline_with_a_3d_checkpoint(tmp_path, monkeypatch):
    """A 3D checkpoint (the 2nd-place recipe, tiny): the bundle brings MONAI, the notebook predicts
    with the recipe's carried settings (top fraction, 26-connected components) and its submission
    equals the library's in-process one."""
    pytest.importorskip("monai")
    data = make_synthetic_dataset(tmp_path / "input" / "blood-vessel-segmentation", scale=0.5, seed=3, progress=False)
    result = train(TrainConfig.from_dict({
        "base": "2nd_place_3d", "data_root": str(data), "out_dir": str(tmp_path / "runs" / "tiny3d"),
        "train_volumes": ["kidney_1_dense"], "val_volumes": [], "epochs": 1, "batch_size": 2, "num_workers": 0,
        "progress": False, "target_voxel_size_um": None,
        "patches": {"patch_size": [16, 32, 32], "patches_per_epoch": 4},
        "model": {"model_kwargs": {"channels": [4, 8, 16], "strides": [2, 2]}},
    }))
    bundle_dir = tmp_path / "input" / "vessel-kit-bundle"
    assert build_dataset(["--checkpoints", str(tmp_path / "runs" / "tiny3d"), "--out", str(bundle_dir),
                          "--wheels", str(tmp_path / "wheels"), "--kaggle-id", "someone/vessel-kit-3d"]) == 0
    assert "monai" in {p.name.split("-")[0] for p in bundle_dir.glob("*.whl")}
    rehearsal = {"tmp": tmp_path, "image": _kaggle_image(tmp_path, (*BUNDLED, "monai"))}
    python = _kaggle_like_venv(rehearsal, "probe3d") / "bin" / "python"
    assert not _imports(python, "monai"), "monai must come from the bundle, not the stand-in image"
    out = tmp_path / "working-infer"
    printed = _run_offline("infer.ipynb", rehearsal, out, {"VESSEL_KIT_DATA": str(data)}, monkeypatch)
    assert "tiny3d.safetensors" in printed and "top_fraction" in printed
    reference = tmp_path / "reference.csv"
    predict_submission(data, [result.best_checkpoint], reference, device="cpu", progress=False)
    assert (out / "submission.csv").read_text() == reference.read_text()
    validate_submission(out / "submission.csv", data / "sample_submission.csv")


def _run_offline(name: str, rehearsal, out: Path, env: dict[str, str], monkeypatch) -> str:
    """Execute kaggle/<name> in a fresh Kaggle-like venv with no package index; returns its text output."""
    tmp = rehearsal["tmp"]
    kernel = name.split(".")[0]
    _kaggle_like_venv(rehearsal, kernel)
    out.mkdir()
    env = {
        "VESSEL_KIT_INPUT": str(tmp / "input"), "VESSEL_KIT_OUT": str(out), "JUPYTER_PATH": str(tmp / "jupyter"),
        "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",  # unreachable registry
        **env,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(REPO / "kaggle" / name, as_version=4)
    # run in the working folder, as on Kaggle (the checkout's vessel_kit/ must not be importable)
    NotebookClient(notebook, timeout=900, kernel_name=kernel, resources={"metadata": {"path": str(out)}}).execute()
    return "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))


def _add_placeholder(data: Path, slices: Path) -> None:
    """The public test's 3 real slices as one more test volume, listed in the sample submission."""
    images = data / "test" / "kidney_placeholder" / "images"
    images.mkdir(parents=True)
    for path in sorted(slices.glob("*.tif")):
        shutil.copyfile(path, images / path.name)
    sample = data / "sample_submission.csv"
    rows = [f"kidney_placeholder_{p.stem},1 0" for p in sorted(slices.glob("*.tif"))]
    sample.write_text(sample.read_text() + "\n".join(rows) + "\n")


def _kaggle_image(tmp: Path, brought: tuple[str, ...] = BUNDLED) -> Path:
    """A folder of links to this environment's packages, minus those the bundle must bring."""
    site = Path(sysconfig.get_paths()["purelib"])
    bundled = set()
    for name in brought:  # packages, modules and dist-info folders (an editable install lists few files)
        files = importlib.metadata.distribution(name).files or []
        bundled |= {f.parts[0] for f in files if f.parts[0] != ".."} | {name}
    image = tmp / "kaggle_image"
    image.mkdir()
    for entry in site.iterdir():
        distribution = entry.name.split("-")[0].replace(".", "_")
        if entry.name in bundled or distribution in bundled or entry.suffix == ".pth" or entry.name.startswith("__editable__"):
            continue
        (image / entry.name).symlink_to(entry)
    return image


def _kaggle_like_venv(rehearsal, name: str) -> Path:
    """A fresh venv that sees the stand-in image, with a Jupyter kernel ``name`` running it."""
    tmp = rehearsal["tmp"]
    venv = tmp / f"venv-{name}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    venv_site = next((venv / "lib").glob("python3*/site-packages"))
    (venv_site / "kaggle_image.pth").write_text(f"{rehearsal['image']}\n")
    kernel = tmp / "jupyter" / "kernels" / name
    kernel.mkdir(parents=True)
    (kernel / "kernel.json").write_text(json.dumps({
        "argv": [str(venv / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Kaggle rehearsal ({name})", "language": "python",
    }))
    return venv


def _imports(python: Path, modules: str) -> bool:
    # run outside the checkout, whose vessel_kit/ folder would otherwise be importable
    return subprocess.run([str(python), "-c", f"import {modules}"], capture_output=True, cwd=python.parents[2]).returncode == 0
