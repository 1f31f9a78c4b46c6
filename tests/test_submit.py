"""predict_submission: a valid submission whatever happens (failing volume, unloadable models,
unreadable layout) with on_error="empty"; logits kept on request; the QC report built from them."""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import vessel_kit.submit as submit
from vessel_kit import rle_decode, validate_submission
from vessel_kit.devices import usable_devices
from vessel_kit.infer_config import InferConfig
from vessel_kit.infer import DeadlineWarning
from vessel_kit.layout import VolumeInfo
from vessel_kit.models import ModelConfig, build_model, save_checkpoint
from vessel_kit.qc import qc_report, read_solution_volume, threshold_curve
from vessel_kit.synth import make_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("submit") / "data", scale=0.3, seed=5, progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, random_unet):
    return random_unet(tmp_path_factory.mktemp("ckpt") / "m.safetensors", in_chans=1)


def rows(path) -> dict[str, str]:
    return dict(pd.read_csv(path, dtype=str, keep_default_na=False)[["id", "rle"]].itertuples(index=False))


FAST = {"axes": ["xy"], "tta": "none", "progress": False}
QUIET = {"device": "cpu", "log": lambda _: None}


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The names of the volumes whose images are read."""
    read, names = VolumeInfo.read_images, []

    def spy(self, **kwargs):
        names.append(self.name)
        return read(self, **kwargs)

    monkeypatch.setattr(VolumeInfo, "read_images", spy)
    return names


def fake_infer(calls: list[int], interrupt_at: int | None = None):
    """An infer_volume that fills its logits memmap slice by slice (Ctrl-C before the last
    slice of a volume of ``interrupt_at`` slices) and predicts everything."""
    def infer(volume, ensemble, *, accumulator_path=None, **options):
        calls.append(volume.shape[0])
        logits = np.zeros(volume.shape, np.float16) if accumulator_path is None else np.lib.format.open_memmap(
            accumulator_path, mode="w+", dtype=np.float16, shape=volume.shape)
        logits[:-1] = 1.0
        if volume.shape[0] == interrupt_at:
            raise KeyboardInterrupt
        logits[-1] = 1.0
        return np.ones(volume.shape, dtype=bool)
    return infer


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
    out, logits_dir, logged = tmp_path / "submission.csv", tmp_path / "logits", []
    submit.predict_submission(dataset, [checkpoint], out, logits_dir=logits_dir, device="cpu", log=lambda _: None, **FAST)
    first_run = out.read_bytes()
    status = submit.predict_submission(dataset, [checkpoint], out, logits_dir=logits_dir, device="cpu", log=logged.append, **FAST)
    assert status == {"kidney_5": "predicted", "kidney_6": "predicted"} and out.read_bytes() == first_run
    assert sum("reusing" in line for line in logged) == 2
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


def test_configuration_errors_stop_before_any_volume_is_read(dataset, checkpoint, tmp_path, reads):
    out = tmp_path / "submission.csv"
    for options, message in [
        ({"tta": "rot"}, r"tta='rot': must be one of"),
        ({"min_component_size": -5}, r"min_component_size=-5: must be an int >= 0"),
        ({"axes": ["xy", "zz"]}, r"axes=\['xy', 'zz'\]"),
        ({"time_budget_s": -10}, r"time_budget_s must be a number of seconds > 0, got -10"),
        ({"time_budget_s": float("inf")}, r"time_budget_s must be .* got inf"),
        ({"device": "tpu"}, r"device 'tpu' is not a device name"),
        ({"tile_size": 100}, r"tile_size must be a positive multiple of the models' stride 32, got 100"),
    ]:
        with pytest.raises(ValueError, match=message):  # on_error="empty" covers volumes, not configuration
            submit.predict_submission(dataset, [checkpoint], out, on_error="empty", **{**QUIET, **options})
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match=f"out {folder} is a folder"):
        submit.predict_submission(dataset, [checkpoint], folder, **QUIET)
    with pytest.raises(FileNotFoundError, match="the folder of out .*absent/s.csv does not exist"):
        submit.predict_submission(dataset, [checkpoint], tmp_path / "absent" / "s.csv", **QUIET)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="logits_dir .*file is a file"):
        submit.predict_submission(dataset, [checkpoint], out, logits_dir=tmp_path / "file", **QUIET)
    assert reads == [] and not out.exists()


def test_interrupted_logits_are_never_left_under_their_name_and_finished_ones_are_reused(
        dataset, checkpoint, tmp_path, monkeypatch):
    out, logits_dir, calls, logged = tmp_path / "submission.csv", tmp_path / "logits", [], []
    monkeypatch.setattr(submit, "infer_volume", fake_infer(calls, interrupt_at=14))  # Ctrl-C in kidney_6
    with pytest.raises(KeyboardInterrupt):
        submit.predict_submission(dataset, [checkpoint], out, logits_dir=logits_dir, **QUIET, **FAST)
    assert sorted(p.name for p in logits_dir.iterdir()) == ["kidney_5.json", "kidney_5.npy"] and not out.exists()
    killed = logits_dir / ".kidney_6.npy.vk-999999999-0badc0de.tmp"  # its process is gone, 10 minutes ago
    killed.write_bytes(b"left by kill -9")
    os.utime(killed, (killed.stat().st_mtime - 600,) * 2)

    monkeypatch.setattr(submit, "infer_volume", fake_infer(calls := []))
    status = submit.predict_submission(dataset, [checkpoint], out, logits_dir=logits_dir, device="cpu",
                                       log=logged.append, **FAST)
    assert status == {"kidney_5": "predicted", "kidney_6": "predicted"} and calls == [14]
    assert any("kidney_5: reusing" in line for line in logged)
    assert any(f"removed {killed}, left by an interrupted run" in line for line in logged)
    assert sorted(p.name for p in logits_dir.iterdir()) == ["kidney_5.json", "kidney_5.npy", "kidney_6.json", "kidney_6.npy"]
    assert np.all(np.load(logits_dir / "kidney_6.npy") == 1.0)
    validate_submission(out, dataset / "sample_submission.csv")

    # other options, or a slice file that changed: predicted again
    submit.predict_submission(dataset, [checkpoint], out, logits_dir=logits_dir, **QUIET, **{**FAST, "tta": "flips"})
    assert len(calls) == 3  # both volumes again
    calls.clear()
    first_slice = find_test_volume(dataset, "kidney_5").image_paths[0]
    os.utime(first_slice, ns=(first_slice.stat().st_atime_ns, first_slice.stat().st_mtime_ns + 10**9))
    submit.predict_submission(dataset, [checkpoint], out, logits_dir=logits_dir, **QUIET, **{**FAST, "tta": "flips"})
    assert len(calls) == 1 and calls[0] != 14  # kidney_5 only


def test_a_stale_sample_submission_keeps_the_previous_file(dataset, checkpoint, tmp_path, monkeypatch):
    root = shutil.copytree(dataset, tmp_path / "data")
    with open(root / "sample_submission.csv", "a") as sample:
        sample.write("kidney_5_9999,1 0\n")  # a slice that is not in test/
    out = tmp_path / "submission.csv"
    out.write_text("the previous submission")
    calls = []
    monkeypatch.setattr(submit, "infer_volume", fake_infer(calls))
    with pytest.raises(ValueError, match="1 ids of sample_submission.csv have no slice in test/, e.g. kidney_5_9999"):
        submit.predict_submission(root, [checkpoint], out, **QUIET)
    assert calls == [] and out.read_text() == "the previous submission"
    # the last guard: the finished file is validated before it replaces the previous one
    monkeypatch.setattr(submit, "_check_sample_lists_layout", lambda *args: None)
    with pytest.raises(ValueError, match="was not written .*1 ids of the sample submission are missing"):
        submit.predict_submission(root, [checkpoint], out, **QUIET)
    assert len(calls) == 2 and out.read_text() == "the previous submission"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "submission.csv"]  # no temporary file left


def find_test_volume(root, name: str) -> VolumeInfo:
    from vessel_kit import find_volumes

    return next(v for v in find_volumes(root, "test") if v.name == name)


def test_the_inference_settings_a_checkpoint_carries_are_the_default(dataset, tmp_path, monkeypatch):
    """A recipe's ``infer:`` section travels in the checkpoint: with no config, predict_submission
    starts from it, and explicit options still override it."""
    torch.manual_seed(0)
    config = ModelConfig(arch="unet", encoder="resnet18", in_chans=1, voxel_size_um=50.0, tile_size=64)
    carried = save_checkpoint(tmp_path / "carried.safetensors", build_model("unet", "resnet18", in_chans=1), config,
                              extra={"infer": {"axes": ["xy"], "tta": "none", "min_component_size": 5}})
    seen, logged = [], []

    def spy(volume, predictor, **options):
        seen.append(predictor.config)
        return np.zeros(volume.shape, dtype=bool)

    monkeypatch.setattr(submit, "infer_volume", spy)
    submit.predict_submission(dataset, [carried], tmp_path / "a.csv", device="cpu", log=logged.append, progress=False)
    assert (seen[-1].axes, seen[-1].tta, seen[-1].min_component_size) == (("xy",), "none", 5)
    assert any("inference settings carried by the checkpoints" in line for line in logged)
    submit.predict_submission(dataset, [carried], tmp_path / "b.csv", device="cpu", log=logged.append, progress=False,
                              tta="flips")
    assert (seen[-1].tta, seen[-1].min_component_size) == ("flips", 5)
    submit.predict_submission(dataset, [carried], tmp_path / "c.csv", device="cpu", log=logged.append,
                              config=InferConfig(progress=False))
    assert (seen[-1].axes, seen[-1].tta) == (("xy", "xz", "yz"), "flips")  # an explicit config wins whole
