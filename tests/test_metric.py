"""surface_dice / dice / score_submission against the oracle (PyPI surface-distance) and known values."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from vessel_kit.metric import SURFACE_AREA, SurfaceDiceAccumulator, dice, score_submission, surface_dice
from vessel_kit.rle import rle_encode
from vessel_kit.volume import read_labels


def random_blobs(shape, seed, threshold=0.6):
    """Smooth random blobs: connected shapes with real surfaces, unlike salt-and-pepper noise."""
    rng = np.random.default_rng(seed)
    noise = rng.random(shape).astype(np.float32)
    smooth = np.stack([cv2.GaussianBlur(s, (0, 0), 1.2) for s in noise])
    smooth = (smooth + np.roll(smooth, 1, 0) + np.roll(smooth, -1, 0)) / 3
    return smooth > np.quantile(smooth, threshold)


def test_area_table_equals_oracle_table():
    from surface_distance import lookup_tables

    np.testing.assert_allclose(SURFACE_AREA, lookup_tables.create_table_neighbour_code_to_surface_area((1, 1, 1)), rtol=0, atol=1e-15)
    assert SURFACE_AREA[0] == SURFACE_AREA[255] == 0
    assert (SURFACE_AREA[1:255] > 0).all()


@pytest.mark.parametrize("shape", [(1, 9, 11), (2, 2, 2), (5, 17, 23), (12, 40, 31), (31, 8, 64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_blobs_equal_oracle(shape, seed, oracle_surface_dice):
    truth = random_blobs(shape, seed)
    pred = random_blobs(shape, seed + 100) | (truth & (np.random.default_rng(seed).random(shape) < 0.8))
    assert surface_dice(truth, pred) == pytest.approx(oracle_surface_dice(truth, pred), abs=1e-6)


def test_masks_touching_every_border_equal_oracle(oracle_surface_dice):
    truth = np.zeros((6, 10, 12), bool)
    truth[0:4, 0:7, 5:12] = True  # touches z=0, y=0 and x=max faces
    pred = np.zeros_like(truth)
    pred[2:6, 3:10, 0:9] = True  # touches z=max, y=max and x=0 faces
    assert surface_dice(truth, pred) == pytest.approx(oracle_surface_dice(truth, pred), abs=1e-6)


@pytest.fixture(scope="module")
def real_labels(real_data):
    return read_labels(real_data / "kidney_3_dense_labels", progress=False)


def _perturb(labels, kind):
    kernel = np.ones((3, 3), np.uint8)
    if kind == "shift":
        return np.roll(labels, (1, -2), axis=(1, 2))
    if kind == "dilation":
        return np.stack([cv2.dilate(s.view(np.uint8), kernel).astype(bool) for s in labels])
    if kind == "erosion":
        return np.stack([cv2.erode(s.view(np.uint8), kernel).astype(bool) for s in labels])
    if kind == "noise":
        rng = np.random.default_rng(3)
        return labels ^ (rng.random(labels.shape) < 0.0005)
    if kind == "drop_slices":
        out = labels.copy()
        out[5:7] = False
        return out
    raise AssertionError(kind)


# ~9 s each on 2 cores: noise and shift run by default, the other perturbations with -m slow
@pytest.mark.parametrize("kind", ["shift", "noise", *(pytest.param(kind, marks=pytest.mark.slow)
                                                     for kind in ("dilation", "erosion", "drop_slices"))])
def test_real_labels_with_perturbations_equal_oracle(real_labels, kind, oracle_surface_dice):
    # The vessels of these slices lie in rows 199..1266, columns 375..1242; crop around them to
    # keep the oracle fast (the crop keeps a background margin, so the score is unchanged).
    truth = real_labels[:, 150:1320, 330:1290]
    pred = _perturb(truth, kind)
    ours = surface_dice(truth, pred)
    assert 0.0 < ours < 1.0
    assert ours == pytest.approx(oracle_surface_dice(truth, pred), abs=1e-6)


def test_known_values(real_labels):
    assert surface_dice(real_labels, real_labels) == 1.0
    assert surface_dice(real_labels, np.zeros_like(real_labels)) == 0.0
    assert surface_dice(np.zeros_like(real_labels), real_labels) == 0.0
    empty = np.zeros((3, 4, 5), bool)
    assert surface_dice(empty, empty) == 0.0  # the official scorer: 0 / max(0, 1e-8)


def test_deepmind_cubes_case():
    truth = np.zeros((100, 100, 100), bool)
    pred = np.zeros_like(truth)
    truth[:50] = True
    pred[:51] = True
    assert surface_dice(truth, pred) == pytest.approx(0.750877, abs=1e-6)


@pytest.mark.parametrize("workers", [1, 2, 3, 8, 50])
def test_thread_chunking_does_not_change_the_score(workers):
    truth, pred = random_blobs((9, 30, 20), 4), random_blobs((9, 30, 20), 5)
    assert surface_dice(truth, pred, workers=workers) == surface_dice(truth, pred, workers=1)


def test_accumulator_streams_and_accepts_uint8_labels():
    truth, pred = random_blobs((7, 21, 19), 6), random_blobs((7, 21, 19), 7)
    accumulator = SurfaceDiceAccumulator()
    for truth_slice, pred_slice in zip(truth.astype(np.uint8) * 255, pred, strict=True):
        accumulator.update(truth_slice, pred_slice)
    assert accumulator.result() == surface_dice(truth, pred)  # integer counts: exactly equal
    assert accumulator.result() == accumulator.result()  # reading the result changes nothing
    with pytest.raises(ValueError, match="slice shape changed from \\(21, 19\\) to \\(20, 19\\)"):
        accumulator.update(truth[0, :20], pred[0, :20])


@pytest.mark.parametrize(
    "truth, pred, message",
    [
        (np.zeros((2, 3, 4), bool), np.zeros((2, 3, 5), bool), "shapes differ"),
        (np.zeros((3, 4), bool), np.zeros((3, 4), bool), "must be a \\(Z, Y, X\\) mask"),
        (np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), bool), "bool or integer mask, got dtype float32"),
        (np.zeros((0, 3, 4), bool), np.zeros((0, 3, 4), bool), "empty arrays"),
        ([[[1]]], np.zeros((1, 1, 1), bool), "must be a numpy array"),
    ],
)
def test_bad_inputs_raise(truth, pred, message):
    with pytest.raises(ValueError, match=message):
        surface_dice(truth, pred)


def test_dice():
    truth = np.zeros((2, 4, 4), bool)
    truth[0, :2] = True  # 8 voxels
    pred = np.zeros_like(truth)
    pred[0, 1:3] = True  # 8 voxels, 4 shared
    assert dice(truth, pred) == pytest.approx(0.5)
    assert dice(truth, truth) == 1.0
    assert dice(truth, np.zeros_like(truth)) == 0.0
    assert dice(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    assert dice(truth[0], pred[0]) == pytest.approx(0.5)  # 2D works too


def _solution_and_submission(tmp_path, volumes):
    solution_rows, submission_rows = [], []
    for name, (truth, pred) in volumes.items():
        height, width = truth.shape[1:]
        for z, (truth_slice, pred_slice) in enumerate(zip(truth, pred, strict=True)):
            row_id = f"{name}_{z:04d}"
            solution_rows.append((row_id, rle_encode(truth_slice), width, height, name, z))
            submission_rows.append((row_id, rle_encode(pred_slice)))
    solution = pd.DataFrame(solution_rows, columns=["id", "rle", "width", "height", "image", "slice"])
    submission = pd.DataFrame(submission_rows, columns=["id", "rle"])
    # Kaggle's files need not be in slice order: shuffle both.
    solution.sample(frac=1, random_state=0).to_csv(tmp_path / "solution.csv", index=False)
    submission.sample(frac=1, random_state=1).to_csv(tmp_path / "submission.csv", index=False)
    return tmp_path / "solution.csv", tmp_path / "submission.csv"


def test_score_submission_scores_each_volume_and_the_mean(tmp_path):
    volumes = {
        "kidney_5": (random_blobs((6, 20, 24), 8), random_blobs((6, 20, 24), 9)),
        "kidney_6": (random_blobs((4, 16, 12), 10), random_blobs((4, 16, 12), 11)),
    }
    solution, submission = _solution_and_submission(tmp_path, volumes)
    scores = score_submission(solution, submission, progress=False)
    expected = {name: surface_dice(t, p) for name, (t, p) in volumes.items()}
    assert set(scores) == {"kidney_5", "kidney_6", "mean"}
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, abs=1e-12)
    assert scores["mean"] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)


def test_score_submission_bad_inputs(tmp_path):
    truth = random_blobs((3, 8, 8), 12)
    solution, submission = _solution_and_submission(tmp_path, {"kidney_5": (truth, truth)})
    frame = pd.read_csv(submission, dtype=str, keep_default_na=False)
    frame.iloc[1:].to_csv(tmp_path / "missing.csv", index=False)
    with pytest.raises(ValueError, match="1 solution ids are missing"):
        score_submission(solution, tmp_path / "missing.csv", progress=False)
    frame.loc[0, "rle"] = "1 2 3"
    frame.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=f"id '{frame.loc[0, 'id']}': RLE has an odd number"):
        score_submission(solution, tmp_path / "bad.csv", progress=False)
    pd.read_csv(solution).drop(columns=["height"]).to_csv(tmp_path / "nosize.csv", index=False)
    with pytest.raises(ValueError, match="nosize.csv: header 'id,rle,width,image,slice' lacks height; expected the columns id,rle,width,height,image,slice"):
        score_submission(tmp_path / "nosize.csv", submission, progress=False)


def _two_volume_files(tmp_path):
    """Solution and submission CSVs of two small volumes (12 and 4 slices), and their frames."""
    volumes = {
        "kidney_5": (random_blobs((12, 16, 14), 20), random_blobs((12, 16, 14), 21)),
        "kidney_6": (random_blobs((4, 10, 12), 22), random_blobs((4, 10, 12), 23)),
    }
    solution, submission = _solution_and_submission(tmp_path, volumes)
    return (
        solution,
        submission,
        pd.read_csv(solution, dtype=str, keep_default_na=False),
        pd.read_csv(submission, dtype=str, keep_default_na=False),
    )


def _rewrite(frame, path):
    frame.to_csv(path, index=False)
    return path


def _drop_and_renumber(frame, row_id):
    """Drop a row and number each volume's remaining slices 0, 1, 2, ... again."""
    frame = frame[frame["id"] != row_id].copy()
    frame["slice"] = frame.groupby("image")["slice"].transform(lambda s: s.astype(int).rank(method="first") - 1).astype(int)
    return frame


def _set(frame, row_id, column, value):
    frame = frame.copy()
    frame.loc[frame["id"] == row_id, column] = value
    return frame


@pytest.mark.parametrize(
    "edit, message",
    [
        # A middle row missing, or repeated: slices 9 and 11 were scored as neighbours (exit 0).
        (lambda f: f[f["id"] != "kidney_5_0010"], "volume 'kidney_5' lacks slice 10: its slice numbers jump from 9 "
         "\\('kidney_5_0009'\\) to 11 \\('kidney_5_0011'\\)"),
        (lambda f: pd.concat([f, f[f["id"] == "kidney_5_0010"]]), "volume 'kidney_5' has slice 10 twice"),
        # The row dropped and the slices renumbered: the ids still tell.
        (lambda f: _drop_and_renumber(f, "kidney_5_0010"),
         "volume 'kidney_5': slice numbers do not follow the ids: 'kidney_5_0000' is slice 0 but 'kidney_5_0011' is slice 10"),
        # Two slice numbers swapped: the volume would be scored in the wrong order.
        (lambda f: _set(_set(f, "kidney_5_0003", "slice", "4"), "kidney_5_0004", "slice", "3"),
         "volume 'kidney_5': slice numbers do not follow the ids: 'kidney_5_0000' is slice 0 but 'kidney_5_0004' is slice 3"),
        (lambda f: _set(f, "kidney_6_0002", "image", "kidney_5"), "volume 'kidney_5' has slice 2 twice"),
        (lambda f: _set(_set(f, "kidney_6_0002", "image", "kidney_5"), "kidney_6_0002", "slice", "12"),
         "volume 'kidney_5': id 'kidney_6_0002' is not kidney_5_<stem>"),
        (lambda f: _set(f, "kidney_6_0001", "width", "13"),
         "volume 'kidney_6' mixes slice sizes \\(height x width\\): 'kidney_6_0000' is 10x12, 'kidney_6_0001' is 10x13"),
    ],
)
def test_solution_slice_gaps_repeats_and_disorder_raise(tmp_path, edit, message):
    solution, submission, solution_frame, _ = _two_volume_files(tmp_path)
    broken = _rewrite(edit(solution_frame), tmp_path / "broken_solution.csv")
    with pytest.raises(ValueError, match=f"solution file .*broken_solution.csv: {message}"):
        score_submission(broken, submission, progress=False)


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("width", "12.5", "width '12.5' is not an integer >= 1"),  # int() would have truncated it
        ("width", "0", "width '0' is not an integer >= 1"),
        ("height", "-3", "height '-3' is not an integer >= 1"),
        ("height", "", "height '' is not an integer >= 1"),
        ("height", "\u0663", "height '\u0663' is not an integer >= 1"),
        ("slice", "-1", "slice '-1' is not an integer >= 0"),
        ("slice", "1e3", "slice '1e3' is not an integer >= 0"),
        ("rle", "1 2 3", "RLE has an odd number of values"),
        ("rle", "1 99999999999999999999999", "RLE value .* is too large"),
        ("rle", "1 200", "RLE run ends at pixel 200, beyond the 10x12=120 pixels"),
    ],
)
def test_solution_errors_name_the_solution_and_the_id(tmp_path, column, value, message):
    solution, submission, solution_frame, _ = _two_volume_files(tmp_path)
    solution_frame.loc[solution_frame["id"] == "kidney_6_0002", column] = value
    broken = _rewrite(solution_frame, tmp_path / "broken_solution.csv")
    with pytest.raises(ValueError, match=f"solution file .*broken_solution.csv: id 'kidney_6_0002': {message}"):
        score_submission(broken, submission, progress=False)


def test_solution_duplicated_ids_raise(tmp_path):
    # Non-numbered stems say nothing about the slice order, so only the id check can see this.
    rows = [("v_a", "1 0", 2, 2, "v", 0), ("v_a", "1 0", 2, 2, "v", 1)]
    frame = pd.DataFrame(rows, columns=["id", "rle", "width", "height", "image", "slice"])
    solution = _rewrite(frame, tmp_path / "solution.csv")
    submission = _rewrite(frame[["id", "rle"]].iloc[:1], tmp_path / "submission.csv")
    with pytest.raises(ValueError, match="solution file .*solution.csv: ids occur more than once, e.g. \\['v_a'\\]"):
        score_submission(solution, submission, progress=False)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "solution file .*bad.csv is empty; expected the columns id,rle,width,height,image,slice"),
        (b"id,rle,width,height,image,slice\n", "solution file .*bad.csv has no rows"),  # the mean was nan
        (b"id,rle,width,height\nkidney_5_0000,1 0,2,2\n",
         "solution file .*bad.csv: header 'id,rle,width,height' lacks image,slice; expected the columns id,rle,width,height,image,slice"),
    ],
)
def test_unreadable_solution_names_the_file(tmp_path, content, message):
    _, submission, _, _ = _two_volume_files(tmp_path)
    (tmp_path / "bad.csv").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        score_submission(tmp_path / "bad.csv", submission, progress=False)


def test_empty_submission_file_names_the_file(tmp_path):
    solution, _, _, _ = _two_volume_files(tmp_path)
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(ValueError, match="submission file .*empty.csv is empty; expected the columns id,rle"):
        score_submission(solution, tmp_path / "empty.csv", progress=False)


def test_submission_duplicated_and_unknown_ids_raise(tmp_path):
    solution, _, _, frame = _two_volume_files(tmp_path)
    twice = pd.concat([frame, frame[frame["id"] == "kidney_6_0001"].assign(rle="1 1")])  # the last row won
    with pytest.raises(ValueError, match="twice.csv: 1 ids occur more than once, e.g. \\['kidney_6_0001'\\]"):
        score_submission(solution, _rewrite(twice, tmp_path / "twice.csv"), progress=False)
    extra = pd.concat([frame, pd.DataFrame([("kidney_6_0004", "1 0"), ("kidney_5_12", "1 0")], columns=["id", "rle"])])
    with pytest.raises(ValueError, match="extra.csv: 2 ids are not in the solution, e.g. \\['kidney_5_12', 'kidney_6_0004'\\]"):
        score_submission(solution, _rewrite(extra, tmp_path / "extra.csv"), progress=False)


def test_submission_missing_rows_or_volumes_raise(tmp_path):
    solution, _, _, frame = _two_volume_files(tmp_path)
    partial = frame[frame["id"] != "kidney_5_0010"]
    with pytest.raises(ValueError, match="partial.csv: 1 solution ids are missing, e.g. \\['kidney_5_0010'\\]$"):
        score_submission(solution, _rewrite(partial, tmp_path / "partial.csv"), progress=False)
    one_volume = frame[frame["id"].str.startswith("kidney_5_")]
    with pytest.raises(ValueError, match="one.csv: 4 solution ids are missing, .*; volumes without any row: \\['kidney_6'\\]"):
        score_submission(solution, _rewrite(one_volume, tmp_path / "one.csv"), progress=False)


def test_submission_volume_absent_from_the_solution_is_ignored_with_a_warning(tmp_path):
    solution, submission, _, frame = _two_volume_files(tmp_path)
    expected = score_submission(solution, submission, progress=False)
    more = pd.concat([frame, pd.DataFrame([("kidney_9_0000", "1 3"), ("kidney_9_0001", "1 0")], columns=["id", "rle"])])
    with pytest.warns(UserWarning, match="more.csv: volumes \\['kidney_9'\\] are not in the solution; their rows are ignored"):
        scores = score_submission(solution, _rewrite(more, tmp_path / "more.csv"), progress=False)
    assert scores == expected
