"""predict_submission: a valid submission whatever happens (failing volume, unloadable models,
unreadable layout) with on_error="empty"; logits kept on request; the QC report built from them."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import vessel_kit.submit as submit
from vessel_kit import rle_decode, validate_submission
from vessel_kit.devices import usable_devices
from vessel_kit.infer import DeadlineWarning
from vessel_kit.models import ModelConfig, build_model, save_checkpoint
from vessel_kit.qc import qc_report, read_solution_volume, threshold_curve
from vessel_kit.synth import make_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("submit") / "data", scale=0.3, seed=5, progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = ModelConfig(arch="unet", encoder="resnet18", in_chans=1, voxel_size_um=50.0, tile_size=64)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.safetensors", build_model("unet", "resnet18", in_chans=1), config)


def rows(path) -> dict[str, str]:
    return dict(pd.read_csv(path, dtype=str, keep_default_na=False)[["id", "rle"]].itertuples(index=False))


FAST = {"axes": ["xy"], "tta": "none", "progress": False}


def test_a_failing_volume_gets_empty_masks(dataset, checkpoint, tmp_path, monkeypatch):
    def flaky(volume, ensemble, **options):
        if volume.shape[0] == 14:  # kidney_6 at scale 0.3
            raise RuntimeError("CUDA out of memory")
        return np.ones(volume.shape, dtype=bool)

    monkeypatch.setattr(submit, "infer_volume", flaky)
    out = tmp_path / "submission.csv"
    with pytest.raises(RuntimeError, match="out of memory"):
        submit.predict_submission(dataset, [checkpoint], out, device="cpu")
    assert not out.exists()  # nothing half-written
    status = submit.predict_submission(dataset, [checkpoint], out, device="cpu", on_error="empty", log=lambda _: None)
    assert status == {"kidney_5": "predicted", "kidney_6": "empty (error: CUDA out of memory)"}
    validate_submission(out, dataset / "sample_submission.csv")
    written = rows(out)
    assert {rle for row_id, rle in written.items() if row_id.startswith("kidney_6")} == {"1 0"}
    assert all(rle != "1 0" for row_id, rle in written.items() if row_id.startswith("kidney_5"))


def test_the_time_budget_shows_in_the_status(dataset, checkpoint, tmp_path, monkeypatch):
    """kidney_5 had to leave axes out (DeadlineWarning), kidney_6 passed the deadline mid-way."""
    def hurried(volume, ensemble, deadline, **options):
        assert deadline is not None
        if volume.shape[0] == 14:
            raise TimeoutError("inference passed its deadline after 3 of 9 tiles")
        warnings.warn("the deadline leaves no time for axes ['yz']; using ['xy', 'xz'] only", DeadlineWarning)
        warnings.warn("an unrelated warning")
        return np.ones(volume.shape, dtype=bool)

    monkeypatch.setattr(submit, "infer_volume", hurried)
    out, logged = tmp_path / "submission.csv", []
    with pytest.warns(UserWarning, match="an unrelated warning"):  # passed on, not swallowed
        status = submit.predict_submission(dataset, [checkpoint], out, device="cpu", time_budget_s=3600, log=logged.append)
    assert status == {"kidney_5": "predicted (the deadline leaves no time for axes ['yz']; using ['xy', 'xz'] only)",
                      "kidney_6": "empty (time budget)"}
    assert any("kidney_6: inference passed its deadline" in line for line in logged)
    written = rows(out)
    assert {rle for row_id, rle in written.items() if row_id.startswith("kidney_6")} == {"1 0"}
    assert all(rle != "1 0" for row_id, rle in written.items() if row_id.startswith("kidney_5"))


def test_unloadable_models_give_an_empty_valid_submission(dataset, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        submit.predict_submission(dataset, [broken], tmp_path / "a.csv", device="cpu")
    status = submit.predict_submission(dataset, [broken], tmp_path / "b.csv", on_error="empty", log=lambda _: None)
    assert set(status) == {"kidney_5", "kidney_6"} and all(s.startswith("empty (error:") for s in status.values())
    validate_submission(tmp_path / "b.csv", dataset / "sample_submission.csv")


def test_an_unreadable_layout_falls_back_to_the_sample_ids(dataset, checkpoint, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    shutil.copyfile(dataset / "sample_submission.csv", root / "sample_submission.csv")  # no test/ folder
    with pytest.raises(FileNotFoundError, match="test does not exist"):
        submit.predict_submission(root, [checkpoint], tmp_path / "a.csv")
    status = submit.predict_submission(root, [checkpoint], tmp_path / "b.csv", on_error="empty", log=lambda _: None)
    assert set(status) == {"kidney_5", "kidney_6"}
    validate_submission(tmp_path / "b.csv", root / "sample_submission.csv")
    assert set(rows(tmp_path / "b.csv").values()) == {"1 0"}
    with pytest.raises(ValueError, match="on_error must be one of"):
        submit.predict_submission(root, [checkpoint], tmp_path / "c.csv", on_error="ignore")
    with pytest.raises(ValueError, match=r"sets accumulator_path \(use logits_dir=\), deadline \(use time_budget_s=\)"):
        submit.predict_submission(root, [checkpoint], tmp_path / "c.csv", deadline=0.0, accumulator_path="x.npy")


def test_logits_are_kept_and_the_qc_report_reads_them(dataset, checkpoint, tmp_path):
    out, logits_dir = tmp_path / "submission.csv", tmp_path / "logits"
    submit.predict_submission(dataset, [checkpoint], out, logits_dir=logits_dir, device="cpu", log=lambda _: None, **FAST)
    truth = read_solution_volume(dataset / "solution.csv", "kidney_5")
    kidney_5 = np.load(logits_dir / "kidney_5.npy")
    assert kidney_5.dtype == np.float16 and kidney_5.shape == truth.shape  # 50.28 µm: not resampled
    assert np.load(logits_dir / "kidney_6.npy").shape != read_solution_volume(dataset / "solution.csv", "kidney_6").shape
    written = rows(out)
    first = rle_decode(written["kidney_5_0000"], truth.shape[1:])
    np.testing.assert_array_equal(first, kidney_5[0] > 0)  # threshold 0.5 = logit 0
    curves = qc_report(dataset, out, logits_dir, tmp_path / "qc.png")
    assert set(curves) == {"kidney_5", "kidney_6"} and len(curves["kidney_5"]) == 19
    assert (tmp_path / "qc.png").read_bytes()[:4] == b"\x89PNG"


def test_threshold_curve():
    logits = np.random.default_rng(0).normal(size=(6, 40, 40)).astype(np.float16)
    curve = dict(threshold_curve(logits, logits > 0))
    assert curve[0.5] == 1.0 and curve[0.1] < 1.0 and curve[0.9] < 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        threshold_curve(logits, logits[:1] > 0)


def test_usable_devices():
    if torch.cuda.device_count() == 0:
        assert usable_devices(log=lambda _: None) == ["cpu"]
        with pytest.raises(ValueError, match="cuda:0.*no usable CUDA device"):
            usable_devices("cuda:0")
    assert usable_devices("cpu") == ["cpu"]
    with pytest.raises(ValueError, match="'gpu' is not a device name"):
        usable_devices("gpu")
    with pytest.raises(ValueError, match="only cpu and cuda"):
        usable_devices("meta")
