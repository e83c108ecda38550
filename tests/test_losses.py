import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from curriculum.losses import compute_loss, gradient_matching_loss, laplace_nll, silog_loss
from curriculum.masks import MaxDepthPolicy, UnclippedPolicy
from curriculum.model import DepthModel, DepthPrediction

LN2 = math.log(2.0)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def _silog_by_hand(pairs, lam=0.5):
    """pairs: (pred, target, weight) for the pixels that count."""
    ws = sum(w for _, _, w in pairs)
    gs = [(math.log(p) - math.log(q), w) for p, q, w in pairs]
    m1 = sum(g * w for g, w in gs) / ws
    m2 = sum(g * g * w for g, w in gs) / ws
    return math.sqrt(m2 - lam * m1 * m1)


def test_silog_hand_computed():
    loss = silog_loss(t(2.0, 4.0, 1.0), t(1.0, 2.0, 2.0), t(1.0, 1.0, 1.0))
    # g = (ln2, ln2, -ln2): mean g^2 = ln2^2, mean g = ln2/3
    expected = math.sqrt(LN2**2 - 0.5 * (LN2 / 3) ** 2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.dtype == torch.float32 and loss.ndim == 0


def test_silog_weighted_and_lambda():
    pred, target, weight = t(2.0, 3.0, 0.5, 7.0), t(1.0, 5.0, 0.25, 7.0), t(1.0, 0.5, 2.0, 0.0)
    pairs = [(2.0, 1.0, 1.0), (3.0, 5.0, 0.5), (0.5, 0.25, 2.0)]
    for lam in (0.0, 0.5, 0.85, 1.0):
        assert silog_loss(pred, target, weight, lam=lam).item() == pytest.approx(_silog_by_hand(pairs, lam), rel=1e-5)


def test_silog_pools_over_batch():
    pred = torch.tensor([[[2.0, 1.0]], [[4.0, 8.0]]])
    target = torch.ones_like(pred)
    weight = torch.ones_like(pred)
    pairs = [(p, 1.0, 1.0) for p in (2.0, 1.0, 4.0, 8.0)]
    assert silog_loss(pred, target, weight).item() == pytest.approx(_silog_by_hand(pairs), rel=1e-6)


def test_silog_matches_depth_anything_v2_formula():
    torch.manual_seed(0)
    pred = torch.rand(2, 5, 7) * 50 + 0.5
    target = torch.rand(2, 5, 7) * 50 + 0.5
    valid = torch.rand(2, 5, 7) > 0.3
    d = torch.log(target[valid]) - torch.log(pred[valid])
    reference = torch.sqrt((d**2).mean() - 0.5 * d.mean() ** 2)
    assert silog_loss(pred, target, valid.float()).item() == pytest.approx(reference.item(), rel=1e-5)


def test_silog_excludes_bad_targets_and_predictions():
    good = silog_loss(t(2.0, 3.0), t(1.0, 4.0), t(1.0, 1.0))
    pred = t(2.0, 3.0, 5.0, 5.0, 5.0, 5.0, math.nan, math.inf, 0.0, -1.0)
    target = t(1.0, 4.0, math.nan, math.inf, 0.0, -2.0, 3.0, 3.0, 3.0, 3.0)
    pred.requires_grad_(True)
    loss = silog_loss(pred, target, torch.ones(10))
    assert loss.item() == pytest.approx(good.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad[2:] == 0).all()


def test_silog_empty_mask_is_connected_zero():
    pred = t(1.0, 2.0, math.nan).requires_grad_(True)
    loss = silog_loss(pred, t(1.0, 1.0, 1.0), t(0.0, 0.0, 0.0))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad == 0).all()


def test_huge_finite_values_outside_the_mask_do_not_turn_the_loss_into_nan():
    """The zero that keeps excluded pixels in the graph is made before summing: a sum of large
    finite values overflows to inf, and inf * 0 is NaN."""
    pred = t(2e38, 2e38, 5.0).requires_grad_(True)
    loss = silog_loss(pred, t(1.0, 1.0, 4.0), t(0.0, 0.0, 1.0))
    assert loss.item() == pytest.approx(_silog_by_hand([(5.0, 4.0, 1.0)]), rel=1e-6)
    empty = silog_loss(pred, t(1.0, 1.0, 4.0), t(0.0, 0.0, 0.0))
    assert empty.item() == 0.0
    (loss + empty).backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad[:2] == 0).all()


def test_silog_variance_rounding_below_zero_is_finite():
    # A constant log ratio: with lambda 1 the variance is 0 up to rounding (often slightly < 0).
    target = torch.linspace(0.5, 80.0, 4097)
    pred = (target * 1.1).requires_grad_(True)
    weight = torch.rand(4097) + 0.1
    loss = silog_loss(pred, target, weight, lam=1.0)
    assert torch.isfinite(loss) and 0.0 <= loss.item() <= 1e-3
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    # lambda > 1 makes the argument truly negative here: clamped, not NaN.
    pred.grad = None
    loss = silog_loss(pred, target, weight, lam=1.5)
    assert loss.item() == pytest.approx(1e-4)
    loss.backward()
    assert torch.isfinite(pred.grad).all()


def test_silog_half_precision_inputs_computed_in_fp32():
    pred = t(2.0, 4.0, 1.0).bfloat16()
    loss = silog_loss(pred, t(1.0, 2.0, 2.0), t(1.0, 1.0, 1.0))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.sqrt(LN2**2 - 0.5 * (LN2 / 3) ** 2), rel=1e-6)


def test_laplace_nll_hand_computed():
    loss = laplace_nll(t(2.0, 1.0, 9.0), t(1.0, 1.0, 9.0), t(1.0, 3.0, 0.0), t(0.5, 2.0, 1.0))
    expected = (1.0 * (LN2 / 0.5 + math.log(0.5)) + 3.0 * (0.0 + math.log(2.0))) / 4.0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_laplace_nll_empty_mask():
    b = t(0.3, 0.4).requires_grad_(True)
    loss = laplace_nll(t(1.0, 2.0), t(1.0, 1.0), t(0.0, 0.0), b)
    assert loss.item() == 0.0
    loss.backward()
    assert (b.grad == 0).all()


def test_gradient_matching_hand_computed():
    pred = t(1.0, 2.0, 4.0, 8.0, 16.0)[None, None]  # (1, 1, 5): residual k*ln2
    target = torch.ones_like(pred)
    weight = torch.ones_like(pred)
    # scale 0: steps of ln2; scale 1 (pixels 0, 2, 4): steps of 2 ln2; scale 2 (0, 4): 4 ln2
    expected = (LN2 + 2 * LN2 + 4 * LN2) / 3
    assert gradient_matching_loss(pred, target, weight, scales=4).item() == pytest.approx(expected, rel=1e-6)
    assert gradient_matching_loss(pred * 3, target, weight, scales=4).item() == pytest.approx(expected, rel=1e-5)
    masked = weight.clone()
    masked[..., 1] = 0  # scale 0 keeps pairs (2, 3) and (3, 4); scales 1 and 2 never see pixel 1
    expected = (LN2 + 2 * LN2 + 4 * LN2) / 3
    assert gradient_matching_loss(pred, target, masked, scales=4).item() == pytest.approx(expected, rel=1e-6)
    empty = gradient_matching_loss(pred.requires_grad_(True), target, torch.zeros_like(pred))
    assert empty.item() == 0.0
    empty.backward()
    assert (pred.grad == 0).all()


# ------------------------------------------------------- empty masks through a real model


def _all_params_have_finite_grads(model):
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("uncertainty", [False, True])
def test_all_sky_batch_gives_zero_loss_and_grads_everywhere(uncertainty):
    torch.manual_seed(0)
    model = DepthModel("tiny", "sigmoid", 1e-3, 80.0, uncertainty=uncertainty).train()
    x = torch.randn(2, 3, 42, 56)
    depth = torch.full((2, 42, 56), math.inf)
    sky = torch.ones(2, 42, 56, dtype=torch.bool)
    weight, target = MaxDepthPolicy()(depth, sky, torch.zeros_like(sky))
    out = compute_loss(model(x), target, weight, grad_weight=0.5, nll_weight=1.0)
    assert out["loss"].item() == 0.0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    _all_params_have_finite_grads(model)


def test_compute_loss_components():
    torch.manual_seed(0)
    model = DepthModel("tiny", "log", 1e-3, 1000.0, uncertainty=True).train()
    x = torch.randn(2, 3, 42, 56)
    depth = torch.rand(2, 42, 56) * 100 + 1
    sky = torch.zeros(2, 42, 56, dtype=torch.bool)
    sky[:, :5] = True
    weight, target = UnclippedPolicy()(depth, sky, torch.zeros_like(sky))
    pred = model(x)
    out = compute_loss(pred, target, weight, silog_lambda=0.85, grad_weight=0.5, nll_weight=0.1)
    assert set(out) == {"loss", "silog", "grad", "nll", "nonfinite_prediction"} and out["nonfinite_prediction"] == 0
    expected = out["silog"] + 0.5 * out["grad"] + 0.1 * out["nll"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["silog"].item() == pytest.approx(silog_loss(pred.depth, target, weight, 0.85).item(), rel=1e-6)
    out["loss"].backward()
    _all_params_have_finite_grads(model)
    plain = compute_loss(DepthPrediction(pred.depth.detach(), None), target, weight)
    assert set(plain) == {"loss", "silog", "nonfinite_prediction"}


def test_a_prediction_holding_nan_makes_the_total_nan():
    """The terms leave NaN predictions out (finite, as for bad targets), but a network predicting
    NaN is broken: the total is NaN so that training skips and counts the step, and says why."""
    target, weight = torch.full((1, 2, 3), 10.0), torch.ones(1, 2, 3)
    for bad in (math.nan, math.inf):
        depth = torch.full((1, 2, 3), 8.0)
        depth[0, 1, 2] = bad
        depth.requires_grad_(True)
        out = compute_loss(DepthPrediction(depth, None), target, weight)
        assert math.isnan(out["loss"].item()) and math.isfinite(out["silog"].item())
        assert out["nonfinite_prediction"].item() == 1.0
    everywhere = torch.full((1, 2, 3), math.nan, requires_grad=True)
    out = compute_loss(DepthPrediction(everywhere, None), target, weight)
    assert out["silog"].item() == 0.0 and math.isnan(out["loss"].item())  # was logged as a loss of 0


# ------------------------------------------------------------------------------- properties

positive = st.floats(min_value=0.01, max_value=500.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(positive, positive, st.floats(0.0, 1.0)), min_size=1, max_size=40),
    st.floats(min_value=0.05, max_value=20.0),
)
def test_silog_lambda_one_invariant_to_global_scale(rows, scale):
    pred, target, weight = (torch.tensor(c, dtype=torch.float32) for c in zip(*rows))
    # a total weight below the loss's denominator floor (e.g. 2e-16) is "no supervision", not a scale test
    assume(float(weight.sum()) > 1e-6)
    a = silog_loss(pred, target, weight, lam=1.0).item()
    b = silog_loss(pred * scale, target, weight, lam=1.0).item()
    assert math.isfinite(a) and math.isfinite(b)
    assert b == pytest.approx(a, rel=1e-3, abs=2e-3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(positive, st.floats(0.0, 1.0)), min_size=1, max_size=40), st.floats(0.0, 1.0))
def test_silog_perfect_prediction_is_minimal_and_finite(rows, lam):
    target, weight = (torch.tensor(c, dtype=torch.float32) for c in zip(*rows))
    loss = silog_loss(target.clone(), target, weight, lam=lam)
    assert 0.0 <= loss.item() <= 1e-3


def test_silog_excludes_infinite_weights():
    good = silog_loss(t(2.0, 3.0), t(1.0, 4.0), t(1.0, 1.0))
    loss = silog_loss(t(2.0, 3.0, 5.0), t(1.0, 4.0, 1.0), t(1.0, 1.0, math.inf))
    assert loss.item() == pytest.approx(good.item(), rel=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_laplace_nll_excludes_pixels_with_an_invalid_scale(bad):
    good = laplace_nll(t(2.0), t(1.0), t(1.0), t(0.5))
    loss = laplace_nll(t(2.0, 3.0), t(1.0, 1.0), t(1.0, 1.0), t(0.5, bad))
    assert loss.item() == pytest.approx(good.item(), rel=1e-6)


def test_laplace_nll_small_valid_scale_is_used_as_is():
    loss = laplace_nll(t(2.0), t(1.0), t(1.0), t(1e-4))
    assert loss.item() == pytest.approx(LN2 / 1e-4 + math.log(1e-4), rel=1e-5)


def test_gradient_matching_vertical_pairs_and_scales_without_pairs():
    col = t(1.0, 2.0, 4.0, 8.0, 16.0)[None, :, None]  # (1, 5, 1): vertical neighbours only
    ones = torch.ones_like(col)
    assert gradient_matching_loss(col, ones, ones).item() == pytest.approx(7 * LN2 / 3, rel=1e-6)
    row, ones = col.transpose(1, 2), ones.transpose(1, 2)
    w = ones.clone()
    w[..., 2] = w[..., 4] = 0  # only pair (0, 1) at scale 0; scales 1 and 2 have no valid pair
    assert gradient_matching_loss(row, ones, w).item() == pytest.approx(LN2, rel=1e-6)
    assert gradient_matching_loss(row, ones, ones, scales=1).item() == pytest.approx(LN2, rel=1e-6)
    with pytest.raises(ValueError, match="scales"):
        gradient_matching_loss(row, ones, ones, scales=0)


def test_nll_trains_the_uncertainty_not_the_depth():
    depth = t(2.0, 3.0, 5.0)[None].requires_grad_(True)
    b = t(0.5, 0.3, 0.2)[None].requires_grad_(True)
    target, weight = t(1.0, 4.0, 5.5)[None], torch.ones(1, 3)
    compute_loss(DepthPrediction(depth, b), target, weight, nll_weight=1.0)["loss"].backward()
    with_nll, depth.grad = depth.grad.clone(), None
    compute_loss(DepthPrediction(depth, None), target, weight)["loss"].backward()
    torch.testing.assert_close(with_nll, depth.grad)
    assert b.grad.abs().sum() > 0
