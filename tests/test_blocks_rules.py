"""The non-local mask rules block-wise (``blocks_rules``): top fraction, hysteresis and small
components over blocks equal ``Predictor.to_mask`` on the whole volume; resumable; hull_gate refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("zarr", minversion="3")
from scipy.ndimage import label  # noqa: E402

from vessel_kit import InferConfig, Normalization, Predictor  # noqa: E402
from vessel_kit.blocks import infer_blocks  # noqa: E402
from vessel_kit.blocks_rules import finish_masks  # noqa: E402
from vessel_kit.calibration import logit  # noqa: E402
from vessel_kit.ensemble import Ensemble  # noqa: E402
from vessel_kit.models import build_model  # noqa: E402
from vessel_kit.ome_zarr_out import create_output  # noqa: E402
from vessel_kit.postprocess import hysteresis_threshold, remove_small_components  # noqa: E402
from vessel_kit.predictor import _threshold  # noqa: E402
from vessel_kit.synth import make_synthetic_volume  # noqa: E402

SHAPE, BLOCK = (12, 27, 30), (4, 8, 8)  # 3 x 4 x 4 blocks, the last ones cut by the volume's edge
COARSE = (6, 16, 16)  # 2 x 2 x 2 blocks, where the merge is not what a test is about
FAST = dict(tta="none", axes=("xy", "yz"), tile_size=16, overlap=0.5, min_plane_side=8, progress=False)


def sigmoid(value: float) -> float:
    return float(1 / (1 + np.exp(-value)))


@pytest.fixture(scope="module")
def model() -> Ensemble:
    torch.manual_seed(0)
    unet = build_model("unet", "resnet18", in_chans=3, encoder_weights=None, encoder_depth=3,
                       decoder_channels=(16, 8, 4)).eval()
    return Ensemble([unet], [1.0], in_chans=3, normalization=Normalization("percentile"), tile_size=None,
                    voxel_size_um=None)


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return make_synthetic_volume(SHAPE, seed=3)[0]


@pytest.fixture(scope="module")
def whole(model, volume):
    """The in-memory logits, and probabilities at their 45th, 60th and 85th percentiles."""
    logits = Predictor(model, InferConfig(**FAST)).logits(volume)
    values = logits.array().astype(np.float32)
    return logits, [sigmoid(np.quantile(values, q)) for q in (0.45, 0.6, 0.85)]


@pytest.fixture(scope="module")
def first_pass(model, volume, whole, tmp_path_factory):
    """A finished block-wise run (min_component_size, 26-connected): later runs copy it and only
    do the second pass."""
    _, (_, middle, _) = whole
    out = tmp_path_factory.mktemp("rules") / "first.zarr"
    infer_blocks(volume, model, out, block=BLOCK, chunks=BLOCK, pyramid=False, threshold=middle,
                 min_component_size=5, connectivity=26, **FAST)
    return out


def rule_sets(low, middle, high):
    return {
        "size": dict(threshold=middle, min_component_size=12),
        "size 6": dict(threshold=middle, min_component_size=6, connectivity=6),
        "size 18": dict(threshold=middle, min_component_size=6, connectivity=18),
        "size 26": dict(threshold=low, min_component_size=40, connectivity=26),
        "top fraction": dict(top_fraction=0.3),
        "top fraction + size": dict(top_fraction=0.25, min_component_size=8, connectivity=18),
        "hysteresis": dict(hysteresis=(high, low)),
        "hysteresis + size": dict(hysteresis=(high, middle), min_component_size=15),
        "hysteresis + size 26": dict(hysteresis=(high, middle), min_component_size=30, connectivity=26),
    }


@pytest.mark.parametrize("name", list(rule_sets(0, 0, 0)))
def test_blocked_rules_equal_the_in_memory_mask(name, model, volume, whole, first_pass, tmp_path):
    logits, levels = whole
    rules = rule_sets(*levels)[name]
    expected = Predictor(model, InferConfig(**FAST, **rules)).to_mask(logits)
    plain = Predictor(model, InferConfig(**FAST, threshold=rules.get("threshold", levels[1]))).to_mask(logits)
    assert expected.any() and not np.array_equal(expected, plain)  # the rule changes the mask
    out = tmp_path / "out.zarr"
    shutil.copytree(first_pass, out)
    store = infer_blocks(volume, model, out, block=BLOCK, chunks=BLOCK, pyramid=False, **FAST, **rules)
    np.testing.assert_array_equal(store.mask[:], expected.astype(np.uint8))


def test_the_calibrated_component_size_runs_block_wise(model, volume, whole, first_pass, tmp_path):
    """An ensemble carrying a calibrated ``min_component_size`` (config's None): the blocked mask
    equals the in-memory one, which removes components under it; an explicit 0 keeps them."""
    logits, (_, middle, _) = whole
    calibrated = Ensemble(model.models, model.weights, in_chans=3, normalization=model.normalization, tile_size=None,
                          voxel_size_um=None, min_component_size=12)
    expected = Predictor(calibrated, InferConfig(**FAST, threshold=middle)).to_mask(logits)
    kept = Predictor(calibrated, InferConfig(**FAST, threshold=middle, min_component_size=0)).to_mask(logits)
    assert expected.any() and not np.array_equal(expected, kept)
    out = tmp_path / "out.zarr"
    shutil.copytree(first_pass, out)
    store = infer_blocks(volume, calibrated, out, block=BLOCK, chunks=BLOCK, pyramid=False, threshold=middle, **FAST)
    np.testing.assert_array_equal(store.mask[:], expected.astype(np.uint8))


def test_components_cross_block_faces_edges_and_corners(whole):
    """The test volume's masks make the merge matter: a component spans >= 8 blocks."""
    logits, (low, _, _) = whole
    components, _ = label(logits.array() > np.float16(logit(low)), structure=np.ones((3, 3, 3)))
    blocks = np.indices(SHAPE).reshape(3, -1).T // BLOCK
    spans = [len({tuple(b) for b in blocks[(components == c).ravel()]}) for c in range(1, components.max() + 1)]
    assert max(spans) >= 8


@pytest.mark.parametrize("connectivity", [None, 6, 18, 26])
def test_random_masks_and_diagonal_corner_contacts(connectivity, tmp_path):
    """A store filled with logits by hand: sparse random masks, plus two voxels that meet only at
    the corner where 8 blocks meet (one component under 26-connectivity, two under the others)."""
    rng = np.random.default_rng(connectivity or 0)
    mask = rng.random(SHAPE) < 0.3
    mask[2:6, 6:10, 6:10] = False
    mask[3, 7, 7] = mask[4, 8, 8] = True
    store = _store(tmp_path, np.where(mask, 4.0, -4.0).astype(np.float16))
    finish_masks(store, dict(min_component_size=2, connectivity=connectivity), 0.5, BLOCK, progress=False)
    expected = remove_small_components(mask, 2, connectivity=connectivity)
    assert expected[3, 7, 7] == (connectivity == 26)
    np.testing.assert_array_equal(store.mask[:], expected)


def test_hysteresis_over_blocks(tmp_path):
    rng = np.random.default_rng(1)
    scores = rng.normal(0, 2, SHAPE).astype(np.float16)
    store = _store(tmp_path, scores)
    finish_masks(store, dict(hysteresis=(0.97, 0.6)), 0.5, BLOCK, progress=False)
    expected = hysteresis_threshold(scores, SHAPE, logit(0.97), logit(0.6))  # as Predictor.to_mask calls it
    np.testing.assert_array_equal(store.mask[:], expected)


def test_interrupted_second_pass_finishes_on_rerun(tmp_path, monkeypatch):
    """Stopped while labelling, then while writing: each rerun skips what is recorded and the
    result equals an undisturbed run's."""
    import vessel_kit.blocks_rules as blocks_rules

    scores = np.random.default_rng(2).normal(0, 2, SHAPE).astype(np.float16)
    rules = dict(hysteresis=(0.95, 0.6), min_component_size=10, connectivity=6)  # two stages
    hysteresis = hysteresis_threshold(scores, SHAPE, logit(0.95), logit(0.6))
    undisturbed = remove_small_components(hysteresis, 10, connectivity=6)
    assert not np.array_equal(undisturbed, hysteresis)
    store = _store(tmp_path, scores)
    labelled, original_label = [], blocks_rules._SecondPass._label_block
    for where, stop_after in (("_label_block", 10), ("_label_block", 60), ("_mask", 70)):
        calls = []
        original = getattr(blocks_rules._SecondPass, where)

        def stopping(self, *args, original=original, calls=calls, stop_after=stop_after):
            if len(calls) == stop_after:
                raise KeyboardInterrupt
            calls.append(args[0])
            return original(self, *args)

        monkeypatch.setattr(blocks_rules._SecondPass, where, stopping)
        with pytest.raises(KeyboardInterrupt):
            finish_masks(store, rules, 0.5, BLOCK, progress=False)
        monkeypatch.setattr(blocks_rules._SecondPass, where, original)
    monkeypatch.setattr(blocks_rules._SecondPass, "_label_block",
                        lambda self, *args: labelled.append(args[1]) or original_label(self, *args))
    finish_masks(store, rules, 0.5, BLOCK, progress=False)
    assert labelled == []  # both stages were recorded whole before the write was stopped
    np.testing.assert_array_equal(store.mask[:], undisturbed)


def test_other_rules_or_none_rewrite_the_mask(tmp_path):
    scores = np.random.default_rng(3).normal(0, 2, SHAPE).astype(np.float16)
    store = _store(tmp_path, scores, COARSE)
    finish_masks(store, dict(min_component_size=20), 0.5, COARSE, progress=False)
    finish_masks(store, dict(top_fraction=0.1), 0.5, COARSE, progress=False)
    top = _threshold(lambda: iter(scores), SHAPE, 0.5, 0.1, None)  # the in-memory rule
    assert top.sum() >= np.ceil(0.1 * np.prod(SHAPE))
    np.testing.assert_array_equal(store.mask[:], top)
    finish_masks(store, None, 0.5, COARSE, progress=False)  # the plain threshold again
    np.testing.assert_array_equal(store.mask[:], scores > 0)
    assert store.root.attrs.get("vessel_kit_rules") is None


def test_hull_gate_is_refused_by_name(model, volume, tmp_path):
    with pytest.raises(ValueError, match="hull_gate.*no block-wise form.*infer_volume"):
        infer_blocks(volume, model, tmp_path / "out.zarr", block=BLOCK, chunks=BLOCK, hull_gate=3, **FAST)
    assert not (tmp_path / "out.zarr").exists()


def _store(folder, scores: np.ndarray, block=BLOCK):
    """An output store whose first pass is done in ``block``s, with ``scores`` as its logits and
    their threshold at 0 as its mask."""
    from vessel_kit.blocks import block_regions

    store = create_output(folder / "out.zarr", SHAPE, voxel_size_um=None, chunks=block, logits=True)
    for index, region in block_regions(SHAPE, block):
        store.write_block(region, scores[region] > 0, scores[region])
        store.mark_done(index)
    return store


def test_cli_blocks_take_the_mask_rule_flags(volume, tmp_path, random_unet):
    import zarr

    from vessel_kit import infer_volume
    from vessel_kit.cli import main

    checkpoint = random_unet(tmp_path / "m.safetensors", tile_size=16, encoder_depth=3, decoder_channels=(16, 8, 4))
    zarr.create_array(str(tmp_path / "volume.zarr"), data=volume, chunks=(8, 8, 8))
    rules = ["--top-fraction", "0.3", "--min-component-size", "6", "--connectivity", "26"]
    flags = ["--tta", "none", "--axes", "xy", "--voxel-size", "50", "--block", "8", *rules]
    with pytest.warns(UserWarning, match="no calibrated threshold"):
        assert main(["infer", str(tmp_path / "volume.zarr"), str(checkpoint), "--out", str(tmp_path / "out.zarr"),
                     "--blocks", *flags]) == 0
        expected = infer_volume(volume, [checkpoint], tta="none", axes=("xy",), top_fraction=0.3, min_component_size=6,
                                connectivity=26, voxel_size_um=50.0, progress=False)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr" / "mask" / "0"))[:], expected)
