"""The WebDataset side of training: shard lists, decoding, joint augmentation, batching.

Design, against the traps of webdataset under DDP:
- Rank and world size are captured in the main process and handed to the dataset; nothing is
  read from environment variables inside loader workers.
- Training: every rank yields exactly `batches_per_rank` full batches per epoch. Global batch `b`
  of an epoch comes from stream `b % num_workers` of the rank; each stream reads its own slice of
  an epoch-seeded shard permutation, cycling it if needed, so no rank ever runs dry.
  Known limit: shards are the unit of the split and each stream draws a fixed number of
  batches, so when a reader's shards hold fewer samples than its batches draw (a shard count
  that is not a multiple of the readers, ranks x workers; shards of unequal size, as a
  converter's short last shard; batches per rank that do not divide among the workers) an epoch
  repeats some of that reader's samples and leaves out some of the others' (a different split
  each epoch, so over epochs every sample is drawn alike). ``uneven_split_note`` says how many
  at the start of training.
- The data of a batch is a pure function of (seed, epoch, rank, loader worker, batch index) for a
  given world size and ``num_workers``: augmentations draw from a per-sample generator. The seed
  is ``run.seed``, mixed with where the parent stood for a stage started with ``init_from``
  (``train.data_seed``). A resumed run skips the batches already trained on (without
  decoding them) and sees the same batches an uninterrupted run would, provided `num_workers` and
  the world size are unchanged. Every batch carries its stream's position (raw samples drawn,
  failed decodes included); checkpoints keep the last trained one of every stream of every rank
  (`StreamPositions`), so the skip is exact after bad samples too. Without positions (a
  checkpoint that lacks them) the skip assumes no failed decode.
- Validation: shards are split over all readers; every image is read by exactly one reader.
- 16-bit depth is decoded by `data_prep.schema.decode_sample`, never by webdataset's decoders.
- Bad samples (truncated tars, missing members, undecodable files) are skipped and counted once
  each (a tar cut short gives up its last, possibly partial, sample: `data_prep.shard_reader`);
  every batch carries how many were dropped, and past `max_bad_samples` the run stops naming the
  shard.
"""
from __future__ import annotations

import atexit
import copy
import functools
import glob
import json
import multiprocessing as mp
import os
import random
import signal
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen

from curriculum.worker_buffers import WorkerBuffers, fresh_batch_bytes
from data_prep.schema import FAR_RAW, SampleError, decode_sample
from data_prep.shard_reader import iter_tar_samples

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REQUIRED_MEMBERS = ("depth.png", "meta.json")


class DataError(RuntimeError):
    """A data problem that stops the run, reported in one line."""

    def __init__(self, message: str = ""):
        super().__init__(one_line(str(message)))


def one_line(message: str) -> str:
    """The original message of an error a loader worker raised: torch re-raises it in the main
    process wrapped in the worker's traceback ("Caught DataError in DataLoader worker process 0.
    Original Traceback ..."), whose last line is "<type>: <message>"."""
    if not message.startswith("Caught ") or "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and " " not in head else last


# ---------------------------------------------------------------------------- shard lists


def expand_shards(spec: str) -> list[str]:
    """Brace-expand `spec`, glob local patterns, keep `pipe:` and URL shards as they are."""
    urls: list[str] = []
    for part in braceexpand(spec):
        if part.startswith("pipe:") or "://" in part:
            urls.append(part)
        elif any(c in part for c in "*?["):
            urls.extend(sorted(glob.glob(part)))
        elif os.path.isfile(part):
            urls.append(part)
        elif os.path.isdir(part):
            raise DataError(f"'{part}' is a folder: give its shards, e.g. {os.path.join(part, '*.tar')}")
        else:
            raise DataError(f"shard not found: {part}")
    if not urls:
        hint = " (make data writes the synthetic set there)" if spec.startswith("data/synthetic/") else ""
        raise DataError(f"shard pattern '{spec}' matches no shard{hint}")
    return urls


def shard_sample_counts(urls: list[str]) -> list[int] | None:
    """Samples of each local shard (in the order of ``urls``) from the index.json beside it; None
    when unknown (a ``pipe:`` or remote shard, a folder without index.json)."""
    by_dir: dict[str, dict] = {}
    for url in urls:
        if url.startswith("pipe:") or "://" in url:
            return None
        by_dir.setdefault(os.path.dirname(os.path.abspath(url)), {})
    for folder in by_dir:
        path = os.path.join(folder, "index.json")
        try:
            with open(path) as f:
                index = json.load(f)
            by_dir[folder] = {s["name"]: int(s["samples"]) for s in index["shards"]}
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise DataError(f"{path}: unreadable shard index ({exc})") from None
    counts = []
    for url in urls:
        folder, name = os.path.dirname(os.path.abspath(url)), os.path.basename(url)
        if name not in by_dir[folder]:
            raise DataError(f"{os.path.join(folder, 'index.json')}: no entry for shard {name}")
        counts.append(by_dir[folder][name])
    return counts


def count_samples(urls: list[str]) -> int | None:
    """Total samples of local shards from the index.json beside them; None when unknown."""
    counts = shard_sample_counts(urls)
    return None if counts is None else sum(counts)


def epoch_shards(urls: list[str], seed: int, epoch: int, slot: int, slots: int) -> list[str]:
    """The training shards reader ``slot`` of ``slots`` (ranks x workers) reads in ``epoch``: its
    slice of an epoch-seeded permutation."""
    order = list(urls)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order[slot::slots]


# ---------------------------------------------------------------------------- transforms


def crop_window(h: int, w: int, out_h: int, out_w: int, rng: np.random.Generator, scale_jitter=0.0, hflip=True):
    """(y0, x0, ch, cw, flip) of a random crop of a lower-bound resize, in source pixels.

    The crop of the frame that, resized to (out_h, out_w), equals cropping the frame resized so
    that it covers (out_h, out_w) (times a random zoom in [1, 1 + scale_jitter]).
    """
    scale = max(out_h / h, out_w / w) * (1.0 + rng.uniform(0.0, scale_jitter) if scale_jitter > 0 else 1.0)
    ch, cw = min(h, max(1, round(out_h / scale))), min(w, max(1, round(out_w / scale)))
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    flip = bool(hflip and rng.random() < 0.5)
    return y0, x0, ch, cw, flip


def crop_flip(rgb, depth, sky, window):
    """Cut the window out of the three maps and flip them as it says (no resizing). Unflipped
    maps come back as views: ``collate_train`` copies them once, into the batch."""
    y0, x0, ch, cw, flip = window
    rows, cols = slice(y0, y0 + ch), slice(x0, x0 + cw)
    rgb, depth, sky = rgb[rows, cols], depth[rows, cols], sky[rows, cols]
    if flip:
        # cv2.flip writes contiguous output in one pass; copying a reversed view is several times slower
        rgb, depth = cv2.flip(rgb, 1), cv2.flip(depth, 1)
        sky = cv2.flip(sky.view(np.uint8), 1).view(bool)
    return rgb, depth, sky


def crop_resize(rgb, depth, sky, out_h, out_w, rng: np.random.Generator, scale_jitter=0.0, hflip=True):
    """Random crop of a lower-bound resize, done crop-first: only the crop is resized.

    Equivalent to resizing the frame so it covers (out_h, out_w), then cropping; depth and sky
    use nearest neighbour so no depth is interpolated across an edge. Known limit, kept from
    Depth-Anything-V2 (the same two OpenCV calls): INTER_NEAREST takes each output pixel's
    top-left source pixel while INTER_CUBIC samples its centre, so where the crop is resized the
    depth and sky maps sit up to half an output pixel up and left of the image. INTER_NEAREST_EXACT
    would centre them, but its fixed-point rounding has no exact twin on the device
    (``_nearest_index_on``), and a gather on the host costs about twice the resize.
    """
    y0, x0, ch, cw, flip = crop_window(*depth.shape, out_h, out_w, rng, scale_jitter, hflip)
    rgb, depth, sky = crop_flip(rgb, depth, sky, (y0, x0, ch, cw, False))  # views: nothing copied yet
    if (ch, cw) != (out_h, out_w):
        rgb = cv2.resize(rgb, (out_w, out_h), interpolation=cv2.INTER_CUBIC)  # as Depth-Anything-V2
        depth = cv2.resize(depth, (out_w, out_h), interpolation=cv2.INTER_NEAREST)
        sky = cv2.resize(sky.view(np.uint8), (out_w, out_h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return crop_flip(rgb, depth, sky, (0, 0, out_h, out_w, flip))


def jitter_factors(amount: float, rng: np.random.Generator) -> tuple[float, float, float] | None:
    """Brightness, contrast and saturation factors in [1 - amount, 1 + amount] (float32 values),
    or None for no jitter (nothing drawn)."""
    if amount <= 0:
        return None
    return tuple((1.0 + rng.uniform(-amount, amount, size=3)).astype(np.float32).tolist())


def color_jitter(rgb: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation jitter on the image only."""
    factors = jitter_factors(amount, rng)
    if factors is None:
        return rgb
    b, c, s = np.asarray(factors, dtype=np.float32)
    img = rgb.astype(np.float32) * b
    mean = img.mean()
    img = (img - mean) * c + mean
    gray = img.mean(axis=2, keepdims=True)
    img = (img - gray) * s + gray
    # rounded: truncating would darken every jittered image by half a level on average
    return np.rint(np.clip(img, 0, 255)).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _imagenet_stats_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # made once per device: torch.tensor(..., device=cuda) waits for the device to drain its queue;
    # ordinary tensors even when first asked for under inference_mode (validation), so that
    # training can use them too
    with torch.inference_mode(False), torch.no_grad():
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(device)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).to(device)
    return mean, std


def normalize_images(images: torch.Tensor, full_scale: float = 255.0) -> torch.Tensor:
    """uint8 (B,3,H,W) -> ImageNet-normalised float; done on the device after transfer.
    ``full_scale`` 1.0: float images already in [0, 1]."""
    mean, std = _imagenet_stats_on(images.device)
    return (images.float().div_(full_scale) - mean) / std


_ALIGN = 64  # every field starts on a cache line, so that its bytes view as any dtype


def collate_train(samples: list[dict], buffers: WorkerBuffers | None = None) -> dict:
    """One training batch as ONE uint8 tensor (``packed``) plus its ``layout``; ``unpack_batch``
    turns it into uint8 images (B,3,H,W), raw uint16 depth as int16 bits (B,H,W), each sample's
    depth scale (B,) and the sky mask packed eight pixels to a byte (B,H,ceil(W/8)).

    One tensor, because a loader worker hands every tensor of a batch to the main process in its
    own shared-memory round trip, which waits for the worker's GIL; the main process, which feeds
    all workers' batches to the device, spent 3.5 ms receiving a batch of five tensors and 1.7 ms
    receiving one (benchmarks/RESULTS.md). 5.1 bytes per pixel cross
    instead of 9 with float32 depth and two bool masks; metres, the no-measurement mask and the
    bool sky are made on the device (``batch_to_metres``), where the packed tensor also goes in
    one copy.

    Crops of different sizes (``device_resize`` with scale jitter) are zero-padded at the bottom
    and right to the batch's largest. With ``buffers`` (in a loader worker), the batch is written
    into one of the worker's reusable shared-memory slots instead of fresh shared memory.
    """
    b = len(samples)
    hp = max(s["depth_raw"].shape[0] for s in samples)
    wp = max(s["depth_raw"].shape[1] for s in samples)
    fields = [  # name, dtype, shape, permutation applied by unpack_batch
        ("image", np.uint8, (b, hp, wp, 3), (0, 3, 1, 2)),  # NCHW view of NHWC (channels-last) memory
        ("depth_raw", np.int16, (b, hp, wp), None),  # uint16 bits: torch lacks uint16 ops
        ("sky_bits", np.uint8, (b, hp, (wp + 7) // 8), None),
        ("depth_scale", np.float32, (b,), None),
    ]
    layout, spans, offset = [], [], 0
    for name, dtype, shape, perm in fields:
        layout.append((name, np.dtype(dtype).name, shape, offset, perm))
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        spans.append((offset + nbytes, offset + -(-nbytes // _ALIGN) * _ALIGN))
        offset = spans[-1][1]
    packed, handle = buffers.take(offset) if buffers is not None else (fresh_batch_bytes(offset),) * 2
    buf = packed.numpy()
    for gap_start, gap_end in spans:  # defined bytes throughout: equal batches are equal tensors
        buf[gap_start:gap_end] = 0
    views = {name: buf[o : o + int(np.prod(shape)) * np.dtype(dt).itemsize].view(dt).reshape(shape)
             for name, dt, shape, o, _ in layout}
    padded = any(s["depth_raw"].shape != (hp, wp) for s in samples)
    for i, s in enumerate(samples):
        h, w = s["depth_raw"].shape
        sky = pack_mask(s["sky"])  # pad bits are 0, as packing the zero-padded mask gives
        for name, src in (("image", s["rgb"]), ("depth_raw", s["depth_raw"].view(np.int16)), ("sky_bits", sky)):
            dst = views[name][i]
            if padded:
                dst[...] = 0
            dst[: src.shape[0], : src.shape[1]] = src  # the crop's only copy on the host
        views["depth_scale"][i] = s["meta"]["depth_scale"]
    return {"packed": handle, "layout": tuple(layout), "key": [s["key"] for s in samples]}


def unpack_batch(batch: dict) -> dict:
    """Replace a ``collate_train`` batch's ``packed`` tensor (on any device) by views of its fields
    (in place; no copy)."""
    if "packed" not in batch:
        return batch
    packed = batch.pop("packed")
    for name, dtype, shape, offset, perm in batch.pop("layout"):
        dt = getattr(torch, dtype)
        n = int(np.prod(shape)) * dt.itemsize
        t = packed[offset : offset + n].view(dt).view(*shape)
        batch[name] = t.permute(*perm) if perm is not None else t
    return batch


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, ceil(W / 8)) uint8, bit i of byte j = pixel 8 j + i: a mask crosses
    from a loader worker in an eighth of the bytes."""
    return np.packbits(mask, axis=-1, bitorder="little")


def unpack_mask(bits: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of ``pack_mask`` for a (..., ceil(W / 8)) uint8 tensor, on its device."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    out = (bits.unsqueeze(-1) >> shifts).bitwise_and_(1).bool()
    return out.flatten(-2)[..., :width]


def collate_train_crops(samples: list[dict], buffers: WorkerBuffers | None = None) -> dict:
    """``collate_train`` for unresized, unflipped crops (``device_resize``): each crop's size and
    flip travel in ``crop_size`` and ``flip`` (plain ints: they stay on the host, no device sync
    to read them), and ``resize_crops`` finishes the job on the device. Crops of one frame size
    all have the same size, so a batch is usually unpadded. Colour jitter factors, when drawn,
    travel in ``jitter``: the jitter runs after the resize, as in the worker path (clipping and
    resizing do not commute)."""
    out = collate_train(samples, buffers)
    out["crop_size"] = [tuple(s["depth_raw"].shape) for s in samples]
    out["flip"] = [s["flip"] for s in samples]
    if any(s.get("jitter") is not None for s in samples):
        out["jitter"] = [s["jitter"] for s in samples]
    return out


def color_jitter_images(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``color_jitter`` on a uint8 batch (B,3,H,W) on its device, with each image's (brightness,
    contrast, saturation) factors in a (B,3) float32 tensor: the same float32 steps, clipped and
    rounded to uint8 as there."""
    b, c, s = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
    img = images.float() * b
    mean = img.mean(dim=(1, 2, 3), keepdim=True)
    img = (img - mean) * c + mean
    gray = img.mean(dim=1, keepdim=True)
    img = (img - gray) * s + gray
    return img.clamp_(0, 255).round_().to(torch.uint8)


def _on_device_without_waiting(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    # from pinned memory without blocking: a blocking copy would wait for the device's whole
    # queue, and one from pageable memory may still wait for the stream
    return (t.pin_memory() if dev.type == "cuda" else t).to(dev, non_blocking=True)


@functools.lru_cache(maxsize=64)
def _nearest_index_on(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """Source index of each output pixel as OpenCV's INTER_NEAREST computes it (the same float64
    products), so a gather picks exactly the pixels ``cv2.resize`` picks. Computed on the device:
    scale jitter gives more crop sizes than the cache holds, and copying each miss's indices
    from the host would wait for the device's queue."""
    src = torch.arange(n_out, dtype=torch.float64, device=device) * (1.0 / (n_out / n_in))
    return src.floor_().to(torch.int64).clamp_(max=n_in - 1)


def resize_crops(batch: dict, out_h: int, out_w: int) -> dict:
    """Resize (then flip, then colour-jitter) a ``device_resize`` batch's crops to (out_h, out_w)
    on their device, in place, in the worker path's order.

    Image: bicubic (OpenCV's INTER_CUBIC up to its fixed-point rounding, at most 1 level apart),
    rounded back to uint8; colour jitter can stretch that difference to 2 levels. Depth (metres,
    after ``batch_to_metres``), the no-measurement mask and sky: nearest neighbour with OpenCV's
    indices, so they equal the worker-side resize exactly.
    """
    sizes = batch.pop("crop_size", None)
    if sizes is None:
        return batch
    sizes = [(int(h), int(w)) for h, w in sizes]  # the loader may hand tuples back as lists
    flips = [bool(f) for f in batch.pop("flip")]
    jitter = batch.pop("jitter", None)
    image, maps = batch["image"], {k: batch[k] for k in ("depth", "no_measurement", "sky")}
    dev = image.device

    def one(i0: int, i1: int, h: int, w: int):
        img = image[i0:i1, :, :h, :w]
        if (h, w) != (out_h, out_w):
            img = F.interpolate(img.float(), (out_h, out_w), mode="bicubic", align_corners=False)
            img = img.round_().clamp_(0, 255).to(torch.uint8)
        iy, ix = _nearest_index_on(h, out_h, dev), _nearest_index_on(w, out_w, dev)
        return img, {k: v[i0:i1].index_select(1, iy).index_select(2, ix) for k, v in maps.items()}

    if len(set(sizes)) == 1:  # the usual case: one batched resize
        img, out = one(0, len(sizes), *sizes[0])
    else:
        parts = [one(i, i + 1, h, w) for i, (h, w) in enumerate(sizes)]
        img = torch.cat([p[0] for p in parts])
        out = {k: torch.cat([p[1][k] for p in parts]) for k in maps}
    out["image"] = img
    if any(flips):  # horizontal flip after the resize, as the worker path does it
        flip = _on_device_without_waiting(torch.tensor(flips), dev)
        for k, v in out.items():
            out[k] = torch.where(flip.view(-1, *([1] * (v.dim() - 1))), v.flip(-1), v)
    if jitter is not None:
        factors = _on_device_without_waiting(torch.tensor(jitter, dtype=torch.float32), dev)
        out["image"] = color_jitter_images(out["image"], factors)
    batch.update(out)
    return batch


def depth_to_metres(depth_raw: torch.Tensor, depth_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw depth (B,H,W; uint16 stored as int16 bits) and per-sample scales (B,) -> float32 metres
    (+inf at 65535) and the no-measurement mask (raw 0). The same float32 product as
    ``data_prep.schema.raw_to_depth``, so the result is bit-identical on any device."""
    raw = depth_raw.to(torch.int32) & 0xFFFF
    depth = raw.to(torch.float32) * depth_scale.to(device=raw.device, dtype=torch.float32).view(-1, 1, 1)
    depth = depth.masked_fill(raw == FAR_RAW, float("inf"))
    return depth, raw == 0


def finish_train_batch(batch: dict, out_h: int, out_w: int) -> dict:
    """What a training batch needs on its device before the model: its fields unpacked, metres,
    masks and, with ``device_resize``, the resized crops (in place; uint8 images stay uint8)."""
    return resize_crops(batch_to_metres(batch), out_h, out_w)


def batch_to_metres(batch: dict) -> dict:
    """Unpack a training batch (``unpack_batch``), then replace its raw depth by metres and the
    no-measurement mask, and its packed sky by a bool mask (in place)."""
    unpack_batch(batch)
    if "depth_raw" in batch:
        batch["depth"], batch["no_measurement"] = depth_to_metres(batch.pop("depth_raw"), batch.pop("depth_scale"))
    if "sky_bits" in batch:
        batch["sky"] = unpack_mask(batch.pop("sky_bits"), batch["depth"].shape[-1])
    return batch


def collate_val(samples: list[dict]) -> dict:
    """Images share the network size; depth keeps its native size, padded (valid = False)."""
    h = max(s["depth"].shape[0] for s in samples)
    w = max(s["depth"].shape[1] for s in samples)
    n = len(samples)
    depth = torch.zeros(n, h, w)
    sky = torch.zeros(n, h, w, dtype=torch.bool)
    valid = torch.zeros(n, h, w, dtype=torch.bool)
    sizes = torch.zeros(n, 2, dtype=torch.long)
    for i, s in enumerate(samples):
        sh, sw = s["depth"].shape
        depth[i, :sh, :sw] = torch.from_numpy(s["depth"])
        sky[i, :sh, :sw] = torch.from_numpy(s["sky"])
        valid[i, :sh, :sw] = True
        sizes[i] = torch.tensor([sh, sw])
    return {
        "image": torch.from_numpy(np.stack([s["rgb"] for s in samples])).permute(0, 3, 1, 2).contiguous(),
        "depth": depth,
        "sky": sky,
        "valid": valid,
        "no_measurement": (depth <= 0) | torch.isnan(depth) | ~valid,
        "size": sizes,
        "key": [s["key"] for s in samples],
    }


# ---------------------------------------------------------------------------- streams


class _BadSampleCounter:
    def __init__(self, limit: int):
        self.limit = limit
        self.total = 0
        self.pending = 0

    def __call__(self, url: str, reason: str) -> None:
        self.total += 1
        self.pending += 1
        warnings.warn(f"skipping bad sample in {url}: {reason}", stacklevel=2)
        if self.total > self.limit:
            raise DataError(f"{url}: more than {self.limit} bad samples in this reader (last: {reason})")

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n


def _ignore_defect(url: str, reason: str) -> None:
    """A bad-sample counter for a reader whose shards another reader counts (``ValStream``)."""


def _raw_samples(urls: list[str], bad: Callable[[str, str], None]) -> Iterator[dict]:
    """Raw samples (bytes) of the given shards. A shard that breaks or ends without its
    end-of-archive marker gives up its last, possibly partial, sample (``data_prep.shard_reader``);
    each defect counts once."""
    for url in urls:
        stream = _PipeErrorsInWords(gopen(url), url) if url.startswith("pipe:") else gopen(url)
        try:
            yield from _complete(iter_tar_samples(stream, url, functools.partial(bad, url)), url, bad)
            if isinstance(stream, _PipeErrorsInWords):
                stream.drain()  # the tar ended at its marker: the command's end and exit status are read too
        finally:
            stream.close()


class _PipeErrorsInWords:
    """A ``pipe:`` shard's stream whose failure reads "<url>: command exited with status N":
    webdataset's own error quotes Popen's arguments (``(('cat x',), {'shell': True, ...}): exit 1
    (read) {}``). Reading on after a failed command is an error; closing it is a DataError,
    unless the reader stopped before the end (an epoch's quota, val_max_images, a corrupt member)
    while the command was still writing: closing its pipe then ends it (SIGPIPE, or curl's
    status 23), which is no failure of the command's."""

    def __init__(self, stream, url: str):
        self.stream, self.url = stream, url
        self.at_end = False

    def _words(self) -> str:
        return f"command exited with status {getattr(self.stream, 'status', '?')}"

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.stream.read(size)
        except OSError:
            raise OSError(self._words()) from None
        if not data and size != 0:
            self.at_end = True
        return data

    def drain(self) -> None:
        """Read the command's output to its end (after the tar's end-of-archive marker, its padding)."""
        try:
            while self.read(1 << 16):
                pass
        except OSError:
            raise DataError(f"{self.url}: {self._words()}") from None

    def close(self) -> None:
        proc = getattr(self.stream, "proc", None)
        still_writing = not self.at_end and proc is not None and proc.poll() is None
        try:
            self.stream.close()
        except OSError:
            if not still_writing:
                raise DataError(f"{self.url}: {self._words()}") from None


def _complete(samples: Iterator[dict], url: str, bad: Callable[[str, str], None]) -> Iterator[dict]:
    """Partial samples (a truncated tar, a missing member) are counted, never passed on."""
    for sample in samples:
        missing = [m for m in REQUIRED_MEMBERS if m not in sample]
        if not any(k.startswith("rgb.") for k in sample):
            missing.append("rgb")
        if missing:
            bad(url, f"sample {sample.get('__key__')} lacks {', '.join(missing)}")
            continue
        yield sample


def _shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    if size <= 1:
        yield from samples
        return
    buf: list[dict] = []
    for s in samples:
        buf.append(s)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


@dataclass
class TrainSpec:
    batch_size: int
    batches_per_rank: int
    crop_height: int
    crop_width: int
    scale_jitter: float = 0.0
    hflip: bool = True
    color_jitter: float = 0.0
    shuffle_buffer: int = 256
    max_bad_samples: int = 100
    device_resize: bool = False  # ship unresized crops; resize_crops finishes them on the device


class TrainStream(IterableDataset):
    """Fixed-length, resumable training stream for one rank (see the module docstring)."""

    def __init__(self, urls: list[str], spec: TrainSpec, rank: int, world_size: int, seed: int):
        self.urls, self.spec = list(urls), spec
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.position = mp.Value("q", 0)  # global step at iterator creation, shared with workers
        self.resume: tuple[int | None, tuple[int, list[int]] | None] = (None, None)  # see set_position
        self.buffers: WorkerBuffers | None = None  # set by train_loader for loader workers

    def __len__(self) -> int:
        # Known epoch length: progress bars get an ETA and Lightning ends epochs on count.
        return self.spec.batches_per_rank

    def empty_batch(self) -> dict:
        """A batch of this stream's shapes with no measured pixel (raw depth 0, no sky): every
        mask policy gives it zero weight, so it trains nothing."""
        h, w = self.spec.crop_height, self.spec.crop_width
        samples = [{"rgb": np.zeros((h, w, 3), np.uint8), "depth_raw": np.zeros((h, w), np.uint16),
                    "sky": np.zeros((h, w), bool), "meta": {"depth_scale": 1.0}, "key": "", "flip": False}
                   for _ in range(self.spec.batch_size)]
        out = (collate_train_crops if self.spec.device_resize else collate_train)(samples)
        out["bad_samples"] = 0
        return out

    def set_position(self, global_step: int, resume: tuple[int, list[int]] | None = None) -> None:
        """The global step the next iterator starts at and, for a resume, ``(epoch, drawn)`` of
        ``StreamPositions``: how many raw samples each stream had drawn when the checkpoint was
        written. ``resume`` is read by the workers started after this call (a resume starts a
        new loader, so new workers); it applies only to the step it was given with."""
        self.position.value = int(global_step)
        self.resume = (int(global_step), resume)

    def _resume_start(self, step: int, epoch: int, stream: int, streams: int, already: int) -> int:
        """Raw samples of `stream` to skip: its recorded position, or one sample per trained
        sample where none is recorded for this step (no failed decode assumed). A recorded
        position short of that is one the run never learnt (a resume without positions saved
        again before this stream's next batch) and counts as none."""
        at, resume = self.resume
        trained = already * self.spec.batch_size
        if at != step or resume is None or resume[0] != epoch or len(resume[1]) != streams:
            return trained
        return max(int(resume[1][stream]), trained)

    def _stream_samples(self, epoch: int, slot: int, slots: int, bad: _BadSampleCounter) -> Iterator[dict]:
        """This reader's shards, cycled; each pass is shuffled on its own, so a pass over shards
        that fit the epoch yields every one of their samples exactly once."""
        mine = epoch_shards(self.urls, self.seed, epoch, slot, slots)
        if not mine:
            raise DataError(f"{len(self.urls)} shards for {slots} readers: reader {slot} has no shard")
        for cycle in range(1 << 30):
            if cycle:
                random.Random(f"{self.seed}/{epoch}/{slot}/{cycle}").shuffle(mine)
            got = 0
            buf_rng = random.Random(f"{self.seed}/{epoch}/{slot}/{cycle}/buffer")
            for s in _shuffled(_raw_samples(mine, bad), self.spec.shuffle_buffer, buf_rng):
                got += 1
                yield s
            if not got:
                raise DataError(f"no readable sample in shards {mine[0]} ... ({len(mine)} shards)")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        spec = self.spec
        step = self.position.value
        epoch, skip = divmod(step, spec.batches_per_rank)
        stream = (wid + skip) % nw  # worker j of a resumed iterator plays stream (j + skip) % nw
        already = len(range(stream, skip, nw))  # batches of this stream trained before `skip`
        quota = len(range(stream, spec.batches_per_rank, nw)) - already
        slot = self.rank * nw + stream
        bad = _BadSampleCounter(spec.max_bad_samples)
        samples = self._stream_samples(epoch, slot, self.world_size * nw, bad)
        counter = 0  # raw samples drawn from this stream in this epoch, failed decodes included
        for _ in range(self._resume_start(step, epoch, stream, nw, already)):  # trained on: skipped, undecoded
            next(samples)
            counter += 1
        # samples the reader dropped on the way (missing members, a cut tar) were counted with
        # the trained batches; the limit still sees them, the next batch's count does not
        bad.take()
        batch: list[dict] = []
        while quota > 0:
            raw = next(samples)
            rng = np.random.default_rng([self.seed, epoch, slot, counter])
            counter += 1
            try:
                s = decode_sample(raw, metres=False)
            except SampleError as exc:
                bad(raw.get("__url__", "?"), str(exc))
                continue
            # the raw uint16 depth travels as it is: metres are computed on the device
            if spec.device_resize:
                window = crop_window(*s["depth_raw"].shape, spec.crop_height, spec.crop_width, rng,
                                     spec.scale_jitter, spec.hflip)
                # flipped on the device after resizing: nearest neighbour and flipping do not commute
                rgb, depth_raw, sky = crop_flip(s["rgb"], s["depth_raw"], s["sky"], window[:4] + (False,))
                # jittered on the device after resizing too: clipping and resizing do not commute
                s.update(flip=window[4], jitter=jitter_factors(spec.color_jitter, rng))
            else:
                rgb, depth_raw, sky = crop_resize(
                    s["rgb"], s["depth_raw"], s["sky"], spec.crop_height, spec.crop_width, rng,
                    spec.scale_jitter, spec.hflip,
                )
                rgb = color_jitter(rgb, spec.color_jitter, rng)
            s.update(rgb=rgb, depth_raw=depth_raw, sky=sky)
            batch.append(s)
            if len(batch) == spec.batch_size:
                collate = collate_train_crops if spec.device_resize else collate_train
                out = collate(batch, self.buffers)
                out["bad_samples"] = bad.take()  # plain ints: no tensor to share
                out["stream_position"] = (epoch, stream, counter)
                yield out
                batch = []
                quota -= 1


class StreamPositions:
    """Where the training streams of one rank stand: per stream, the raw samples it had drawn in
    the current epoch (failed decodes included) when its last trained batch was made. The trainer
    notes every trained batch's ``stream_position``; checkpoints keep these, and a resumed stream
    skips exactly that many samples (``TrainStream.set_position``)."""

    def __init__(self, streams: int, epoch: int = -1, drawn: list[int] | None = None):
        self.epoch = epoch
        self.drawn = list(drawn) if drawn is not None else [0] * streams
        if len(self.drawn) != streams:
            raise ValueError(f"{len(self.drawn)} stream positions for {streams} streams")

    def note(self, position: tuple[int, int, int]) -> None:
        epoch, stream, drawn = position
        if epoch != self.epoch:  # a new epoch: every stream starts again
            self.epoch, self.drawn = epoch, [0] * len(self.drawn)
        self.drawn[stream] = drawn

    def resume(self) -> tuple[int, list[int]]:
        return self.epoch, list(self.drawn)


class ValStream(IterableDataset):
    """Every validation image exactly once over all ranks and workers. Images are resized to
    (height, width) as uint8, or with ``float_images`` as floats in [0, 1] with the cubic
    overshoot kept, as Depth-Anything-V2's own evaluation feeds its official checkpoints."""

    def __init__(self, urls, rank, world_size, batch_size, height, width, max_images=0, max_bad_samples=100,
                 float_images=False):
        self.urls = list(urls)
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.height, self.width = batch_size, height, width
        self.float_images = float_images
        self.max_images, self.max_bad_samples = max_images, max_bad_samples
        self.data_error: str | None = None  # under DDP, set by _EndOnDataError for the module to share

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * nw + wid, self.world_size * nw
        bad = _BadSampleCounter(self.max_bad_samples)
        by_shard = len(self.urls) >= slots and not self.max_images
        urls = self.urls[slot::slots] if by_shard else self.urls
        # A full batch waits for the next sample before it goes: bad samples found after the
        # last one (a cut-off final frame) ride with it instead of being lost with the stream.
        batch, full = [], None
        # Every reader reads every shard when they are not dealt out: a shard's own defects (a cut
        # tar, a sample without its depth) are counted by the first reader only, not once per reader.
        shard_defects = bad if by_shard or slot == 0 else _ignore_defect
        for index, raw in enumerate(_raw_samples(urls, shard_defects)):
            if not by_shard:
                if self.max_images and index >= self.max_images:
                    break
                if index % slots != slot:
                    continue
            try:
                s = decode_sample(raw)
            except SampleError as exc:
                bad(raw.get("__url__", "?"), str(exc))
                continue
            rgb = s["rgb"].astype(np.float32) / 255.0 if self.float_images else s["rgb"]
            s["rgb"] = cv2.resize(rgb, (self.width, self.height), interpolation=cv2.INTER_CUBIC)
            if full is not None:
                yield self._finish(full, bad)
                full = None
            batch.append(s)
            if len(batch) == self.batch_size:
                full, batch = batch, []
        if full is not None:
            yield self._finish(full, bad)
        if batch:
            yield self._finish(batch, bad)

    @staticmethod
    def _finish(batch, bad) -> dict:
        out = collate_val(batch)
        out["bad_samples"] = bad.take()
        return out


# Iterators with live workers, ended at exit before multiprocessing's own exit handler (atexit runs
# handlers last-registered first) would SIGTERM them, which _worker_init makes them ignore, and
# then wait for them forever: a script ending on an exception with a loader alive used to hang.
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _end_live_workers() -> None:
    for it in list(_LIVE_ITERATORS):
        it._shutdown_workers()
        for worker in getattr(it, "_workers", []):  # one still busy after the shutdown's wait
            if worker.is_alive():
                worker.kill()


class _Loader(DataLoader):
    """A DataLoader whose workers end when the process does (see _LIVE_ITERATORS) and can be
    forked after this process used OpenCV."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        # Workers are forked here. A fork taken while OpenCV's thread pool is alive (any cv2 call
        # in this process before: an in-process validation or evaluation, a panel) leaves the child
        # waiting forever on the pool's locks at its first cv2 call (_worker_init's); the pool is
        # stopped for the fork and comes back after it.
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            it = super()._get_iterator()
        finally:
            cv2.setNumThreads(threads)
        _LIVE_ITERATORS.add(it)
        return it


ResumeFn = Callable[[], "tuple[int, list[int]] | None"]


class _StopTogether:
    """A DDP rank's training batches, where a ``DataError`` of this rank's stream does not end the
    process at once: the other ranks would wait in the step's gradient all-reduce (on NCCL until
    the process group's timeout, on gloo they fail with a traceback). From the error on, this
    rank trains on empty batches (no measured pixel: a zero loss, zero gradients) that carry the
    error, and ``faults.SignalCheckpoint`` has every rank stop after the same step with it."""

    def __init__(self, batches: Iterator[dict], stream: TrainStream):
        self.batches, self.stream = batches, stream
        self.error: str | None = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.error is None:
            try:
                return next(self.batches)
            except (DataError, OSError) as exc:  # OSError: a shard that cannot be read
                self.error = one_line(str(exc))
        return {**self.stream.empty_batch(), "data_error": self.error}


class _EndOnDataError:
    """A DDP rank's validation batches, where a ``DataError`` ends this rank's validation early
    instead of the process: the other ranks would wait in the epoch-end all-reduce of the metric
    sums. The error is kept on the stream; ``DepthModule.on_validation_epoch_end`` adds it to that
    all-reduce, so that every rank stops there with it."""

    def __init__(self, batches: Iterator[dict], stream: ValStream):
        self.batches, self.stream = batches, stream

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.stream.data_error is not None:
            raise StopIteration
        try:
            return next(self.batches)
        except (DataError, OSError) as exc:  # OSError: a shard that cannot be read
            self.stream.data_error = one_line(str(exc))
            raise StopIteration from None


class _ValLoader(_Loader):
    def __iter__(self):
        self.dataset.data_error = None
        batches = super().__iter__()
        return _EndOnDataError(batches, self.dataset) if self.dataset.world_size > 1 else batches


class _PositionedLoader(_Loader):
    """Tells the stream the global step (and stream positions) each time an epoch's iterator is
    created; under DDP, a data error stops the ranks together (``_StopTogether``)."""

    def __init__(self, dataset: TrainStream, position_fn: Callable[[], int], resume_fn: ResumeFn, **kw):
        super().__init__(dataset, batch_size=None, **kw)
        self.position_fn, self.resume_fn = position_fn, resume_fn

    def __iter__(self):
        self.dataset.set_position(self.position_fn(), self.resume_fn())
        batches = super().__iter__()
        return _StopTogether(batches, self.dataset) if self.dataset.world_size > 1 else batches


def _worker_init(_: int) -> None:
    # One core per worker: OpenCV's own thread pool in every worker would oversubscribe the CPUs.
    cv2.setNumThreads(1)
    # A SIGTERM/SIGINT/SIGUSR1/SIGHUP sent to the whole process group (SLURM time limit, scancel,
    # Ctrl-C, a closed terminal) is for the training process, which checkpoints and then ends its
    # workers; a worker dying first would fail the run without a checkpoint.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


_PREFETCH_FACTOR = 4


def train_loader(stream: TrainStream, position_fn: Callable[[], int], num_workers: int,
                 resume_fn: ResumeFn = lambda: None) -> DataLoader:
    """``position_fn``: the global step; ``resume_fn``: ``StreamPositions.resume()`` of the
    trained batches (restored from a checkpoint), or None; both asked at each epoch's start."""
    # Each loader its own copy of the stream (sharing its position) with its own buffers: a stream
    # may feed a reloaded loader while the old one's workers still send batches.
    stream = copy.copy(stream)
    # A worker has at most _PREFETCH_FACTOR batches queued; two more slots cover the batch being
    # trained on and the one the trainer fetched ahead (or the one the pinning thread is copying).
    stream.buffers = WorkerBuffers(num_workers, _PREFETCH_FACTOR + 2) if num_workers > 0 else None
    return _PositionedLoader(
        stream,
        position_fn,
        resume_fn,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        prefetch_factor=_PREFETCH_FACTOR if num_workers > 0 else None,
    )


def val_loader(stream: ValStream, num_workers: int) -> DataLoader:
    return _ValLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_worker_init if num_workers > 0 else None)


def uneven_split_note(urls: list[str], counts: list[int] | None, seed: int, world_size: int, num_workers: int,
                       batch_size: int, batches_per_rank: int, what: str) -> str | None:
    """One line when the readers' shards do not hold what their batches draw in the first epoch
    (so that some samples are drawn twice and others left out), else None; see the module
    docstring's known limit. Without sample counts (``pipe:`` shards, no index.json), from the
    shard count alone."""
    workers = max(1, num_workers)
    readers = world_size * workers
    if counts is None:
        if len(urls) % readers == 0:
            return None
        fewer = readers - len(urls) % readers
        return (f"note: {what}: {len(urls)} shards over {readers} readers (ranks x workers) do not split evenly: "
                f"in each epoch {fewer} of the readers hold one shard less, so an epoch draws some of their "
                f"samples twice and leaves out some of the others'; a shard count that is a multiple of "
                f"{readers} avoids it")
    size = dict(zip(urls, counts))
    drawn = [len(range(stream, batches_per_rank, workers)) * batch_size for stream in range(workers)]
    order = epoch_shards(urls, seed, 0, 0, 1)  # the first epoch's permutation, whose slices the readers read
    twice = sum(max(0, drawn[slot % workers] - sum(size[u] for u in order[slot::readers])) for slot in range(readers))
    if twice == 0:
        return None
    epoch = batches_per_rank * batch_size * world_size
    causes = []
    if len(urls) % readers:
        causes.append(f"{len(urls)} shards do not divide among the {readers} readers (ranks x workers)")
    if min(counts) != max(counts):
        causes.append(f"the shards hold {min(counts)} to {max(counts)} samples")
    if batches_per_rank % workers:
        causes.append(f"{batches_per_rank} batches per rank do not divide among {workers} loader workers")
    if epoch > sum(counts):
        causes.append(f"an epoch draws {epoch} of the shards' {sum(counts)} samples (data.epoch_samples)")
    return (f"note: {what}: in the first epoch {twice} of {epoch} drawn samples ({100 * twice / epoch:.1f}%) repeat "
            f"one of their reader's while other readers' samples are left out, as each reader reads its own shards "
            f"and " + "; ".join(causes or ["their sizes differ"]) + " (each epoch splits the shards anew)")


def check_readers(n_shards: int, world_size: int, num_workers: int, what: str, spec: str) -> None:
    readers = world_size * max(1, num_workers)
    if n_shards < readers:
        raise DataError(
            f"{what} '{spec}': {n_shards} shards for {world_size} ranks x {max(1, num_workers)} workers "
            f"= {readers} readers; write more, smaller shards or lower data.num_workers"
        )
