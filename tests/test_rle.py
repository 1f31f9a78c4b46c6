"""RLE encode/decode in the competition convention, submission writing and validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vessel_kit.rle import (
    EMPTY_RLE,
    SubmissionWriter,
    parse_rle,
    read_submission,
    rle_decode,
    rle_encode,
    validate_submission,
    volume_of,
    write_submission,
)


def reference_encode(mask: np.ndarray) -> str:
    """The encoder published with the competition (pixel loop over the row-major flattening)."""
    pixels = mask.flatten()
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    rle = " ".join(str(x) for x in runs)
    return rle if rle else EMPTY_RLE


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (13, 17), (64, 33), (128, 128)])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 1.0])
def test_round_trip_and_reference_encoding(shape, density):
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    mask = rng.random(shape) < density
    rle = rle_encode(mask)
    assert rle == reference_encode(mask.astype(np.uint8))
    np.testing.assert_array_equal(rle_decode(rle, shape), mask)


def test_known_encodings():
    mask = np.array([[0, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=np.uint8)
    # Row-major flattening: 0 1 1 0 0 1 1 0 0 -> runs at 2 (len 2) and 6 (len 2), 1-indexed.
    assert rle_encode(mask) == "2 2 6 2"
    assert rle_encode(np.zeros((4, 5), bool)) == "1 0"
    assert rle_encode(np.ones((4, 5), bool)) == "1 20"
    single = np.zeros((3, 4), bool)
    single[2, 3] = True
    assert rle_encode(single) == "12 1"
    assert rle_encode(np.array([[0, 255]], dtype=np.uint8)) == "2 1"  # nonzero is foreground


def test_decode_empty_and_touching_runs():
    assert not rle_decode("1 0", (3, 3)).any()
    touching = rle_decode("1 2 3 2", (1, 5))  # runs meet end to start: decodable, not overlapping
    np.testing.assert_array_equal(touching, [[1, 1, 1, 1, 0]])


@pytest.mark.parametrize(
    "rle, message",
    [
        ("", "empty RLE"),
        ("   ", "empty RLE"),
        ("1 2 3", "odd number"),
        ("1 x", "not a non-negative integer"),
        ("1 -2", "'-2' is not a non-negative integer"),
        ("-1 2", "'-1' is not a non-negative integer"),
        ("1.5 2", "not a non-negative integer"),
        ("1 \u0663", "'\u0663' is not a non-negative integer in ASCII digits"),  # Arabic-Indic 3: int() takes it
        ("\uff11 2", "not a non-negative integer in ASCII digits"),  # fullwidth 1
        ("1 \u00b2", "not a non-negative integer in ASCII digits"),  # superscript 2: isdigit() is True
        ("1 99999999999999999999999", "too large \\(over 18 digits\\)"),  # was an OverflowError
        ("9223372036854775807 1", "too large"),  # int64 max: start + length would overflow
        ("0 3", "1-indexed"),
        ("2 0", "zero-length"),
        ("1 0 5 2", "zero-length"),  # the empty mask "1 0" only stands alone
        ("1 0 1 0", "zero-length"),
        ("5 3 6 2", "overlap"),
        ("10 2 1 2", "overlap or are not in increasing order"),
    ],
)
def test_malformed_rles_raise(rle, message):
    with pytest.raises(ValueError, match=message):
        rle_decode(rle, (10, 10))


def test_largest_valid_values_parse():
    starts, lengths = parse_rle("999999999999999999 1")  # 18 digits: the most an RLE value may have
    assert starts.tolist() == [999999999999999998] and lengths.tolist() == [1]
    assert parse_rle("0001 02")[1].tolist() == [2]  # leading zeros are still ASCII integers


@pytest.mark.parametrize("shape", [(0, 3), (3, -1), (2.0, 3), (2.5, 3), (True, 3), ("2", "3"), (2, 3, 1), 6])
def test_bad_slice_shapes_raise(shape):
    with pytest.raises(ValueError, match="slice shape must be two positive integers"):
        rle_decode("1 1", shape)
    with pytest.raises(ValueError, match="slice shape must be two positive integers"):
        parse_rle("1 1", shape)
    with pytest.raises(ValueError, match="slice shape must be two positive integers"):
        rle_decode("1 1", None)  # parse_rle's shape is optional; rle_decode's is not


def test_out_of_bounds_and_bad_shape_raise():
    with pytest.raises(ValueError, match="beyond the 3x3=9 pixels"):
        rle_decode("8 3", (3, 3))
    with pytest.raises(ValueError, match="beyond the 3x3=9 pixels"):
        parse_rle("8 3", (3, 3))  # the same check without decoding, as validate_submission uses it
    assert parse_rle("7 3", (3, 3))[1].tolist() == [3]
    assert rle_decode("1 2", (np.int64(1), np.int32(2))).all()  # numpy integers are integers
    with pytest.raises(ValueError, match="must be a string"):
        parse_rle(float("nan"))
    with pytest.raises(ValueError, match="2D mask"):
        rle_encode(np.zeros((2, 2, 2)))


def test_write_submission_streams_in_slice_order(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.random((4, 6, 5)) < 0.3
    path = tmp_path / "submission.csv"
    masks = (m for m in volume)  # a generator: nothing holds the volume twice
    write_submission({"kidney_5": (["0000", "0001", "0002", "0003"], masks), "kidney_6": (["00000"], volume[:1])}, path)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(frame.columns) == ["id", "rle"]
    assert frame["id"].tolist() == ["kidney_5_0000", "kidney_5_0001", "kidney_5_0002", "kidney_5_0003", "kidney_6_00000"]
    for row, mask in zip(frame["rle"], [*volume, volume[0]], strict=True):
        np.testing.assert_array_equal(rle_decode(row, (6, 5)), mask)
    assert not list(tmp_path.glob("*.tmp"))


def test_interrupted_write_leaves_no_file(tmp_path):
    path = tmp_path / "submission.csv"
    with pytest.raises(RuntimeError, match="boom"):
        with SubmissionWriter(path) as writer:
            writer.add_slice("kidney_5_0000", np.zeros((2, 2)))
            raise RuntimeError("boom")
    assert not path.exists()
    assert not list(tmp_path.iterdir())


def test_writer_rejects_duplicates_and_count_mismatch(tmp_path):
    with pytest.raises(ValueError, match="duplicate submission id 'a_0'"):
        with SubmissionWriter(tmp_path / "s.csv") as writer:
            writer.add_slice("a_0", np.zeros((2, 2)))
            writer.add_slice("a_0", np.zeros((2, 2)))
    for broken in ("a\r_0", "a\n_0"):  # a lone "\r" was written unquoted and read back as two rows
        with pytest.raises(ValueError, match="contains a line break"):
            with SubmissionWriter(tmp_path / "s.csv") as writer:
                writer.add_slice(broken, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="3 slice stems but 2 masks"):
        write_submission({"a": (["0", "1", "2"], np.zeros((2, 2, 2)))}, tmp_path / "s.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_submission({"a": (["0"], np.zeros((1, 2, 2)))}, tmp_path / "missing" / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def _write_csv(path, rows):
    pd.DataFrame(rows, columns=["id", "rle"]).to_csv(path, index=False)
    return path


def test_validate_submission(tmp_path):
    sample = _write_csv(tmp_path / "sample.csv", [("kidney_5_0000", "1 0"), ("kidney_5_0001", "1 0")])
    good = _write_csv(tmp_path / "good.csv", [("kidney_5_0001", "3 2"), ("kidney_5_0000", "1 0")])
    validate_submission(good, sample)
    validate_submission(good, sample, shapes={"kidney_5": (2, 3)})

    with pytest.raises(ValueError, match="beyond"):
        validate_submission(good, sample, shapes={"kidney_5": (1, 3)})
    missing = _write_csv(tmp_path / "missing.csv", [("kidney_5_0000", "1 0")])
    with pytest.raises(ValueError, match="1 ids of the sample submission are missing, e.g. 'kidney_5_0001'"):
        validate_submission(missing, sample)
    extra = _write_csv(tmp_path / "extra.csv", [("kidney_5_0000", "1 0"), ("kidney_5_0001", "1 0"), ("kidney_9_0000", "1 0")])
    with pytest.raises(ValueError, match="not in the sample submission, e.g. 'kidney_9_0000'"):
        validate_submission(extra, sample)
    empty_rle = _write_csv(tmp_path / "empty.csv", [("kidney_5_0000", ""), ("kidney_5_0001", "1 0")])
    with pytest.raises(ValueError, match="kidney_5_0000: empty RLE"):
        validate_submission(empty_rle, sample)
    duplicated = _write_csv(tmp_path / "dup.csv", [("kidney_5_0000", "1 0"), ("kidney_5_0000", "1 0"), ("kidney_5_0001", "1 0")])
    with pytest.raises(ValueError, match="duplicated ids"):
        validate_submission(duplicated, sample)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        validate_submission(tmp_path / "nope.csv", sample)


def test_validate_names_the_id_of_an_invalid_value(tmp_path):
    sample = _write_csv(tmp_path / "sample.csv", [("kidney_5_0000", "1 0"), ("kidney_5_0001", "1 0")])
    for rle, message in [("1 99999999999999999999999", "too large"), ("1 \u0663", "ASCII digits"), ("3 0", "zero-length")]:
        bad = _write_csv(tmp_path / "bad.csv", [("kidney_5_0000", "1 0"), ("kidney_5_0001", rle)])
        with pytest.raises(ValueError, match=f"bad.csv: .*kidney_5_0001: RLE .*{message}"):
            validate_submission(bad, sample)


def test_validate_checks_run_ends_only_where_the_slice_size_is_known(tmp_path):
    ids = ["kidney_1_0000", "kidney_1_dense_0000"]
    sample = _write_csv(tmp_path / "sample.csv", [(i, "1 0") for i in ids])
    long_runs = _write_csv(tmp_path / "long.csv", [(i, "1 7") for i in ids])  # 7 pixels
    validate_submission(long_runs, sample)  # no sizes: well-formed is all that can be checked
    validate_submission(long_runs, sample, shapes={"kidney_1_dense": (2, 4)})
    # kidney_1_dense_0000 is a slice of kidney_1_dense, not of kidney_1: only kidney_1's runs are too long.
    with pytest.raises(ValueError, match="1 invalid RLEs, e.g. kidney_1_0000: RLE run ends at pixel 7, beyond the 2x3=6"):
        validate_submission(long_runs, sample, shapes={"kidney_1": (2, 3), "kidney_1_dense": (2, 4)})
    with pytest.raises(ValueError, match="shapes\\['kidney_1'\\] must be two positive integers \\(height, width\\), got \\(2.5, 3\\)"):
        validate_submission(long_runs, sample, shapes={"kidney_1": (2.5, 3)})


def test_volume_of_takes_the_longest_matching_name():
    volumes = ["kidney_1", "kidney_1_dense", "kidney_5"]
    assert volume_of("kidney_1_dense_0001", volumes) == "kidney_1_dense"
    assert volume_of("kidney_1_0001", volumes) == "kidney_1"
    assert volume_of("kidney_50_0001", volumes) is None  # a name must be followed by "_"
    assert volume_of("kidney_9_0001", volumes) is None


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty; expected the columns id,rle"),
        (b"\n\n", "is empty; expected the columns id,rle"),
        (b"id,mask\nkidney_5_0000,1 0\n", "header 'id,mask' lacks rle; expected the columns id,rle"),
        (b"kidney_5_0000,1 0\n", "lacks id,rle; expected the columns id,rle"),  # no header line
        (b"id,rle\nkidney_5_0000,1 0,extra\n", "is not a readable CSV: Length of header"),  # was read as index,id,rle
        (b"id,rle\nkidney_5_0000,1 0\nkidney_5_0001,1 0,x,y\n", "is not a readable CSV: .*Expected 2 fields in line 3"),
        (b"id,rle\nkidney_5_0000,1 \xff\n", "is not a readable CSV"),  # not UTF-8
    ],
)
def test_unreadable_csvs_name_the_file(tmp_path, content, message):
    sample = _write_csv(tmp_path / "sample.csv", [("kidney_5_0000", "1 0")])
    (tmp_path / "broken.csv").write_bytes(content)
    with pytest.raises(ValueError, match=f"submission file .*broken.csv:? .*{message}"):
        validate_submission(tmp_path / "broken.csv", sample)
    with pytest.raises(ValueError, match=f"sample submission file .*broken.csv:? .*{message}"):
        validate_submission(sample, tmp_path / "broken.csv")


def test_read_submission_columns_may_come_in_any_order(tmp_path):
    (tmp_path / "s.csv").write_text("rle,id,width\n1 0,kidney_5_0000,3\n")
    frame = read_submission(tmp_path / "s.csv")
    assert frame.loc[0, "id"] == "kidney_5_0000" and frame.loc[0, "rle"] == "1 0"
