"""read_volume / read_labels / write_volume on real and synthetic TIFF stacks, and their errors."""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from vessel_kit.volume import read_labels, read_slice_header, read_volume, slice_files, slice_ids, write_volume


def _set_tags(path: Path, **values: int) -> None:
    """Overwrite single-value SHORT/LONG tags of a little-endian TIFF's first page in place."""
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        for name, value in values.items():
            tag = tags[name]
            struct.pack_into("<I" if tag.dtype == 4 else "<H", data, tag.valueoffset, value)
    path.write_bytes(bytes(data))


def test_real_placeholder_equals_tifffile(real_data):
    folder = real_data / "kidney_test_placeholder"
    volume = read_volume(folder, progress=False)
    expected = np.stack([tifffile.imread(p) for p in sorted(folder.glob("*.tif"))])
    assert volume.dtype == np.uint16 and volume.shape == (3, 1303, 912)
    np.testing.assert_array_equal(volume, expected)


def test_real_labels_are_bool(real_data):
    folder = real_data / "kidney_3_dense_labels"
    labels = read_labels(folder, progress=False)
    raw = np.stack([tifffile.imread(p) for p in sorted(folder.glob("*.tif"))])
    assert labels.dtype == np.bool_ and labels.shape == (15, 1706, 1510)
    np.testing.assert_array_equal(labels, raw == 255)
    assert slice_ids(folder)[0] == "0496"


def test_write_read_round_trip_slices_and_out(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.integers(18000, 37000, size=(7, 33, 21), dtype=np.uint16)
    write_volume(volume, tmp_path)
    np.testing.assert_array_equal(read_volume(tmp_path, progress=False), volume)
    np.testing.assert_array_equal(read_volume(tmp_path, slices=slice(2, 5), progress=False), volume[2:5])
    np.testing.assert_array_equal(read_volume(tmp_path, slices=[6, 0], progress=False), volume[[6, 0]])
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.uint16, shape=volume.shape)
    assert read_volume(tmp_path, out=out, workers=3, progress=False) is out
    np.testing.assert_array_equal(out, volume)
    assert not list(tmp_path.glob("*.tmp"))


def test_natural_order_and_five_digit_stems(tmp_path):
    volume = np.arange(12, dtype=np.uint16).reshape(12, 1, 1).repeat(4, 1).repeat(4, 2)
    stems = [str(i) for i in range(12)]  # "10" must come after "9", not after "1"
    write_volume(volume, tmp_path, stems=stems)
    assert slice_ids(tmp_path) == stems
    np.testing.assert_array_equal(read_volume(tmp_path, progress=False)[:, 0, 0], np.arange(12))
    five = tmp_path / "five"
    write_volume(volume[:3], five, stems=["00000", "00001", "00002"])
    assert slice_ids(five) == ["00000", "00001", "00002"]


def test_other_tiff_encodings_go_through_tifffile(tmp_path):
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 65535, size=(3, 40, 30), dtype=np.uint16)
    for z, image in enumerate(volume):
        options = [{"compression": "zlib"}, {"byteorder": ">"}, {"tile": (16, 16)}][z]
        tifffile.imwrite(tmp_path / f"{z:04d}.tif", image, **options)
    np.testing.assert_array_equal(read_volume(tmp_path, progress=False), volume)


def test_bool_volume_writes_label_convention(tmp_path):
    labels = np.zeros((2, 5, 6), bool)
    labels[1, 2:4, 1:3] = True
    write_volume(labels, tmp_path)
    assert set(np.unique(tifffile.imread(tmp_path / "0001.tif"))) == {0, 255}
    np.testing.assert_array_equal(read_labels(tmp_path, progress=False), labels)


# -- bad input ----------------------------------------------------------------------------------


def test_missing_folder_and_no_tiffs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        read_volume(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=f"no .tif/.tiff files in {tmp_path}"):
        read_volume(tmp_path)
    with pytest.raises(FileNotFoundError, match="1 slice files do not exist"):
        read_volume([tmp_path / "0000.tif"])
    with pytest.raises(ValueError, match=f"{tmp_path} is a folder, not a slice file"):
        read_volume([tmp_path])
    (tmp_path / "0000.tif").symlink_to(tmp_path / "0000.tif")
    with pytest.raises(ValueError, match="0000.tif is a symbolic link loop"):
        read_volume([tmp_path / "0000.tif"])


def test_mixed_shapes_name_the_file(tmp_path):
    write_volume(np.zeros((2, 8, 8), np.uint16), tmp_path)
    write_volume(np.zeros((1, 8, 9), np.uint16), tmp_path, stems=["0002"])
    with pytest.raises(ValueError, match="0002.tif: slice is \\(8, 9\\) uint16, but the volume's slices are \\(8, 8\\)"):
        read_volume(tmp_path, progress=False)


def test_wrong_dtype(tmp_path):
    write_volume(np.zeros((2, 4, 4), np.float32), tmp_path)
    with pytest.raises(ValueError, match="0000.tif: slices are float32, expected uint16"):
        read_volume(tmp_path)
    assert read_volume(tmp_path, dtype=None, progress=False).dtype == np.float32
    mixed = tmp_path / "mixed"
    write_volume(np.zeros((1, 4, 4), np.uint16), mixed)
    write_volume(np.zeros((1, 4, 4), np.uint8), mixed, stems=["0001"])
    with pytest.raises(ValueError, match="0001.tif: slice is \\(4, 4\\) uint8.*mixed slice shapes or dtypes"):
        read_volume(mixed, dtype=None, progress=False)
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    tifffile.imwrite(rgb / "0000.tif", np.zeros((4, 4, 3), np.uint16))
    with pytest.raises(ValueError, match="expected a 2D grayscale slice, got shape \\(4, 4, 3\\)"):
        read_volume(rgb)


def test_unreadable_and_truncated_files(tmp_path):
    write_volume(np.ones((2, 64, 64), np.uint16), tmp_path)
    (tmp_path / "0002.tif").write_bytes(b"this is not a tiff")
    with pytest.raises(ValueError, match="cannot read TIFF .*0002.tif"):
        read_volume(tmp_path, progress=False)
    (tmp_path / "0002.tif").unlink()
    data = (tmp_path / "0001.tif").read_bytes()
    (tmp_path / "0001.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="0001.tif: header places pixel data up to byte 8448, but the file has 4224 bytes"):
        read_volume(tmp_path, progress=False)


def _header_only(path: Path) -> None:
    path.write_bytes(b"II*\x00\x08\x00\x00\x00")  # a valid TIFF header and nothing after it


def _garbage_after_header(path: Path) -> None:
    tifffile.imwrite(path, np.ones((16, 16), np.uint16))
    data = bytearray(path.read_bytes())
    data[8:40] = np.random.default_rng(0).integers(0, 256, 32, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _zlib_body_garbage(path: Path) -> None:
    tifffile.imwrite(path, np.ones((16, 16), np.uint16), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\x00" * count
    path.write_bytes(bytes(data))


def _strip_past_the_end(path: Path) -> None:
    tifffile.imwrite(path, np.ones((16, 16), np.uint16), compression="zlib")
    _set_tags(path, StripOffsets=10**6)


@pytest.mark.parametrize(
    ("corrupt", "problem", "in_header"),
    [
        (_header_only, "the TIFF holds no image", True),
        (_garbage_after_header, "cannot read TIFF", True),
        (_zlib_body_garbage, "cannot read TIFF", False),
        (_strip_past_the_end, "header places pixel data up to byte 1000", True),
    ],
)
def test_corrupt_tiff_is_a_value_error_naming_the_file(tmp_path, corrupt, problem, in_header):
    write_volume(np.ones((1, 16, 16), np.uint16), tmp_path)
    path = tmp_path / "0001.tif"
    corrupt(path)
    with pytest.raises(ValueError, match=f"{path}.*{problem}|{problem}.*{path}"):
        read_volume(tmp_path, progress=False)
    if in_header:
        with pytest.raises(ValueError, match=f"{path}.*{problem}|{problem}.*{path}"):
            read_slice_header(path)


def test_header_declaring_more_pixels_than_the_file_fails_before_allocating(tmp_path):
    write_volume(np.ones((8, 64, 64), np.uint16), tmp_path)
    _set_tags(tmp_path / "0000.tif", ImageWidth=10**6, ImageLength=10**6, RowsPerStrip=10**6)
    # The old reader sized an 8 x 10^6 x 10^6 volume (14.6 TiB) from this header first.
    with pytest.raises(ValueError, match="0000.tif: header declares a \\(1000000, 1000000\\) uint16 image .* strips hold 8192 bytes"):
        read_volume(tmp_path, progress=False)


@pytest.mark.parametrize(
    ("image", "options"),
    [
        (np.zeros((4, 4, 3), np.uint8), {"photometric": "rgb"}),
        (np.zeros((3, 4, 4), np.uint16), {"photometric": "rgb", "planarconfig": "separate"}),
        (np.zeros((4, 4, 2), np.uint16), {"photometric": "minisblack", "planarconfig": "contig", "extrasamples": [0]}),
    ],
)
def test_multi_sample_slice_header(tmp_path, image, options):
    tifffile.imwrite(tmp_path / "0000.tif", image, **options)
    with pytest.raises(ValueError, match="0000.tif: expected a 2D grayscale slice, got shape"):
        read_slice_header(tmp_path / "0000.tif")


def test_several_images_in_one_slice_file(tmp_path):
    for _ in range(2):
        tifffile.imwrite(tmp_path / "0000.tif", np.zeros((4, 4), np.uint16), append=True)
    with pytest.raises(ValueError, match="0000.tif: the TIFF holds 2 images; expected one 2D slice per file"):
        read_volume(tmp_path, progress=False)


def test_unreadable_folder_is_named(tmp_path, monkeypatch):
    write_volume(np.zeros((2, 4, 4), np.uint16), tmp_path)
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == tmp_path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(ValueError, match=f"cannot list slice folder {tmp_path}: Permission denied"):
        read_volume(tmp_path)


@pytest.mark.parametrize(
    ("make_link", "problem"),
    [
        (lambda link: link.symlink_to(link.parent / "gone.tif"), "is a dangling symbolic link \\(its target .*gone.tif does not exist"),
        (lambda link: link.symlink_to(link), "is a symbolic link loop"),
    ],
)
def test_broken_slice_link_is_named(tmp_path, make_link, problem):
    write_volume(np.zeros((2, 4, 4), np.uint16), tmp_path)
    make_link(tmp_path / "0002.tif")
    with pytest.raises(ValueError, match=f"0002.tif {problem}"):
        read_volume(tmp_path, progress=False)


def test_two_files_of_one_slice(tmp_path):
    write_volume(np.zeros((2, 4, 4), np.uint16), tmp_path)
    os.link(tmp_path / "0001.tif", tmp_path / "0001.tiff")
    with pytest.raises(ValueError, match=f"{tmp_path}: 0001.tif and 0001.tiff are both slice '0001'"):
        slice_files(tmp_path)


def test_numbering_gap_warns_with_the_missing_numbers(tmp_path):
    write_volume(np.zeros((5, 4, 4), np.uint16), tmp_path, stems=["0000", "0001", "0003", "0007", "0008"])
    with pytest.warns(UserWarning, match=f"{tmp_path}: slice numbers skip 0002, 0004-0006 \\(4 missing\\)"):
        assert read_volume(tmp_path, progress=False).shape == (5, 4, 4)
    write_volume(np.zeros((2, 4, 4), np.uint16), tmp_path / "no_gap", stems=["0496", "0497"])
    write_volume(np.zeros((2, 4, 4), np.uint16), tmp_path / "not_numbers", stems=["a1", "a3"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slice_files(tmp_path / "no_gap")
        slice_files(tmp_path / "not_numbers")


def test_bad_selection_and_out(tmp_path):
    write_volume(np.zeros((3, 4, 4), np.uint16), tmp_path)
    with pytest.raises(ValueError, match="slice indices \\[3\\] out of range for 3 slices"):
        read_volume(tmp_path, slices=[0, 3])
    with pytest.raises(ValueError, match="selects none"):
        read_volume(tmp_path, slices=slice(5, 9))
    with pytest.raises(ValueError, match="out has shape \\(3, 4, 5\\) uint16, need \\(3, 4, 4\\) uint16"):
        read_volume(tmp_path, out=np.zeros((3, 4, 5), np.uint16))


def test_labels_reject_images_and_odd_values(tmp_path):
    write_volume(np.zeros((1, 4, 4), np.uint16), tmp_path / "images")
    with pytest.raises(ValueError, match="slices are uint16, expected uint8"):
        read_labels(tmp_path / "images")
    odd = np.zeros((2, 4, 4), np.uint8)
    odd[1, 0, 0] = 7
    write_volume(odd, tmp_path / "odd")
    with pytest.raises(ValueError, match="0001.tif: label values must be in \\(0, 1, 255\\), found \\[0, 7\\]"):
        read_labels(tmp_path / "odd", progress=False)


def test_write_volume_errors(tmp_path):
    with pytest.raises(ValueError, match="expects a \\(Z, Y, X\\) array"):
        write_volume(np.zeros((4, 4)), tmp_path)
    with pytest.raises(ValueError, match="1 stems for 2 slices"):
        write_volume(np.zeros((2, 4, 4)), tmp_path, stems=["a"])


def test_slice_files_ignores_other_files(tmp_path):
    write_volume(np.zeros((2, 4, 4), np.uint16), tmp_path)
    (tmp_path / "readme.md").write_text("x")
    (tmp_path / "sub.tif").mkdir()
    assert [p.name for p in slice_files(tmp_path)] == ["0000.tif", "0001.tif"]
