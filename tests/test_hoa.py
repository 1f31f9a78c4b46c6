"""Human Organ Atlas datasets by name (``hoa.py``, ``open_volume("hoa:<name>")``), through the
real hoa-tools: its metadata, URL parsing, store and array handling. Only its Google Cloud file
system is replaced by a local folder laid out like the bucket (the smallest seam)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("zarr", minversion="3")
hoa_dataset = pytest.importorskip("hoa_tools.dataset")

from vessel_kit.hoa import dataset_names, open_hoa  # noqa: E402
from vessel_kit.ome_zarr import is_volume_store, open_volume  # noqa: E402

NAME = "K292_kidney_complete-organ_10.22um_bm18"  # an OME-Zarr dataset in hoa-tools' metadata, 10.22 µm
SHAPE = (20, 24, 28)  # (Z, Y, X)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The dataset's OME-Zarr at the path its ``gcs_url`` names, under a local "bucket" that
    hoa-tools' gcsfs file system is pointed at; returns the full-resolution (Z, Y, X) volume."""
    import zarr
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem
    from numcodecs import Blosc

    dataset = hoa_dataset.get_dataset(NAME)
    url = dataset.data.gcs_url.removeprefix("zarr://gs://")
    volume = np.random.default_rng(0).integers(0, 65535, SHAPE, dtype=np.uint16)
    root = zarr.open_group(str(tmp_path / url), mode="w", zarr_format=2)
    for k in range(5):  # levels 0-4 as the atlas publishes them: 2x subsampled here, stored (x, y, z)
        level = volume[:: 2**k, :: 2**k, :: 2**k].T
        array = root.create_array(str(k), shape=level.shape, chunks=(8, 8, 8), dtype=np.uint16,
                                  compressors=Blosc(cname="zstd", clevel=8, shuffle=1),
                                  chunk_key_encoding={"name": "v2", "separator": "/"})
        array[:] = level
    root.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space", "unit": "micrometer"} for a in "xyz"],
                                  "datasets": [{"path": str(k), "coordinateTransformations": [
                                      {"type": "scale", "scale": [10.22 * 2**k] * 3}]} for k in range(5)]}]
    calls = []

    def local_gcs(**options):
        calls.append(options)
        return AsyncFileSystemWrapper(DirFileSystem(path=str(tmp_path), fs=LocalFileSystem()), asynchronous=True)

    monkeypatch.setattr(hoa_dataset.gcsfs, "GCSFileSystem", local_gcs)
    yield volume
    dataset.__dict__.pop("_remote_store", None)  # hoa-tools caches the store on its global Dataset
    assert calls and all(c["token"] == "anon" and c["asynchronous"] for c in calls)


def test_a_dataset_opens_by_name_at_the_level_nearest_the_model(bucket):
    source = open_volume(f"hoa:{NAME}", model_voxel_size_um=50.0)
    assert source.voxel_size_um == pytest.approx(40.88)  # level 2: 10.22 x 4 is nearest 50 µm
    np.testing.assert_array_equal(source.read((slice(None),) * 3), bucket[::4, ::4, ::4])  # (Z, Y, X) again


def test_a_level_by_number_and_a_voxel_size_override(bucket):
    source = open_hoa(NAME, level=0)
    assert source.shape == SHAPE and source.voxel_size_um == 10.22 and source.dtype == np.uint16
    box = (slice(3, 11), slice(5, 20), slice(0, 9))
    np.testing.assert_array_equal(source.read(box), bucket[box])
    assert open_hoa(NAME, level=1, voxel_size_um=5.0).voxel_size_um == 10.0
    with pytest.raises(ValueError, match="levels 0-4, got level=5"):
        open_hoa(NAME, level=5)


def test_block_wise_inference_reads_a_dataset_by_name(bucket, tmp_path):
    import torch

    from vessel_kit import Normalization, infer_volume
    from vessel_kit.blocks import infer_blocks
    from vessel_kit.ensemble import Ensemble
    from vessel_kit.models import build_model

    torch.manual_seed(0)
    unet = build_model("unet", "resnet18", in_chans=3, encoder_weights=None, encoder_depth=3,
                       decoder_channels=(16, 8, 4)).eval()
    model = Ensemble([unet], [1.0], in_chans=3, normalization=Normalization("percentile"), tile_size=None,
                     voxel_size_um=None)
    options = dict(tta="none", axes=("xy",), tile_size=16, overlap=0.5, min_plane_side=8, progress=False)
    store = infer_blocks(f"hoa:{NAME}", model, tmp_path / "out.zarr", level=1, block=8, chunks=8, pyramid=False, **options)
    assert store.voxel_size_um == pytest.approx(20.44)
    np.testing.assert_array_equal(store.mask[:], infer_volume(bucket[::2, ::2, ::2], model, **options))


def test_an_unknown_name_lists_the_closest():
    assert NAME in dataset_names() and len(dataset_names()) > 100
    with pytest.raises(ValueError, match=r"no Human Organ Atlas dataset named 'K292_kidney_complete-organ_10.2um_bm18'"
                                         rf".*did you mean {NAME}"):
        open_volume("hoa:K292_kidney_complete-organ_10.2um_bm18")
    assert is_volume_store("hoa:anything")


def test_without_hoa_tools_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "hoa_tools.dataset", None)
    with pytest.raises(ImportError, match=r"pip install 'vessel_kit\[hoa\]'"):
        open_volume(f"hoa:{NAME}")
