"""Hull rules of 2D + 3D ensembles (``hull.HullGate``): parsing, the convex hull, and the
4th place's sum rule end to end through a Predictor."""

from __future__ import annotations

import numpy as np
import pytest

from test_predictor import UNIT, AffineLogits3d, PointwiseLogits2d
from vessel_kit.hull import HullGate, hull_slices
from vessel_kit.infer_config import InferConfig
from vessel_kit.predictor import Predictor

FOURTH_PLACE = {"dilation": 2, "shape": "convex", "rule": "sum", "threshold_3d": 0.5}


def test_a_hull_gate_parses_from_an_int_or_a_mapping_and_names_bad_fields():
    assert HullGate.parse(3) == HullGate(dilation=3)
    assert InferConfig(hull_gate=FOURTH_PLACE).hull_gate == HullGate(**FOURTH_PLACE)
    assert InferConfig.from_dict(InferConfig(hull_gate=FOURTH_PLACE).to_dict()).hull_gate == HullGate(**FOURTH_PLACE)
    with pytest.raises(ValueError, match=r"unknown hull_gate keys \['radius'\]; valid: \['dilation', 'shape'"):
        InferConfig(hull_gate={"radius": 2})
    with pytest.raises(ValueError, match=r"hull_gate shape must be one of \('mask', 'convex'\), got 'ball'"):
        InferConfig(hull_gate={"shape": "ball"})
    with pytest.raises(ValueError, match="threshold_3d must be a probability in"):
        HullGate(threshold_3d=1.5)


def test_the_convex_hull_of_a_slice_is_filled_and_dilated_by_a_square():
    mask = np.zeros((1, 30, 30), bool)
    mask[0, 5, 5] = mask[0, 5, 20] = mask[0, 20, 5] = True  # a right triangle's corners
    hull = next(hull_slices(mask, HullGate(dilation=0, shape="convex")))
    assert hull[5, 5:21].all() and hull[5:21, 5].all() and hull[12, 12] and not hull[19, 19]
    grown = next(hull_slices(mask, HullGate(dilation=2, shape="convex")))
    assert grown[3, 3] and not grown[2, 3] and grown[22, 7] and not grown[23, 5]
    assert not next(hull_slices(np.zeros((1, 8, 8), bool), HullGate(shape="convex"))).any()


def test_the_fourth_place_sum_rule_adds_the_3d_probability_inside_the_2d_hull_only():
    """Background x = 0.1: p2D = 0.018 (out of the 2D mask), p3D = 0.83. Two squares x = 0.4:
    p2D = 0.27 (in), p3D = 0.60. Inside the dilated convex hull of the squares p2D + p3D > 0.55
    everywhere; outside only p2D counts, which is below 0.55 everywhere."""
    volume = np.full((6, 40, 40), round(0.1 * 65535), np.uint16)
    volume[:, 10:14, 5:9] = volume[:, 25:29, 30:34] = round(0.4 * 65535)
    config = InferConfig(axes=("xy",), tta="none", tile_size=32, progress=False, threshold=0.05, hull_gate=FOURTH_PLACE)
    predictor = Predictor([PointwiseLogits2d(), AffineLogits3d()], config, in_chans=3, normalization=UNIT)
    mask = predictor.predict(volume)
    assert mask[:, 10:14, 5:9].all() and mask[:, 25:29, 30:34].all()
    assert mask[:, 19, 19].all()  # between the squares: inside their convex hull
    assert mask[:, 8, 5].all() and not mask[:, 7, 5].any()  # 2 pixels of dilation, not 3
    assert not mask[:, 0, 39].any() and not mask[:, 39, 0].any()  # far outside: p2D alone is too low
    plain = Predictor([PointwiseLogits2d(), AffineLogits3d()], config.replace(hull_gate=None), in_chans=3,
                      normalization=UNIT).predict(volume)
    assert plain.sum() > mask.sum()  # averaged logits mark the background the 3D model likes
    with pytest.raises(ValueError, match="rule 'sum' adds probabilities .* excludes hysteresis and top_fraction"):
        Predictor([PointwiseLogits2d(), AffineLogits3d()], config.replace(threshold=None, top_fraction=0.1),
                  in_chans=3, normalization=UNIT)
