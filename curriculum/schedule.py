"""Stage schedule and learning-rate factor as pure functions of the global step."""
from __future__ import annotations

from typing import Mapping, Sequence


def stage_starts(stages: Sequence[Mapping]) -> list[int]:
    """Global step at which each stage begins."""
    starts, step = [], 0
    for stage in stages:
        starts.append(step)
        step += int(stage["steps"])
    return starts


def stage_index_at(step: int, stages: Sequence[Mapping]) -> int:
    """Index of the stage that trains optimizer step `step` (the last stage after the end)."""
    index = 0
    for i, start in enumerate(stage_starts(stages)):
        if step >= start:
            index = i
    return index


def lr_factor(step: int, stages: Sequence[Mapping], warmup_steps: int, poly_power: float) -> float:
    """Multiplier of the base learning rates at optimizer step `step`.

    Poly decay over the whole run (Depth-Anything-V2: (1 - step/total)^0.9), a linear warm-up at
    the start, and a linear re-warm-up over the first `rewarm_steps` of a stage that asks for one.
    """
    total = sum(int(s["steps"]) for s in stages)
    factor = max(0.0, 1.0 - step / total) ** poly_power
    if warmup_steps > 0 and step < warmup_steps:
        factor *= (step + 1) / warmup_steps
    index = stage_index_at(step, stages)
    rewarm = int(stages[index].get("rewarm_steps", 0))
    start = stage_starts(stages)[index]
    if rewarm > 0 and step - start < rewarm:
        factor *= (step - start + 1) / rewarm
    return factor
