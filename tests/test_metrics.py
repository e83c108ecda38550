import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curriculum.metrics import (
    GROUPS,
    METRIC_NAMES,
    MIN_PIXELS,
    PROTOCOLS,
    RANGE_BINS,
    MetricAccumulator,
    depth_metrics,
    eval_crop,
)

INF = math.inf


def _by_hand(pred, gt):
    n = len(pred)
    ratios = [max(p / g, g / p) for p, g in zip(pred, gt)]
    logs = [math.log(p) - math.log(g) for p, g in zip(pred, gt)]
    mean_g = sum(logs) / n
    mean_g2 = sum(x * x for x in logs) / n
    return {
        "d1": sum(r < 1.25 for r in ratios) / n,
        "d2": sum(r < 1.25**2 for r in ratios) / n,
        "d3": sum(r < 1.25**3 for r in ratios) / n,
        "abs_rel": sum(abs(p - g) / g for p, g in zip(pred, gt)) / n,
        "sq_rel": sum((p - g) ** 2 / g for p, g in zip(pred, gt)) / n,
        "rmse": math.sqrt(sum((p - g) ** 2 for p, g in zip(pred, gt)) / n),
        "rmse_log": math.sqrt(mean_g2),
        "log10": sum(abs(math.log10(p) - math.log10(g)) for p, g in zip(pred, gt)) / n,
        "silog": math.sqrt(mean_g2 - 0.5 * mean_g**2),
    }


def test_depth_metrics_hand_computed():
    pred, gt = [1.0, 2.0, 3.0, 10.0], [1.0, 1.0, 4.0, 8.0]
    got = depth_metrics(torch.tensor(pred), torch.tensor(gt), torch.ones(4, dtype=torch.bool))
    # ratios 1, 2, 4/3, 1.25: 1.25 itself is not < 1.25
    assert got["d1"] == 0.25 and got["d2"] == 0.75 and got["d3"] == 0.75
    assert got["abs_rel"] == pytest.approx((0 + 1 + 0.25 + 0.25) / 4)
    assert got["rmse"] == pytest.approx(math.sqrt((0 + 1 + 1 + 4) / 4))
    expected = _by_hand(pred, gt)
    assert set(got) == set(METRIC_NAMES)
    for k in METRIC_NAMES:
        assert got[k] == pytest.approx(expected[k], rel=1e-6), k


def test_depth_metrics_valid_mask_and_errors():
    pred = torch.tensor([[2.0, 5.0], [1.0, 3.0]])
    gt = torch.tensor([[1.0, 0.0], [math.nan, 3.0]])
    valid = torch.tensor([[True, True], [True, False]])
    got = depth_metrics(pred, gt, valid)  # only pixel (0, 0) is valid with a measured gt
    assert got["abs_rel"] == pytest.approx(1.0) and got["d3"] == 0.0
    with pytest.raises(ValueError, match="no valid pixel"):
        depth_metrics(pred, gt, torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        depth_metrics(pred, gt[0], None)


def _image(gt_values, pred_values, sky=None, valid=None):
    gt = torch.tensor([gt_values], dtype=torch.float32)
    pred = torch.tensor([pred_values], dtype=torch.float32)
    sky = torch.zeros_like(gt, dtype=torch.bool) if sky is None else torch.tensor([sky])
    valid = torch.ones_like(gt, dtype=torch.bool) if valid is None else torch.tensor([valid])
    return pred[None], gt[None], sky[None], valid[None]


def test_accumulator_averages_per_image():
    acc = MetricAccumulator(min_pixels=1)  # one-pixel images: the threshold is tested below
    acc.update(*_image([10.0], [15.0]))  # abs_rel 0.5 from one pixel
    acc.update(*_image([10.0] * 50, [10.0] * 50))  # abs_rel 0 from 50 pixels
    out = acc.compute()
    assert out["images"] == 2 and out["near/images"] == 2
    assert out["near/abs_rel"] == pytest.approx(0.25)  # per image, not per pixel (0.5 / 51)
    assert out["near/d1"] == pytest.approx(0.5)


def test_accumulator_bins_and_far_group():
    gt = [5.0, 20.0, 39.0, 40.0, 80.0, 84.9, 0.0]
    pred = [5.0, 30.0, 39.0, 60.0, 80.0, 84.9, 3.0]
    acc = MetricAccumulator(min_pixels=1)
    acc.update(*_image(gt, pred))
    out = acc.compute()
    near = _by_hand(pred[:5], gt[:5])
    assert out["near/abs_rel"] == pytest.approx(near["abs_rel"])
    assert out["near/0_20/abs_rel"] == pytest.approx(0.0)  # 5 m only
    assert out["near/20_40/abs_rel"] == pytest.approx(_by_hand([30.0, 39.0], [20.0, 39.0])["abs_rel"])
    assert out["near/40_80/abs_rel"] == pytest.approx(_by_hand([60.0, 80.0], [40.0, 80.0])["abs_rel"])
    assert out["far/abs_rel"] == pytest.approx(0.0) and out["far/images"] == 1
    assert [name for name, _, _ in RANGE_BINS] == ["0_20", "20_40", "40_80"]


def test_accumulator_phantom_rate():
    gt = [INF, 90.0, 0.0, 30.0, 10.0, 95.0]
    pred = [50.0, 100.0, 70.0, 700.0, 10.0, 20.0]
    sky = [False, False, True, True, False, False]
    valid = [True, True, True, True, True, False]  # the last pixel is cropped away
    acc = MetricAccumulator(min_pixels=1)
    acc.update(*_image(gt, pred, sky, valid))
    out = acc.compute()
    # beyond 80 m or sky: inf (50 -> phantom), 90 (100 -> ok), sky (70 -> phantom), sky (700 -> ok)
    assert out["phantom_rate"] == pytest.approx(2 / 4)
    assert out["far/phantom_rate"] == pytest.approx(0 / 1)
    assert out["sky/phantom_rate"] == pytest.approx(2 / 3)
    # the sky pixel with a 30 m gt does not count as near
    assert out["near/images"] == 1 and out["near/abs_rel"] == pytest.approx(0.0)


def test_an_image_counts_in_a_range_only_with_ten_pixels_there():
    """Depth-Anything-V2's evaluation skips images with fewer than 10 valid pixels; per range, a
    few stray far pixels would otherwise weigh as much as a whole image of them."""
    assert MIN_PIXELS == 10
    acc = MetricAccumulator()
    acc.update(*_image([10.0] * 10 + [90.0] * 9, [15.0] * 10 + [45.0] * 9))  # 9 far pixels, badly predicted
    acc.update(*_image([10.0] * 20 + [90.0] * 10, [10.0] * 20 + [90.0] * 10))  # 10 far pixels, exact
    out = acc.compute()
    assert out["near/images"] == 2 and out["near/abs_rel"] == pytest.approx(0.25)
    assert out["far/images"] == 1 and out["far/abs_rel"] == pytest.approx(0.0)
    assert out["near/20_40/images"] == 0 and math.isnan(out["near/20_40/abs_rel"])
    assert out["far/phantom_rate"] == pytest.approx(9 / 19)  # phantom pixels are pooled: every one counts


def test_empty_groups_are_nan_not_errors():
    acc = MetricAccumulator(min_pixels=1)
    out = acc.compute()
    assert out["images"] == 0 and all(math.isnan(out[f"{g}/abs_rel"]) for g in GROUPS)
    assert math.isnan(out["phantom_rate"])
    acc.update(*_image([5.0, 0.0], [5.0, 1.0]))
    out = acc.compute()
    assert out["near/abs_rel"] == 0.0 and math.isnan(out["far/abs_rel"]) and out["far/images"] == 0
    assert math.isnan(out["near/20_40/d1"]) and math.isnan(out["sky/phantom_rate"])
    acc.update(*_image([0.0, 0.0], [1.0, 1.0]))  # nothing measured at all: counted, no metrics
    assert acc.compute()["images"] == 2 and acc.compute()["near/images"] == 1


def test_nonfinite_predictions_are_counted_left_out_of_errors_and_phantoms():
    """One NaN pixel made a whole range NaN (shown as "n/a", like a range without images), and NaN
    on sky counted as a success (NaN <= 80 is False)."""
    nan = math.nan
    gt = [10.0] * 10 + [INF, INF, 90.0, 90.0, 10.0]
    pred = [10.0] * 9 + [nan] + [nan, 100.0, INF, 100.0, nan]
    valid = [True] * 14 + [False]  # the last NaN is cropped away: not counted
    acc = MetricAccumulator(min_pixels=1)
    acc.update(*_image(gt, pred, valid=valid))
    out = acc.compute()
    assert out["nonfinite_pixels"] == 3
    assert out["near/images"] == 1 and out["near/abs_rel"] == 0.0 and out["near/d1"] == 1.0  # from 9 pixels
    assert all(math.isfinite(out[f"near/{m}"]) for m in METRIC_NAMES)
    # beyond 80 m or sky: inf (NaN -> phantom), inf (100 -> ok), 90 (inf -> phantom), 90 (100 -> ok)
    assert out["phantom_rate"] == 0.5 and out["sky/phantom_rate"] == 0.5 and out["far/phantom_rate"] == 0.5
    assert out["far/images"] == 1 and out["far/abs_rel"] == pytest.approx(10 / 90)
    # an image counts in a range only with MIN_PIXELS finite predictions there
    acc = MetricAccumulator()
    acc.update(*_image([10.0] * 10, [10.0] * 9 + [nan]))
    assert acc.compute()["near/images"] == 0 and acc.compute()["nonfinite_pixels"] == 1


def _random_batch(seed, b=3):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(b, 6, 8, generator=g) * 120
    gt[torch.rand(b, 6, 8, generator=g) < 0.1] = 0.0
    gt[torch.rand(b, 6, 8, generator=g) < 0.1] = INF
    sky = torch.rand(b, 6, 8, generator=g) < 0.1
    pred = torch.rand(b, 6, 8, generator=g) * 120 + 0.1
    pred[torch.rand(b, 6, 8, generator=g) < 0.05] = math.nan  # counted, reduced like the rest
    valid = torch.rand(b, 6, 8, generator=g) < 0.9
    return pred, gt, sky, valid


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], rel=1e-12), k


def test_state_merge_and_load_state_equal_single_pass():
    batches = [_random_batch(s) for s in range(4)]  # small images: every range must count (min_pixels=1)
    single = MetricAccumulator(min_pixels=1)
    for batch in batches:
        single.update(*batch)
    ranks = [MetricAccumulator(min_pixels=1), MetricAccumulator(min_pixels=1)]
    for i, batch in enumerate(batches):
        ranks[i % 2].update(*batch)
    # what all_reduce(SUM) does across ranks
    reduced = ranks[0].state() + ranks[1].state()
    assert reduced.dtype == torch.float64 and reduced.shape == (len(MetricAccumulator.state_names()),)
    loaded = MetricAccumulator(min_pixels=1)
    loaded.load_state(reduced)
    _same(loaded.compute(), single.compute())
    merged = MetricAccumulator(min_pixels=1).merge(ranks[0]).merge(ranks[1])
    _same(merged.compute(), single.compute())
    assert single.compute()["images"] == 12 and single.compute()["nonfinite_pixels"] > 0
    assert not any(math.isnan(v) for v in single.compute().values())  # every value compared is a number
    with pytest.raises(ValueError, match="entries"):
        loaded.load_state(torch.zeros(3))


def test_compute_keys_are_stable():
    keys = set(MetricAccumulator().compute())
    for g in GROUPS:
        assert {f"{g}/{m}" for m in METRIC_NAMES} | {f"{g}/images"} <= keys
    assert {"images", "phantom_rate", "far/phantom_rate", "sky/phantom_rate", "nonfinite_pixels"} <= keys


# ------------------------------------------------------------------------------- crops


def test_eval_crops():
    assert PROTOCOLS == ("none", "synthetic", "kitti_garg", "kitti_eigen", "nyu")
    h, w = 375, 1242
    garg = eval_crop(h, w, "kitti_garg")
    rows = garg.any(1).nonzero().flatten()
    cols = garg.any(0).nonzero().flatten()
    assert (rows.min().item(), rows.max().item() + 1) == (int(0.40810811 * h), int(0.99189189 * h)) == (153, 371)
    assert (cols.min().item(), cols.max().item() + 1) == (44, 1197)
    assert garg.sum() == 218 * 1153
    eigen = eval_crop(h, w, "kitti_eigen")
    rows = eigen.any(1).nonzero().flatten()
    assert (rows.min().item(), rows.max().item() + 1) == (int(0.3324324 * h), int(0.91351351 * h))
    nyu = eval_crop(480, 640, "nyu")
    assert nyu.sum() == (471 - 45) * (601 - 41) and nyu[45, 41] and not nyu[44, 41] and not nyu[45, 601]
    assert eval_crop(7, 9, "none").all() and eval_crop(7, 9, "synthetic").all()
    with pytest.raises(ValueError, match="480x640"):
        eval_crop(375, 1242, "nyu")
    with pytest.raises(ValueError, match="garg_crop"):
        eval_crop(10, 10, "garg_crop")


# ---------------------------------------------------------------------------- properties

depths = st.lists(st.floats(min_value=0.01, max_value=300.0), min_size=1, max_size=50)


@settings(max_examples=60, deadline=None)
@given(depths)
def test_perfect_prediction(values):
    gt = torch.tensor(values)
    got = depth_metrics(gt.clone(), gt, None)
    assert got["abs_rel"] == 0.0 and got["d1"] == 1.0 and got["rmse"] == 0.0
    assert got["silog"] == 0.0 and got["log10"] == 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 300.0), st.floats(0.01, 300.0)), min_size=1, max_size=50), st.randoms())
def test_metrics_invariant_to_pixel_permutation(pairs, rnd):
    shuffled = pairs[:]
    rnd.shuffle(shuffled)
    a = depth_metrics(*(torch.tensor(c) for c in zip(*pairs)))
    b = depth_metrics(*(torch.tensor(c) for c in zip(*shuffled)))
    for k in METRIC_NAMES:
        assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), k


@settings(max_examples=30, deadline=None)
@given(depths, st.floats(0.05, 20.0))
def test_silog_metric_lambda_half_of_scaled_prediction(values, scale):
    # with g shifted by c = ln(scale): silog^2 = var(g') + 0.5 (mean g')^2 = var(g) + 0.5 c^2
    gt = torch.tensor(values, dtype=torch.float64)
    base = depth_metrics(gt.clone(), gt)
    scaled = depth_metrics(gt * scale, gt)
    assert base["silog"] == 0.0
    assert scaled["silog"] == pytest.approx(math.sqrt(0.5) * abs(math.log(scale)), rel=1e-6, abs=1e-9)


def test_protocol_text_states_what_the_numbers_follow():
    """Printed with every evaluation: the crop, the ranges, the 10-pixel rule and that predictions
    are not clamped (KITTI numbers of clamping papers are not directly comparable)."""
    from curriculum.evaluate import protocol_text

    text = protocol_text("kitti_garg", 1e-3, 80.0)
    assert text.startswith("protocol kitti_garg: Garg crop; near range 0.001..80 m")
    assert ">= 10 pixels" in text and "predictions unclamped" in text and "clamp them to 80 m" in text
    assert "\n" not in text


def test_zero_prediction_is_a_finite_huge_error():
    got = depth_metrics(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 2.0]))
    assert all(math.isfinite(v) for v in got.values()), got
    assert got["d1"] == 0.5 and got["rmse_log"] > 10


def test_d2_and_d3_thresholds():
    got = depth_metrics(torch.tensor([1.8, 1.0, 2.0]), torch.tensor([1.0, 1.0, 1.0]))
    # ratio 1.8 lies between 1.25^2 = 1.5625 and 1.25^3 = 1.953
    assert got["d2"] == pytest.approx(1 / 3) and got["d3"] == pytest.approx(2 / 3)


def test_group_and_phantom_boundaries():
    acc = MetricAccumulator(min_depth=1.0, max_depth=80.0, min_pixels=1)
    acc.update(*_image([1.0, 80.0, 90.0], [2.0, 40.0, 90.0]))  # gt at min_depth and at max_depth: near
    out = acc.compute()
    assert out["near/abs_rel"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["far/abs_rel"] == 0.0 and out["far/beyond_pixels"] == 1
    acc = MetricAccumulator(max_depth=80.0, min_pixels=1)
    acc.update(*_image([90.0, INF], [80.0, 80.0]))  # predicted exactly at max_depth: phantoms
    assert acc.compute()["phantom_rate"] == 1.0


def test_cropped_sky_pixels_are_not_counted():
    acc = MetricAccumulator(min_pixels=1)
    acc.update(*_image([5.0, 30.0], [5.0, 30.0], sky=[False, True], valid=[True, False]))
    out = acc.compute()
    assert out["sky/beyond_pixels"] == 0 and math.isnan(out["sky/phantom_rate"])


def test_merge_refuses_other_depth_ranges():
    with pytest.raises(ValueError, match="depth ranges"):
        MetricAccumulator(max_depth=80.0).merge(MetricAccumulator(max_depth=20.0))
