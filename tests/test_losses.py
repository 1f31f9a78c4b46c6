"""Losses against hand-computed values, valid-mask semantics, boundary weights against a brute-force
distance, composites, the spec builder, half-precision inputs and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vessel_kit.losses import (
    COMPOSITE_PRESETS,
    LOSSES,
    BCELoss,
    BoundaryWeightedLoss,
    CompositeLoss,
    DiceLoss,
    FocalLoss,
    _soft_skeleton,
    boundary_weights,
    build_loss,
)

# A 1x1x2x2 example: one confident hit, one confident reject, one weak hit, one soft target.
LOGITS = [2.0, -1.0, 0.5, -3.0]
TARGET = [1.0, 0.0, 1.0, 0.25]
ALL_SPECS = [*LOSSES, *COMPOSITE_PRESETS]


def tiny(values):
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 2, 2)


def sig(x):
    return 1 / (1 + math.exp(-x))


def bce(x, t, pos_weight=1.0):
    return -(pos_weight * t * math.log(sig(x)) + (1 - t) * math.log(1 - sig(x)))


def random_batch(seed=0, shape=(2, 1, 16, 16)):
    """Logits, a blobby hard target with a few soft pixels and a valid mask with a hole."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen) * 3
    target = (torch.nn.functional.avg_pool2d(torch.rand(shape, generator=gen), 5, 1, 2) > 0.55).float()
    target[0, 0, 0, :4] = torch.tensor([0.2, 0.4, 0.6, 0.8])
    valid = torch.ones(shape)
    valid[:, :, 4:9, 6:12] = 0
    valid[1, 0, :, :3] = 0
    return logits, target, valid


# ---------------------------------------------------------------- hand-computed values


def test_dice_matches_hand_computed():
    p = [sig(x) for x in LOGITS]
    intersection = sum(pi * ti for pi, ti in zip(p, TARGET))
    total = sum(p) + sum(TARGET)
    for smooth in (1.0, 0.5):
        expected = 1 - (2 * intersection + smooth) / (total + smooth)
        got = DiceLoss(smooth=smooth)(tiny(LOGITS), tiny(TARGET))
        assert got.dtype == torch.float32 and got.ndim == 0
        assert got.item() == pytest.approx(expected, rel=1e-6)


def test_bce_matches_hand_computed():
    for pos_weight in (None, 3.0):
        expected = sum(bce(x, t, pos_weight or 1.0) for x, t in zip(LOGITS, TARGET)) / 4
        got = BCELoss(pos_weight=pos_weight)(tiny(LOGITS), tiny(TARGET))
        assert got.item() == pytest.approx(expected, rel=1e-6)
    torch_bce = torch.nn.functional.binary_cross_entropy_with_logits(
        tiny(LOGITS), tiny(TARGET), pos_weight=torch.tensor(3.0)
    )
    got = BCELoss(pos_weight=3.0)(tiny(LOGITS), tiny(TARGET))
    assert got.item() == pytest.approx(torch_bce.item(), rel=1e-6)


def test_focal_matches_hand_computed():
    gamma, alpha = 2.0, 0.25
    terms, alpha_terms = [], []
    for x, t in zip(LOGITS, TARGET):
        p_t = sig(x) * t + (1 - sig(x)) * (1 - t)
        focal = (1 - p_t) ** gamma * bce(x, t)
        terms.append(focal)
        alpha_terms.append((alpha * t + (1 - alpha) * (1 - t)) * focal)
    assert FocalLoss(gamma)(tiny(LOGITS), tiny(TARGET)).item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    got = FocalLoss(gamma, alpha=alpha)(tiny(LOGITS), tiny(TARGET))
    assert got.item() == pytest.approx(sum(alpha_terms) / 4, rel=1e-6)


def test_boundary_weighted_loss_matches_hand_computed():
    # A 1x5 row, vessel in the first pixel: boundary pixels 0 and 1 (d=0), then d = 1, 2, 3.
    logits = torch.tensor([1.5, 0.3, -0.7, -2.0, 0.8]).reshape(1, 1, 1, 5)
    target = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 5)
    width, strength = 1.0, 2.0
    weights = [1 + strength * math.exp(-d / width) for d in (0, 0, 1, 2, 3)]
    pairs = list(zip(logits.flatten().tolist(), target.flatten().tolist()))

    def focal(x, t):
        return (1 - sig(x) * t - (1 - sig(x)) * (1 - t)) ** 2 * bce(x, t)

    for base, pixel in (("bce", bce), ("focal", focal)):
        values = [pixel(x, t) for x, t in pairs]
        expected = sum(w * v for w, v in zip(weights, values)) / sum(weights)
        loss = BoundaryWeightedLoss(base=base, width=width, strength=strength)
        assert loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # Base kwargs reach the base loss.
    pw = BoundaryWeightedLoss(base="bce", width=width, strength=strength, pos_weight=4.0)
    values = [bce(x, t, 4.0) for x, t in pairs]
    expected = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    assert pw(logits, target).item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- Dice behaviour


@pytest.mark.parametrize("batch", [True, False])
def test_dice_perfect_prediction_is_zero(batch):
    _, target, _ = random_batch()
    hard = (target >= 0.5).float()
    loss = DiceLoss(batch=batch)(torch.where(hard > 0, 30.0, -30.0), hard)
    assert 0 <= loss.item() < 1e-6
    # A wrong prediction scores far worse.
    assert DiceLoss(batch=batch)(torch.where(hard > 0, -30.0, 30.0), hard).item() > 0.9


@pytest.mark.parametrize("batch", [True, False])
def test_dice_empty_target_and_prediction_is_zero_and_finite(batch):
    logits = torch.full((2, 1, 8, 8), -40.0, requires_grad=True)
    loss = DiceLoss(batch=batch)(logits, torch.zeros(2, 1, 8, 8))
    assert torch.isfinite(loss) and 0 <= loss.item() < 1e-6
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_batch_dice_is_gentler_on_false_positives_in_empty_crops():
    # Sample 0: 4 vessel pixels predicted perfectly; sample 1: no vessel, p = 0.5 everywhere.
    logits = torch.stack([torch.full((1, 2, 2), 30.0), torch.zeros(1, 2, 2)])
    target = torch.stack([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)])
    p = sig(30.0)
    batch_expected = 1 - (2 * 4 * p + 1) / (4 * p + 4 + 4 * 0.5 + 1)
    per_sample_expected = ((1 - (2 * 4 * p + 1) / (4 * p + 4 + 1)) + (1 - 1 / (4 * 0.5 + 1))) / 2
    batch_loss = DiceLoss(batch=True)(logits, target).item()
    per_sample_loss = DiceLoss(batch=False)(logits, target).item()
    assert batch_loss == pytest.approx(batch_expected, rel=1e-6)  # ~2/11
    assert per_sample_loss == pytest.approx(per_sample_expected, rel=1e-6)  # ~1/3
    assert per_sample_loss > batch_loss + 0.1


def test_dice_accepts_soft_targets():
    # p = 0.5 and t = 0.5 on 4 pixels: intersection 1, total 4, Dice (2 + 1) / (4 + 1).
    loss = DiceLoss()(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5))
    assert loss.item() == pytest.approx(0.4, rel=1e-6)


# ---------------------------------------------------------------- valid mask


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_invalid_pixels_do_not_change_the_loss(spec):
    loss = build_loss(spec)
    logits, target, valid = random_batch()
    reference = loss(logits, target, valid)
    hole = valid == 0
    gen = torch.Generator().manual_seed(1)
    scrambled_logits = torch.where(hole, torch.randn(logits.shape, generator=gen) * 50, logits)
    scrambled_target = torch.where(hole, torch.rand(target.shape, generator=gen).round(), target)
    assert torch.equal(loss(scrambled_logits, scrambled_target, valid), reference)
    # ... whereas changing valid pixels does change it, and so does dropping the mask.
    assert not torch.equal(loss(scrambled_logits, scrambled_target), reference)
    # (2 - logits, not -logits: surface Dice, like the metric, is blind to complementing the mask)
    assert not torch.equal(loss(torch.where(hole, logits, 2 - logits), target, valid), reference)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_all_invalid_gives_zero_with_finite_gradients(spec):
    logits, target, _ = random_batch()
    logits.requires_grad_(True)
    loss = build_loss(spec)(logits, target, torch.zeros_like(target))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


@pytest.mark.parametrize("spec", ["bce", "focal", "boundary"])
def test_valid_is_a_weight_and_broadcasts_per_sample(spec):
    loss = build_loss(spec)
    logits, target, _ = random_batch()
    plain = loss(logits, target)
    assert loss(logits, target, torch.full_like(target, 0.5)).item() == pytest.approx(plain.item(), rel=1e-6)
    # A (B, 1, 1, 1) mask dropping sample 1 equals the loss of sample 0 alone.
    per_sample = torch.tensor([1.0, 0.0]).reshape(2, 1, 1, 1)
    first_only = loss(logits[:1], target[:1])
    assert loss(logits, target, per_sample).item() == pytest.approx(first_only.item(), rel=1e-6)


def test_mismatched_shapes_are_rejected():
    logits, target, valid = random_batch()
    with pytest.raises(ValueError, match="target shape"):
        DiceLoss()(logits, target[:, 0])
    with pytest.raises(ValueError, match="valid shape"):
        BCELoss()(logits, target, valid[:, :, :8])


# ---------------------------------------------------------------- focal vs BCE


def test_focal_with_gamma_zero_is_bce():
    logits, target, valid = random_batch()
    focal = FocalLoss(gamma=0.0)(logits, target, valid)
    assert focal.item() == pytest.approx(BCELoss()(logits, target, valid).item(), rel=1e-6)


def test_focal_down_weights_easy_examples():
    # Easy: confident and right (p_t ~ 0.95); hard: confident and wrong (p_t ~ 0.05).
    easy_logits, hard_logits = tiny([3.0, -3.0, 3.0, -3.0]), tiny([-3.0, 3.0, -3.0, 3.0])
    target = tiny([1.0, 0.0, 1.0, 0.0])
    focal, plain = FocalLoss(gamma=2.0), BCELoss()
    easy_ratio = focal(easy_logits, target) / plain(easy_logits, target)
    hard_ratio = focal(hard_logits, target) / plain(hard_logits, target)
    assert easy_ratio.item() == pytest.approx((1 - sig(3.0)) ** 2, rel=1e-5)  # ~0.002
    assert hard_ratio.item() == pytest.approx(sig(3.0) ** 2, rel=1e-5)  # ~0.9
    logits, target, _ = random_batch()
    assert focal(logits, target) < plain(logits, target)


def test_focal_gradient_finite_for_fractional_gamma_when_saturated():
    logits = torch.tensor([200.0, -200.0, 0.0, 5.0]).reshape(1, 1, 2, 2).requires_grad_(True)
    FocalLoss(gamma=0.5)(logits, tiny([1.0, 0.0, 1.0, 0.0])).backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- boundary weights


def brute_force_weights(target, valid, width, strength, cap):
    """Weights from the documented definition, by exhaustive search over pixels (one 2D image)."""
    fg, labelled = target >= 0.5, valid > 0
    height, wide = target.shape
    boundary = [
        (y, x)
        for y in range(height)
        for x in range(wide)
        if labelled[y, x]
        and any(
            labelled[ny, nx] and fg[ny, nx] != fg[y, x]
            for ny in range(max(y - 1, 0), min(y + 2, height))
            for nx in range(max(x - 1, 0), min(x + 2, wide))
        )
    ]
    weights = np.ones(target.shape)
    for y in range(height):
        for x in range(wide):
            d = min((max(abs(y - by), abs(x - bx)) for by, bx in boundary), default=math.inf)
            if d <= cap:
                weights[y, x] = 1 + strength * math.exp(-d / width)
    return weights


def test_boundary_weights_exact_on_a_square():
    target = torch.zeros(1, 1, 9, 9)
    target[..., 3:6, 3:6] = 1
    width, strength = 1.5, 3.0
    weights = boundary_weights(target, width=width, strength=strength)
    assert weights.dtype == torch.float32 and weights.shape == target.shape
    # Chessboard distance r from the centre pixel -> distance to the boundary ring (r = 1, 2).
    d_of_ring = {0: 1, 1: 0, 2: 0, 3: 1, 4: 2}
    expected = torch.empty(9, 9)
    for y in range(9):
        for x in range(9):
            expected[y, x] = 1 + strength * math.exp(-d_of_ring[max(abs(y - 4), abs(x - 4))] / width)
    torch.testing.assert_close(weights[0, 0], expected)
    assert weights.max().item() == pytest.approx(1 + strength)
    assert weights[0, 0, 4, 4] < weights[0, 0, 3, 3]  # the square's centre is one step inside
    # The cap: distance 2 (the crop's outer ring) is past max_distance=1 -> weight exactly 1.
    capped = boundary_weights(target, width=width, strength=strength, max_distance=1)[0, 0]
    assert (capped[0] == 1).all() and (capped[:, -1] == 1).all()
    torch.testing.assert_close(capped[1:8, 1:8], expected[1:8, 1:8])


def test_boundary_weights_match_brute_force_with_valid_mask():
    _, target, valid = random_batch(seed=3, shape=(2, 1, 14, 17))
    width, strength, cap = 2.0, 5.0, 4
    weights = boundary_weights(target, valid, width=width, strength=strength, max_distance=cap)
    for b in range(2):
        expected = brute_force_weights(target[b, 0].numpy(), valid[b, 0].numpy(), width, strength, cap)
        np.testing.assert_allclose(weights[b, 0].numpy(), expected, rtol=1e-6)
    # Without the mask the unlabelled hole's targets create boundaries of their own.
    unmasked = boundary_weights(target, width=width, strength=strength, max_distance=cap)
    assert not torch.equal(unmasked, weights)


def test_boundary_weights_default_cap_is_six_widths():
    target = torch.zeros(1, 1, 1, 20)
    target[..., 0] = 1  # pixel i >= 1 is at distance i - 1
    weights = boundary_weights(target, width=2.0, strength=4.0)[0, 0, 0]
    assert weights[13].item() == pytest.approx(1 + 4.0 * math.exp(-12 / 2.0), rel=1e-6)
    assert weights[14].item() == 1.0
    assert (weights[:14].diff() <= 0).all() and (weights[1:14].diff() < 0).all()


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_boundary_weights_are_one_without_a_boundary(fill):
    weights = boundary_weights(torch.full((2, 1, 8, 8), fill), width=2.0, strength=10.0)
    assert (weights == 1).all()


def test_boundary_weights_reject_bad_input():
    with pytest.raises(ValueError, match="B, C, H, W"):
        boundary_weights(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="width"):
        BoundaryWeightedLoss(width=0)
    with pytest.raises(ValueError, match="max_distance"):
        boundary_weights(torch.zeros(1, 1, 4, 4), max_distance=-1)


# ---------------------------------------------------------------- composites and build_loss


def test_composite_is_the_weighted_sum_of_its_parts():
    logits, target, valid = random_batch()
    dice, focal = DiceLoss(), FocalLoss(gamma=1.0)
    composite = CompositeLoss({"dice": (dice, 0.3), "focal": (focal, 2.0)})
    value = composite(logits, target, valid)
    d, f = dice(logits, target, valid).item(), focal(logits, target, valid).item()
    assert value.item() == pytest.approx(0.3 * d + 2.0 * f, rel=1e-6)
    assert composite.last_parts == pytest.approx({"dice": d, "focal": f}, rel=1e-6)
    assert all(type(v) is float for v in composite.last_parts.values())
    as_list = CompositeLoss([("dice", dice, 0.3), ("focal", focal, 2.0)])
    assert as_list(logits, target, valid).item() == pytest.approx(value.item(), rel=1e-6)
    with pytest.raises(ValueError, match="unique"):
        CompositeLoss([("a", dice, 1.0), ("a", focal, 1.0)])
    with pytest.raises(ValueError, match="at least one"):
        CompositeLoss([])


def test_build_loss_from_name_and_dict():
    assert type(build_loss("dice")) is DiceLoss
    focal = build_loss({"name": "focal", "gamma": 3, "alpha": 0.5})
    assert type(focal) is FocalLoss and focal.gamma == 3.0 and focal.alpha == 0.5
    boundary = build_loss({"name": "boundary", "base": "focal", "width": 3, "gamma": 1})
    assert type(boundary.base) is FocalLoss and boundary.base.gamma == 1.0 and boundary.width == 3.0


def test_build_loss_composite_list_and_preset():
    spec = [{"name": "dice", "weight": 0.5}, {"name": "bce", "weight": 2, "pos_weight": 3.0}]
    composite = build_loss(spec)
    assert isinstance(composite, CompositeLoss) and composite.weights == {"dice": 0.5, "bce": 2.0}
    assert composite.parts["bce"].pos_weight == 3.0
    assert spec[1] == {"name": "bce", "weight": 2, "pos_weight": 3.0}  # the spec is not consumed
    preset = build_loss("5th_place")
    assert preset.weights == {"dice": 0.01, "focal": 0.09, "boundary": 0.9}
    assert [type(part) for part in preset.parts.values()] == [DiceLoss, FocalLoss, BoundaryWeightedLoss]
    logits, target, valid = random_batch()
    expected = 0.01 * DiceLoss()(logits, target, valid) + 0.09 * FocalLoss()(logits, target, valid)
    expected += 0.9 * BoundaryWeightedLoss()(logits, target, valid)
    assert preset(logits, target, valid).item() == pytest.approx(expected.item(), rel=1e-6)
    assert build_loss("5th_place").weights == preset.weights  # the preset survives being built


def test_build_loss_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="dice, bce, focal, boundary.*5th_place"):
        build_loss("tversky")
    with pytest.raises(ValueError, match="valid: dice, bce, focal, boundary"):
        build_loss({"name": "lovasz"})
    with pytest.raises(ValueError, match="gama.*valid: gamma, alpha"):
        build_loss({"name": "focal", "gama": 2})
    with pytest.raises(ValueError, match="boundary base loss 'dice'; valid: bce, focal"):
        build_loss({"name": "boundary", "base": "dice"})
    with pytest.raises(ValueError, match="gamma.*'bce'; valid: pos_weight"):
        build_loss({"name": "boundary", "gamma": 2})
    with pytest.raises(ValueError, match="no 'name'"):
        build_loss({"gamma": 2})
    with pytest.raises(ValueError, match="weight"):
        build_loss([{"name": "dice"}])
    with pytest.raises(ValueError, match="unique"):
        build_loss([{"name": "dice", "weight": 1}, {"name": "dice", "weight": 2}])
    with pytest.raises(ValueError, match="smooth"):
        build_loss({"name": "dice", "smooth": 0})
    with pytest.raises(TypeError):
        build_loss(3)


# ---------------------------------------------------------------- precision and gradients


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_half_precision_logits_give_a_float32_loss(spec, dtype):
    loss = build_loss(spec)
    logits, target, valid = random_batch()
    low, low_target, low_valid = logits.to(dtype), target.to(dtype), valid.to(dtype)
    value = loss(low, low_target, low_valid)
    assert value.dtype == torch.float32
    # Same as float32 on the rounded inputs (the loss itself adds no half-precision error) ...
    rounded = loss(low.float(), low_target.float(), low_valid.float())
    assert value.item() == pytest.approx(rounded.item(), rel=1e-6)
    # ... and close to the full-precision loss.
    assert value.item() == pytest.approx(loss(logits, target, valid).item(), rel=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss(low, target, valid).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_gradients_flow(spec, dtype):
    logits, target, valid = random_batch()
    logits = logits.to(dtype).requires_grad_(True)
    build_loss(spec)(logits, target, valid).backward()
    grad = logits.grad
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    assert grad[valid > 0].abs().sum() > 0
    assert (grad[valid == 0] == 0).all()


def _tube(shift: int = 0) -> torch.Tensor:
    """A (1, 1, 8, 16, 16) target: a 4x4 tube along z, moved ``shift`` voxels along x."""
    target = torch.zeros(1, 1, 8, 16, 16)
    target[..., 6:10, 6 + shift : 10 + shift] = 1.0
    return target


def test_boundary_dou_is_zero_for_a_perfect_prediction_and_grows_with_a_shift():
    loss = build_loss("boundary_dou")
    target = _tube()
    perfect = loss(40 * (2 * target - 1), target)
    shifted = [loss(40 * (2 * _tube(shift) - 1), target).item() for shift in (1, 2, 4)]
    assert perfect.item() < 1e-6
    assert 0 < shifted[0] < shifted[1] < shifted[2] <= 1.0 + 1e-6
    flat = loss(40 * (2 * target[:, :, 0] - 1), target[:, :, 0])  # 2D works too
    assert flat.item() < 1e-6


def test_boundary_dou_alpha_follows_the_boundary_share():
    """A thin target (all boundary) gives alpha = -1: the loss is then 1 - 2I / (P² + T²)."""
    target = torch.zeros(1, 1, 6, 6)
    target[..., 2, 1:5] = 1.0
    logits = torch.randn(1, 1, 6, 6)
    p = torch.sigmoid(logits)
    expected = 1 - 2 * (p * target).sum() / ((p * p).sum() + (target * target).sum() + 1e-5)
    assert build_loss("boundary_dou")(logits, target).item() == pytest.approx(expected.item(), rel=1e-4)


def test_losses_and_boundary_weights_take_3d_batches():
    target = _tube()
    logits = torch.randn_like(target, requires_grad=True)
    for spec in ALL_SPECS:
        value = build_loss(spec)(logits, target, torch.ones_like(target))
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(logits.grad).all(), spec
    weights = boundary_weights(target, width=1.0, strength=4.0)
    assert weights[0, 0, 4, 5, 7] == pytest.approx(5.0)  # just outside the tube: on the boundary
    assert weights[0, 0, 4, 0, 0] < weights[0, 0, 4, 4, 7] < weights[0, 0, 4, 5, 7]


# ---------------------------------------------------------------- soft surface Dice


def _surface_dice_reference(pred: np.ndarray, target: np.ndarray, tolerance: int) -> float:
    """1 - NSD of 0/1 maps by scipy: morphological-gradient boundaries, chessboard tolerance."""
    from scipy import ndimage

    def edge(x):  # max - min over 3^n, the crop edge padded so that it is no boundary
        return ndimage.maximum_filter(x, 3, mode="nearest") - ndimage.minimum_filter(x, 3, mode="nearest")

    def near(x):
        return ndimage.maximum_filter(x, 2 * tolerance + 1, mode="constant") if tolerance else x

    bp, bt = edge(pred), edge(target)
    return 1 - ((bp * near(bt)).sum() + (bt * near(bp)).sum() + 1) / (bp.sum() + bt.sum() + 1)


@pytest.mark.parametrize("tolerance", [0, 1, 2])
def test_surface_dice_matches_a_scipy_reference_on_hard_masks(tolerance):
    target, shifted = _tube()[0, 0, 0], _tube(1)[0, 0, 0]
    shifted[3, 3] = 1.0  # a stray pixel: its own surface, far from the target's
    loss = build_loss({"name": "surface_dice", "tolerance": tolerance})
    value = loss(40 * (2 * shifted - 1)[None, None], target[None, None]).item()
    assert value == pytest.approx(_surface_dice_reference(shifted.numpy(), target.numpy(), tolerance), abs=1e-5)


def test_surface_dice_is_zero_when_exact_and_worse_the_farther_the_shift():
    loss = build_loss("surface_dice")
    target = _tube()
    for dims in (slice(None), 0):  # 3D (1, 1, 8, 16, 16) and 2D (1, 1, 16, 16)
        exact = loss(40 * (2 * target - 1)[:, :, dims], target[:, :, dims]).item()
        shifted = [loss(40 * (2 * _tube(s) - 1)[:, :, dims], target[:, :, dims]).item() for s in (1, 2, 4)]
        assert exact < 1e-6
        assert 0 < shifted[0] < shifted[1] <= shifted[2] <= 1.0
    # A tolerance forgives a one-voxel shift in part.
    tolerant = build_loss({"name": "surface_dice", "tolerance": 1})(40 * (2 * _tube(1) - 1), target).item()
    assert tolerant < loss(40 * (2 * _tube(1) - 1), target).item()


def test_surface_dice_ignores_a_masked_region_and_its_edges():
    loss = build_loss("surface_dice")
    target = _tube()[:, :, 0]
    logits = 40 * (2 * target - 1)
    valid = torch.ones_like(target)
    valid[..., :, :5] = 0  # masked strip next to the vessel (which starts at x = 6)
    wrong = logits.clone()
    wrong[..., 2:14, 0:5] = 40.0  # a false vessel touching the valid region: ignored
    assert loss(wrong, target, valid).item() < 1e-6
    assert loss(wrong, target).item() > 0.1
    gradient_target = torch.zeros_like(target)
    gradient_target[..., :, :5] = 1.0  # a target filled in the masked strip adds no edge either
    assert loss(logits, torch.maximum(target, gradient_target), valid).item() < 1e-6


def test_surface_dice_gradient_is_finite_and_reaches_the_boundary():
    target = _tube()
    logits = (0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = build_loss("surface_dice")(logits.to(torch.bfloat16), target)
    assert value.dtype == torch.float32
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="tolerance must be a non-negative int"):
        build_loss({"name": "surface_dice", "tolerance": -1})


# ---------------------------------------------------------------- skeleton recall


def _band(rows: slice, shape=(1, 1, 24, 32)) -> torch.Tensor:
    """A straight horizontal vessel across a 2D crop, filling ``rows``."""
    target = torch.zeros(shape)
    target[..., rows, :] = 1.0
    return target


def _confident(mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask > 0, 30.0, -30.0)


@pytest.mark.parametrize("rows, centre", [(slice(8, 15), 11), (slice(3, 4), 3)])
def test_soft_skeleton_of_a_straight_vessel_is_its_centre_line(rows, centre):
    skeleton = _soft_skeleton(_band(rows), iterations=10)
    expected = torch.zeros_like(skeleton)
    expected[..., centre, :] = 1.0
    assert torch.equal(skeleton, expected)
    tube = torch.zeros(1, 1, 9, 11, 20)
    tube[0, 0, 2:7, 3:8, :] = 1.0  # 5 x 5 across, along the last axis
    skeleton = _soft_skeleton(tube, iterations=10)
    assert skeleton.sum() == 20 and torch.equal(skeleton[0, 0, 4, 5, :], torch.ones(20))


def test_skeleton_recall_scores_the_centre_line_not_the_rim():
    loss = build_loss({"name": "skeleton_recall", "tube_radius": 0, "smooth": 1e-6})
    target = _band(slice(8, 15))
    assert loss(_confident(_band(slice(11, 12))), target).item() < 1e-6  # the centre line alone: nothing missed
    rim = _band(slice(8, 9)) + _band(slice(14, 15))
    assert loss(_confident(rim), target).item() > 0.999  # the vessel's rim, not its centre line
    thick = build_loss({"name": "skeleton_recall", "tube_radius": 1, "smooth": 1e-6})
    assert thick(_confident(_band(slice(11, 12))), target).item() == pytest.approx(2 / 3, abs=1e-5)


def test_skeleton_recall_weighs_a_thin_branch_like_a_thick_one():
    """A model that finds only the thick vessel misses half the centre lines (loss ~0.5), though
    it finds 7/8 of the vessel voxels (Dice loss ~0.07): why the term helps thin branches."""
    thick, thin = _band(slice(4, 11)), _band(slice(16, 17))
    target = thick + thin
    found_thick = _confident(thick)
    recall = build_loss({"name": "skeleton_recall", "tube_radius": 0, "smooth": 1e-6})(found_thick, target).item()
    dice = build_loss({"name": "dice", "smooth": 1e-6})(found_thick, target).item()
    assert recall == pytest.approx(0.5, abs=1e-5) and dice < 0.07


def test_skeleton_recall_gradient_reaches_only_the_skeleton():
    target = _band(slice(8, 15))
    logits = torch.zeros_like(target, requires_grad=True)
    build_loss({"name": "skeleton_recall", "tube_radius": 1})(logits, target).backward()
    touched = (logits.grad != 0).nonzero()[:, 2].unique().tolist()
    assert touched == [10, 11, 12] and (logits.grad <= 0).all()  # more vessel on the skeleton, lower loss


@pytest.mark.parametrize("option, value", [("iterations", 0), ("iterations", 2.5), ("tube_radius", -1), ("smooth", 0)])
def test_skeleton_recall_rejects_bad_options(option, value):
    with pytest.raises(ValueError, match=option):
        build_loss({"name": "skeleton_recall", option: value})
