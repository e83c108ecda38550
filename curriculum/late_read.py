"""Reading small device tensors on the host one step late, so that the host never waits for the
step it has just queued.

``tensor.item()`` on a GPU waits until the device has run everything queued before it: the
device then idles while the host prepares the next step (on an H200, part of a 16 ms gap in a 175
ms vitl step). A value that may arrive a step late (a skipped-step count, a stop signal the ranks
agree on, the loss on a progress bar) can instead be copied into pinned memory without blocking
and read when the next value is pushed, by which time the copy has normally finished.
"""
from __future__ import annotations

import torch


class LateRead:
    """``push(t)`` starts copying ``t`` (a small tensor) to the host and returns the values pushed
    the call before, as a list (``initial`` before any). ``latest()`` waits for the last push.

    ``late`` None: late for CUDA tensors; anything else is read at once (there is nothing to
    wait for). ``late=True`` on the CPU runs the same bookkeeping with ordinary memory (tests)."""

    def __init__(self, initial: list, late: bool | None = None):
        self.initial = list(initial)
        self.late = late
        self._slots: list | None = None  # two (host buffer, copy event or None), used in turn
        self._turn = 0

    def push(self, t: torch.Tensor) -> list:
        late = t.is_cuda if self.late is None else self.late
        if not late:
            self._slots = None
            self.initial = t.detach().flatten().tolist()
            return list(self.initial)
        if self._slots is None:
            start = torch.tensor(self.initial, dtype=t.dtype)
            pinned = t.is_cuda
            self._slots = [(start.pin_memory() if pinned else start.clone(), torch.cuda.Event() if pinned else None)
                           for _ in range(2)]
        buf, event = self._slots[self._turn]
        buf.copy_(t.detach().flatten(), non_blocking=event is not None)
        if event is not None:
            event.record(torch.cuda.current_stream(t.device))  # the stream the copy was queued on
        self._turn ^= 1
        return self._read(self._turn)  # the other slot: the previous push (or ``initial``)

    def latest(self) -> list:
        """The values of the last push (waits for its copy)."""
        if self._slots is None:
            return list(self.initial)
        return self._read(self._turn ^ 1)

    def _read(self, turn: int) -> list:
        buf, event = self._slots[turn]
        if event is not None:
            # normally complete already; if not, the device is more than a step behind, and
            # waiting for the previous step still leaves it the current one to work on
            event.synchronize()
        return buf.tolist()
