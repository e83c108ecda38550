"""Plumbing shared by the dataset converters and the synthetic generator.

A converter lists its frames as ``Frame`` records (picklable: paths and small parameters), and
provides a module-level ``load(frame, opts) -> sample dict`` that reads the source files and
calls ``schema.encode_sample`` (through ``encode_frame``). ``run`` maps ``load`` over the frames
in a process pool, writes the samples in frame order (the converters' ``--order shuffled``, their
default, shuffles that order once, with a fixed seed) through ``ShardWriter`` and reports
progress and a summary.

Bad input (missing or unreadable file, size mismatch, NaN or negative depth, missing
intrinsics) is a ``SampleError`` whose one-line message names the file. Without ``--skip-bad``
the first one stops the run with exit status 2 and the writer removes everything it wrote; with
it the frame is skipped and listed in the summary. Ctrl-C exits with 130 and, likewise, leaves
no shard under a final name; so do SIGTERM (SLURM, docker stop, kill) and SIGHUP, with 143 and
129 (128 + the signal, as for a process the signal killed).
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import math
import multiprocessing as mp
import os
import random
import signal
import sys
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from .schema import SampleError, encode_sample, opencv_message
from .writer import ShardWriter

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Frame:
    """One source frame: what ``load`` needs to read it, and a label for messages."""

    label: str
    paths: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)


# -- reading source files ------------------------------------------------------------------


def bad(path: Any, problem: str) -> SampleError:
    return SampleError(f"{path}: {problem}")


def read_bytes(path: Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise bad(path, "missing file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise bad(path, f"cannot read ({e.strerror or e})") from None
    if not data:
        raise bad(path, "empty file")
    return data


def decode_image_bytes(data: bytes, path: Path) -> np.ndarray:
    # OpenCV raises, rather than returning None, on some corrupt headers (e.g. a PNG that
    # declares more pixels than CV_IO_MAX_IMAGE_PIXELS): still a bad frame, not a crash.
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise bad(path, f"unreadable image ({opencv_message(e)})") from None
    if img is None:
        raise bad(path, "unreadable image (cannot decode)")
    return img


def to_rgb8(img: np.ndarray, path: Path) -> np.ndarray:
    """cv2 BGR/BGRA/gray uint8 -> RGB uint8."""
    if img.dtype != np.uint8:
        raise bad(path, f"colour image is {img.dtype}, expected 8-bit")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise bad(path, f"colour image has {img.shape[2]} channels")


def read_rgb(path: Path) -> tuple[np.ndarray, bytes, str]:
    """Return (RGB uint8 pixels, the file's bytes, its format 'jpg' or 'png')."""
    path = Path(path)
    data = read_bytes(path)
    img = decode_image_bytes(data, path)
    fmt = "jpg" if data[:3] == b"\xff\xd8\xff" else "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "other"
    if fmt == "png" and (img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3):
        fmt = "other"  # a PNG that is not plain 8-bit RGB is re-encoded, not passed through
    return to_rgb8(img, path), data, fmt


def read_depth_png16(path: Path) -> np.ndarray:
    path = Path(path)
    img = decode_image_bytes(read_bytes(path), path)
    if img.dtype != np.uint16:
        raise bad(path, f"depth PNG is {img.dtype}, expected 16-bit")
    if img.ndim != 2:
        raise bad(path, f"depth PNG has {img.shape[2]} channels, expected 1")
    return img


def check_same_size(rgb: np.ndarray, rgb_path: Path, other: np.ndarray, other_path: Path) -> None:
    if rgb.shape[:2] != other.shape[:2]:
        raise bad(
            other_path,
            f"size {other.shape[1]}x{other.shape[0]} does not match rgb {rgb_path} "
            f"({rgb.shape[1]}x{rgb.shape[0]})",
        )


def read_rgb_and_depth16(rgb_path: Path, depth_path: Path) -> tuple[np.ndarray, bytes, str, np.ndarray]:
    """``read_rgb`` and ``read_depth_png16`` of one frame, checked to be the same size."""
    rgb, rgb_bytes, rgb_fmt = read_rgb(Path(rgb_path))
    depth = read_depth_png16(Path(depth_path))
    check_same_size(rgb, rgb_path, depth, depth_path)
    return rgb, rgb_bytes, rgb_fmt, depth


def encode_frame(opts: dict, key: str, rgb: np.ndarray, rgb_bytes: bytes, rgb_fmt: str,
                 depth_raw: np.ndarray, meta: dict, sky: np.ndarray | None = None) -> dict:
    """``encode_sample`` with the RGB output the options ask for (the source bytes passed
    through where the format allows it)."""
    fmt, passthrough = rgb_output(opts, rgb_fmt)
    return encode_sample(key, rgb, depth_raw, meta, sky=sky, rgb_format=fmt, jpeg_quality=opts["jpeg_quality"],
                         rgb_bytes=rgb_bytes if passthrough else None)


def rgb_output(opts: dict, rgb_fmt: str) -> tuple[str, bool]:
    """(rgb_format for encode_sample, pass the source bytes through?)."""
    want = opts.get("rgb_format", "source")
    if want == "source":
        if rgb_fmt in ("jpg", "png"):
            return rgb_fmt, True
        return "png", False
    # an explicit --jpeg-quality asks for that quality: a JPEG source is re-encoded
    return want, want == rgb_fmt and not (want == "jpg" and opts.get("reencode_jpeg", False))


# -- command line ----------------------------------------------------------------------------


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def add_output_args(ap: argparse.ArgumentParser, rgb_default: str = "source", shard_size: int = 1000) -> None:
    """Options of every command that writes shards."""
    ap.add_argument("--out", type=Path, required=True, help="output folder for shards and index.json")
    ap.add_argument("--workers", type=int, default=default_workers(),
                    help="worker processes (default: min(4, CPUs)); 1 runs in-process")
    ap.add_argument("--shard-size", type=int, default=shard_size,
                    help=f"samples per shard (default {shard_size})")
    ap.add_argument("--shard-mb", type=float, default=300.0, help="maximum shard size in MiB (default 300)")
    ap.add_argument("--prefix", default="shard", help="shard name prefix: <prefix>-%%06d.tar")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the data set in --out once the new one is complete (shards of no known data set are refused)")
    choices = ["source", "png", "jpg"] if rgb_default == "source" else ["png", "jpg"]
    ap.add_argument("--rgb-format", choices=choices, default=rgb_default,
                    help="how to store rgb" + (" (source: the source file's bytes, unchanged)"
                                               if rgb_default == "source" else ""))
    ap.add_argument("--jpeg-quality", type=int, default=None, metavar="Q",
                    help=f"quality 1-100 of the JPEGs this command encodes (default {DEFAULT_JPEG_QUALITY}); "
                         "given, a JPEG source is re-encoded instead of passed through; needs --rgb-format jpg")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """Options of the dataset converters."""
    add_output_args(ap)
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip frames with bad or missing files and list them in the summary")
    ap.add_argument("--limit", type=int, default=None, help="convert only the first N frames (in the dataset's order)")
    ap.add_argument("--order", choices=["shuffled", "source"], default="shuffled",
                    help="shuffled (default): the frames in a fixed random order, so that a training reader, which "
                         "reads its shards one after another through a shuffle buffer, mixes scenes in each batch; "
                         "source: the dataset's own order, scene by scene")


DEFAULT_JPEG_QUALITY = 95


def common_opts(args: argparse.Namespace) -> dict:
    return {"rgb_format": args.rgb_format, "reencode_jpeg": args.jpeg_quality is not None,
            "jpeg_quality": DEFAULT_JPEG_QUALITY if args.jpeg_quality is None else args.jpeg_quality}


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


# -- running ---------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that it takes Ctrl-C's path: the writer
    aborts and the run ends with 128 + ``signum``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Signals handled like Ctrl-C. SLURM signals every process of the job, a shell's hangup the
# whole process group: workers ignore them, as they ignore Ctrl-C, and the parent cleans up.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_terminated(signum: int, _frame: Any) -> None:
    # Once: a second signal during the clean-up must not cut the clean-up short.
    for s in _STOP_SIGNALS:
        if signal.getsignal(s) is _raise_terminated:
            signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


def _catch_stop_signals() -> dict:
    """Route SIGTERM and SIGHUP to ``Terminated``; returns the handlers to restore. A SIGHUP
    that is ignored (nohup) stays ignored; off the main thread nothing can be installed."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    saved = {}
    for s in _STOP_SIGNALS:
        old = signal.getsignal(s)
        if s == signal.SIGHUP and old is signal.SIG_IGN:
            continue
        saved[s] = old
        signal.signal(s, _raise_terminated)
    return saved


def _start_pool_helpers() -> None:
    """Start multiprocessing's resource tracker and forkserver with SIGHUP ignored, which they keep
    (an ignored signal survives exec). They ignore SIGINT and SIGTERM themselves but not a hangup:
    a closed terminal's SIGHUP to the process group killed the tracker, whose relaunched copy then
    printed a KeyError traceback for each shared-memory block the parent released as it cleaned up."""
    from multiprocessing import forkserver, resource_tracker

    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        resource_tracker.ensure_running()
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGHUP, previous)


def _worker_init() -> None:
    # The parent handles Ctrl-C, SIGTERM and SIGHUP (and aborts the writer); workers finish
    # their frame and stop.
    for s in (signal.SIGINT, *_STOP_SIGNALS):
        signal.signal(s, signal.SIG_IGN)
    cv2.setNumThreads(1)
    # A parent killed outright (kill -9) leaves no one to stop the workers: each ends itself.
    parent = mp.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()


def _call(load: Callable, opts: dict, frame: Any) -> tuple[str, Any]:
    try:
        return "ok", load(frame, opts)
    except SampleError as e:
        return "bad", str(e)


def bounded_map(pool: Executor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """``pool.map(fn, items)`` in order, with at most ``ahead`` calls submitted and not yet consumed."""
    pending: collections.deque = collections.deque()
    items = iter(items)
    for item in itertools.islice(items, ahead):
        pending.append(pool.submit(fn, item))
    while pending:
        yield pending.popleft().result()
        for item in itertools.islice(items, 1):  # once the caller is done with that result
            pending.append(pool.submit(fn, item))


class _Stop(Exception):
    """Ends a run with a one-line error; the writer removes what it wrote."""


def run(
    name: str,
    frames: Sequence[Any],
    load: Callable[[Any, dict], dict],
    opts: dict,
    args: argparse.Namespace,
) -> int:
    """Convert ``frames`` with ``load`` into shards in ``args.out``; returns the exit status."""
    # Ctrl-C must reach us even when started with SIGINT ignored (e.g. a background job of a
    # non-interactive shell): the clean-up of partial shards hangs on KeyboardInterrupt.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    saved_handlers = _catch_stop_signals()
    try:
        return _run(name, frames, load, opts, args)
    finally:
        for s, h in saved_handlers.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _left(writer: ShardWriter, cleaned: str) -> str:
    """What a failed run left: ``cleaned`` (the writer removed its shards), unless it had begun
    replacing an old data set, which it then cannot put back."""
    if writer.replacing:
        return "the old data set is partly deleted and no index.json was written: rerun to complete it"
    return cleaned


def _run(name: str, frames: Sequence[Any], load: Callable[[Any, dict], dict], opts: dict,
         args: argparse.Namespace) -> int:
    skip_bad = getattr(args, "skip_bad", False)
    limit = getattr(args, "limit", None)
    if limit is not None:
        frames = list(frames)[: max(0, limit)]
    if getattr(args, "order", "source") == "shuffled":
        # one fixed order: the same data set every time. Written in scene order, a batch would hold
        # frames of one stretch of one scene (a shard is read whole, through a buffer of a few
        # hundred samples)
        frames = list(frames)
        random.Random(0).shuffle(frames)
    if not frames:
        return fail(f"{name}: no frames found")
    if args.workers < 1:
        return fail(f"--workers must be >= 1, got {args.workers}")
    if args.shard_size < 1:
        return fail(f"--shard-size must be >= 1, got {args.shard_size}")
    quality = getattr(args, "jpeg_quality", None)
    if quality is not None:  # OpenCV would quietly clamp it (and -3 means quality 0)
        if not 1 <= quality <= 100:
            return fail(f"--jpeg-quality must lie in 1..100, got {quality}")
        if args.rgb_format != "jpg":
            return fail(f"--jpeg-quality {quality} sets the quality of re-encoded JPEGs: add --rgb-format jpg "
                        f"(--rgb-format is {args.rgb_format})")
    smallest_mb = ShardWriter.MIN_BYTES / 2**20
    if not (math.isfinite(args.shard_mb) and args.shard_mb >= smallest_mb):  # int(inf) raises, nan passes comparisons
        return fail(f"--shard-mb must be a finite number >= {smallest_mb:g} (MiB, the smallest shard the writer "
                    f"makes), got {args.shard_mb}")
    try:
        writer = ShardWriter(
            args.out,
            prefix=args.prefix,
            max_samples=args.shard_size,
            max_bytes=int(args.shard_mb * 2**20),
            overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError) as e:
        msg = str(e)
        if isinstance(e, FileExistsError) and not args.overwrite:
            msg += " (pass --overwrite to replace them)"
        return fail(msg)
    except OSError as e:
        return fail(f"{args.out}: {e.strerror}" if e.strerror else str(e))

    fn = functools.partial(_call, load, opts)
    workers = min(args.workers, len(frames))
    # forkserver, not fork: a forked child inherits OpenCV's thread pool in whatever state the
    # parent left it, and can deadlock on its first cv2 call.
    # An executor, not multiprocessing.Pool: Pool replaces a worker that dies (OOM kill, segfault)
    # and waits for its frame forever; the executor reports it.
    if workers > 1:
        _start_pool_helpers()
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver"), initializer=_worker_init) \
        if workers > 1 else None
    # A few frames per worker ahead of the writer, not all of them: Executor.map submits every
    # frame at once, and encoded frames pile up in memory whenever writing is the slower side.
    results = bounded_map(pool, fn, frames, ahead=4 * workers) if pool is not None else map(fn, frames)
    skipped: list[str] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(frames), desc=name, unit="frame", dynamic_ncols=True, file=sys.stderr,
               disable=getattr(args, "no_progress", False),
               mininterval=0.2 if sys.stderr.isatty() else 10.0)  # logs get a line per 10 s
    try:
        with writer:
            for status, value in results:
                if status == "bad":
                    if not skip_bad:
                        raise _Stop(f"{value} (no shards written; --skip-bad skips bad frames)")
                    skipped.append(value)
                    bar.set_postfix(skipped=len(skipped), refresh=False)
                else:
                    try:
                        writer.write(value)
                    except ValueError as e:  # e.g. two frames mapped to the same key
                        raise _Stop(f"{e} (no shards written)") from None
                bar.update(1)
            if writer.total == 0:
                raise _Stop(f"{name}: every frame was bad, nothing written (the first: {skipped[0]})")
    except _Stop as e:
        bar.close()
        return fail(str(e))
    except OSError as e:  # writing failed (a full disk, a quota): the writer has cleaned up
        bar.close()
        return fail(f"{args.out}: cannot write shards ({e.strerror or e}); {_left(writer, 'no shards written')}")
    except BrokenProcessPool:
        bar.close()
        return fail(f"{name}: a conversion worker died (killed, out of memory?); no shards written")
    except KeyboardInterrupt as e:  # Ctrl-C, or Terminated by SIGTERM / SIGHUP
        bar.close()
        how = f"terminated by {e}" if isinstance(e, Terminated) else "interrupted"
        print(f"{how}: {_left(writer, f'removed the partial output in {args.out}')}", file=sys.stderr)
        return 128 + e.signum if isinstance(e, Terminated) else EXIT_INTERRUPTED
    finally:
        bar.close()
        if pool is not None:  # workers ignore Ctrl-C: pending frames are cancelled, running ones end
            pool.shutdown(wait=True, cancel_futures=True)

    dt = time.perf_counter() - t0
    index = writer.index()
    print(
        f"{name}: wrote {index['total']} samples in {len(index['shards'])} shard(s) to {args.out} "
        f"({dt:.1f} s, {index['total'] / max(dt, 1e-9):.1f} frames/s)"
    )
    if hasattr(args, "skip_bad"):  # converters; the generator has no bad frames
        print(f"skipped {len(skipped)} bad frame(s)")
    for msg in skipped:
        print(f"  skipped: {msg}")
    return EXIT_OK
