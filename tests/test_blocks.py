"""Block-wise inference (``blocks.py``, ``Predictor.logits(region=...)``): identical to the in-memory
result, resumable, retried, on serial and dask executors; bad input refused by name."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from vessel_kit import InferConfig, Normalization, Predictor, infer_volume
from vessel_kit.blocks import block_regions, infer_blocks
from vessel_kit.models import build_model
from vessel_kit.regions import check_region
from vessel_kit.resample import ResampledSource, resample_volume, scaled_shape
from vessel_kit.sources import ArraySource
from vessel_kit.ensemble import Ensemble
from vessel_kit.synth import make_synthetic_volume

SHAPE = (12, 27, 30)  # no block size below divides it; Z is thinner than a tile (padded)
PERCENTILE = Normalization("percentile")
OPTIONS = dict(tta="flips", axes=("xy", "xz", "yz"), tile_size=16, overlap=0.5, min_plane_side=8)  # every axis and view, 2.5D
FAST = dict(tta="none", axes=("xy", "yz"), tile_size=16, overlap=0.5, min_plane_side=8)  # for the mechanics: fewer tiles


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    image, _ = make_synthetic_volume(SHAPE, seed=3)
    return image


@pytest.fixture(scope="module")
def model() -> Ensemble:
    """A seeded random-weight 2.5D U-Net (3 slices in), small enough for the CPU."""
    torch.manual_seed(0)
    unet = build_model("unet", "resnet18", in_chans=3, encoder_weights=None, encoder_depth=3,
                       decoder_channels=(16, 8, 4)).eval()
    return Ensemble([unet], [1.0], in_chans=3, normalization=PERCENTILE, tile_size=None, voxel_size_um=None)


def predictor(model: Ensemble, **options) -> Predictor:
    return Predictor(model, InferConfig(**{**OPTIONS, "progress": False, **options}))


def assert_same_logits(blocked: np.ndarray, whole: np.ndarray) -> None:
    """Equal up to the models' batch arithmetic: at most one float16 step apart."""
    step = np.spacing(np.abs(whole).astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(blocked.astype(np.float32) - whole.astype(np.float32)) <= step)


@pytest.mark.parametrize("voxel_size_um", [None, 63.08])
def test_region_logits_equal_the_whole_volumes(volume, model, voxel_size_um):
    """3 axes x flips x 2.5D (3 channels), boxes that cut tiles and the volume's edges, with and
    without resampling (63.08 µm volume, 50 µm models)."""
    run = predictor(model, model_voxel_size_um=50.0)
    whole = run.logits(volume, voxel_size_um=voxel_size_um).array()
    windows = run.intensity_windows(volume)
    for region in [(slice(0, 7), slice(5, 20), slice(17, 30)), (slice(7, 12), slice(0, 27), slice(0, 9))]:
        blocked = run.logits(volume, voxel_size_um=voxel_size_um, region=region, intensity_windows=windows)
        assert blocked.shape == blocked.accumulator.shape == tuple(s.stop - s.start for s in region)
        assert_same_logits(blocked.array(), whole[region])


def test_whole_plane_windows_read_whole_planes_and_stay_exact(volume, model):
    """tile_size=None (one window per plane, padded to the stride): a box still gets the whole
    volume's logits; its planes are read whole."""
    run = predictor(model, **{**FAST, "tile_size": None})
    whole = run.logits(volume).array()
    region = (slice(3, 9), slice(10, 27), slice(0, 12))
    assert_same_logits(run.logits(volume, region=region).array(), whole[region])


def test_region_resampling_is_exact():
    """A box of a ResampledSource equals that box of the whole resampled volume, bit for bit
    (cv2.resize on a sub-image would not: its taps follow the sub-image)."""
    rng = np.random.default_rng(0)
    data = (rng.random((13, 29, 31)) * 60000).astype(np.uint16)
    for shape in [scaled_shape(data.shape, 63.08 / 50), scaled_shape(data.shape, 0.6), (13, 29, 31)]:
        whole = resample_volume(data, shape)
        source = ResampledSource(ArraySource(data), shape)
        for _ in range(20):
            region = tuple(slice(int(a), int(b)) for a, b in (sorted(rng.choice(n + 1, 2, replace=False)) for n in shape))
            np.testing.assert_array_equal(source.read(region), whole[region])


@pytest.mark.parametrize("voxel_size_um", [None, pytest.param(63.08, marks=pytest.mark.slow)])
def test_blocked_store_equals_infer_volume(volume, model, tmp_path, voxel_size_um):
    """Blocks of (12, 16, 16) over (12, 27, 30): masks equal, logits within one float16 step."""
    options = dict(OPTIONS, model_voxel_size_um=50.0 if voxel_size_um else None)
    run = predictor(model, **options)
    whole = run.logits(volume, voxel_size_um=voxel_size_um)
    store = infer_blocks(ArraySource(volume, voxel_size_um=voxel_size_um), model, tmp_path / "out.zarr",
                         block=(12, 16, 16), chunks=(4, 8, 8), logits=True, progress=False, **options)
    np.testing.assert_array_equal(store.mask[:], run.to_mask(whole).astype(np.uint8))
    assert_same_logits(store.logits[:], whole.array())
    assert store.done_blocks() == {index for index, _ in block_regions(SHAPE, (12, 16, 16))}
    assert store.level(1).shape == (6, 14, 15)  # the pyramid


def test_interrupted_run_resumes_without_recomputing(volume, model, tmp_path, monkeypatch):
    import vessel_kit.blocks as blocks

    out, calls, original = tmp_path / "out.zarr", [], blocks._BlockTask.__call__

    def counted(self, index, region, stop_after=None):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(index)
        return original(self, index, region)

    kwargs = dict(block=16, chunks=8, progress=False, pyramid=False, **FAST)
    monkeypatch.setattr(blocks._BlockTask, "__call__", lambda self, i, r: counted(self, i, r, stop_after=2))
    with pytest.raises(KeyboardInterrupt):
        infer_blocks(volume, model, out, **kwargs)
    first = list(calls)
    assert len(first) == 2 and blocks_done(out) == set(first)
    monkeypatch.setattr(blocks._BlockTask, "__call__", lambda self, i, r: counted(self, i, r))
    store = infer_blocks(volume, model, out, **kwargs)
    total = len(list(block_regions(SHAPE, (16, 16, 16))))
    assert total == 4 and len(calls) == total and not set(calls[2:]) & set(first)  # done blocks are not run again
    reference = infer_volume(volume, model, progress=False, **FAST)
    np.testing.assert_array_equal(store.mask[:], reference)


def test_a_failing_block_is_retried(volume, model, tmp_path):
    source = _FailingOnce(volume, tmp_path / "failed")
    with pytest.warns(UserWarning, match="retrying"):
        store = infer_blocks(source, model, tmp_path / "out.zarr", block=16, chunks=8, progress=False,
                             pyramid=False, **FAST)
    assert (tmp_path / "failed").exists()
    reference = infer_volume(volume, model, progress=False, **FAST)
    np.testing.assert_array_equal(store.mask[:], reference)
    with pytest.raises(OSError, match=r"block \(0, 0, 0\) \[0:12, 0:16, 0:16\].*OSError: simulated"):
        infer_blocks(_FailingOnce(volume, tmp_path / "again"), model, tmp_path / "out2.zarr", block=16,
                     chunks=8, progress=False, retries=0, **FAST)


@pytest.mark.slow
def test_dask_run_survives_a_killed_worker(volume, model, tmp_path):
    pytest.importorskip("distributed")
    source = _KillingOnce(volume, tmp_path / "killed")
    kwargs = dict(block=16, chunks=8, progress=False, pyramid=False, **FAST)
    store = infer_blocks(source, model, tmp_path / "out.zarr", executor="dask", workers=2, **kwargs)
    assert (tmp_path / "killed").exists()  # a worker died in the middle of a block
    reference = infer_volume(volume, model, progress=False, **FAST)
    np.testing.assert_array_equal(store.mask[:], reference)
    assert store.done_blocks() == {index for index, _ in block_regions(SHAPE, (16, 16, 16))}


@pytest.fixture
def torch_threads():
    """torch's intra-op thread count, restored after the test."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.mark.parametrize("nthreads, given, prefetch, torch_threads_after", [
    (1, None, False, 1),      # a one-thread CPU worker: one core
    (1, True, True, 1),       # an explicit prefetch is kept; torch still runs one thread
    (2, None, None, "kept"),  # a worker with two threads: nothing changes
    (None, None, None, "kept"),  # no worker (serial): nothing changes
])
def test_one_thread_cpu_workers_use_one_core(monkeypatch, torch_threads, nthreads, given, prefetch, torch_threads_after):
    import vessel_kit.blocks as blocks

    torch.set_num_threads(2)
    worker = None if nthreads is None else type("Worker", (), {"name": 0, "state": type("State", (), {"nthreads": nthreads})})()
    monkeypatch.setattr(blocks, "_dask_worker", lambda: worker)
    config = blocks._process_config(InferConfig(device="cpu", prefetch=given, progress=False))
    assert config.prefetch is prefetch and config.device == "cpu"
    assert torch.get_num_threads() == (2 if torch_threads_after == "kept" else torch_threads_after)


@pytest.mark.slow
def test_a_one_worker_local_cluster_equals_serial_with_one_core(volume, model, tmp_path):
    """A LocalCluster of one one-thread worker (as infer_blocks starts): the worker's Predictor
    prepares batches inline on one torch thread, and the store equals the serial one."""
    distributed = pytest.importorskip("distributed")
    import vessel_kit.blocks as blocks

    kwargs = dict(block=16, chunks=8, progress=False, pyramid=False, logits=True, **FAST)
    serial = infer_blocks(volume, model, tmp_path / "serial.zarr", **kwargs)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        store = infer_blocks(volume, model, tmp_path / "dask.zarr", executor="dask", scheduler=cluster, **kwargs)
        seen = client.run(lambda: [(p.config.prefetch, torch.get_num_threads()) for p in blocks._LOADED.values()])
    assert list(seen.values()) == [[(False, 1)]]
    np.testing.assert_array_equal(store.mask[:], serial.mask[:])
    np.testing.assert_array_equal(store.logits[:], serial.logits[:])


def test_bad_input_is_refused_by_name(volume, model, tmp_path):
    kwargs = dict(block=16, chunks=8, progress=False, **FAST)
    with pytest.raises(ValueError, match="no voxel size.*voxel_size_um=UM"):
        infer_blocks(volume, model, tmp_path / "a.zarr", model_voxel_size_um=50.0, **kwargs)
    with pytest.raises(ValueError, match="shape"):
        infer_blocks(volume[0], model, tmp_path / "b.zarr", **kwargs)
    with pytest.raises(ValueError, match="int16"):
        infer_blocks(volume.astype(np.int16), model, tmp_path / "c.zarr", **kwargs)
    with pytest.raises(ValueError, match="multiple of the output chunks"):
        infer_blocks(volume, model, tmp_path / "d.zarr", block=12, chunks=8, progress=False, **FAST)
    with pytest.raises(ValueError, match="hull_gate"):
        infer_blocks(volume, model, tmp_path / "e.zarr", hull_gate=3, **kwargs)
    with pytest.raises(ValueError, match="dask|executor"):
        infer_blocks(volume, model, tmp_path / "f.zarr", executor="ray", **kwargs)
    with pytest.raises(ValueError, match="polarity='auto' has no block-wise form"):
        infer_blocks(volume, model, tmp_path / "g.zarr", polarity="auto", **kwargs)


def test_inverted_polarity_block_wise_equals_infer_volume(volume, model, tmp_path):
    """Every block reads the volume mirrored, with the mirrored volume's intensity window."""
    run = predictor(model, **FAST, polarity="inverted")
    whole = run.prediction(volume)
    assert whole.logits.mirrored
    store = infer_blocks(volume, model, tmp_path / "out.zarr", block=(12, 16, 16), chunks=(4, 8, 8), logits=True,
                         progress=False, polarity="inverted", **FAST)
    assert_same_logits(store.logits[:], whole.logits.array())
    np.testing.assert_array_equal(store.mask[:], whole.mask.astype(np.uint8))
    assert not np.array_equal(whole.logits.array(), run.logits(volume).array())  # not the scan as read


def test_2d_zscore_models_and_deadlines_are_refused_for_a_region(model):
    region = (slice(0, 4), slice(0, 8), slice(0, 8))
    zscore = Ensemble(model.models, [1.0], in_chans=3, normalization=Normalization("zscore"), tile_size=None,
                      voxel_size_um=None)
    with pytest.raises(ValueError, match="'zscore' normalises each whole plane stack"):
        Predictor(zscore, InferConfig(tile_size=16, progress=False)).logits(np.zeros((8, 16, 16), np.uint16), region=region)
    with pytest.raises(ValueError, match="deadline and accumulator_path are for whole volumes"):
        predictor(model).logits(np.zeros((8, 16, 16), np.uint16), region=region, deadline=1e9)


def test_a_store_of_another_shape_needs_overwrite(volume, model, tmp_path):
    from vessel_kit.ome_zarr_out import create_output

    out = tmp_path / "out.zarr"
    create_output(out, (8, 8, 8), voxel_size_um=None, chunks=(8, 8, 8))
    kwargs = dict(block=16, chunks=8, progress=False, pyramid=False, **FAST)
    with pytest.raises(ValueError, match=r"other settings.*shape.*overwrite"):
        infer_blocks(volume, model, out, **kwargs)
    store = infer_blocks(volume, model, out, overwrite=True, **kwargs)
    assert store.shape == SHAPE and store.mask[:].any()


def test_a_store_resumed_with_another_block_shape_is_refused(volume, model, tmp_path):
    kwargs = dict(chunks=8, progress=False, pyramid=False, **FAST)
    infer_blocks(volume[:, :16, :16], model, tmp_path / "out.zarr", block=8, **kwargs)
    with pytest.raises(ValueError, match=r"written with blocks \(8, 8, 8\)"):
        infer_blocks(volume[:, :16, :16], model, tmp_path / "out.zarr", block=16, **kwargs)


@pytest.mark.parametrize("voxel_size_um", [None, 63.08])
def test_3d_patches_block_wise_equal_the_whole_volumes(volume, tmp_path, voxel_size_um):
    """A seeded random 3D network (MONAI DynUNet), patches (8, 16, 16): a box and a blocked store
    equal the whole volume's logits and mask (TTA is per window, so blocking is tested without)."""
    pytest.importorskip("monai")
    from vessel_kit.models import ModelConfig, build_model_from_config

    torch.manual_seed(0)
    config = ModelConfig(arch="dynunet", spatial_dims=3, tile_size=(8, 16, 16), normalization=PERCENTILE,
                         model_kwargs={"filters": [4, 8, 16], "strides": [1, 2, 2]})
    model = Ensemble([build_model_from_config(config).eval()], [1.0], in_chans=1, normalization=PERCENTILE,
                     tile_size=(8, 16, 16), voxel_size_um=50.0 if voxel_size_um else None, spatial_dims=3)
    run = Predictor(model, InferConfig(tta="none", overlap=0.5, progress=False))
    whole = run.logits(volume, voxel_size_um=voxel_size_um)
    region = (slice(3, 12), slice(5, 20), slice(0, 17))
    assert_same_logits(run.logits(volume, voxel_size_um=voxel_size_um, region=region).array(), whole.array()[region])
    store = infer_blocks(ArraySource(volume, voxel_size_um=voxel_size_um), model, tmp_path / "out.zarr", block=(8, 16, 16),
                         chunks=8, progress=False, pyramid=False, tta="none", overlap=0.5)
    np.testing.assert_array_equal(store.mask[:], run.to_mask(whole))


def test_cli_infers_a_zarr_volume_block_by_block(volume, tmp_path, random_unet):
    import zarr

    from vessel_kit.cli import main

    checkpoint = random_unet(tmp_path / "m.safetensors", tile_size=16, encoder_depth=3, decoder_channels=(16, 8, 4))
    zarr.create_array(str(tmp_path / "volume.zarr"), data=volume, chunks=(8, 8, 8))
    flags = ["--tta", "none", "--axes", "xy", "--voxel-size", "50", "--block", "16"]
    assert main(["infer", str(tmp_path / "volume.zarr"), str(checkpoint), "--out", str(tmp_path / "out.zarr"), "--blocks", *flags]) == 0
    expected = infer_volume(ArraySource(volume, voxel_size_um=50.0), [checkpoint], tta="none", axes=("xy",), progress=False)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr" / "mask" / "0"))[:], expected)
    assert main(["infer", str(tmp_path / "volume.zarr"), str(checkpoint), "--out", str(tmp_path / "x.zarr"), "--workers", "2"]) == 2


def blocks_done(path: Path) -> set:
    from vessel_kit.ome_zarr_out import OutputStore

    return OutputStore(path).done_blocks()


class _FailingOnce(ArraySource):
    """The first read of several slices (a block's: the intensity sample reads single slices)
    fails (OSError), once, recorded by a marker file."""

    def __init__(self, array: np.ndarray, marker: Path) -> None:
        super().__init__(array)
        self.marker = marker

    def read(self, region):
        region = check_region(region, self.shape)
        if region[0].stop - region[0].start > 1 and not self.marker.exists():
            self.marker.touch()
            raise OSError("simulated read error")
        return super().read(region)


class _KillingOnce(ArraySource):
    """The first read in another process (a dask worker) kills that process (SIGKILL), once."""

    def __init__(self, array: np.ndarray, marker: Path) -> None:
        super().__init__(array)
        self.marker, self.client = marker, os.getpid()

    def read(self, region):
        if os.getpid() != self.client and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().read(region)
