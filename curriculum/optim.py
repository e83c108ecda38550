"""Skipping optimizer steps with non-finite loss or gradients, without stalling the device.

A step whose loss or any gradient is NaN/inf must not update the weights. Deciding that on the
host costs a device synchronisation every step: the device drains its queue and idles while the
host reads the flag and launches the optimizer (measured on an H200 as part of a 16 ms gap in a
175 ms vitl step). Fused AdamW can take the decision on the device instead: given ``found_inf``
(the hook GradScaler uses), its kernel leaves parameters and optimizer state untouched where the
flag is 1. So:

- ``nonfinite_flag``: 1.0 if the loss or any gradient is non-finite, as a device tensor;
- ``skip_if_nonfinite``: fused optimizers get the flag as ``found_inf`` (no host sync); others
  read it on the host and drop the gradients (AdamW leaves parameters without one untouched);
- ``before_step``: the check, then gradient clipping; what runs between backward and the
  optimizer's step, in training (``DepthModule.optimizer_step``) and in the benchmark alike;
- ``NonFiniteCounter``: skipped steps and the current streak, counted on the device and read
  back one step late (``curriculum.late_read``), so the host never waits for the step it has
  just queued. On the CPU the counts are exact after every step.
"""
from __future__ import annotations

from typing import Callable

import torch

from curriculum.late_read import LateRead


def nonfinite_flag(grads: list[torch.Tensor], loss: torch.Tensor | None) -> torch.Tensor:
    """float32 scalar on the gradients' device: 1.0 if ``loss`` or any gradient holds a NaN/inf."""
    if grads:
        # the max of the per-tensor max-norms is finite iff every gradient is
        bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf"))).max())
    else:
        bad = torch.zeros((), dtype=torch.bool, device=loss.device if loss is not None else None)
    if loss is not None:
        bad = bad | ~torch.isfinite(loss.detach().float()).to(bad.device)
    return bad.float()


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer honours ``found_inf`` (torch's fused Adam/AdamW kernels do). Decided
    from its param groups, whose settings pick the kernel (see ``match_restored_groups``)."""
    return (isinstance(optimizer, torch.optim.Adam) and bool(optimizer.param_groups)
            and all(group.get("fused") for group in optimizer.param_groups))


def match_restored_groups(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict``: each param group's ``fused``/``foreach`` (which pick the kernel)
    come from the file, so a non-fused run resumed with fused AdamW (a CPU run resumed on a GPU)
    would keep the file's kernel. Sets them back to this optimizer's own choice, with the step
    counts where that kernel keeps them (fused: on the parameter's device)."""
    fused = optimizer.defaults.get("fused")
    for group in optimizer.param_groups:
        if bool(group.get("fused")) == bool(fused):
            continue
        group["fused"], group["foreach"] = fused, optimizer.defaults.get("foreach")
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                on_device = fused or group.get("capturable")
                state["step"] = state["step"].to(device=p.device if on_device else "cpu", dtype=torch.float32)


class NonFiniteCounter:
    """Skipped (non-finite) steps and the current streak of them; see the module docstring."""

    def __init__(self, skipped: int = 0):
        self.skipped = int(skipped)  # host view: exact on the CPU, one step late on a device
        self.streak = 0
        self._device_counts: torch.Tensor | None = None  # [skipped, streak]; float64 counts exactly
        self._late: LateRead | None = None

    def add(self, flag: torch.Tensor) -> None:
        if flag.device.type == "cpu":  # the flag is already on the host: exact and free
            bad = bool(flag.item())
            self.skipped += bad
            self.streak = self.streak + 1 if bad else 0
            return
        if self._device_counts is None:
            start = [float(self.skipped), float(self.streak)]
            self._device_counts = torch.tensor(start, dtype=torch.float64).to(flag.device)
            self._late = LateRead(start)  # the first read finds the counts we start from
        counts = self._device_counts
        counts[0] += flag
        counts[1] = (counts[1] + flag) * flag
        self._set(self._late.push(counts))  # the previous step's counts

    def sync(self) -> None:
        """Bring the host view up to date (one device sync): before a checkpoint or the end."""
        if self._late is not None:
            self._set(self._late.latest())

    def _set(self, counts: list) -> None:
        self.skipped, self.streak = int(counts[0]), int(counts[1])


def skip_if_nonfinite(optimizer: torch.optim.Optimizer, params, loss: torch.Tensor | None,
                      counter: NonFiniteCounter,
                      all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
    """Call after backward and before ``optimizer.step()``; ``release(optimizer)`` after it.

    ``all_reduce`` (DDP) makes the ranks agree: a loss that is non-finite on one rank only can
    leave the averaged gradients finite, and a rank that stepped alone would leave the replicas
    different for the rest of the run.
    """
    grads = [p.grad for p in params if p.grad is not None]
    flag = nonfinite_flag(grads, loss)
    if all_reduce is not None:
        all_reduce(flag)
    if skips_on_device(optimizer):
        optimizer.found_inf = flag
    elif flag.item():
        for p in params:
            p.grad = None
    counter.add(flag)


def before_step(optimizer: torch.optim.Optimizer, params, loss: torch.Tensor | None,
                counter: NonFiniteCounter, grad_clip: float = 0.0,
                all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
    """``skip_if_nonfinite``, then clip the gradients' total 2-norm to ``grad_clip`` (0: no clip).

    Clipped on the device, no sync; a skipped step's non-finite gradients turn NaN here, and the
    fused step leaves them unused (the others had them dropped already).
    """
    skip_if_nonfinite(optimizer, params, loss, counter, all_reduce=all_reduce)
    clip_gradients(params, grad_clip)


def clip_gradients(params, grad_clip: float) -> None:
    """Scale the gradients to a total 2-norm of at most ``grad_clip`` (0: leave them); on the device."""
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)


def release(optimizer: torch.optim.Optimizer) -> None:
    """Forget the ``found_inf`` of the step just taken."""
    if hasattr(optimizer, "found_inf"):
        del optimizer.found_inf
