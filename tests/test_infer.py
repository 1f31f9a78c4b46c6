"""infer_volume: coverage and normalisation at every voxel, axes, 2.5D depth, TTA inversion,
ensembling, rescaling, float16 accumulation, thresholds, devices, checkpoints, bad input."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from vessel_kit.axes import SLICE_AXIS
from vessel_kit.infer import infer_volume, load_ensemble
from vessel_kit.models import ModelConfig, build_model, save_checkpoint
from vessel_kit.normalize import Normalization
from vessel_kit.resample import resample_volume
from vessel_kit.tiling import gaussian_importance, window_normaliser, window_starts
from vessel_kit.tta import tta_views

UNIT = Normalization("unit")


class ChannelMean(torch.nn.Module):
    """Logits = scale x mean of the input channels + offset: a known function of the input."""

    def __init__(self, scale: float = 10.0, offset: float = -5.0) -> None:
        super().__init__()
        self.scale, self.offset = scale, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True) * self.scale + self.offset


def expected_channel_mean(volume, axis, in_chans, scale=10.0, offset=-5.0):
    """What ChannelMean must give along ``axis``: the mean of each voxel's clamped neighbours."""
    unit = volume.astype(np.float64) / 65535
    slice_axis = SLICE_AXIS[axis]
    count = volume.shape[slice_axis]
    half = in_chans // 2
    total = np.zeros_like(unit)
    for offset_index in range(-half, half + 1):
        index = np.clip(np.arange(count) + offset_index, 0, count - 1)
        total += np.take(unit, index, axis=slice_axis)
    return total / in_chans * scale + offset


@pytest.fixture(scope="module")
def volume():
    return np.random.default_rng(0).integers(0, 65535, (9, 45, 70), dtype=np.uint16)


def run(volume, model, **options):
    options = {"in_chans": 1, "normalization": UNIT, "progress": False, "return_logits": True, "min_plane_side": 1, **options}
    return infer_volume(volume, model, **options).astype(np.float64)


FP16_TOLERANCE = 5 / 1024  # one float16 ulp at |logits| ~ 5


def test_a_passed_deadline_stops_the_prediction(volume):
    with pytest.raises(TimeoutError, match="passed its deadline after 1 of"):
        run(volume, ChannelMean(), batch_size=1, deadline=time.monotonic())
    run(volume, ChannelMean(), deadline=time.monotonic() + 3600)  # a future deadline changes nothing


def test_axes_the_deadline_cannot_fit_are_skipped(volume, monkeypatch):
    """A fake clock that advances one second per batch: with a deadline one second after xy
    ends, xz would overrun; the result is the xy prediction alone, at full weight."""
    clock = {"now": 0.0}

    class Ticking(ChannelMean):
        def forward(self, x):
            clock["now"] += 1.0
            return super().forward(x)

    monkeypatch.setattr(time, "monotonic", lambda: clock["now"])
    options = {"in_chans": 3, "tile_size": 64, "batch_size": 2, "tta": "none"}
    run(volume, Ticking(), axes=["xy"], **options)
    xy_seconds, clock["now"] = clock["now"], 0.0
    with pytest.warns(UserWarning, match=r"no time for axes \['xz'\]; using \['xy'\] only"):
        logits = run(volume, Ticking(), axis_weights={"xy": 1, "xz": 2}, axes=["xy", "xz"], deadline=xy_seconds + 1, **options)
    assert clock["now"] == xy_seconds
    np.testing.assert_allclose(logits, expected_channel_mean(volume, "xy", 3), atol=FP16_TOLERANCE)


def test_axes_with_thin_planes_are_skipped(volume):
    """(9, 45, 70): xz and yz planes are 9 pixels tall; below min_plane_side they are skipped."""
    xy_only = run(volume, ChannelMean(), axes=["xy"])
    with pytest.warns(UserWarning, match="skipping axis xz"):
        np.testing.assert_array_equal(run(volume, ChannelMean(), min_plane_side=10), xy_only)
    with pytest.warns(UserWarning, match="skipping axis yz"):  # all too thin: the widest planes (xy) stay
        np.testing.assert_array_equal(run(volume, ChannelMean(), min_plane_side=50), xy_only)
    with pytest.raises(ValueError, match="min_plane_side"):
        run(volume, ChannelMean(), min_plane_side=0)


class WindowHeight(torch.nn.Module):
    """Logits = the height of the window the model is fed, at every pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x[:, :1], float(x.shape[-2]))


def test_whole_planes_are_padded_up_to_pad_planes_to(volume):
    """(9, 45, 70), stride 32: whole xz planes (9 rows) are fed as 32 rows, or as 64 with
    pad_planes_to=64; xy planes (45 rows: 64 either way) are unchanged; a pointwise model's
    logits are unchanged by the padding."""
    options = {"tta": "none", "min_plane_side": 1}
    assert np.unique(run(volume, WindowHeight(), axes=["xz"], **options)).tolist() == [32.0]
    assert np.unique(run(volume, WindowHeight(), axes=["xz"], pad_planes_to=64, **options)).tolist() == [64.0]
    assert np.unique(run(volume, WindowHeight(), axes=["xz"], pad_planes_to=40, **options)).tolist() == [64.0]
    assert np.unique(run(volume, WindowHeight(), axes=["xy"], pad_planes_to=64, **options)).tolist() == [64.0]
    padded = run(volume, ChannelMean(), axes=["xz"], pad_planes_to=64, **options)
    np.testing.assert_allclose(padded, expected_channel_mean(volume, "xz", 1), atol=FP16_TOLERANCE)
    with pytest.raises(ValueError, match="pad_planes_to"):
        run(volume, ChannelMean(), pad_planes_to=0)


@pytest.mark.parametrize("axis", ["xy", "xz", "yz"])
@pytest.mark.parametrize("in_chans", [1, 3, 5])
@pytest.mark.parametrize("tile", [None, 32, 64, 128])
def test_every_voxel_is_covered_and_normalised(volume, axis, in_chans, tile):
    logits = run(volume, ChannelMean(), axes=(axis,), in_chans=in_chans, tile_size=tile, tta="none")
    np.testing.assert_allclose(logits, expected_channel_mean(volume, axis, in_chans), atol=FP16_TOLERANCE)


def test_axes_are_averaged_with_their_weights(volume):
    logits = run(volume, ChannelMean(), in_chans=3, tile_size=32, axis_weights={"xy": 2, "xz": 1, "yz": 1})
    expected = sum(w * expected_channel_mean(volume, a, 3) for a, w in (("xy", 0.5), ("xz", 0.25), ("yz", 0.25)))
    np.testing.assert_allclose(logits, expected, atol=FP16_TOLERANCE)


@pytest.mark.parametrize("tta", ["none", "flips", "d4"])
def test_tta_views_are_inverted(volume, tta):
    # The input is random, so any view not exactly undone would move logits off their voxels.
    logits = run(volume, ChannelMean(), axes=("xy", "yz"), in_chans=3, tile_size=32, tta=tta, reverse_slices=True)
    expected = (expected_channel_mean(volume, "xy", 3) + expected_channel_mean(volume, "yz", 3)) / 2
    np.testing.assert_allclose(logits, expected, atol=FP16_TOLERANCE)


def test_each_view_is_undone_and_all_d4_views_differ():
    x = torch.rand(2, 3, 8, 8)
    views = tta_views("d4", reverse_slices=True)
    assert len(views) == 16 and len(tta_views("flips")) == 4 and len(tta_views("none")) == 1
    for transform, inverse in views:
        assert torch.equal(inverse(transform(x)[:, 1:2]), x[:, 1:2])  # centre channel survives reversal
    transformed = {tuple(transform(x[:, :1]).flatten().tolist()) for transform, _ in views[:8]}
    assert len(transformed) == 8


class Shifted(torch.nn.Module):
    """Not flip-equivariant: shows that TTA really runs the model on transformed input."""

    def forward(self, x):
        return torch.roll(x[:, :1], shifts=1, dims=-1) * 10


def test_tta_changes_a_non_equivariant_model(volume):
    plain = run(volume, Shifted(), axes=("xy",), tile_size=32, tta="none")
    flipped = run(volume, Shifted(), axes=("xy",), tile_size=32, tta="flips")
    assert np.abs(plain - flipped).max() > 1.0


def test_ensemble_is_the_weighted_mean_of_logits(volume):
    a, b = ChannelMean(10.0, -5.0), ChannelMean(-4.0, 3.0)
    logits = run(volume, [a, b], model_weights=[3, 1], axes=("xz",), tile_size=32)
    expected = 0.75 * expected_channel_mean(volume, "xz", 1, 10.0, -5.0) + 0.25 * expected_channel_mean(volume, "xz", 1, -4.0, 3.0)
    np.testing.assert_allclose(logits, expected, atol=FP16_TOLERANCE)


def test_float16_accumulation_matches_float64(volume):
    logits = run(volume, ChannelMean(20.0, -10.0), in_chans=3, tile_size=32, tta="flips")
    expected = np.mean([expected_channel_mean(volume, a, 3, 20.0, -10.0) for a in ("xy", "xz", "yz")], axis=0)
    assert np.abs(logits - expected).max() <= 10 / 1024 + 1e-6  # half an ulp at |10| plus float32 blending


def test_memmap_accumulator(volume, tmp_path):
    logits = infer_volume(volume, ChannelMean(), in_chans=1, normalization=UNIT, tile_size=32, return_logits=True,
                          accumulator_path=tmp_path / "acc.npy", progress=False)
    assert isinstance(logits, np.memmap)
    np.testing.assert_allclose(logits.astype(np.float64), np.mean([expected_channel_mean(volume, a, 1) for a in ("xy", "xz", "yz")], axis=0), atol=FP16_TOLERANCE)


def test_rescaled_inference_returns_the_original_shape():
    z, y, x = np.meshgrid(np.linspace(0, 1, 20), np.linspace(0, 1, 36), np.linspace(0, 1, 40), indexing="ij")
    smooth = ((np.sin(3 * z) + np.cos(2 * y) * x + 2) / 4 * 65535).astype(np.uint16)
    logits = run(smooth, ChannelMean(), axes=("xy",), tile_size=32, voxel_size_um=63.08, model_voxel_size_um=50.0)
    assert logits.shape == smooth.shape
    # Up- then down-sampling a smooth field changes it little: the identity-like logits survive.
    np.testing.assert_allclose(logits, expected_channel_mean(smooth, "xy", 1), atol=0.05)


def test_nearly_equal_voxel_sizes_are_not_resampled(volume, monkeypatch):
    import vessel_kit.predictor as infer_module

    def fail(*args, **kwargs):
        raise AssertionError("resampled")

    monkeypatch.setattr(infer_module, "resample_volume", fail)
    run(volume, ChannelMean(), axes=("xy",), tile_size=32, voxel_size_um=50.28, model_voxel_size_um=50.0)
    with pytest.raises(AssertionError, match="resampled"):
        run(volume, ChannelMean(), axes=("xy",), tile_size=32, voxel_size_um=63.08, model_voxel_size_um=50.0)


def test_resample_volume_round_trip():
    volume = np.random.default_rng(1).random((6, 10, 12)).astype(np.float32)
    up = resample_volume(volume, (12, 20, 24))
    assert up.shape == (12, 20, 24) and up.dtype == np.float32
    np.testing.assert_allclose(up[:, ::2, ::2].mean(), volume.mean(), atol=0.02)
    constant = np.full((5, 7, 9), 1234, np.uint16)
    np.testing.assert_array_equal(resample_volume(constant, (8, 3, 20)), np.full((8, 3, 20), 1234, np.uint16))
    same = resample_volume(volume, volume.shape)
    np.testing.assert_allclose(same, volume, atol=1e-6)


def test_threshold_and_exact_top_fraction(volume):
    mask = infer_volume(volume, ChannelMean(), in_chans=1, normalization=UNIT, axes=("xy",), tile_size=32, tta="none",
                        threshold=0.5, progress=False)
    logits = expected_channel_mean(volume, "xy", 1)
    assert mask.dtype == np.bool_
    assert np.mean(mask == (logits > 0)) > 0.999  # float16 rounding may flip values at 0
    top = infer_volume(volume, ChannelMean(), in_chans=1, normalization=UNIT, axes=("xy",), tile_size=32, tta="none",
                       top_fraction=0.1, progress=False)
    assert top.sum() == math.ceil(0.1 * volume.size) or abs(top.sum() / volume.size - 0.1) < 0.001
    assert logits[top].min() >= logits[~top].max() - FP16_TOLERANCE
    out = np.zeros(volume.shape, bool)
    assert infer_volume(volume, ChannelMean(), in_chans=1, normalization=UNIT, axes=("xy",), out=out, progress=False) is out


def test_small_components_are_removed(volume):
    from vessel_kit.postprocess import remove_small_components

    options = dict(in_chans=1, normalization=UNIT, axes=("xy",), tile_size=32, tta="none", threshold=0.8, progress=False)
    plain = infer_volume(volume, ChannelMean(), **options)
    cleaned = infer_volume(volume, ChannelMean(), min_component_size=4, **options)
    np.testing.assert_array_equal(cleaned, remove_small_components(plain, 4))
    assert 0 < cleaned.sum() < plain.sum()


def test_two_devices_split_the_planes(volume):
    single = run(volume, ChannelMean(), in_chans=3, tile_size=32, tta="flips")
    split = run(volume, ChannelMean(), in_chans=3, tile_size=32, tta="flips", device=["cpu", "cpu"])
    np.testing.assert_array_equal(single, split)


def test_checkpoint_needs_nothing_else(tmp_path):
    torch.manual_seed(0)
    model = build_model("unet", "resnet18", in_chans=3)
    config = ModelConfig(arch="unet", encoder="resnet18", in_chans=3, normalization=Normalization("percentile"),
                         voxel_size_um=50.0, tile_size=64)
    path = save_checkpoint(tmp_path / "m.safetensors", model, config)
    volume = np.random.default_rng(2).integers(20000, 30000, (6, 70, 50), dtype=np.uint16)
    mask = infer_volume(volume, path, axes=("xy",), tta="none", progress=False)
    assert mask.shape == volume.shape and mask.dtype == np.bool_
    ensemble = load_ensemble([path, path])
    assert (ensemble.in_chans, ensemble.tile_size, ensemble.voxel_size_um, ensemble.weights) == (3, 64, 50.0, [0.5, 0.5])
    with pytest.raises(ValueError, match="in_chans=1 was given, but .*m.safetensors needs 3"):
        infer_volume(volume, path, in_chans=1, progress=False)


class NaNModel(torch.nn.Module):
    def forward(self, x):
        return x[:, :1] * float("nan")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda v: infer_volume(v[0], ChannelMean(), in_chans=1, normalization=UNIT), ValueError, "must be a \\(Z, Y, X\\) array"),
        (lambda v: infer_volume(v[:0], ChannelMean(), in_chans=1, normalization=UNIT), ValueError, "volume is empty"),
        (lambda v: infer_volume(v > 0, ChannelMean(), in_chans=1, normalization=UNIT), ValueError, "intensities .* got dtype bool"),
        (lambda v: infer_volume(v, ChannelMean(), in_chans=1, normalization=UNIT, tile_size=48), ValueError, "multiple of the models' stride 32, got 48"),
        (lambda v: infer_volume(v, ChannelMean()), ValueError, "in_chans and normalization are needed"),
        (lambda v: infer_volume(v, ChannelMean(), in_chans=1, normalization=UNIT, axes=("xy", "zz")), ValueError, "option axes=.*must be distinct names"),
        (lambda v: infer_volume(v, ChannelMean(), in_chans=1, normalization=UNIT, tta="many"), ValueError, "option tta='many': must be one of"),
        (lambda v: infer_volume(v, ChannelMean(), in_chans=1, normalization=UNIT, threshold=1.5), ValueError, "option threshold=1.5: must be a probability"),
        (lambda v: infer_volume(v, ChannelMean(), in_chans=1, normalization=UNIT, overlap=1.0), ValueError, "option overlap=1.0: must be a number in"),
        (lambda v: infer_volume(v, [], in_chans=1, normalization=UNIT), ValueError, "no models given"),
        (lambda v: infer_volume(v, ChannelMean(), in_chans=1, normalization=UNIT, device="gpu"), ValueError, "'gpu' is not a device name"),
        (lambda v: infer_volume(v, ChannelMean(), in_chans=1, normalization=UNIT, device=[]), ValueError, "device list is empty"),
        (lambda v: infer_volume(v, ChannelMean(), in_chans=1, normalization=UNIT, device="cuda:99"), ValueError, "'cuda:99' cannot be used"),
        (lambda v: infer_volume(v, NaNModel(), in_chans=1, normalization=UNIT, progress=False), FloatingPointError, "non-finite logits on xy plane 0"),
        *[(lambda v, size=size: infer_volume(v, ChannelMean(), in_chans=1, normalization=UNIT, voxel_size_um=size),
           ValueError, "option voxel_size_um=.*must be a voxel size in µm") for size in (0, -1.0, float("nan"), float("inf"), 1e9, True)],
        (lambda v: infer_volume(v, ChannelMean(), in_chans=1, normalization=UNIT, voxel_size_um=50.0, model_voxel_size_um=5.0),
         ValueError, "voxel_size_um=50.0 is 10 times the models' 5.0 µm"),
        (lambda v: infer_volume(v, ChannelMean(), in_chans=1, normalization=UNIT, min_component_size=-5), ValueError, "option min_component_size=-5"),
        (lambda v: infer_volume(v, ChannelMean(), in_chans=1, normalization=UNIT, hysteresis=(0.3, 0.6)), ValueError, "option hysteresis=.*0 < low < high"),
        (lambda v: infer_volume(v, ChannelMean(), in_chans=1, normalization=UNIT, hysteresis=(0.6, 0.3), top_fraction=0.1),
         ValueError, "top_fraction and hysteresis exclude each other"),
        (lambda v: infer_volume(v, ChannelMean(), in_chans=1, normalization=UNIT, batch_size=2.0), ValueError, "option batch_size=2.0: must be an int"),
    ],
)
def test_bad_input(volume, call, error, message):
    with pytest.raises(error, match=message):
        call(volume)


def test_a_failing_model_does_not_hang_the_prefetch_thread(volume):
    # Many batches queue up behind the first, failing one: the producer must still stop.
    with pytest.raises(FloatingPointError):
        infer_volume(volume, NaNModel(), in_chans=1, normalization=UNIT, tile_size=32, batch_size=1, progress=False)


def test_mismatched_ensemble_members(tmp_path):
    paths = []
    for chans in (1, 3):
        config = ModelConfig(arch="unet", encoder="resnet18", in_chans=chans, normalization=UNIT, tile_size=64)
        paths.append(save_checkpoint(tmp_path / f"m{chans}.safetensors", build_model("unet", "resnet18", in_chans=chans), config))
    with pytest.raises(ValueError, match="disagree on in_chans"):
        load_ensemble(paths)


def test_tiling_helpers():
    assert window_starts(100, 32, 16) == [0, 14, 27, 41, 54, 68]  # steps <= 16, last ends at 100
    assert window_starts(20, 32, 16) == [0]
    importance = gaussian_importance((32, 32))
    assert importance.max() == 1.0 and importance.min() > 0
    starts = (window_starts(100, 32, 16), window_starts(40, 32, 16))
    normaliser = window_normaliser((100, 40), (32, 32), starts)
    assert normaliser.shape == (100, 40) and normaliser.min() > 0
    brute = np.zeros((100, 40), np.float64)  # the separable sum equals accumulating every window
    for y in starts[0]:
        for x in starts[1]:
            brute[y : y + 32, x : x + 32] += importance
    np.testing.assert_allclose(normaliser, brute, rtol=1e-5)


def test_window_normaliser_is_separable_in_3d():
    shape, tile = (20, 30, 25), (8, 16, 16)
    starts = [window_starts(n, t, t // 2) for n, t in zip(shape, tile)]
    importance = gaussian_importance(tile)
    assert importance.shape == tile and importance.max() == 1.0 and importance.min() > 0
    brute = np.zeros(shape, np.float64)
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                brute[z : z + 8, y : y + 16, x : x + 16] += importance
    np.testing.assert_allclose(window_normaliser(shape, tile, starts), brute, rtol=1e-5)
    counts = np.zeros(shape, np.int64)
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                counts[z : z + 8, y : y + 16, x : x + 16] += 1
    np.testing.assert_array_equal(window_normaliser(shape, tile, starts, gaussian=False), counts)
    with pytest.raises(ValueError, match="one entry per dimension"):
        window_normaliser(shape, tile[:2], starts)
