"""open_volume: OME-Zarr v0.4/v0.5, N5, plain zarr, TIFF folders and array-likes as lazy sources.

The stores are written here the way the Human Organ Atlas publishes them (uint16, 3D, 2-3 levels of
2x downsampling, scales in micrometres, blosc-zstd or gzip chunks), by hand rather than through
vessel_kit's own writer, so the reader is checked against the formats, not against itself.
"""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest

zarr = pytest.importorskip("zarr", minversion="3")
from numcodecs import Blosc  # noqa: E402  (zarr's codecs)

import vessel_kit  # noqa: E402
from vessel_kit.n5 import N5Array  # noqa: E402
from vessel_kit.ome_zarr import StoreSource, is_volume_store, open_volume, require_voxel_size  # noqa: E402
from vessel_kit.sources import ArraySource, TiffStackSource, as_source  # noqa: E402
from vessel_kit.volume import write_volume  # noqa: E402

ALL = slice(None)


def _volume(shape=(24, 40, 32), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 60000, size=shape, dtype=np.uint16)


def _levels(volume: np.ndarray, count: int) -> list[np.ndarray]:
    return [volume[:: 2**k, :: 2**k, :: 2**k] for k in range(count)]


def write_ome_zarr(path: Path, volume: np.ndarray, *, version: str = "0.4", levels: int = 3, scale: float = 2.5,
                   unit: str | None = "micrometer", leading: tuple[int, ...] = (), chunks=(8, 8, 8),
                   spatial: str = "zyx") -> Path:
    """An OME-Zarr image like the Human Organ Atlas's: levels 0.. of 2x subsampling, blosc-zstd
    chunks, ``leading`` singleton-or-not t/c axes before the spatial axes, stored and named in the
    order ``spatial`` (e.g. "xyz")."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    names = ["t", "c"][2 - len(leading):] if leading else []
    axes = [{"name": n, "type": "time" if n == "t" else "channel"} for n in names]
    axes += [{"name": n, "type": "space", **({"unit": unit} if unit else {})} for n in spatial]
    datasets = []
    for k, data in enumerate(_levels(volume, levels)):
        data = data.transpose(["zyx".index(axis) for axis in spatial])
        data = np.broadcast_to(data, leading + data.shape)
        options = ({"compressors": Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE),
                    "chunk_key_encoding": {"name": "v2", "separator": "/"}} if version == "0.4" else
                   {"compressors": zarr.codecs.BloscCodec(cname="zstd", clevel=3), "dimension_names": names + list(spatial)})
        array = root.create_array(str(k), shape=data.shape, chunks=leading + chunks, dtype=data.dtype, **options)
        array[...] = data
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0] * len(leading) + [scale * 2**k] * 3}]})
    multiscale = {"axes": axes, "datasets": datasets, "name": "organ"}
    if version == "0.4":
        root.update_attributes({"multiscales": [{"version": "0.4", **multiscale}]})
    else:
        root.update_attributes({"ome": {"version": "0.5", "multiscales": [multiscale]}})
    return path


def write_n5(path: Path, volume: np.ndarray, *, levels: int = 3, resolution: float = 2.5, unit: str | None = "um",
             compression: str = "gzip", block=(8, 8, 8)) -> Path:
    """An N5 multiscale group s0, s1, ... (the N5 spec: big-endian blocks with a header, x first)."""
    path.mkdir(parents=True)
    root = {"n5": "2.3.0", "scales": [[2**k] * 3 for k in range(levels)]}
    if unit:
        root["pixelResolution"] = {"dimensions": [resolution] * 3, "unit": unit}
    (path / "attributes.json").write_text(json.dumps(root))
    codecs = {"gzip": gzip.compress, "raw": bytes, "blosc": lambda data: Blosc(cname="zstd").encode(data)}
    for k, data in enumerate(_levels(volume, levels)):
        dataset = path / f"s{k}"
        dataset.mkdir()
        attrs = {"dimensions": list(data.shape[::-1]), "blockSize": list(block[::-1]), "dataType": str(data.dtype),
                 "compression": {"type": compression}, "downsamplingFactors": [2**k] * 3}
        (dataset / "attributes.json").write_text(json.dumps(attrs))
        grid = [range(0, n, b) for n, b in zip(data.shape, block)]
        for corner in product(*grid):
            piece = data[tuple(slice(c, c + b) for c, b in zip(corner, block))]
            header = struct.pack(">HH", 0, 3) + struct.pack(">3I", *piece.shape[::-1])
            file = dataset.joinpath(*(str(c // b) for c, b in zip(corner[::-1], block[::-1])))
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(header + codecs[compression](piece.astype(">u2").tobytes()))
    return path


# -- OME-Zarr ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_levels_voxel_sizes_and_data(tmp_path, version):
    volume = _volume()
    path = write_ome_zarr(tmp_path / "organ.ome.zarr", volume, version=version)
    source = open_volume(path)
    assert isinstance(source, StoreSource) and is_volume_store(path)
    assert source.shape == (24, 40, 32) and source.dtype == np.uint16 and source.chunks == (8, 8, 8)
    assert source.voxel_size_um == 2.5 and source.level_voxel_sizes_um == [2.5, 5.0, 10.0]
    box = (slice(3, 17), slice(9, 30), slice(0, 5))
    np.testing.assert_array_equal(source.read(box), volume[box])
    coarse = open_volume(path, level=2)
    assert coarse.shape == (6, 10, 8) and coarse.voxel_size_um == 10.0
    np.testing.assert_array_equal(coarse.read((ALL, ALL, ALL)), volume[::4, ::4, ::4])


@pytest.mark.parametrize(("model_um", "level"), [(1.0, 0), (3.4, 0), (3.6, 1), (6.0, 1), (8.0, 2), (50.0, 2)])
def test_the_level_nearest_the_models_voxel_size_is_read(tmp_path, model_um, level):
    path = write_ome_zarr(tmp_path / "organ.zarr", _volume())  # levels 2.5, 5, 10 µm
    source = open_volume(path, model_voxel_size_um=model_um)
    assert source.level == level and source.voxel_size_um == 2.5 * 2**level


def test_an_explicit_level_wins_and_a_bad_one_names_the_levels(tmp_path):
    path = write_ome_zarr(tmp_path / "organ.zarr", _volume())
    assert open_volume(path, level=1, model_voxel_size_um=50.0).level == 1
    with pytest.raises(ValueError, match=r"organ.zarr has levels 0-2, got level=3"):
        open_volume(path, level=3)


@pytest.mark.parametrize(("unit", "scale"), [("millimeter", 0.0025), ("nanometer", 2500.0), ("micrometer", 2.5)])
def test_units_are_converted_to_micrometres(tmp_path, unit, scale):
    source = open_volume(write_ome_zarr(tmp_path / "u.zarr", _volume(), unit=unit, scale=scale))
    assert source.voxel_size_um == pytest.approx(2.5, rel=1e-12)
    assert source.level_voxel_sizes_um == pytest.approx([2.5, 5.0, 10.0], rel=1e-12)


def test_an_unknown_unit_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"u.zarr: unknown spatial unit 'furlong'"):
        open_volume(write_ome_zarr(tmp_path / "u.zarr", _volume(), unit="furlong"))


def test_the_argument_overrides_the_metadata_and_keeps_the_level_ratios(tmp_path):
    path = write_ome_zarr(tmp_path / "organ.zarr", _volume())
    source = open_volume(path, voxel_size_um=4.0, model_voxel_size_um=8.0)
    assert source.level == 1 and source.voxel_size_um == 8.0 and source.level_voxel_sizes_um == [4.0, 8.0, 16.0]


def test_without_units_the_kaggle_name_or_the_argument_gives_the_voxel_size(tmp_path):
    unnamed = open_volume(write_ome_zarr(tmp_path / "scan.zarr", _volume(), unit=None))
    assert unnamed.voxel_size_um is None and unnamed.level_voxel_sizes_um == [None, None, None]
    with pytest.raises(ValueError, match=r"scan.zarr.*has no voxel size.*pass --voxel-size UM"):
        require_voxel_size(unnamed)
    with pytest.raises(ValueError, match=r"scan.zarr has 3 pyramid levels but no voxel size .* pass --voxel-size UM"):
        open_volume(tmp_path / "scan.zarr", model_voxel_size_um=50.0)
    named = open_volume(write_ome_zarr(tmp_path / "kidney_6.zarr", _volume(), unit=None))
    assert named.voxel_size_um == 63.08 and named.level_voxel_sizes_um == [63.08, 126.16, 252.32]
    assert open_volume(tmp_path / "scan.zarr", voxel_size_um=7.0).voxel_size_um == 7.0


def test_anisotropic_voxels_need_the_argument(tmp_path):
    path = write_ome_zarr(tmp_path / "organ.zarr", _volume(), levels=1)
    root = zarr.open_group(str(path), mode="r+")
    attrs = root.attrs.asdict()
    attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [5.0, 2.5, 2.5]
    root.update_attributes(attrs)
    with pytest.raises(ValueError, match=r"anisotropic voxels \[5.0, 2.5, 2.5\].*pass --voxel-size UM"):
        open_volume(path)
    assert open_volume(path, voxel_size_um=2.5).voxel_size_um == 2.5


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_singleton_t_and_c_axes_are_dropped(tmp_path, version):
    volume = _volume()
    source = open_volume(write_ome_zarr(tmp_path / "tczyx.zarr", volume, version=version, leading=(1, 1)))
    assert source.shape == volume.shape and source.chunks == (8, 8, 8)
    box = (slice(5, 9), ALL, slice(30, 32))
    np.testing.assert_array_equal(source.read(box), volume[box])


@pytest.mark.parametrize("spatial", ["xyz", "yxz"])
def test_spatial_axes_stored_in_another_order_are_read_as_zyx_by_name(tmp_path, spatial):
    volume = _volume()
    source = open_volume(write_ome_zarr(tmp_path / f"{spatial}.zarr", volume, leading=(1,), chunks=(8, 4, 2)))
    assert source.shape == volume.shape
    source = open_volume(write_ome_zarr(tmp_path / f"{spatial}_2.zarr", volume, leading=(1,), spatial=spatial))
    assert source.shape == volume.shape
    box = (slice(5, 9), slice(2, 20), slice(30, 32))
    np.testing.assert_array_equal(source.read(box), volume[box])
    np.testing.assert_array_equal(source.read((ALL, ALL, ALL)), volume)


def test_a_channel_axis_of_two_is_refused(tmp_path):
    path = write_ome_zarr(tmp_path / "czyx.zarr", _volume(), leading=(2,), levels=1)
    with pytest.raises(ValueError, match=r"czyx.zarr: expected a \(Z, Y, X\) volume.*c=2, z=24.*select one time point and channel"):
        open_volume(path)
    root = zarr.open_group(str(path), mode="r+")
    attrs = root.attrs.asdict()
    axes = attrs["multiscales"][0]["axes"]
    attrs["multiscales"][0]["axes"] = axes[1:] + axes[:1]  # z, y, x, c
    root.update_attributes(attrs)
    with pytest.raises(ValueError, match=r"OME axes \['z', 'y', 'x', 'c'\] must end with the 3 spatial axes"):
        open_volume(path)


def test_a_plain_zarr_array_and_bad_dtypes_and_shapes(tmp_path):
    volume = _volume().astype(np.float32)
    zarr.create_array(str(tmp_path / "kidney_5.zarr"), data=volume, chunks=(8, 8, 8))
    source = open_volume(tmp_path / "kidney_5.zarr")
    assert source.voxel_size_um == 50.28 and source.dtype == np.float32 and source.chunks == (8, 8, 8)
    zarr.create_array(str(tmp_path / "f64.zarr"), data=volume.astype(np.float64), chunks=(8, 8, 8))
    with pytest.raises(ValueError, match=r"f64.zarr: dtype float64 is not supported; volumes are uint8, uint16 or float32"):
        open_volume(tmp_path / "f64.zarr")
    zarr.create_array(str(tmp_path / "flat.zarr"), data=volume[0], chunks=(8, 8))
    with pytest.raises(ValueError, match=r"flat.zarr: expected a \(Z, Y, X\) volume.*got shape \(40, 32\)"):
        open_volume(tmp_path / "flat.zarr")
    group = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    group.create_group("raw")
    with pytest.raises(ValueError, match=r"group.zarr is a zarr group without OME-Zarr multiscales.*\['raw'\]"):
        open_volume(tmp_path / "group.zarr")


def test_a_corrupt_chunk_names_the_store_level_and_block(tmp_path):
    volume = _volume()
    path = write_ome_zarr(tmp_path / "organ.zarr", volume, levels=1)
    (path / "0" / "1" / "2" / "3").write_bytes(b"not blosc at all")  # chunk z 8:16, y 16:24, x 24:32
    source = open_volume(path)
    np.testing.assert_array_equal(source.read((slice(0, 8), ALL, ALL)), volume[:8])  # other chunks read fine
    with pytest.raises(ValueError, match=r"organ.zarr \(level 0\): cannot read the block \[4:12, 20:22, 0:32\].*"
                                         r"missing or corrupt: download or write it again"):
        source.read((slice(4, 12), slice(20, 22), ALL))


def test_a_region_read_touches_only_its_chunks(tmp_path):
    """Every chunk outside the box is corrupted: the box still reads, so none of them was read."""
    volume = _volume()
    path = write_ome_zarr(tmp_path / "organ.zarr", volume, levels=1)
    box = (slice(8, 16), slice(10, 20), slice(0, 8))  # chunk z 1, chunk rows 1-2, chunk column 0
    for file in (path / "0").glob("*/*/*"):
        z, y, x = (int(part) for part in file.relative_to(path / "0").parts)
        if not (z == 1 and y in (1, 2) and x == 0):
            file.write_bytes(b"garbage")
    np.testing.assert_array_equal(open_volume(path).read(box), volume[box])


# -- N5 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "raw", "blosc"])
def test_n5_levels_voxel_sizes_and_data(tmp_path, compression):
    volume = _volume(shape=(20, 27, 35))  # edge blocks are smaller than the block size
    path = write_n5(tmp_path / "organ.n5", volume, compression=compression)
    source = open_volume(path)
    assert source.shape == volume.shape and source.chunks == (8, 8, 8) and source.dtype == np.uint16
    assert source.voxel_size_um == 2.5 and source.level_voxel_sizes_um == [2.5, 5.0, 10.0]
    box = (slice(3, 19), slice(7, 27), slice(30, 35))
    np.testing.assert_array_equal(source.read(box), volume[box])
    coarse = open_volume(path, model_voxel_size_um=10.0)
    assert coarse.level == 2 and coarse.voxel_size_um == 10.0
    np.testing.assert_array_equal(coarse.read((ALL, ALL, ALL)), volume[::4, ::4, ::4])


@pytest.mark.parametrize("kind", ["ome-zarr", "n5"])
def test_sources_pickle_for_dask_workers(tmp_path, kind):
    import pickle

    volume = _volume()
    path = (write_ome_zarr(tmp_path / "o.zarr", volume, version="0.5") if kind == "ome-zarr"
            else write_n5(tmp_path / "o.n5", volume, compression="blosc"))
    source = pickle.loads(pickle.dumps(open_volume(path, level=1)))
    np.testing.assert_array_equal(source.read((ALL, slice(0, 3), ALL)), volume[::2, ::2, ::2][:, :3])


def test_n5_reads_only_the_blocks_of_the_box_and_missing_blocks_are_zero(tmp_path, monkeypatch):
    volume = _volume(shape=(16, 24, 24))
    path = write_n5(tmp_path / "organ.n5", volume, levels=1, unit="nm", resolution=2500.0)
    (path / "s0" / "2" / "1" / "0").unlink()  # x block 2, y block 1, z block 0: zeros
    expected = volume.copy()
    expected[0:8, 8:16, 16:24] = 0
    reads = []
    original = N5Array.read_block
    monkeypatch.setattr(N5Array, "read_block", lambda self, index: reads.append(index) or original(self, index))
    source = open_volume(path / "s0")  # one dataset; its units live on the group, so none here
    assert source.voxel_size_um is None
    box = (slice(2, 6), slice(5, 20), slice(17, 24))
    np.testing.assert_array_equal(source.read(box), expected[box])
    assert sorted(reads) == [(0, 0, 2), (0, 1, 2), (0, 2, 2)]
    assert open_volume(path).voxel_size_um == pytest.approx(2.5)  # 2500 nm on the group


def test_n5_corrupt_block_and_unknown_compression_are_named(tmp_path):
    path = write_n5(tmp_path / "organ.n5", _volume(shape=(16, 16, 16)), levels=1)
    block = path / "s0" / "1" / "0" / "1"
    block.write_bytes(block.read_bytes()[:20])  # truncated
    source = open_volume(path)
    with pytest.raises(ValueError, match=r"organ.n5 \(level 0\): cannot read the block \[8:16, 0:4, 8:10\].*"
                                         r"cannot decode block \(1, 0, 1\) \(file .*s0/1/0/1\)"):
        source.read((slice(8, 16), slice(0, 4), slice(8, 10)))
    attrs = json.loads((path / "s0" / "attributes.json").read_text())
    attrs["compression"] = {"type": "lz4"}
    (path / "s0" / "attributes.json").write_text(json.dumps(attrs))
    with pytest.raises(ValueError, match=r"unsupported N5 compression \{'type': 'lz4'\}; supported: raw, gzip"):
        open_volume(path)


# -- TIFF folders, array-likes, as_source --------------------------------------------------------


def test_tiff_folders_take_the_kaggle_voxel_size_and_the_argument(tmp_path):
    volume = _volume(shape=(3, 16, 12))
    write_volume(volume, tmp_path / "kidney_6" / "images")
    source = open_volume(tmp_path / "kidney_6" / "images")
    assert isinstance(source, TiffStackSource) and source.voxel_size_um == 63.08
    assert open_volume(tmp_path / "kidney_6" / "images", voxel_size_um=5.0).voxel_size_um == 5.0
    with pytest.raises(ValueError, match="a folder of TIFF slices has one level, got level=1"):
        open_volume(tmp_path / "kidney_6" / "images", level=1)


def test_array_likes_stay_lazy_and_singletons_are_dropped():
    da = pytest.importorskip("dask.array")
    volume = _volume()

    class Counted:
        """A numpy volume that counts the boxes dask asks it for."""

        shape, dtype, ndim = (1,) + volume.shape, volume.dtype, 4
        boxes: list = []

        def __getitem__(self, box):
            self.boxes.append(box)
            return volume[None][box]

    counted = Counted()
    lazy = da.from_array(counted, chunks=(1, 8, 8, 8), asarray=True)
    source = open_volume(lazy, voxel_size_um=3.0)
    assert isinstance(source, ArraySource) and source.shape == volume.shape and source.chunks == (8, 8, 8)
    counted.boxes.clear()
    np.testing.assert_array_equal(source.read((slice(0, 8), slice(8, 16), slice(0, 16))), volume[:8, 8:16, :16])
    assert len(counted.boxes) == 2  # two chunks of 60, not the volume
    with pytest.raises(ValueError, match=r"ndarray of shape \(4, 4\): expected a \(Z, Y, X\) volume"):
        open_volume(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="dtype int32 is not supported"):
        open_volume(np.zeros((2, 4, 4), np.int32))


def test_as_source_opens_stores_through_open_volume(tmp_path):
    path = write_ome_zarr(tmp_path / "organ.zarr", _volume(), version="0.5")
    source = as_source(path)
    assert isinstance(source, StoreSource) and source.voxel_size_um == 2.5 and source.level == 0
    assert isinstance(as_source(str(write_n5(tmp_path / "organ.n5", _volume()))), StoreSource)


def test_importing_vessel_kit_and_the_volume_modules_loads_neither_zarr_nor_dask():
    code = ("import sys, vessel_kit, vessel_kit.cli, vessel_kit.ome_zarr, vessel_kit.ome_zarr_out, "
            "vessel_kit.metric_blocks, vessel_kit.n5; vessel_kit.open_volume, vessel_kit.surface_dice_blocks; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('zarr', 'dask', 'distributed', 'numcodecs')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
    assert vessel_kit.open_volume is open_volume


# -- vessel-kit infer --voxel-size and store input -----------------------------------------------


def test_infer_passes_voxel_size_to_the_kaggle_path(tmp_path, monkeypatch, capsys):
    import vessel_kit.submit as submit
    from vessel_kit.cli import main

    seen = {}
    monkeypatch.setattr(submit, "predict_submission", lambda *args, **kwargs: seen.update(kwargs) or {"kidney_7": "predicted"})
    assert main(["infer", str(tmp_path), "m.safetensors", "--voxel-size", "12.5"]) == 0
    assert seen["voxel_size_um"] == 12.5
    assert main(["infer", str(tmp_path), "m.safetensors", "--level", "1"]) == 2
    assert "--level is for an OME-Zarr or N5 volume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["infer", str(tmp_path), "m.safetensors", "--voxel-size", "-3"])
    assert "--voxel-size: expected a positive number, got '-3'" in capsys.readouterr().err


def test_a_layout_volume_takes_the_given_voxel_size(tmp_path):
    from vessel_kit.layout import find_volumes
    from vessel_kit.submit import predict_submission

    write_volume(_volume(shape=(2, 16, 16)), tmp_path / "test" / "kidney_7" / "images")
    assert find_volumes(tmp_path, "test")[0].voxel_size_um is None
    with pytest.raises(ValueError, match="voxel_size_um must be a positive number of micrometres, got -1"):
        predict_submission(tmp_path, ["m.safetensors"], tmp_path / "s.csv", voxel_size_um=-1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, random_unet):
    return random_unet(tmp_path_factory.mktemp("ckpt") / "m.safetensors", voxel_size_um=5.0, tile_size=32)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_infer_predicts_an_ome_zarr_volume_into_an_ome_zarr_store(tmp_path, checkpoint, capsys, version):
    from vessel_kit.cli import main

    path = write_ome_zarr(tmp_path / "organ.zarr", _volume(shape=(8, 64, 64)), version=version)  # 2.5, 5, 10 µm
    out = tmp_path / "result.zarr"
    assert main(["infer", str(path), str(checkpoint), "--out", str(out), "--axes", "xy", "--tta", "none"]) == 0
    assert "level=1" in capsys.readouterr().out  # the model's 5 µm level
    mask = open_volume(out / "mask")
    assert mask.shape == (4, 32, 32) and mask.voxel_size_um == 5.0 and mask.dtype == np.uint8
    assert main(["infer", str(path), str(checkpoint), "--out", str(out), "--level", "0", "--axes", "xy"]) == 2
    assert "exists with other settings: shape [4, 32, 32] (asked [8, 64, 64])" in capsys.readouterr().err
    assert main(["infer", str(path), str(checkpoint), "--out", str(tmp_path / "r.csv")]) == 2
    assert "give --out NAME.zarr" in capsys.readouterr().err
    assert main(["infer", str(path), str(checkpoint), "--out", str(out), "--time-budget", "60"]) == 2
    assert "--time-budget: for a dataset root only" in capsys.readouterr().err
