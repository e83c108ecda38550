"""Shared-memory batch buffers that loader workers reuse once the main process is done with them.

A DataLoader worker normally writes every batch into fresh shared memory: the kernel faults in and
zeroes each page on the worker's side, the main process receives a file descriptor through the
worker's resource-sharer thread, maps it and faults the pages in again. For an 11 MB batch of
eight 518x518 crops that is 6-14 ms on the 2-core machine against about 1 ms to fill memory that
is already mapped (benchmarks/RESULTS.md).

Here each worker keeps a few buffers ("slots"). A slot's memory crosses to the main process once;
afterwards a batch in it crosses as a few integers, and the main process rebuilds it as a tensor
over the mapping it already holds. The hard part is knowing when a slot may be written again:
the main process hands out an ordinary tensor whose memory is the slot, and a finalizer on the
numpy array beneath it marks the slot free when the last view of that tensor is gone (after a
pinned copy, a device copy or a float conversion, or never, if the consumer keeps the batch). A
worker with no free slot falls back to fresh shared memory, so a consumer that holds on to batches
costs speed, never correctness. Batches made in the main process itself (``num_workers=0``) need
none of this: malloc hands the same pages back batch after batch (no page faults per batch,
measured).

Known limits: slots are per worker and sized by the largest batch seen so far (a larger batch
replaces the slot's buffer); the ring serves the workers of one loader (``num_workers > 0``)
started with the process-wide start method (a loader given another ``multiprocessing_context``
cannot share the ring's lock, as with ``TrainStream.position``); state flags live in a
``multiprocessing.Array`` whose lock also orders the consumer's last reads before the worker's
next writes on weakly-ordered CPUs. A batch pickled but never received (an iterator shut down with
batches in flight, a killed worker) keeps its slot taken; its worker falls back to fresh memory.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import uuid
import weakref

import torch
from torch.utils.data import get_worker_info

_MIB = 1 << 20
_LOCK_TIMEOUT_S = 5.0  # a worker killed inside its few-microsecond critical section must not hang the consumer

# Rings of this process by token: a batch unpickled in the main process finds its ring here.
_LIVE: weakref.WeakValueDictionary[str, WorkerBuffers] = weakref.WeakValueDictionary()


def _fresh_shared(nbytes: int) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))


def fresh_batch_bytes(nbytes: int) -> torch.Tensor:
    """A new uint8 buffer for a batch; inside a loader worker, in shared memory from the start, so
    that sending it to the main process copies nothing (as default_collate does for its stacks)."""
    return torch.empty(nbytes, dtype=torch.uint8) if get_worker_info() is None else _fresh_shared(nbytes)


class WorkerBuffers:
    """``slots_per_worker`` reusable shared-memory buffers for each of ``num_workers`` workers.

    Create it in the main process before the loader starts its workers, make it reachable from
    the dataset, and have the dataset call ``take`` for each batch's memory (see ``take``)."""

    def __init__(self, num_workers: int, slots_per_worker: int):
        if num_workers < 1 or slots_per_worker < 1:
            raise ValueError(f"WorkerBuffers: num_workers={num_workers}, slots_per_worker={slots_per_worker}; "
                             "both must be >= 1")
        self.token = uuid.uuid4().hex
        self.num_workers, self.slots_per_worker = num_workers, slots_per_worker
        # 0: free; otherwise the sequence number of the batch in the slot (stale releases are no-ops)
        self.state = mp.Array("q", num_workers * slots_per_worker)
        self._init_process_local()

    def _init_process_local(self) -> None:
        self._own: dict[int, tuple[str, torch.Tensor]] = {}  # worker side: slot -> (buffer id, buffer)
        self._mapped: dict[int, tuple[str, torch.Tensor]] = {}  # main side: flat slot -> (buffer id, buffer)
        self._seq = itertools.count(1)
        self.buffers_received = 0  # main side: slot buffers mapped (a fresh one, or a slot regrown)
        self.batches_received = 0  # main side: batches rebuilt from a slot
        _LIVE[self.token] = self

    def __getstate__(self):
        return {"token": self.token, "num_workers": self.num_workers,
                "slots_per_worker": self.slots_per_worker, "state": self.state}

    def __setstate__(self, state):  # a spawned worker's copy
        self.__dict__.update(state)
        self._init_process_local()

    # ------------------------------------------------------------------ worker side

    def take(self, nbytes: int) -> tuple[torch.Tensor, object]:
        """Memory for a batch of ``nbytes``: ``(tensor, handle)``. Fill the tensor, then put the
        handle where the tensor belongs in the batch; unpickled in the main process, the handle
        becomes a uint8 tensor holding the same bytes. Outside a worker, or with every slot still
        held, both are one fresh tensor (in shared memory inside a worker)."""
        info = get_worker_info()
        if info is None:
            t = fresh_batch_bytes(nbytes)
            return t, t
        if info.id >= self.num_workers:
            raise RuntimeError(f"WorkerBuffers for {self.num_workers} workers used by worker {info.id}")
        first = info.id * self.slots_per_worker
        seq = next(self._seq)
        chosen = None
        with self.state.get_lock():
            flags = self.state.get_obj()
            free = [s for s in range(self.slots_per_worker) if flags[first + s] == 0]
            # a free slot big enough, else any free slot (its buffer grows), else none
            big = [s for s in free if s in self._own and self._own[s][1].numel() >= nbytes]
            chosen = big[0] if big else (free[0] if free else None)
            if chosen is not None:
                flags[first + chosen] = seq
        if chosen is None:
            t = fresh_batch_bytes(nbytes)
            return t, t
        new_buffer = None
        if chosen not in self._own or self._own[chosen][1].numel() < nbytes:
            capacity = -(-nbytes * 5 // 4 // _MIB) * _MIB  # a quarter spare for batches of padded crops
            self._own[chosen] = (f"{os.getpid()}-{seq}", _fresh_shared(capacity))
            new_buffer = self._own[chosen][1]
        buffer_id, buffer = self._own[chosen]
        handle = _SlotHandle(self.token, first + chosen, seq, buffer_id, nbytes, new_buffer)
        return buffer[:nbytes], handle

    # ------------------------------------------------------------------ main side

    def _receive(self, slot: int, seq: int, buffer_id: str, nbytes: int, buffer: torch.Tensor | None) -> torch.Tensor:
        if buffer is not None:
            self._mapped[slot] = (buffer_id, buffer)
            self.buffers_received += 1
        mapped_id, mapped = self._mapped.get(slot, (None, None))
        if mapped_id != buffer_id:
            raise RuntimeError(f"worker buffer {buffer_id} for slot {slot} was never received (have {mapped_id})")
        self.batches_received += 1
        view = mapped.numpy()[:nbytes]
        done = weakref.finalize(view, _release, self.state, slot, seq)
        done.atexit = False
        return torch.from_numpy(view)  # holds `view`: the slot is freed when this tensor's storage is


def _release(state, slot: int, seq: int) -> None:
    lock = state.get_lock()
    if not lock.acquire(timeout=_LOCK_TIMEOUT_S):
        return  # the slot stays taken; its worker falls back to fresh memory
    try:
        flags = state.get_obj()
        if flags[slot] == seq:
            flags[slot] = 0
    finally:
        lock.release()


def _rebuild(token: str, slot: int, seq: int, buffer_id: str, nbytes: int,
             buffer: torch.Tensor | None) -> torch.Tensor:
    ring = _LIVE.get(token)
    if ring is None:
        raise RuntimeError(f"a batch from worker buffers {token} arrived in a process that does not own them")
    return ring._receive(slot, seq, buffer_id, nbytes, buffer)


class _SlotHandle:
    """A batch's place in a slot, as it crosses from a worker: pickles to a few integers (and the
    slot's buffer the first time it is used) and unpickles as a tensor."""

    __slots__ = ("args",)

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return _rebuild, self.args

