"""Volume sources: protocol, lazy TIFF reads, array views, as_source, plane slabs, chunk-read counts."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile

import vessel_kit.volume as volume_module
from vessel_kit.normalize import SAMPLE_BLOCKS, Normalization
from vessel_kit.sources import (
    ArraySource,
    Slab,
    TiffStackSource,
    VolumeSource,
    as_source,
    iter_slabs,
    read_planes,
)
from vessel_kit.volume import read_volume, write_volume

ALL = slice(None)


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 65535, size=(9, 23, 17), dtype=np.uint16)


@pytest.fixture
def stack(tmp_path, volume) -> Path:
    write_volume(volume, tmp_path / "images")
    return tmp_path / "images"


def _random_regions(shape, count, seed=1):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        bounds = [sorted(rng.choice(n + 1, 2, replace=False)) for n in shape]
        yield tuple(slice(int(a), int(b)) for a, b in bounds)


def _reference_planes(volume, axis, start, stop, halo):
    index = np.clip(np.arange(start - halo, stop + halo), 0, volume.shape[axis] - 1)
    return np.moveaxis(volume, axis, 0)[index]


# -- protocol and the two sources -----------------------------------------------------------------


def test_sources_satisfy_the_protocol(stack, volume):
    class Minimal:  # a third-party source needs nothing from this package
        shape, dtype, voxel_size_um, slice_ids = (1, 2, 2), np.dtype(np.uint8), None, None

        def read(self, region):
            return np.zeros((1, 2, 2), np.uint8)[region]

    for source in (ArraySource(volume), TiffStackSource(stack), Minimal()):
        assert isinstance(source, VolumeSource)
    assert not isinstance(volume, VolumeSource)


def test_tiff_stack_reads_equal_read_volume(stack, volume):
    source = TiffStackSource(stack, voxel_size_um=50.16)
    assert source.shape == volume.shape and source.dtype == np.uint16 and source.voxel_size_um == 50.16
    assert source.slice_ids == [f"{z:04d}" for z in range(9)] and source.chunks == (1, 23, 17)
    whole = read_volume(stack, progress=False)
    for region in _random_regions(volume.shape, 25):
        np.testing.assert_array_equal(source.read(region), whole[region])
    np.testing.assert_array_equal(source.read((ALL, ALL, ALL)), volume)


def test_compressed_and_big_endian_slices_are_cropped_too(tmp_path, volume):
    for z, image in enumerate(volume[:3]):
        options = [{"compression": "zlib"}, {"byteorder": ">"}, {"tile": (16, 16)}][z]
        tifffile.imwrite(tmp_path / f"{z:04d}.tif", image, **options)
    region = (slice(0, 3), slice(5, 21), slice(2, 9))
    np.testing.assert_array_equal(TiffStackSource(tmp_path).read(region), volume[region])


def test_tiff_stack_opens_only_the_region_slices_and_reads_only_its_rows(stack, monkeypatch):
    source = TiffStackSource(stack)
    opened: list[str] = []
    open_slice = volume_module._open_slice

    def counting_open(path):
        opened.append(Path(path).stem)
        return open_slice(path)

    read_bytes: list[int] = []
    preadv = os.preadv

    def counting_preadv(fd, buffers, offset):
        read_bytes.append(sum(memoryview(b).nbytes for b in buffers))
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(volume_module, "_open_slice", counting_open)
    monkeypatch.setattr(os, "preadv", counting_preadv)
    source.read((slice(3, 5), slice(10, 13), slice(4, 8)))
    assert sorted(opened) == ["0003", "0004"]
    assert read_bytes == [3 * 17 * 2] * 2  # 3 full-width uint16 rows per slice, not the slice


def test_tiff_stack_checks_every_slice_it_reads(stack):
    write_volume(np.zeros((1, 23, 18), np.uint16), stack, stems=["0009"])
    source = TiffStackSource(stack)
    assert source.read((slice(0, 2), ALL, ALL)).shape == (2, 23, 17)
    mismatch = "0009.tif: slice is \\(23, 18\\) uint16, but the volume's slices are \\(23, 17\\)"
    with pytest.raises(ValueError, match=mismatch):
        source.read((slice(8, 10), ALL, ALL))


def test_array_source_numpy_reads_are_views(volume, tmp_path):
    source = ArraySource(volume, slice_ids=[str(z) for z in range(9)])
    block = source.read((slice(2, 5), slice(0, 7), ALL))
    assert type(block) is np.ndarray and np.shares_memory(block, volume)
    np.testing.assert_array_equal(block, volume[2:5, :7])
    assert source.chunks is None and source.slice_ids[-1] == "8" and source.voxel_size_um is None
    np.save(tmp_path / "v.npy", volume)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    assert np.shares_memory(ArraySource(mapped).read((slice(1, 2), ALL, ALL)), mapped)


def test_array_source_computes_dask_like_blocks(volume):
    class Lazy:  # dask's duck type: indexing gives something with .compute()
        def __init__(self, data):
            self.data = data

        def compute(self):
            return self.data

    class DaskLike:
        shape, dtype, chunksize = volume.shape, volume.dtype, (3, 23, 17)

        def __getitem__(self, region):
            return Lazy(volume[region])

    source = as_source(DaskLike())
    assert isinstance(source, ArraySource) and source.chunks == (3, 23, 17)
    np.testing.assert_array_equal(source.read((slice(1, 4), ALL, slice(0, 5))), volume[1:4, :, :5])


def test_array_source_bad_input(volume):
    with pytest.raises(ValueError, match="non-empty \\(Z, Y, X\\) array, got shape \\(23, 17\\)"):
        ArraySource(volume[0])
    with pytest.raises(ValueError, match="non-empty \\(Z, Y, X\\) array, got shape \\(0, 23, 17\\)"):
        ArraySource(volume[:0])
    with pytest.raises(ValueError, match="numeric image volume, got dtype bool"):
        ArraySource(volume > 0)
    with pytest.raises(ValueError, match="2 slice_ids for 9 Z slices"):
        ArraySource(volume, slice_ids=["a", "b"])
    with pytest.raises(ValueError, match="voxel_size_um must be a positive number.*got -1"):
        ArraySource(volume, voxel_size_um=-1)
    with pytest.raises(TypeError, match="shape, dtype and \\[\\] indexing, got list"):
        ArraySource([[[1]]])


@pytest.mark.parametrize("kind", ["array", "tiff"])
@pytest.mark.parametrize(
    ("region", "message"),
    [
        ((slice(0, 10), ALL, ALL), "axis 0 needs 0 <= start < stop <= 9, got \\[0, 10\\)"),
        ((ALL, slice(-3, None), ALL), "axis 1 needs 0 <= start < stop <= 23, got \\[-3, 23\\)"),
        ((ALL, ALL, slice(4, 4)), "axis 2 needs 0 <= start < stop <= 17, got \\[4, 4\\)"),
        ((ALL, slice(0, 9, 2), ALL), "axis 1 has step 2; only step 1"),
        ((ALL, ALL), "must be a tuple of 3 slices"),
        ((0, ALL, ALL), "must be a tuple of 3 slices"),
    ],
)
def test_bad_regions_name_the_region_and_shape(kind, region, message, stack, volume):
    source = ArraySource(volume) if kind == "array" else TiffStackSource(stack)
    with pytest.raises(ValueError, match=f"region .*{message}.*shape \\(9, 23, 17\\)"):
        source.read(region)


def test_as_source_dispatch(stack, volume):
    source = ArraySource(volume, voxel_size_um=5.0)
    assert as_source(source) is source and as_source(source, voxel_size_um=5.0) is source
    assert isinstance(as_source(volume), ArraySource)
    for folder in (stack, str(stack)):
        tiffs = as_source(folder, voxel_size_um=50.0)
        assert isinstance(tiffs, TiffStackSource) and tiffs.voxel_size_um == 50.0
    with pytest.raises(ValueError, match="has voxel_size_um=5.0, but voxel_size_um=50.0 was given"):
        as_source(source, voxel_size_um=50.0)
    with pytest.raises(TypeError, match="cannot read a volume from a list"):
        as_source([1, 2, 3])
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        as_source(stack.parent / "nowhere")


# -- planes and slabs -----------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_read_planes_replicates_edges_along_every_axis(axis, volume):
    source = ArraySource(volume)
    count = volume.shape[axis]
    for start, stop, halo in [(0, 1, 2), (0, count, 1), (count - 2, count, 3), (2, 5, 0), (3, 5, 2)]:
        block = read_planes(source, axis, start, stop, halo)
        np.testing.assert_array_equal(block, _reference_planes(volume, axis, start, stop, halo))
    assert np.shares_memory(read_planes(source, axis, 3, 5, 2), volume)  # inside: a view, no copy


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_iter_slabs_cover_the_axis_once_with_halos(axis, volume):
    source = ArraySource(volume)
    slabs = list(iter_slabs(source, axis, size=4, halo=1))
    count = volume.shape[axis]
    assert [(s.start, s.stop) for s in slabs] == [(a, min(count, a + 4)) for a in range(0, count, 4)]
    for slab in slabs:
        assert isinstance(slab, Slab)
        np.testing.assert_array_equal(slab.block, _reference_planes(volume, axis, slab.start, slab.stop, 1))


def test_plane_errors(volume):
    source = ArraySource(volume)
    with pytest.raises(ValueError, match="axis in \\(0, 1, 2\\) and halo >= 0, got axis=3, halo=0"):
        iter_slabs(source, 3, 4)
    with pytest.raises(ValueError, match="got axis=0, halo=-1"):
        read_planes(source, 0, 0, 1, halo=-1)
    with pytest.raises(ValueError, match="iter_slabs needs size >= 1, got 0"):
        iter_slabs(source, 0, 0)
    with pytest.raises(ValueError, match="axis 1 needs 0 <= start < stop <= 23, got \\[20, 24\\)"):
        read_planes(source, 1, 20, 24, halo=1)


# -- chunk reads of a zarr volume -----------------------------------------------------------------


def _counting_zarr(data: np.ndarray, chunks: tuple[int, int, int]):
    """A zarr 3 array of ``data`` in a memory store that counts chunk reads per key."""
    zarr = pytest.importorskip("zarr", minversion="3")

    class CountingStore(zarr.storage.MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.reads: Counter[str] = Counter()

        async def get(self, key, prototype=None, byte_range=None):
            if key.startswith("c/"):
                self.reads[key] += 1
            return await super().get(key, prototype, byte_range)

    store = CountingStore()
    array = zarr.create_array(store, shape=data.shape, chunks=chunks, dtype=data.dtype)
    array[...] = data
    store.reads.clear()
    return array, store.reads


def _chunk_keys(region, chunks):
    spans = [range(s.start // c, (s.stop - 1) // c + 1) for s, c in zip(region, chunks)]
    return {f"c/{z}/{y}/{x}" for z in spans[0] for y in spans[1] for x in spans[2]}


def test_three_xz_planes_of_zarr_read_only_their_chunks():
    data = np.random.default_rng(2).integers(0, 4000, size=(40, 48, 56), dtype=np.uint16)
    array, reads = _counting_zarr(data, chunks=(8, 8, 8))  # 5 x 6 x 7 = 210 chunks
    source = ArraySource(array)
    assert source.chunks == (8, 8, 8)
    planes = source.read((ALL, slice(17, 20), ALL))
    np.testing.assert_array_equal(planes, data[:, 17:20])
    assert set(reads) == _chunk_keys((slice(0, 40), slice(16, 24), slice(0, 56)), (8, 8, 8))
    assert len(reads) == 35 and max(reads.values()) == 1  # 1 of 6 chunk rows, each chunk once
    reads.clear()
    block = read_planes(source, 1, 15, 18, halo=1)  # xz planes 14..18: chunk rows 1 and 2
    np.testing.assert_array_equal(block, np.moveaxis(data, 1, 0)[14:19])
    assert len(reads) == 70 and max(reads.values()) == 1


def test_percentile_window_of_zarr_reads_a_bounded_sample_once():
    data = np.random.default_rng(3).normal(27000, 3000, size=(64, 96, 96)).astype(np.uint16)
    array, reads = _counting_zarr(data, chunks=(8, 16, 16))  # 8 x 6 x 6 = 288 chunks
    norm = Normalization("percentile", low=10.0, high=99.8, max_samples=100_000)
    lo, hi = norm.window(array)
    assert 0 < len(reads) <= SAMPLE_BLOCKS and max(reads.values()) == 1
    assert len(reads) == 60  # 5 x 4 x 3 chunks: spread like the 8 x 6 x 6 chunk grid
    exact_lo, exact_hi = np.percentile(data, [10.0, 99.8])
    assert abs(lo - exact_lo) < 0.02 * (exact_hi - exact_lo)
    assert abs(hi - exact_hi) < 0.02 * (exact_hi - exact_lo)
