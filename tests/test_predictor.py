"""Predictor and InferConfig: set up once, predict many volumes; logits apart from masks; 3D patches
stitched exactly; one schema for options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vessel_kit.infer import infer_volume
from vessel_kit.infer_config import InferConfig
from vessel_kit.normalize import Normalization
from vessel_kit.predictor import LogitVolume, Predictor
from vessel_kit.sources import ArraySource

UNIT = Normalization("unit")
FP16 = 4 / 1024  # a few float16 ulps at |logits| ~ 5


class PointwiseLogits2d(torch.nn.Module):
    """Logits = 10 x the centre channel - 5: every window agrees on every pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1] * 10.0 - 5.0


class PointwiseLogits3d(torch.nn.Module):
    """A 3D network (a 1x1x1 convolution) with logits = 10 x input - 5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(10.0)
            self.conv.bias.fill_(-5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 65535, (40, 48, 72), dtype=np.uint16)


def expected(volume: np.ndarray) -> np.ndarray:
    return volume.astype(np.float64) / 65535 * 10.0 - 5.0


# --- InferConfig ---------------------------------------------------------------------------------


def test_infer_config_round_trips_and_names_unknown_keys(tmp_path):
    config = InferConfig.from_dict({"axes": ["xy", "yz"], "tta": "none", "tile_size": 64, "hysteresis": [0.6, 0.3]})
    assert config.axes == ("xy", "yz") and config.hysteresis == (0.6, 0.3)
    assert InferConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown inference options \['tile'\]; valid: \['axes', 'axis_weights', 'tile_size'"):
        InferConfig.from_dict({"tile": 64})
    with pytest.raises(ValueError, match=r"inference option tta='rot90': must be one of"):
        InferConfig(tta="rot90")
    with pytest.raises(ValueError, match=r"unknown inference options \['ttta'\]"):
        config.replace(ttta="none")
    path = tmp_path / "infer.yaml"
    path.write_text("tta: none\nthreshold: 1.5\n")
    with pytest.raises(ValueError, match=r"infer.yaml: inference option threshold=1.5"):
        InferConfig.from_yaml(path)


def test_infer_config_stores_numpy_numbers_as_python_ones():
    """Sizes computed with numpy (a tile from an array's shape) are accepted, and the config still
    writes to JSON (a bundle manifest) and equals the one given Python numbers."""
    given = InferConfig(tile_size=np.int64(96), batch_size=np.int32(4), threshold=np.float32(0.25),
                        hysteresis=(np.float32(0.5), np.float64(0.25)), axis_weights={"xy": np.float32(2.0)},
                        min_component_size=np.uint16(100), hull_gate=np.int64(10))
    plain = InferConfig(tile_size=96, batch_size=4, threshold=0.25, hysteresis=(0.5, 0.25), axis_weights={"xy": 2.0},
                        min_component_size=100, hull_gate=10)
    assert given == plain
    assert json.loads(json.dumps(given.to_dict())) == plain.to_dict()
    assert type(given.tile_size) is int and type(given.hull_gate.dilation) is int


def test_infer_volume_takes_a_config_and_lets_keywords_override_it(volume):
    config = InferConfig(axes=("xy",), tta="none", tile_size=32, progress=False, min_plane_side=1)
    a = infer_volume(volume, PointwiseLogits2d(), config, in_chans=3, normalization=UNIT, return_logits=True)
    b = infer_volume(volume, PointwiseLogits2d(), config, in_chans=3, normalization=UNIT, return_logits=True, tile_size=None)
    np.testing.assert_allclose(a.astype(np.float64), expected(volume), atol=FP16)
    np.testing.assert_allclose(b.astype(np.float64), expected(volume), atol=FP16)
    with pytest.raises(ValueError, match=r"unknown inference options \['tiles'\]"):
        infer_volume(volume, PointwiseLogits2d(), config, in_chans=3, normalization=UNIT, tiles=3)


# --- Predictor -----------------------------------------------------------------------------------


def test_a_predictor_is_set_up_once_and_reused(volume):
    predictor = Predictor(PointwiseLogits2d(), InferConfig(tta="flips", tile_size=32, progress=False),
                          in_chans=3, normalization=UNIT)
    first = predictor.logits(volume)
    second = predictor.logits(volume[:, :40, :64])
    assert isinstance(first, LogitVolume) and first.shape == volume.shape
    np.testing.assert_allclose(first.array().astype(np.float64), expected(volume), atol=FP16)
    np.testing.assert_allclose(second.array().astype(np.float64), expected(volume[:, :40, :64]), atol=FP16)
    mask = predictor.to_mask(first)  # 0.5 -> logit 0: pixels above half the range
    assert mask.dtype == np.bool_ and np.mean(mask != (expected(volume) > 0)) < 1e-3  # fp16 ties at 0 aside
    assert predictor.threshold == 0.5


def test_to_mask_follows_the_output_options(volume):
    config = InferConfig(axes=("xy",), tta="none", progress=False, top_fraction=0.1, min_plane_side=1)
    predictor = Predictor(PointwiseLogits2d(), config, in_chans=1, normalization=UNIT)
    logits = predictor.logits(volume)
    top = predictor.to_mask(logits)
    assert abs(top.mean() - 0.1) < 1e-3
    thresholded = Predictor(PointwiseLogits2d(), config.replace(top_fraction=None, threshold=0.9),
                            in_chans=1, normalization=UNIT).to_mask(logits)
    np.testing.assert_array_equal(thresholded, logits.array() > np.float16(np.log(0.9 / 0.1)))


def test_a_source_is_read_like_the_array_it_wraps(volume):
    predictor = Predictor(PointwiseLogits2d(), InferConfig(tta="none", tile_size=32, progress=False),
                          in_chans=3, normalization=UNIT)
    from_array = predictor.logits(volume).array()
    from_source = predictor.logits(ArraySource(volume, voxel_size_um=50.0)).array()
    np.testing.assert_array_equal(from_array, from_source)


# --- 3D patches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tta", ["none", "flips"])
def test_3d_patches_stitch_exactly_to_the_whole_volume_prediction(volume, tta):
    """A pointwise 3D model predicts every voxel alike in every patch, so patches blended with the
    separable normaliser must equal the whole volume predicted as one patch."""
    options = {"in_chans": 1, "normalization": UNIT, "progress": False, "return_logits": True, "tta": tta}
    whole = infer_volume(volume, PointwiseLogits3d(), **options).astype(np.float64)
    patches = infer_volume(volume, PointwiseLogits3d(), tile_size=(32, 32, 64), overlap=0.5, **options).astype(np.float64)
    np.testing.assert_allclose(whole, expected(volume), atol=FP16)
    np.testing.assert_allclose(patches, whole, atol=FP16)


def test_3d_models_are_recognised_and_their_tile_sizes_checked(volume):
    predictor = Predictor(PointwiseLogits3d(), InferConfig(progress=False, tile_size=32), in_chans=1, normalization=UNIT)
    assert predictor.ensemble.spatial_dims == 3
    with pytest.raises(ValueError, match=r"tile_size \(32, 32\) needs 1 or 3 sides for these 3D models"):
        Predictor(PointwiseLogits3d(), InferConfig(tile_size=(32, 32)), in_chans=1, normalization=UNIT)
    with pytest.raises(ValueError, match="multiple of the models' stride 32"):
        Predictor(PointwiseLogits3d(), InferConfig(tile_size=(32, 48, 32)), in_chans=1, normalization=UNIT)


class AffineLogits3d(PointwiseLogits3d):
    """A pointwise 3D network with logits = -4 x input + 2."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.conv.weight.fill_(-4.0)
            self.conv.bias.fill_(2.0)


def test_an_ensemble_mixing_2d_and_3d_models_averages_their_logits_with_weights(volume):
    """The 2D models' plane passes and the 3D models' patch pass fill one accumulator, each
    weighted by its models' share: 1:3 gives 0.25 x the 2D logits + 0.75 x the 3D ones."""
    config = InferConfig(axes=("xy", "yz"), tta="flips", tile_size=32, progress=False)
    predictor = Predictor([PointwiseLogits2d(), AffineLogits3d()], config, model_weights=[1, 3], in_chans=3,
                          normalization=UNIT)
    assert [(group.spatial_dims, group.in_chans, share) for group, share in predictor.ensemble.groups()] == \
        [(2, 3, 0.25), (3, 1, 0.75)]
    mixed = predictor.logits(volume).array().astype(np.float64)
    x = volume.astype(np.float64) / 65535
    np.testing.assert_allclose(mixed, 0.25 * (10 * x - 5) + 0.75 * (-4 * x + 2), atol=FP16)


def test_hull_gate_keeps_the_3d_mask_near_the_2d_mask_each_thresholded_alone(volume, tmp_path):
    """Under hull_gate each rank is averaged alone (weights within it), thresholded alone, and the
    3D mask is kept within hull_gate voxels of the 2D one; two accumulators when memmapped."""
    from vessel_kit.postprocess import hull_gate

    config = InferConfig(axes=("xy",), tta="none", tile_size=32, progress=False, threshold=0.5, hull_gate=1)
    predictor = Predictor([PointwiseLogits2d(), AffineLogits3d()], config, model_weights=[1, 3], in_chans=3,
                          normalization=UNIT)
    logits = predictor.logits(volume, accumulator_path=tmp_path / "acc.npy")
    x = volume.astype(np.float64) / 65535
    np.testing.assert_allclose(logits.hull.array().astype(np.float64), 10 * x - 5, atol=FP16)  # the 2D rank alone
    np.testing.assert_allclose(logits.array().astype(np.float64), -4 * x + 2, atol=FP16)  # the 3D rank alone
    assert sorted(path.name for path in tmp_path.iterdir()) == ["acc.hull.npy", "acc.npy"]
    mask = predictor.to_mask(logits)
    np.testing.assert_array_equal(mask, hull_gate(-4 * x + 2 > 0, 10 * x - 5 > 0, 1))
    assert 0 < mask.sum() < (-4 * x + 2 > 0).sum()
    with pytest.raises(ValueError, match=r"hull_gate=\{'dilation': 1, .*\} gates 3D models' mask by 2D models' mask, but this ensemble has only 2D"):
        Predictor(PointwiseLogits2d(), config, in_chans=3, normalization=UNIT)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"axes": ("xz",)}, r"inference options axes=\['xz'\], axis_weights=None choose plane passes, but these models are 3D"),
        ({"axis_weights": {"xy": 1.0, "xz": 1.0, "yz": 2.0}}, "choose plane passes, but these models are 3D"),
        ({"reverse_slices": True}, "inference option reverse_slices=True .* set reverse_slices=False"),
        ({"tta": "d4", "tile_size": (32, 32, 64)}, r"tta='d4' rotates 3D patches .* tile_size is \(32, 32, 64\): use tta='flips'"),
    ],
)
def test_3d_models_refuse_plane_pass_options(options, message):
    with pytest.raises(ValueError, match=message):
        Predictor(PointwiseLogits3d(), InferConfig(**options), in_chans=1, normalization=UNIT)


def test_3d_models_take_the_volumes_own_axis_and_square_d4(volume):
    config = InferConfig(axes=("xy",), tta="d4", tile_size=(32, 64, 64), progress=False)
    part = volume[:, :40, :60]  # a patch larger than the volume in Y and X: padded
    logits = Predictor(PointwiseLogits3d(), config, in_chans=1, normalization=UNIT).logits(part)
    np.testing.assert_allclose(logits.array().astype(np.float64), expected(part), atol=FP16)
    # In a mixed ensemble the plane-pass options are the 2D models'.
    Predictor([PointwiseLogits2d(), PointwiseLogits3d()], InferConfig(axes=("xz",), reverse_slices=True),
              in_chans=3, normalization=UNIT)
    with pytest.raises(ValueError, match="in_chans=3 was given, but 3D models read one channel"):
        Predictor(PointwiseLogits3d(), InferConfig(), in_chans=3, normalization=UNIT)


def test_3d_patches_keep_the_deadline(volume):
    import time

    predictor = Predictor(PointwiseLogits3d(), InferConfig(progress=False, tile_size=32, batch_size=1),
                          in_chans=1, normalization=UNIT)
    with pytest.raises(TimeoutError, match="passed its deadline after 1 of"):
        predictor.logits(volume, deadline=time.monotonic())


def test_inference_presets_ship_with_the_package_and_load_by_name(tmp_path):
    from importlib import resources

    from vessel_kit.infer_config import list_infer_presets

    presets = list_infer_presets()
    assert {"default", "fast", "cpu", "kaggle_t4x2"} <= set(presets) and all(presets.values())
    assert {e.name for e in resources.files("vessel_kit.configs.infer").iterdir() if e.name.endswith(".yaml")} == \
        {f"{name}.yaml" for name in presets}
    assert InferConfig.load("fast") == InferConfig(axes=("xy",), tta="none")
    assert InferConfig.load("default") == InferConfig()
    own = tmp_path / "mine.yaml"
    own.write_text("description: mine\ntta: d4\n")
    assert InferConfig.load(own).tta == "d4"
    with pytest.raises(ValueError, match="nosuch is neither an inference preset"):
        InferConfig.load("nosuch")


def test_components_are_removed_with_the_configured_connectivity(volume):
    """Two voxels touching only at a corner: one component of 2 with 26-connectivity (kept at
    min size 2), two of 1 with 6-connectivity (both removed)."""
    small = np.zeros((6, 32, 32), np.uint16)
    small[2, 10, 10] = small[3, 11, 11] = 65535
    options = {"axes": ("xy",), "tta": "none", "progress": False, "min_plane_side": 1, "min_component_size": 2,
               "polarity": "as_given"}
    for connectivity, kept in ((26, 2), (6, 0)):
        predictor = Predictor(PointwiseLogits2d(), InferConfig(connectivity=connectivity, **options),
                              in_chans=1, normalization=UNIT)
        assert int(predictor.predict(small).sum()) == kept
    with pytest.raises(ValueError, match=r"inference option connectivity=8: must be one of \(6, 18, 26\)"):
        InferConfig(connectivity=8)
