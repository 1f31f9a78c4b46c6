"""The OME-Zarr output store: create, reopen to resume, refuse a mismatch, chunk-aligned blocks,
done markers, the pyramid's values and its OME-NGFF metadata (v0.4 and v0.5)."""

from __future__ import annotations

import json
from itertools import product

import numpy as np
import pytest

zarr = pytest.importorskip("zarr", minversion="3")

from vessel_kit.ome_zarr import open_volume  # noqa: E402
from vessel_kit.ome_zarr_out import OutputStore, create_output  # noqa: E402

SHAPE, CHUNKS = (21, 34, 17), (8, 8, 8)


def _blocks(shape=SHAPE, side=16):
    """Chunk-aligned blocks of ``side`` (two chunks) covering ``shape``, with their grid indices."""
    for index in product(*(range(-(-n // side)) for n in shape)):
        yield index, tuple(slice(i * side, min((i + 1) * side, n)) for i, n in zip(index, shape))


def _filled(tmp_path, *, logits=True, version="0.4"):
    rng = np.random.default_rng(0)
    mask = rng.random(SHAPE) > 0.8
    logit = rng.normal(0, 4, SHAPE).astype(np.float16)
    store = create_output(tmp_path / "out.zarr", SHAPE, voxel_size_um=2.5, chunks=CHUNKS, logits=logits, ome_version=version)
    for index, region in _blocks():
        store.write_block(region, mask[region], logit[region] if logits else None)
        store.mark_done(index)
    return store, mask, logit


def test_blocks_written_and_marked_done_survive_a_reopen(tmp_path):
    store, mask, logit = _filled(tmp_path)
    assert store.done_blocks() == {index for index, _ in _blocks()} and len(store.done_blocks()) == 12
    again = create_output(tmp_path / "out.zarr", SHAPE, voxel_size_um=2.5, chunks=CHUNKS, logits=True)
    assert again.done_blocks() == store.done_blocks()
    np.testing.assert_array_equal(again.mask[...], mask.astype(np.uint8))
    np.testing.assert_array_equal(OutputStore(tmp_path / "out.zarr").logits[...], logit)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "out.zarr" / ".vessel_kit" / "done").iterdir())


def test_only_marked_blocks_count_as_done(tmp_path):
    store = create_output(tmp_path / "out.zarr", SHAPE, voxel_size_um=2.5, chunks=CHUNKS)
    (first, region), (second, other) = list(_blocks())[:2]
    store.write_block(region, np.ones(np.shape(np.empty(SHAPE)[region]), bool))
    store.mark_done(first)
    store.write_block(other, np.ones(np.shape(np.empty(SHAPE)[other]), bool))  # written, then "killed" before marking
    assert OutputStore(tmp_path / "out.zarr").done_blocks() == {first}
    with pytest.raises(ValueError, match=r"a block id is a tuple of non-negative ints \(its grid index\), got \(0, -1, 0\)"):
        store.mark_done((0, -1, 0))


@pytest.mark.parametrize(("change", "message"), [
    ({"shape": (21, 34, 18)}, r"shape \[21, 34, 17\] \(asked \[21, 34, 18\]\)"),
    ({"voxel_size_um": 5.0}, r"voxel_size_um 2.5 \(asked 5.0\)"),
    ({"chunks": (16, 16, 16)}, r"chunks \[8, 8, 8\] \(asked \[16, 16, 16\]\)"),
    ({"logits": False}, r"logits True \(asked False\)"),
])
def test_a_store_with_other_settings_is_refused_unless_overwritten(tmp_path, change, message):
    store, _, _ = _filled(tmp_path)
    settings = {"shape": SHAPE, "voxel_size_um": 2.5, "chunks": CHUNKS, "logits": True, **change}
    shape = settings.pop("shape")
    with pytest.raises(ValueError, match=rf"output store .*out.zarr exists with other settings: {message}; pass overwrite=True"):
        create_output(store.path, shape, **settings)
    fresh = create_output(store.path, shape, overwrite=True, **settings)
    assert fresh.done_blocks() == set() and not fresh.mask[...].any() and fresh.shape == tuple(shape)


def test_a_path_that_is_not_a_zarr_store_is_never_replaced(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    for path in (tmp_path / "notes", tmp_path / "notes" / "keep.txt"):
        with pytest.raises(ValueError, match=rf"{path.name} exists and is not a zarr store: choose another output path"):
            create_output(path, SHAPE, voxel_size_um=2.5, overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    other = tmp_path / "input.zarr"
    zarr.create_array(str(other), data=np.ones((4, 4, 4), np.uint16))
    for make in (lambda: create_output(other, SHAPE, voxel_size_um=2.5, overwrite=True), lambda: OutputStore(other)):
        with pytest.raises(ValueError, match=r"input.zarr is a zarr store but not an output store of vessel_kit"):
            make()
    assert zarr.open_array(str(other), mode="r")[...].sum() == 64
    (tmp_path / "empty").mkdir()
    assert create_output(tmp_path / "empty", SHAPE, voxel_size_um=2.5).done_blocks() == set()


def test_write_block_checks_alignment_shapes_and_logits(tmp_path):
    store = create_output(tmp_path / "out.zarr", SHAPE, voxel_size_um=2.5, chunks=CHUNKS, logits=True)
    ones = lambda *shape: np.ones(shape, np.float16)  # noqa: E731
    store.write_block((slice(16, 21), slice(32, 34), slice(8, 17)), ones(5, 2, 9), ones(5, 2, 9))  # ends at the edge
    with pytest.raises(ValueError, match=r"block \[4:12, 0:8, 0:8\] is not aligned to the chunks \(8, 8, 8\)"):
        store.write_block((slice(4, 12), slice(0, 8), slice(0, 8)), ones(8, 8, 8), ones(8, 8, 8))
    with pytest.raises(ValueError, match=r"block \[0:8, 0:12, 0:8\] is not aligned"):
        store.write_block((slice(0, 8), slice(0, 12), slice(0, 8)), ones(8, 12, 8), ones(8, 12, 8))
    with pytest.raises(ValueError, match=r"mask of shape \(8, 8, 7\) for block \[0:8, 0:8, 0:8\] of shape \(8, 8, 8\)"):
        store.write_block((slice(0, 8), slice(0, 8), slice(0, 8)), ones(8, 8, 7), ones(8, 8, 8))
    with pytest.raises(ValueError, match="the store has logits; write_block got none"):
        store.write_block((slice(0, 8), slice(0, 8), slice(0, 8)), ones(8, 8, 8))
    with pytest.raises(ValueError, match=r"axis 0 needs 0 <= start < stop <= 21"):
        store.write_block((slice(16, 24), slice(0, 8), slice(0, 8)), ones(8, 8, 8), ones(8, 8, 8))


def _reduce_pairs(level: np.ndarray, ufunc) -> np.ndarray:
    """2x2x2 reduction by ``ufunc.reduceat`` (a lone last voxel is its own group)."""
    for axis in range(3):
        level = ufunc.reduceat(level, np.arange(0, level.shape[axis], 2), axis=axis)
    return level


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_the_pyramid_is_max_of_the_mask_and_mean_of_the_logits(tmp_path, version):
    store, mask, logit = _filled(tmp_path, version=version)
    assert store.build_pyramid(progress=False) == 3  # (21, 34, 17) -> (11, 17, 9) -> (6, 9, 5) -> (3, 5, 3): fits a chunk
    previous_mask, previous_logit = mask.astype(np.uint8), logit
    for k, shape in enumerate([(11, 17, 9), (6, 9, 5), (3, 5, 3)], start=1):
        level_mask, level_logit = store.level(k)[...], store.level(k, "logits")[...]
        assert level_mask.shape == level_logit.shape == shape
        np.testing.assert_array_equal(level_mask, _reduce_pairs(previous_mask, np.maximum))
        counts = _reduce_pairs(np.ones(previous_logit.shape, np.float32), np.add)
        expected = _reduce_pairs(previous_logit.astype(np.float32), np.add) / counts
        np.testing.assert_allclose(level_logit.astype(np.float32), expected, rtol=2e-3, atol=1e-3)
        previous_mask, previous_logit = level_mask, level_logit
    source = open_volume(store.path / "mask", model_voxel_size_um=10.0)
    assert source.level_voxel_sizes_um == [2.5, 5.0, 10.0, 20.0] and source.level == 2
    np.testing.assert_array_equal(source.read((slice(None),) * 3), store.level(2)[...])


def _check_multiscales(entry: dict, voxel: float, levels: int) -> None:
    """The OME-NGFF rules for one multiscales entry (spec 0.4/0.5, "multiscales metadata")."""
    assert [a["name"] for a in entry["axes"]] == ["z", "y", "x"]
    assert all(a["type"] == "space" and a["unit"] == "micrometer" for a in entry["axes"])
    assert [d["path"] for d in entry["datasets"]] == [str(k) for k in range(levels)]
    for k, dataset in enumerate(entry["datasets"]):
        transforms = dataset["coordinateTransformations"]
        assert transforms[0] == {"type": "scale", "scale": [voxel * 2**k] * 3}  # exactly one scale, first
        assert len(transforms) == (2 if k else 1)
        if k:
            assert transforms[1] == {"type": "translation", "translation": [voxel * (2**k - 1) / 2] * 3}


def test_v04_metadata_follows_the_spec(tmp_path):
    store, _, _ = _filled(tmp_path, version="0.4")
    store.build_pyramid(levels=2, progress=False)
    root = tmp_path / "out.zarr"
    assert json.loads((root / ".zgroup").read_text()) == {"zarr_format": 2}
    for image in ("mask", "logits"):
        (entry,) = json.loads((root / image / ".zattrs").read_text())["multiscales"]
        assert entry["version"] == "0.4" and entry["name"] == image
        _check_multiscales(entry, 2.5, 3)
        array = json.loads((root / image / "2" / ".zarray").read_text())
        assert array["dimension_separator"] == "/" and array["compressor"]["cname"] == "zstd"
    assert (root / "mask" / "0" / "0" / "0" / "0").is_file()  # nested chunk keys, as the spec's examples


def test_v05_metadata_follows_the_spec(tmp_path):
    store, _, _ = _filled(tmp_path, version="0.5", logits=False)
    store.build_pyramid(levels=1, progress=False)
    root = tmp_path / "out.zarr"
    group = json.loads((root / "mask" / "zarr.json").read_text())
    assert group["zarr_format"] == 3 and group["node_type"] == "group"
    ome = group["attributes"]["ome"]
    assert ome["version"] == "0.5" and "version" not in ome["multiscales"][0]
    _check_multiscales(ome["multiscales"][0], 2.5, 2)
    array = json.loads((root / "mask" / "1" / "zarr.json").read_text())
    assert array["dimension_names"] == ["z", "y", "x"] and array["data_type"] == "uint8"
    assert not (root / "logits").exists()


def test_an_unknown_voxel_size_writes_no_unit(tmp_path):
    store = create_output(tmp_path / "out.zarr", (4, 4, 4), voxel_size_um=None, chunks=(2, 2, 2))
    store.write_block((slice(None),) * 3, np.ones((4, 4, 4), bool))
    store.build_pyramid(progress=False)
    source = open_volume(tmp_path / "out.zarr" / "mask")
    assert source.voxel_size_um is None and source.level_voxel_sizes_um == [None, None]
