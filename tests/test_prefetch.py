"""``InferConfig.prefetch``: batches prepared in a background thread (True, None) or in the
model's thread (False) give bit-identical logits and masks, on plane passes (2D, 2.5D, two axes,
flips) and 3D patch passes (whole volume and a region); bad values are refused."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from vessel_kit import InferConfig, Normalization, Predictor
from vessel_kit.ensemble import Ensemble
from vessel_kit.models import build_model
from vessel_kit.sources import ArraySource
from vessel_kit.synth import make_synthetic_volume

PERCENTILE = Normalization("percentile")
PLANES = dict(tta="flips", axes=("xy", "yz"), tile_size=16, overlap=0.5, min_plane_side=8, batch_size=3,
              top_fraction=0.3, progress=False)  # random weights: a threshold gives an all-or-nothing mask


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return make_synthetic_volume((8, 20, 22), seed=5)[0]


def unet(in_chans: int) -> Ensemble:
    """A seeded random-weight U-Net small enough for the CPU (in_chans 1: 2D, 3: 2.5D)."""
    torch.manual_seed(0)
    model = build_model("unet", "resnet18", in_chans=in_chans, encoder_weights=None, encoder_depth=3,
                        decoder_channels=(16, 8, 4)).eval()
    return Ensemble([model], [1.0], in_chans=in_chans, normalization=PERCENTILE, tile_size=None, voxel_size_um=None)


def logits_and_mask(model: Ensemble, volume, prefetch: bool | None):
    run = Predictor(model, InferConfig(**PLANES, prefetch=prefetch))
    logits = run.logits(volume)
    return logits.array(), run.to_mask(logits)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_plane_passes_are_bit_identical_with_and_without_prefetch(volume, in_chans):
    model = unet(in_chans)
    inline_logits, inline_mask = logits_and_mask(model, volume, False)
    threaded_logits, threaded_mask = logits_and_mask(model, volume, True)
    np.testing.assert_array_equal(inline_logits, threaded_logits)
    np.testing.assert_array_equal(inline_mask, threaded_mask)
    assert 0.2 < inline_mask.mean() < 0.4  # a real mask, not a degenerate one
    default_logits, _ = logits_and_mask(model, volume, None)  # None: the background thread
    np.testing.assert_array_equal(default_logits, threaded_logits)


def test_3d_patch_passes_are_bit_identical_with_and_without_prefetch(volume):
    pytest.importorskip("monai")
    from vessel_kit.models import ModelConfig, build_model_from_config

    torch.manual_seed(0)
    config = ModelConfig(arch="dynunet", spatial_dims=3, tile_size=(8, 16, 16), normalization=PERCENTILE,
                         model_kwargs={"filters": [4, 8, 16], "strides": [1, 2, 2]})
    model = Ensemble([build_model_from_config(config).eval()], [1.0], in_chans=1, normalization=PERCENTILE,
                     tile_size=(8, 16, 16), voxel_size_um=None, spatial_dims=3)
    region = (slice(2, 8), slice(5, 20), slice(0, 17))
    results = {}
    for prefetch in (False, True):
        run = Predictor(model, InferConfig(tta="none", overlap=0.5, batch_size=2, progress=False, prefetch=prefetch))
        whole = run.logits(volume)
        results[prefetch] = (whole.array(), run.to_mask(whole), run.logits(volume, region=region).array())
    for inline, threaded in zip(results[False], results[True], strict=True):
        np.testing.assert_array_equal(inline, threaded)


def test_without_prefetch_every_read_happens_in_the_calling_thread(volume):
    """The plane batches are read (and normalised, cut) in the model's thread with prefetch=False,
    and in another thread with prefetch=True."""
    model = unet(3)
    for prefetch, inline in ((False, True), (True, False)):
        source = _ThreadRecording(volume)
        Predictor(model, InferConfig(**{**PLANES, "axes": ("xy",), "tta": "none", "prefetch": prefetch})).logits(source)
        assert (source.threads == {threading.get_ident()}) is inline


@pytest.mark.parametrize("value", ["no", 0, 1.0])
def test_a_bad_prefetch_value_is_refused_by_name(value):
    with pytest.raises(ValueError, match=r"inference option prefetch=.*must be true or false"):
        InferConfig(prefetch=value)
    with pytest.raises(ValueError, match="prefetch"):
        InferConfig.from_dict({"prefetch": value})


def test_prefetch_round_trips_through_the_config_and_the_cli():
    from vessel_kit.cli import _build_parser as build_parser

    assert InferConfig.from_dict({"prefetch": False}).to_dict()["prefetch"] is False
    assert InferConfig().prefetch is None
    args = build_parser().parse_args(["infer", "volume", "model.safetensors", "--prefetch", "false"])
    assert args.prefetch is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["infer", "volume", "model.safetensors", "--prefetch", "sometimes"])


class _ThreadRecording(ArraySource):
    """An array source that records the threads its reads run in."""

    def __init__(self, array: np.ndarray) -> None:
        super().__init__(array)
        self.threads: set[int] = set()

    def read(self, region):
        self.threads.add(threading.get_ident())
        return super().read(region)
