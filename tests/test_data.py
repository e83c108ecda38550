import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from conftest import write_tiny_shards
from curriculum.data import (
    DataError, TrainSpec, TrainStream, ValStream, batch_to_metres, check_readers, collate_train, count_samples,
    crop_resize, crop_window, depth_to_metres, expand_shards, normalize_images, pack_mask, resize_crops,
    jitter_factors, shard_sample_counts, train_loader, uneven_split_note, unpack_batch, unpack_mask, _imagenet_stats_on, _nearest_index_on,
)
from data_prep.schema import FAR_RAW, raw_to_depth


def _spec(**kw):
    base = dict(batch_size=2, batches_per_rank=4, crop_height=28, crop_width=56, shuffle_buffer=4)
    base.update(kw)
    return TrainSpec(**base)


def _keys(batches):
    return [k for b in batches for k in b["key"]]


def test_expand_and_count(tiny_shards):
    train_dir, _, train, _ = tiny_shards
    assert expand_shards(f"{train_dir}/*.tar") == train
    assert expand_shards(f"{train_dir}/shard-{{000000..000001}}.tar") == train[:2]
    assert count_samples(train) == 16 and count_samples(train[:1]) == 4
    assert expand_shards("pipe:cat a.tar") == ["pipe:cat a.tar"]
    assert count_samples(["pipe:cat a.tar"]) is None
    with pytest.raises(DataError, match="matches no shard"):
        expand_shards(f"{train_dir}/nothing-*.tar")
    with pytest.raises(DataError, match="not found"):
        expand_shards(f"{train_dir}/missing.tar")


def test_far_value_survives_to_the_batch(tiny_shards):
    """65535 in depth.png arrives as +inf metres; finite depths equal raw x scale exactly."""
    _, _, train, _ = tiny_shards
    stream = TrainStream(train, _spec(batches_per_rank=2, crop_height=56, crop_width=112, hflip=False), 0, 1, 0)
    batch = next(iter(stream))
    assert set(batch) == {"packed", "layout", "key", "bad_samples", "stream_position"}  # one tensor crosses
    assert batch["packed"].dtype == torch.uint8 and batch["packed"].dim() == 1
    batch = unpack_batch(batch)
    assert batch["depth_raw"].dtype == torch.int16 and "depth" not in batch  # metres are made on the device
    assert batch["sky_bits"].dtype == torch.uint8 and batch["sky_bits"].shape == (2, 56, 14)  # 112 px / 8
    batch = batch_to_metres(batch)
    depth = batch["depth"]
    assert depth.dtype == torch.float32 and torch.isinf(depth).any()
    assert torch.equal(torch.isinf(depth), batch["sky"])  # the sky band is the 65535 band
    finite = depth[torch.isfinite(depth) & (depth > 0)]
    raw = torch.round(finite / 0.01)
    assert torch.allclose(raw * 0.01, finite, atol=1e-6, rtol=0)
    assert batch["no_measurement"].any()  # the 0 hole survives as no measurement
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (2, 3, 56, 112)


def test_device_metres_are_the_host_conversion_bit_for_bit():
    """Raw depth crosses as int16 bits; metres made from it equal raw_to_depth exactly, over the
    whole uint16 range (values above 32767 included) and for each sample's own scale."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 65536, size=(3, 9, 11), dtype=np.uint16)
    raw[0, 0, :4] = [0, 1, 32767, 32768]
    raw[1, 0, :3] = [65534, FAR_RAW, 0]
    scales = [0.01, 1 / 256, 0.001]
    depth, no_measurement = depth_to_metres(torch.from_numpy(raw.view(np.int16)), torch.tensor(scales))
    want = np.stack([raw_to_depth(r, sc) for r, sc in zip(raw, scales)])
    assert depth.dtype == torch.float32
    assert np.array_equal(depth.numpy(), want)  # +inf at 65535 included
    assert torch.equal(no_measurement, torch.from_numpy(raw == 0))


def test_every_rank_same_batch_count_and_disjoint(tiny_shards):
    _, _, train, _ = tiny_shards
    per_rank = [list(TrainStream(train, _spec(), rank, 2, seed=3)) for rank in range(2)]
    assert [len(b) for b in per_rank] == [4, 4]
    assert all(len(b["key"]) == 2 for batches in per_rank for b in batches)  # full batches only
    k0, k1 = set(_keys(per_rank[0])), set(_keys(per_rank[1]))
    assert not k0 & k1 and len(k0 | k1) == 16


def test_the_data_module_splits_by_global_rank_across_nodes(tiny_shards):
    """Two single-GPU nodes: global ranks 0 and 1, each local rank 0. Split by the local rank,
    both nodes would read the same training and validation data, and counts alone would not show it."""
    from types import SimpleNamespace

    from curriculum.config import RECIPES_DIR, load_recipe, to_plain
    from curriculum.datamodule import DepthDataModule

    train_dir, val_dir, _, _ = tiny_shards
    data = to_plain(load_recipe([RECIPES_DIR / "smoke.yaml"], [f"data.train_shards={train_dir}/*.tar",
                                                               f"data.val_shards={val_dir}/*.tar",
                                                               "data.num_workers=0"]))["data"]
    train_keys, val_keys = [], []
    for global_rank in (0, 1):
        module = DepthDataModule(data, 0)
        module.trainer = SimpleNamespace(global_rank=global_rank, local_rank=0, world_size=2)
        module.setup("fit")
        train_keys.append({k for b in module.train_stream for k in b["key"]})
        val_keys.append({k for b in module.val_stream for k in b["key"]})
    assert train_keys[0] and not train_keys[0] & train_keys[1]
    assert not val_keys[0] & val_keys[1] and len(val_keys[0] | val_keys[1]) == 6  # every image once


def test_more_batches_than_shards_cycle(tiny_shards):
    _, _, train, _ = tiny_shards
    batches = list(TrainStream(train[:1], _spec(batches_per_rank=7), 0, 1, seed=0))
    assert len(batches) == 7


def test_epochs_reshuffle_and_runs_repeat(tiny_shards):
    _, _, train, _ = tiny_shards
    spec = _spec(batches_per_rank=8)

    def epoch_keys(epoch, seed=0):
        s = TrainStream(train, spec, 0, 1, seed)
        s.set_position(epoch * spec.batches_per_rank)
        return _keys(list(s))

    assert epoch_keys(0) == epoch_keys(0)
    assert epoch_keys(0) != epoch_keys(1)
    assert sorted(epoch_keys(0)) == sorted(epoch_keys(1))
    assert epoch_keys(0) != epoch_keys(0, seed=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_sees_the_same_remaining_batches(tiny_shards, workers):
    _, _, train, _ = tiny_shards
    spec = _spec(batches_per_rank=8, color_jitter=0.2, scale_jitter=0.3)
    full = list(train_loader(TrainStream(train, spec, 0, 1, 5), lambda: 0, workers))
    resumed = list(train_loader(TrainStream(train, spec, 0, 1, 5), lambda: 3, workers))
    assert len(full) == 8 and len(resumed) == 5
    for a, b in zip(full[3:], resumed):
        assert a["key"] == b["key"] and a["layout"] == b["layout"]
        assert torch.equal(a["packed"], b["packed"])


@pytest.mark.parametrize("world,workers", [(2, 0), (3, 0), (2, 2)])
def test_validation_counts_every_image_once(tiny_shards, world, workers):
    _, _, _, val = tiny_shards  # 2 shards x 3 samples
    keys = []
    for rank in range(world):
        loader = DataLoader(ValStream(val, rank, world, 2, 28, 56), batch_size=None, num_workers=workers)
        keys += _keys(list(loader))
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 6


def test_validation_keeps_native_depth(tiny_shards):
    _, _, _, val = tiny_shards
    batch = next(iter(ValStream(val, 0, 1, 2, 28, 56)))
    assert batch["image"].shape == (2, 3, 28, 56)
    assert batch["depth"].shape == (2, 56, 112) and batch["valid"].all()
    assert batch["size"].tolist() == [[56, 112], [56, 112]]


def test_too_few_shards_for_readers_is_a_clear_error():
    check_readers(4, 2, 2, "data.train_shards", "x/*.tar")
    with pytest.raises(DataError, match=r"3 shards for 2 ranks x 2 workers = 4 readers"):
        check_readers(3, 2, 2, "data.train_shards", "x/*.tar")


def test_an_uneven_shard_split_is_noted_and_is_what_repeats_samples(tiny_shards, tmp_path):
    """The known limit of splitting by shard: a reader whose shards hold fewer samples than its
    batches draw repeats some, and the note says how many: 4 shards over 3 readers, shards of
    unequal size (a converter's short last shard), batches per rank that do not divide among the
    workers; an even split draws every sample once and gets no note. Without sample counts
    (pipe: shards) the note goes by the shard count."""
    _, _, train, _ = tiny_shards  # 4 shards of 4 samples

    def drawn(urls, world, workers, batch, batches):
        spec = _spec(batch_size=batch, batches_per_rank=batches)
        return _keys(b for rank in range(world)
                     for b in train_loader(TrainStream(urls, spec, rank, world, 3), lambda: 0, workers))

    def note(urls, world, workers, batch, batches):
        return uneven_split_note(urls, shard_sample_counts(urls), 3, world, workers, batch, batches, "data.train_shards")

    assert note(train, 2, 2, 1, 8) is None
    even = drawn(train, 2, 2, 1, 8)
    assert sorted(even) == sorted(set(even)) and len(even) == 16
    # 16 samples, batch 1, 3 ranks: 5 batches per rank; the readers hold 8, 4 and 4 samples
    keys = drawn(train, 3, 0, 1, 5)
    assert len(keys) == 15 and len(keys) - len(set(keys)) == 2  # two samples drawn twice, three left out
    text = note(train, 3, 0, 1, 5)
    assert text.startswith("note: data.train_shards: in the first epoch 2 of 15 drawn samples (13.3%) repeat")
    assert "4 shards do not divide among the 3 readers" in text and "\n" not in text
    # 9 batches of 1 over 2 workers: the streams draw 5 and 4 from 8 samples each (2 shards each)
    text = note(train, 1, 2, 1, 9)
    assert text is None  # each stream's 8 samples cover its 5 or 4
    keys = drawn(train[:2], 1, 2, 1, 8)  # 2 shards, 8 samples, streams draw 4 + 4: once each
    assert sorted(keys) == sorted(set(keys)) and note(train[:2], 1, 2, 1, 8) is None
    keys = drawn(train[:2], 1, 2, 2, 4)  # batches of 2 from 8 samples, 4 per rank over 2 workers: even
    assert sorted(keys) == sorted(set(keys))
    keys = drawn(train[:2], 1, 2, 1, 7)  # 7 batches over 2 workers: 4 and 3 from 4 samples each
    assert note(train[:2], 1, 2, 1, 7) is None and len(set(keys)) == 7
    # shards of unequal size, a count that divides among the readers: still a repeat, now noted
    small = tmp_path / "uneven"
    urls = write_tiny_shards(small, n_shards=1, per_shard=6, seed=4) + write_tiny_shards(
        small / "b", n_shards=1, per_shard=2, seed=5)
    keys = drawn(urls, 2, 0, 1, 4)
    assert len(keys) == 8 and len(set(keys)) == 6  # the 2-sample reader draws each twice
    text = note(urls, 2, 0, 1, 4)
    assert "2 of 8 drawn samples" in text and "the shards hold 2 to 6 samples" in text
    assert "do not divide" not in text
    # batches that do not divide among the workers, shards of equal size and count: noted
    keys = drawn(train[:2], 1, 2, 1, 9)  # 9 batches: the streams draw 5 and 4 of 4 samples each
    assert len(keys) == 9 and len(set(keys)) == 8
    text = note(train[:2], 1, 2, 1, 9)
    assert "1 of 9 drawn samples" in text and "9 batches per rank do not divide among 2 loader workers" in text
    # no counts (pipe: shards): by the shard count
    piped = [f"pipe:cat {u}" for u in train]
    assert uneven_split_note(piped, None, 3, 2, 2, 1, 8, "data.train_shards") is None
    text = uneven_split_note(piped, None, 3, 3, 1, 1, 5, "data.train_shards")
    assert text.startswith("note: data.train_shards: 4 shards over 3 readers") and "multiple of 3" in text


def _append_broken_sample(shard, key):
    """Rewrite `shard` with an extra sample that has rgb and meta but no depth.png."""
    with tarfile.open(shard) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(shard, "w") as dst:
        for m, data in members:
            dst.addfile(m, io.BytesIO(data))
        for name, data in ((f"{key}.rgb.png", b"x"), (f"{key}.meta.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def test_bad_samples_are_skipped_counted_and_bounded(tmp_path):
    shards = write_tiny_shards(tmp_path / "d", n_shards=1, per_shard=4)
    _append_broken_sample(shards[0], "broken_0001")
    spec = _spec(batches_per_rank=3, shuffle_buffer=1)
    with pytest.warns(UserWarning, match="lacks depth.png"):
        batches = list(TrainStream(shards, spec, 0, 1, 0))
    assert len(batches) == 3 and sum(int(b["bad_samples"]) for b in batches) == 1
    with pytest.raises(DataError, match=r"shard-000000.tar: more than 0 bad samples"):
        with pytest.warns(UserWarning):
            list(TrainStream(shards, _spec(batches_per_rank=3, max_bad_samples=0), 0, 1, 0))


def test_crop_resize_keeps_depth_values_and_aligns_flip():
    rng = np.random.default_rng(0)
    h, w = 40, 90
    depth = np.tile(np.arange(w, dtype=np.float32) + 1, (h, 1))
    depth[:5] = np.inf
    rgb = np.repeat((np.arange(w) * 2).astype(np.uint8)[None, :, None], h, 0).repeat(3, 2)
    sky = np.isinf(depth)
    for _ in range(20):
        r, d, s = crop_resize(rgb, depth, sky, 28, 56, rng, scale_jitter=0.5, hflip=True)
        assert r.shape == (28, 56, 3) and d.shape == (28, 56) and s.shape == (28, 56)
        assert set(np.unique(d[np.isfinite(d)])) <= set(np.arange(w, dtype=np.float32) + 1)  # nearest only
        assert np.array_equal(np.isinf(d), s)
        # image and depth flipped together: column order of depth follows that of the colour ramp
        row = d[-1]
        assert np.sign(row[-1] - row[0]) == np.sign(int(r[-1, -1, 0]) - int(r[-1, 0, 0]))


def test_normalize_images():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    y = normalize_images(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y[0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


def test_normalisation_constants_made_under_inference_mode_serve_training():
    """The per-device constants are cached; made first during validation (inference mode) they
    must still be ordinary tensors, usable where autograd saves them."""
    _imagenet_stats_on.cache_clear()
    with torch.inference_mode():
        normalize_images(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    mean, std = _imagenet_stats_on(torch.device("cpu"))
    assert not mean.is_inference() and not std.is_inference()
    x = torch.rand(1, 3, 2, 2, requires_grad=True)
    ((x - mean) / std).sum().backward()  # std is saved for backward
    assert torch.allclose(x.grad, (1 / std).expand_as(x))


@given(st.integers(1, 600), st.integers(1, 600))
@settings(max_examples=80, deadline=None)
def test_nearest_index_is_opencv_inter_nearest(n_in, n_out):
    src = np.arange(n_in, dtype=np.float32)[None, :].repeat(2, axis=0)
    want = cv2.resize(src, (n_out, 2), interpolation=cv2.INTER_NEAREST)[0]
    on_device = _nearest_index_on(n_in, n_out, torch.device("cpu"))  # computed where it is used
    assert on_device.dtype == torch.int64 and np.array_equal(src[0][on_device.numpy()], want)


@pytest.mark.parametrize("scale_jitter,color_jitter", [(0.0, 0.0), (0.4, 0.0), (0.4, 0.3)])
def test_device_resize_matches_the_worker_resize(tiny_shards, scale_jitter, color_jitter):
    """Unresized crops finished by resize_crops: the same keys and windows as the worker path,
    depth / sky / no-measurement identical, the image within one grey level, two with colour
    jitter (scale jitter 0.4: crops of several sizes in a batch, padded)."""
    _, _, train, _ = tiny_shards
    kw = dict(batches_per_rank=4, crop_height=42, crop_width=70, scale_jitter=scale_jitter, hflip=True,
              color_jitter=color_jitter)
    worker = [batch_to_metres(b) for b in TrainStream(train, _spec(**kw), 0, 1, 7)]
    device = list(TrainStream(train, _spec(device_resize=True, **kw), 0, 1, 7))
    assert all("crop_size" in b for b in device)
    if scale_jitter:
        assert any(len(set(b["crop_size"])) > 1 for b in device)
    for w, d in zip(worker, device):
        d = resize_crops(batch_to_metres(d), 42, 70)
        assert w["key"] == d["key"] and "crop_size" not in d
        assert d["image"].dtype == torch.uint8 and d["image"].shape == w["image"].shape == (2, 3, 42, 70)
        assert (d["image"].int() - w["image"].int()).abs().max() <= (2 if color_jitter else 1)
        for k in ("depth", "sky", "no_measurement"):
            assert d[k].shape == w[k].shape and torch.equal(d[k], w[k]), k


@given(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 21)), min_size=1, max_size=4), st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_collated_batches_unpack_to_the_samples_zero_padded(sizes, seed):
    """One packed tensor per batch; its views give back every sample's maps, padded with zeros."""
    rng = np.random.default_rng(seed)
    samples = [{"rgb": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                "depth_raw": rng.integers(0, 65536, (h, w), dtype=np.uint16),
                "sky": rng.random((h, w)) < 0.5,
                "meta": {"depth_scale": float(rng.uniform(1e-3, 1.0))}, "key": f"k{i}"}
               for i, (h, w) in enumerate(sizes)]
    batch = collate_train(samples)
    assert batch["key"] == [s["key"] for s in samples] and batch["packed"].dim() == 1
    batch = unpack_batch(batch)
    hp, wp = max(h for h, _ in sizes), max(w for _, w in sizes)
    assert batch["image"].shape == (len(sizes), 3, hp, wp) and batch["depth_raw"].shape == (len(sizes), hp, wp)
    sky = unpack_mask(batch["sky_bits"], wp)
    for i, s in enumerate(samples):
        h, w = s["depth_raw"].shape
        image = batch["image"][i].permute(1, 2, 0)
        assert np.array_equal(image[:h, :w].numpy(), s["rgb"])
        assert np.array_equal(batch["depth_raw"][i, :h, :w].numpy().view(np.uint16), s["depth_raw"])
        assert np.array_equal(sky[i, :h, :w].numpy(), s["sky"])
        assert batch["depth_scale"][i].item() == np.float32(s["meta"]["depth_scale"])
        for t in (image, batch["depth_raw"][i], sky[i]):  # padding: zero bytes, no measurement, no sky
            assert not t[h:].any() and not t[:, w:].any()


@given(st.integers(1, 7), st.integers(1, 40), st.integers(0, 2**32 - 1))
@settings(max_examples=50, deadline=None)
def test_packed_masks_unpack_to_the_same_mask(h, w, seed):
    mask = np.random.default_rng(seed).random((3, h, w)) < 0.5
    bits = torch.from_numpy(np.stack([pack_mask(m) for m in mask]))
    assert bits.dtype == torch.uint8 and bits.shape == (3, h, (w + 7) // 8)
    assert torch.equal(unpack_mask(bits, w), torch.from_numpy(mask))


def test_loader_workers_start_after_this_process_used_opencv_threads(tiny_shards, tmp_path):
    """Forked while OpenCV's thread pool was alive, a worker used to hang at its first cv2 call
    (19 forks in 20 in a reproduction); the loader stops the pool for the fork."""
    _, _, train, _ = tiny_shards
    script = tmp_path / "fork_after_cv2.py"
    script.write_text(
        "import cv2, numpy as np\n"
        "from curriculum.data import TrainSpec, TrainStream, train_loader\n"
        "img = np.random.rand(2000, 3000).astype(np.float32)\n"
        "for _ in range(3):\n"
        "    cv2.resize(img, (1500, 1000), interpolation=cv2.INTER_CUBIC)\n"
        "    cv2.GaussianBlur(img, (9, 9), 0)\n"
        "threads = cv2.getNumThreads()\n"
        "spec = TrainSpec(batch_size=2, batches_per_rank=4, crop_height=28, crop_width=56, shuffle_buffer=4)\n"
        f"for _ in range(3):\n"
        f"    assert len(list(train_loader(TrainStream({train!r}, spec, 0, 1, 0), lambda: 0, 2))) == 4\n"
        "assert cv2.getNumThreads() == threads  # this process keeps its thread pool\n"
        "print('ok')\n"
    )
    done = _run_script(script)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_script_ending_on_an_exception_with_live_workers_exits(tiny_shards, tmp_path):
    """Workers ignore SIGTERM (a signal to the process group is for the trainer), so
    multiprocessing's exit handler, which SIGTERMs and then joins them, used to wait forever."""
    _, _, train, _ = tiny_shards
    script = tmp_path / "crash.py"
    script.write_text(
        "from curriculum.data import TrainSpec, TrainStream, train_loader\n"
        "spec = TrainSpec(batch_size=2, batches_per_rank=8, crop_height=28, crop_width=56, shuffle_buffer=4)\n"
        f"loader = train_loader(TrainStream({train!r}, spec, 0, 1, 0), lambda: 0, 2)\n"
        "batch = next(iter(loader))\n"
        "raise RuntimeError('crash with workers alive')\n"
    )
    done = _run_script(script)
    assert done.returncode == 1 and "crash with workers alive" in done.stderr


def _run_script(script: Path) -> subprocess.CompletedProcess:
    """A test script run by a fresh interpreter from the project root (fork and exit behaviour)."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})


@pytest.mark.parametrize("out,scale_jitter", [((120, 150), 0.0), ((56, 84), 0.0), ((56, 84), 0.5)])
def test_crops_keep_image_depth_and_sky_aligned(out, scale_jitter):
    """Every pixel's source coordinates are written into the image and into the depth map: a crop
    that cuts or flips the maps apart shows up as a difference. Unresized crops (120x150 of a
    120x200 frame) agree exactly; resized ones to within the nearest-neighbour offset (see
    ``crop_resize``: under one output pixel, so at most one output pixel's worth of source pixels)."""
    h, w = 120, 200
    ys, xs = np.mgrid[0:h, 0:w]
    rgb = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    depth = (xs + 1000.0 * ys + 1.0).astype(np.float32)
    sky = xs < 50  # a vertical edge: the sky mask must follow the image's columns
    rng = np.random.default_rng(1)
    resized = out != (120, 150) or scale_jitter > 0
    bound = max(h / out[0], w / out[1]) + 0.5 if resized else 0.0
    inner = (slice(2, -2), slice(2, -2)) if resized else (slice(None), slice(None))  # cubic overshoots at borders
    flips = 0
    for _ in range(30):
        r, d, s = crop_resize(rgb, depth, sky, *out, rng, scale_jitter=scale_jitter, hflip=True)
        depth_x, depth_y = (d - 1.0) % 1000.0, (d - 1.0) // 1000.0
        image_x, image_y = r[..., 0].astype(np.float64), r[..., 1].astype(np.float64)
        assert np.abs(depth_x - image_x)[inner].max() <= bound
        assert np.abs(depth_y - image_y)[inner].max() <= bound
        assert np.array_equal(s, depth_x < 50)  # sky goes with depth, pixel for pixel
        flips += bool(depth_x[0, 0] > depth_x[0, -1])
    assert 0 < flips < 30  # flipped and unflipped crops were both checked


def test_a_shard_missing_from_its_index_is_a_one_line_error(tiny_shards):
    """count_samples: a shard the index.json beside it does not list is a DataError naming it,
    not a KeyError from inside the count."""
    train_dir, _, train, _ = tiny_shards
    index_path = train_dir / "index.json"
    index = json.loads(index_path.read_text())
    dropped = index["shards"].pop(-1)["name"]
    index_path.write_text(json.dumps(index))
    assert count_samples(train[:-1]) == 12
    with pytest.raises(DataError, match=rf"index.json: no entry for shard {dropped}"):
        count_samples(train)


def test_crop_windows_reach_every_offset_and_the_whole_jitter_range():
    """Offsets run from the top-left to the bottom-right corner, both included (no edge row or
    column is left out of training), flips are drawn about half the time, and scale jitter zooms
    over all of [1, 1 + scale_jitter]."""
    rng = np.random.default_rng(0)
    windows = [crop_window(20, 30, 14, 14, rng, 0.0, True) for _ in range(2000)]
    assert {(y0, ch, cw) for y0, _, ch, cw, _ in windows} == {(0, 20, 20)}  # a lower-bound resize: rows fit
    assert {x0 for _, x0, *_ in windows} == set(range(0, 30 - 20 + 1))  # 11 offsets, both ends included
    rng = np.random.default_rng(1)
    windows = [crop_window(100, 100, 50, 50, rng, 1.0, False) for _ in range(3000)]
    assert not any(flip for *_, flip in windows)
    sizes = [ch for _, _, ch, _, _ in windows]
    # zoom 1 + u, u in [0, 1]: crops of round(100 / (1 + u)) source pixels, 50..100
    assert min(sizes) >= 50 and max(sizes) <= 100
    assert min(sizes) <= 52 and max(sizes) >= 98  # both ends of the jitter range are drawn
    zoomed = [(y0, x0, ch, cw) for y0, x0, ch, cw, _ in windows if ch < 100]
    assert any(y0 == 0 for y0, _, _, _ in zoomed) and any(x0 == 0 for _, x0, _, _ in zoomed)
    assert any(y0 + ch == 100 for y0, _, ch, _ in zoomed)  # the bottom row ...
    assert any(x0 + cw == 100 for _, x0, _, cw in zoomed)  # ... and the right column are reached
    flips = [crop_window(40, 60, 14, 14, np.random.default_rng(s), 0.0, True)[4] for s in range(2000)]
    assert 0.45 < np.mean(flips) < 0.55


def test_colour_jitter_factors_spread_both_ways_within_the_amount():
    rng = np.random.default_rng(0)
    assert jitter_factors(0.0, rng) is None
    factors = np.array([jitter_factors(0.3, rng) for _ in range(500)])
    assert factors.shape == (500, 3) and factors.dtype == np.float64
    assert (factors >= 0.7 - 1e-6).all() and (factors <= 1.3 + 1e-6).all()
    # brightness, contrast and saturation each darken/flatten as often as they brighten/boost
    assert ((factors < 0.8).any(axis=0) & (factors > 1.2).any(axis=0)).all()
    assert np.allclose(factors.mean(axis=0), 1.0, atol=0.05)


def test_bad_sample_limit_allows_exactly_that_many(tmp_path):
    """max_bad_samples is how many a reader may skip: that many pass, one more stops the run."""
    shards = write_tiny_shards(tmp_path / "d", n_shards=1, per_shard=4)
    _append_broken_sample(shards[0], "broken_0001")  # one bad sample
    with pytest.warns(UserWarning, match="lacks depth.png"):
        batches = list(TrainStream(shards, _spec(batches_per_rank=3, shuffle_buffer=1, max_bad_samples=1), 0, 1, 0))
    assert len(batches) == 3 and sum(int(b["bad_samples"]) for b in batches) == 1


def test_the_shard_split_over_readers_changes_with_the_epoch(tiny_shards):
    """Shards are dealt to the readers by an epoch-seeded permutation: a reader that holds fewer
    shards in one epoch is not the same reader in every epoch (the module docstring's known limit
    evens out over epochs only so)."""
    _, _, train, _ = tiny_shards  # 4 shards of 4 samples

    def rank0_keys(epoch):
        s = TrainStream(train, _spec(batch_size=1, batches_per_rank=8, shuffle_buffer=1), 0, 2, 3)
        s.set_position(epoch * 8)
        return frozenset(_keys(list(s)))

    assert len({rank0_keys(e) for e in range(4)}) > 1


def test_each_pass_over_a_readers_shards_takes_them_in_a_new_order(tmp_path):
    """A reader that cycles its shards within an epoch takes them in a new order on each pass."""
    shards = write_tiny_shards(tmp_path / "d", n_shards=4, per_shard=2)
    keys = _keys(list(TrainStream(shards, _spec(batch_size=1, batches_per_rank=16, shuffle_buffer=1), 0, 1, 0)))
    shard_of = [int(k.rsplit("_", 1)[1]) // 2 for k in keys]  # frame i is in shard i // 2
    passes = [shard_of[:8:2], shard_of[8::2]]
    assert sorted(passes[0]) == sorted(passes[1]) == [0, 1, 2, 3]
    assert passes[0] != passes[1]


def test_augmentations_differ_between_readers_and_epochs_for_the_same_frames(tmp_path):
    """The per-sample generator is seeded by (seed, epoch, reader, position): two readers holding
    identical frames, or one reader in two epochs, do not crop, flip and jitter them alike."""
    a = write_tiny_shards(tmp_path / "a", n_shards=1, per_shard=4, seed=0)
    b = write_tiny_shards(tmp_path / "b", n_shards=1, per_shard=4, seed=0)  # the same frames
    spec = _spec(batch_size=2, batches_per_rank=2, shuffle_buffer=1, scale_jitter=0.5, color_jitter=0.3)
    ranks = [list(TrainStream(a + b, spec, rank, 2, 0)) for rank in range(2)]
    assert _keys(ranks[0]) == _keys(ranks[1])  # the same frames in the same order ...
    assert not any(torch.equal(x["packed"], y["packed"]) for x, y in zip(*ranks))  # ... augmented apart

    def epoch(e):
        s = TrainStream(a, spec, 0, 1, 0)
        s.set_position(e * spec.batches_per_rank)
        return list(s)

    e0, e1 = epoch(0), epoch(1)
    assert _keys(e0) == _keys(e1)
    assert not any(torch.equal(x["packed"], y["packed"]) for x, y in zip(e0, e1))


@pytest.mark.parametrize("world", [1, 2])
def test_validation_max_images_reads_exactly_that_many(tiny_shards, world):
    _, _, _, val = tiny_shards  # 2 shards x 3 samples
    keys = _keys(b for rank in range(world) for b in ValStream(val, rank, world, 2, 28, 56, max_images=4))
    assert len(keys) == 4 and len(set(keys)) == 4


def test_validation_counts_a_shards_defect_once_when_every_reader_reads_it(tmp_path):
    """Fewer shards than readers: each reader reads every shard and keeps its own images, but a
    sample the shard lacks parts of is one bad sample, not one per reader."""
    shards = write_tiny_shards(tmp_path / "v", n_shards=1, per_shard=2)
    _append_broken_sample(shards[0], "broken_0001")
    for world in (1, 2):
        with pytest.warns(UserWarning, match="lacks depth.png"):
            batches = [b for rank in range(world) for b in ValStream(shards, rank, world, 1, 28, 56)]
        assert len(_keys(batches)) == 2 and sum(int(b["bad_samples"]) for b in batches) == 1, world


def test_color_jitter_rounds_to_the_nearest_level_on_host_and_device():
    """Jittered pixels are the float result rounded, not truncated (which darkened every image by
    half a level on average); the device path rounds the same way."""
    from curriculum.data import color_jitter, color_jitter_images, jitter_factors

    rgb = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    b, c, s = jitter_factors(0.3, np.random.default_rng(5))
    img = rgb.astype(np.float64) * b
    img = (img - img.mean()) * c + img.mean()
    img = (img - img.mean(axis=2, keepdims=True)) * s + img.mean(axis=2, keepdims=True)
    exact = np.clip(img, 0, 255)
    host = color_jitter(rgb, 0.3, np.random.default_rng(5))
    device = color_jitter_images(torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous(),
                                 torch.tensor([[b, c, s]], dtype=torch.float32))[0].permute(1, 2, 0).numpy()
    for out in (host, device):
        err = out.astype(np.float64) - exact
        assert np.abs(err).max() <= 0.5 + 1e-3 and abs(err.mean()) < 0.02


def test_epoch_samples_stands_in_for_an_index_that_misses_a_shard(tiny_shards, tmp_path):
    """An index.json that does not list every shard (one copied in later) stops a run that relies
    on it, naming the shard; data.epoch_samples is the way round it, and then the index is not
    needed."""
    import shutil

    from curriculum.datamodule import DepthDataModule

    train_dir, val_dir, train, _ = tiny_shards
    shutil.copy(train[0], train_dir / "extra-000009.tar")
    cfg = {"train_shards": f"{train_dir}/*.tar", "val_shards": f"{val_dir}/*.tar", "epoch_samples": 0}
    with pytest.raises(DataError, match="no entry for shard extra-000009.tar"):
        DepthDataModule(cfg, 0)
    dm = DepthDataModule({**cfg, "epoch_samples": 12}, 0)
    assert dm.epoch_samples == 12 and dm.shard_counts is None


def test_an_index_nested_past_the_parsers_depth_is_one_line(tiny_shards):
    _, _, train, _ = tiny_shards
    (Path(train[0]).parent / "index.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DataError, match="index.json: unreadable shard index"):
        shard_sample_counts(train)
