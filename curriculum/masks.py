"""Loss-mask policies: (depth, sky, no_measurement) -> (per-pixel weight, target).

Depth convention: float metres, 0 = no measurement, +inf = at or beyond the sensor's range (sky,
a renderer's far clip). NaN, negative and zero depths are treated as no measurement whatever the
``no_measurement`` mask says. "Far" pixels are those marked sky or with depth +inf; the sky mask
wins over ``no_measurement`` (lidar has no return from the sky), so the data pipeline must leave
``sky`` False on padding.

Targets are finite and positive everywhere (1.0 where the weight is 0) so that a loss may take
logs of the whole tensor.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch

# Far clip of the synthetic data and of Virtual KITTI 2: 65535 x 0.01 m.
DEFAULT_FAR_TARGET = 655.35


def _measured(depth: torch.Tensor, no_measurement: torch.Tensor | None) -> torch.Tensor:
    ok = torch.isfinite(depth) & (depth > 0)
    if no_measurement is not None:
        ok = ok & ~no_measurement.to(torch.bool)
    return ok


def _far(depth: torch.Tensor, sky: torch.Tensor | None) -> torch.Tensor:
    far = torch.isposinf(depth)
    if sky is not None:
        far = far | sky.to(torch.bool)
    return far


def _as_floats(obj) -> None:
    """Store every field as a float (recipes may give ints); reject non-numbers by name."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{type(obj).__name__}.{f.name} must be a number, got {v!r}")
        object.__setattr__(obj, f.name, float(v))


def _check_positive(obj, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive finite number, got {v!r}")


def _check_weight(obj, name: str) -> None:
    v = getattr(obj, name)
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise ValueError(f"{type(obj).__name__}.{name} must be a finite number >= 0, got {v!r}")


def _check_range(obj) -> None:
    if not obj.min_depth < obj.max_depth:
        raise ValueError(
            f"{type(obj).__name__}.max_depth ({obj.max_depth}) must be above min_depth ({obj.min_depth})"
        )


def _compose(depth: torch.Tensor, parts: list[tuple[torch.Tensor, float, torch.Tensor | float]]):
    """Weight/target from (mask, weight, target) parts; later parts win where masks overlap."""
    depth = depth.float()
    weight = torch.zeros_like(depth)
    target = torch.ones_like(depth)
    for mask, w, t in parts:
        # Python scalars straight into torch.where: a scalar tensor made on a GPU would be a
        # blocking host-to-device copy, waiting for the device's queue, on every step
        weight = torch.where(mask, float(w), weight)
        target = torch.where(mask, t if isinstance(t, torch.Tensor) else float(t), target)
    # Weight-0 pixels keep target 1.0 (their depth may be 0, NaN or inf).
    target = torch.where(weight > 0, target, torch.ones_like(target))
    return weight, target


@dataclass(frozen=True)
class UnclippedPolicy:
    """Every measured pixel at its depth (far ones included); sky/+inf at ``far_target``."""

    name: ClassVar[str] = "unclipped"
    min_depth: float = 1e-3
    far_target: float = DEFAULT_FAR_TARGET
    far_weight: float = 1.0

    def __post_init__(self):
        _as_floats(self)
        _check_positive(self, "min_depth", "far_target")
        _check_weight(self, "far_weight")
        if self.far_target < self.min_depth:
            raise ValueError(f"UnclippedPolicy.far_target ({self.far_target}) must be >= min_depth ({self.min_depth})")

    def __call__(self, depth, sky=None, no_measurement=None):
        far = _far(depth, sky)
        near = _measured(depth, no_measurement) & (depth >= self.min_depth) & ~far
        return _compose(depth, [(near, 1.0, depth.float()), (far, self.far_weight, self.far_target)])


@dataclass(frozen=True)
class MaxDepthPolicy:
    """Depth-Anything-V2's policy: measured pixels in [min_depth, max_depth] only."""

    name: ClassVar[str] = "max_depth"
    far_weight: ClassVar[float] = 0.0  # far and sky pixels are left out (not a recipe field)
    min_depth: float = 1e-3
    max_depth: float = 80.0

    def __post_init__(self):
        _as_floats(self)
        _check_positive(self, "min_depth", "max_depth")
        _check_range(self)

    def __call__(self, depth, sky=None, no_measurement=None):
        keep = (
            _measured(depth, no_measurement)
            & ~_far(depth, sky)
            & (depth >= self.min_depth)
            & (depth <= self.max_depth)
        )
        return _compose(depth, [(keep, 1.0, depth.float())])


@dataclass(frozen=True)
class MixedPolicy:
    """Near pixels at weight 1; measured pixels beyond ``max_depth`` at ``far_weight`` and their
    depth; sky/+inf at ``far_weight`` and ``far_target``.

    The losses are weighted means, so ``far_weight`` sets far pixels against the near pixels of
    the same batch: in a batch with no near pixel (all sky or far) any ``far_weight`` gives the
    same loss."""

    name: ClassVar[str] = "mixed"
    min_depth: float = 1e-3
    max_depth: float = 80.0
    far_weight: float = 0.1
    far_target: float = DEFAULT_FAR_TARGET

    def __post_init__(self):
        _as_floats(self)
        _check_positive(self, "min_depth", "max_depth", "far_target")
        _check_range(self)
        _check_weight(self, "far_weight")

    def __call__(self, depth, sky=None, no_measurement=None):
        far = _far(depth, sky)
        measured = _measured(depth, no_measurement) & ~far & (depth >= self.min_depth)
        near = measured & (depth <= self.max_depth)
        beyond = measured & (depth > self.max_depth)
        return _compose(
            depth,
            [
                (near, 1.0, depth.float()),
                (beyond, self.far_weight, depth.float()),
                (far, self.far_weight, self.far_target),
            ],
        )


Policy = UnclippedPolicy | MaxDepthPolicy | MixedPolicy
POLICIES: dict[str, type] = {cls.name: cls for cls in (UnclippedPolicy, MaxDepthPolicy, MixedPolicy)}


def build_policy(spec: Mapping | Policy) -> Policy:
    """Policy from plain recipe data: {"name": ..., <fields>}. Unknown names/fields -> ValueError."""
    if isinstance(spec, tuple(POLICIES.values())):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"a mask policy spec must be a mapping, got {type(spec).__name__}")
    if "name" not in spec:
        raise ValueError(f"mask policy spec has no 'name'; valid names: {sorted(POLICIES)}")
    name = spec["name"]
    if name not in POLICIES:
        raise ValueError(f"unknown mask policy name {name!r}; valid names: {sorted(POLICIES)}")
    cls = POLICIES[name]
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in spec.items():
        if key == "name":
            continue
        if key not in valid:
            raise ValueError(f"unknown field {key!r} for mask policy {name!r}; valid fields: {valid}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"mask policy {name!r} field {key!r} must be a number, got {value!r}")
        kwargs[key] = float(value)
    return cls(**kwargs)


def describe_policy(policy: Policy) -> str:
    """One line for logs, e.g. 'max_depth (min_depth=0.001, max_depth=80)'."""
    fields = ", ".join(f"{k}={v:g}" for k, v in dataclasses.asdict(policy).items())
    return f"{policy.name} ({fields})"


def policy_to_dict(policy: Policy) -> dict:
    """Plain dict (with "name") that ``build_policy`` turns back into an equal policy."""
    return {"name": policy.name, **dataclasses.asdict(policy)}
