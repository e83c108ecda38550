import math

import pytest
import torch

from curriculum.masks import (
    MaxDepthPolicy,
    MixedPolicy,
    UnclippedPolicy,
    build_policy,
    policy_to_dict,
)

INF = math.inf
NAN = math.nan

# One row per case: near, 80 m exactly, beyond 80 m, +inf, no measurement (0), NaN, negative,
# below min_depth, sky with depth 0, sky with a finite depth, padding (flagged, finite depth).
DEPTH = torch.tensor([[5.0, 80.0, 84.9, INF, 0.0, NAN, -3.0, 1e-4, 0.0, 30.0, 12.0]])
SKY = torch.tensor([[False, False, False, False, False, False, False, False, True, True, False]])
NO_MEAS = torch.tensor([[False, False, False, False, True, True, False, False, True, False, True]])


def _check_targets(target):
    assert target.dtype == torch.float32
    assert torch.isfinite(target).all() and (target > 0).all()


def test_unclipped_policy():
    weight, target = UnclippedPolicy()(DEPTH, SKY, NO_MEAS)
    assert weight.tolist()[0] == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0]
    t = target.tolist()[0]
    assert t[:3] == pytest.approx([5.0, 80.0, 84.9])
    assert t[3] == t[8] == t[9] == pytest.approx(655.35)
    assert t[4:8] == [1.0, 1.0, 1.0, 1.0] and t[10] == 1.0
    _check_targets(target)


def test_unclipped_far_weight_and_target():
    weight, target = UnclippedPolicy(far_target=1000.0, far_weight=0.5)(DEPTH, SKY, NO_MEAS)
    assert weight[0, 3].item() == weight[0, 8].item() == 0.5 and weight[0, 2].item() == 1.0
    assert target[0, 3].item() == 1000.0


def test_max_depth_policy():
    weight, target = MaxDepthPolicy()(DEPTH, SKY, NO_MEAS)
    assert weight.tolist()[0] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert target[0, :2].tolist() == pytest.approx([5.0, 80.0])
    assert (target[0, 2:] == 1.0).all()
    _check_targets(target)


def test_mixed_policy():
    weight, target = MixedPolicy(far_weight=0.1)(DEPTH, SKY, NO_MEAS)
    assert weight.tolist()[0] == pytest.approx([1, 1, 0.1, 0.1, 0, 0, 0, 0, 0.1, 0.1, 0])
    t = target.tolist()[0]
    assert t[:3] == pytest.approx([5.0, 80.0, 84.9])
    assert t[3] == t[8] == t[9] == pytest.approx(655.35)
    _check_targets(target)


def test_all_sky_batch_has_empty_mask_under_max_depth():
    depth = torch.full((2, 4, 6), INF)
    sky = torch.ones(2, 4, 6, dtype=torch.bool)
    nm = torch.zeros(2, 4, 6, dtype=torch.bool)
    weight, target = MaxDepthPolicy()(depth, sky, nm)
    assert weight.sum() == 0 and weight.shape == (2, 4, 6)
    _check_targets(target)
    weight, target = UnclippedPolicy()(depth, sky, nm)
    assert (weight == 1).all() and torch.allclose(target, torch.full_like(target, 655.35))


def test_optional_masks_and_dtype():
    depth = torch.tensor([[2.0, 0.0, INF]], dtype=torch.float64)
    weight, target = MaxDepthPolicy()(depth, None, None)
    assert weight.dtype == target.dtype == torch.float32
    assert weight.tolist() == [[1.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (UnclippedPolicy, {"min_depth": 0.0}, "min_depth"),
        (UnclippedPolicy, {"far_target": -1.0}, "far_target"),
        (UnclippedPolicy, {"far_weight": -0.1}, "far_weight"),
        (MaxDepthPolicy, {"max_depth": 1e-4}, "max_depth"),
        (MaxDepthPolicy, {"min_depth": NAN}, "min_depth"),
        (MixedPolicy, {"far_weight": INF}, "far_weight"),
        (MixedPolicy, {"min_depth": 100.0}, "max_depth"),
    ],
)
def test_validation_names_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_build_policy_and_dict_roundtrip():
    for policy in (UnclippedPolicy(far_weight=0.5), MaxDepthPolicy(max_depth=20), MixedPolicy(far_weight=0.2)):
        d = policy_to_dict(policy)
        assert d["name"] == policy.name and all(isinstance(v, (str, float)) for v in d.values())
        assert build_policy(d) == policy
    assert build_policy({"name": "max_depth"}) == MaxDepthPolicy()
    assert policy_to_dict(MixedPolicy()) == {
        "name": "mixed",
        "min_depth": 1e-3,
        "max_depth": 80.0,
        "far_weight": 0.1,
        "far_target": 655.35,
    }


def test_build_policy_errors():
    with pytest.raises(ValueError, match=r"'clipped'.*max_depth.*mixed.*unclipped"):
        build_policy({"name": "clipped"})
    with pytest.raises(ValueError, match="far_weight"):
        build_policy({"name": "max_depth", "far_weight": 0.1})
    with pytest.raises(ValueError, match="name"):
        build_policy({"max_depth": 80})
    with pytest.raises(ValueError, match="max_depth"):
        build_policy({"name": "max_depth", "max_depth": "eighty"})


def test_min_depth_is_inclusive_for_every_policy():
    depth = torch.tensor([[0.5, 0.4999]])
    for policy in (UnclippedPolicy(min_depth=0.5), MaxDepthPolicy(min_depth=0.5), MixedPolicy(min_depth=0.5)):
        weight, _ = policy(depth)
        assert weight.tolist() == [[1.0, 0.0]], policy.name


def test_zero_far_weight_is_valid_and_its_pixels_get_target_one():
    for policy in (UnclippedPolicy(far_weight=0), MixedPolicy(far_weight=0.0)):
        weight, target = policy(DEPTH, SKY, NO_MEAS)
        assert weight[0, [3, 8, 9]].tolist() == [0.0, 0.0, 0.0], policy.name
        assert target[0, [3, 8, 9]].tolist() == [1.0, 1.0, 1.0], policy.name
    weight, target = MixedPolicy(far_weight=0.0)(DEPTH, SKY, NO_MEAS)
    assert weight[0, 2].item() == 0.0 and target[0, 2].item() == 1.0  # measured beyond max_depth


def test_range_boundaries_of_the_validation():
    UnclippedPolicy(min_depth=1.0, far_target=1.0)  # far_target >= min_depth: equal is allowed
    for cls in (MaxDepthPolicy, MixedPolicy):
        with pytest.raises(ValueError, match="max_depth"):
            cls(min_depth=5.0, max_depth=5.0)


def test_bools_are_not_numbers():
    with pytest.raises(ValueError, match="far_weight"):
        UnclippedPolicy(far_weight=True)
    with pytest.raises(ValueError, match="max_depth"):
        build_policy({"name": "max_depth", "max_depth": True})
