"""Loader workers' reusable batch buffers: batches equal the in-process ones whether the consumer
drops them at once or keeps them all, and dropped batches' slots are written again."""
import gc

import pytest
import torch

from curriculum.data import TrainSpec, TrainStream, train_loader, unpack_batch
from curriculum.worker_buffers import WorkerBuffers

SPEC = dict(batch_size=2, crop_height=28, crop_width=56, shuffle_buffer=4, color_jitter=0.2, scale_jitter=0.3)


def _loader(train, workers, batches, ring=True, pin=False, **kw):
    loader = train_loader(TrainStream(train, TrainSpec(batches_per_rank=batches, **SPEC, **kw), 0, 1, 7),
                          lambda: 0, workers)
    # the slot tests look at the workers' own batches; with CUDA the loader pins memory, and the
    # pinning thread's copy frees each slot at once (test_pinned_batches_equal_the_fresh_memory_ones)
    loader.pin_memory = pin
    if not ring:  # the same workers writing every batch into fresh shared memory
        loader.dataset.buffers = None
    return loader


def _plain(batch):
    return batch["key"], batch["layout"], batch["packed"].clone()


@pytest.mark.parametrize("device_resize", [False, True])
def test_kept_batches_are_never_overwritten(tiny_shards, device_resize):
    """The consumer keeps every batch: once the slots are all held, workers fall back to fresh
    memory, and every kept batch still holds its own bytes."""
    _, _, train, _ = tiny_shards
    batches = 3 * 2 * 6 + 1  # more batches than the two workers' slots
    want = [_plain(b) for b in _loader(train, 2, batches, ring=False, device_resize=device_resize)]
    loader = _loader(train, 2, batches, device_resize=device_resize)
    kept = list(loader)
    ring = loader.dataset.buffers
    assert ring.batches_received == 2 * ring.slots_per_worker  # every slot used once, none reused
    assert len(kept) == len(want)
    for got, (key, layout, packed) in zip(kept, want):
        assert got["key"] == key and got["layout"] == layout
        assert torch.equal(got["packed"], packed)
    first = unpack_batch(kept[0])
    assert first["image"].dtype == torch.uint8


def test_dropped_batches_free_their_slots(tiny_shards):
    """A consumer that lets each batch go gets every batch out of a slot after the first few, and
    the slots' memory crosses from the workers only once."""
    _, _, train, _ = tiny_shards
    batches = 40
    want = [_plain(b) for b in _loader(train, 2, batches, ring=False)]
    loader = _loader(train, 2, batches)
    for got, (key, _, packed) in zip(loader, want):
        assert got["key"] == key and torch.equal(got["packed"], packed)
        got = None  # noqa: F841 - the batch is let go here; its slot frees
    ring = loader.dataset.buffers
    assert ring.batches_received >= batches - 2 * ring.slots_per_worker
    assert ring.buffers_received <= 2 * ring.slots_per_worker


def test_a_view_keeps_its_slot(tiny_shards):
    """A field view taken from a batch (unpack_batch) holds the slot after the batch is gone."""
    _, _, train, _ = tiny_shards
    batches = 30
    loader = _loader(train, 1, batches)
    images = []
    for i, batch in enumerate(loader):
        if i % 3 == 0:
            image = unpack_batch(batch)["image"]
            images.append((i, image.clone(), image))  # the view outlives its batch
        batch = None
        gc.collect()
    for i, snapshot, view in images:
        assert torch.equal(view, snapshot), f"batch {i} was overwritten while a view held it"
    assert loader.dataset.buffers.batches_received > 0


def test_outside_a_worker_take_gives_plain_memory():
    ring = WorkerBuffers(1, 2)
    tensor, handle = ring.take(100)
    assert handle is tensor and tensor.numel() == 100
    with pytest.raises(ValueError, match="slots_per_worker=0"):
        WorkerBuffers(1, 0)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches_equal_the_fresh_memory_ones(tiny_shards):
    """With CUDA the loader pins memory: the pinning thread copies each batch out of its slot,
    and the slot frees as soon as that copy is made."""
    _, _, train, _ = tiny_shards
    batches = 30
    want = [_plain(b) for b in _loader(train, 2, batches, ring=False)]
    loader = _loader(train, 2, batches, pin=True)
    kept = list(loader)
    for got, (key, _, packed) in zip(kept, want):
        assert got["packed"].is_pinned() and got["key"] == key and torch.equal(got["packed"], packed)
    ring = loader.dataset.buffers
    assert ring.batches_received == batches and ring.buffers_received <= 2 * ring.slots_per_worker


def test_each_loader_has_its_own_buffers(tiny_shards):
    """A stream may feed a second loader (reloaded dataloaders) while the first one's workers
    still send batches: each loader copies the stream and owns its buffers."""
    _, _, train, _ = tiny_shards
    stream = TrainStream(train, TrainSpec(batches_per_rank=12, **SPEC), 0, 1, 7)
    first, second = train_loader(stream, lambda: 0, 2), train_loader(stream, lambda: 0, 2)
    assert stream.buffers is None and first.dataset.buffers is not second.dataset.buffers
    for a, b in zip(first, second):  # both loaders' workers at once
        assert a["key"] == b["key"] and torch.equal(a["packed"], b["packed"])


def _in_worker_zero(monkeypatch):
    import types

    import curriculum.worker_buffers as wb

    monkeypatch.setattr(wb, "get_worker_info", lambda: types.SimpleNamespace(id=0))


def test_a_slot_is_regrown_for_a_larger_batch(monkeypatch):
    import pickle

    _in_worker_zero(monkeypatch)
    ring = WorkerBuffers(1, 1)
    _, handle = ring.take(100)
    got = pickle.loads(pickle.dumps(handle))
    assert got.numel() == 100
    del got
    gc.collect()
    assert ring.state[0] == 0  # the slot is free again
    big = 3 << 20  # beyond the first buffer's 1 MiB
    tensor, handle = ring.take(big)
    assert ring.state[0] != 0  # the same slot, taken again
    assert tensor.numel() == big
    tensor[-1] = 7
    got = pickle.loads(pickle.dumps(handle))
    assert got.numel() == big and int(got[-1]) == 7
    assert ring.buffers_received == 2


def test_a_buffer_never_received_is_refused(monkeypatch):
    import pickle

    _in_worker_zero(monkeypatch)
    ring = WorkerBuffers(1, 1)
    _, handle = ring.take(100)
    got = pickle.loads(pickle.dumps(handle))
    del got
    gc.collect()
    _, lost = ring.take(3 << 20)  # regrows the slot; this batch never reaches the main process
    del lost
    ring.state[0] = 0  # as if the lost batch's slot had been released
    _, handle = ring.take(3 << 20)  # fits the regrown buffer, so it does not carry it again
    with pytest.raises(RuntimeError, match="never received"):
        pickle.loads(pickle.dumps(handle))
