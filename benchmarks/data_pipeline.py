"""Data-pipeline throughput: our shard stream against the per-file reference loader.

Both read the same vKITTI2-sized frames (default 1242x375: a jpg and a 16-bit png each), rendered
once by ``data_prep.synthetic`` and cached, stored both as loose files (reference) and as
WebDataset shards (ours, the very same jpg and png bytes plus sky.png and meta.json). For each
worker count both loaders produce batches of 518x518 training crops:

- ours: ``curriculum.data.TrainStream`` + ``train_loader`` as training runs them (decode, crop
  first and resize only the crop, bicubic as the reference, flip; uint8 images and raw 16-bit
  depth in the batch: normalisation and metres happen on the device). On a GPU machine each batch is also moved to
  the GPU and finished there (metres; with ``--device-resize``, the default there, resizing the
  crops), synchronised, inside the timing. Without a GPU that device-side work is not timed,
  unless ``--device-resize on`` moves the resize there, in which case it runs on the CPU and
  counts;
- reference: ``reference_loader.ReferenceDataset`` (whole-frame cubic resize, float64
  normalisation, then crop; float32 batches).

Reported per worker count: samples/s (wall), samples/s per core (worker count, 1 for in-process
loading), samples per CPU-second (user + system time of the main process and all workers; the
per-core figure that stays honest on a machine shared with other jobs) and the ratios of ours to
the reference. OpenCV runs single-threaded in every process (``--cv2-threads``), so a worker is a
core. Both are timed in steady state, as a training run with persistent workers runs: the clock
starts after two batches per worker (the time until then is reported as start-up in the JSON),
and CPU time is read from /proc for the main process and the running workers over the same
window; the loaders run interleaved, best of ``--repeats``.

    python benchmarks/data_pipeline.py [--frames 32] [--per-shard 16] [--workers 0,1,2] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_model  # noqa: E402
from reference_loader import reference_loader  # noqa: E402

from curriculum.data import TrainSpec, TrainStream, finish_train_batch, train_loader, unpack_batch  # noqa: E402
from data_prep.schema import PNG_PARAMS, depth_to_raw, encode_sample, make_key  # noqa: E402
from data_prep.writer import ShardWriter  # noqa: E402

CACHE_VERSION = 2  # 2: PNG filters of data_prep.schema.PNG_PARAMS
TARGET_RATIO = 5.0  # the target: ours per core >= 5x the reference per core
DEPTH_SCALE = 0.01  # vKITTI2: centimetres, 65535 = far clip
JPEG_QUALITY = 95


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "curriculum-depth" / "bench-frames"


# ---------------------------------------------------------------------------- frames


def _render_frame(args: tuple[int, int, int, str]) -> None:
    index, width, height, folder = args
    from data_prep.synthetic import render

    r = render(0, index, width, height)
    raw = depth_to_raw(r["depth"], DEPTH_SCALE, name=f"frame {index}")
    bgr = cv2.cvtColor(r["rgb"], cv2.COLOR_RGB2BGR)
    ok1, jpg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    ok2, png = cv2.imencode(".png", raw, PNG_PARAMS["depth"])  # the loose files: as our shards store them
    ok3, sky = cv2.imencode(".png", np.where(r["sky"], np.uint8(255), np.uint8(0)), PNG_PARAMS["sky"])
    if not (ok1 and ok2 and ok3):
        raise RuntimeError(f"could not encode frame {index}")
    stem = Path(folder) / f"frame_{index:05d}"
    for suffix, data in (("_sky.png", sky), (".png", png), (".jpg", jpg)):  # jpg last: marks complete
        tmp = stem.with_name(stem.name + suffix + ".tmp")
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, stem.with_name(stem.name + suffix))
    meta = {"fx": r["fx"], "fy": r["fy"], "cx": r["cx"], "cy": r["cy"]}
    stem.with_name(stem.name + ".json").write_text(json.dumps(meta))


def prepare_frames(cache: Path, frames: int, width: int, height: int, per_shard: int,
                   procs: int | None = None, log=print) -> tuple[list[tuple[str, str]], list[str]]:
    """Render missing frames into ``cache`` and (re)write shards; returns (file pairs, shard urls)."""
    root = Path(cache) / f"v{CACHE_VERSION}-{width}x{height}"
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(frames) if not (files / f"frame_{i:05d}.jpg").is_file()]
    if todo:
        t0 = time.perf_counter()
        procs = max(1, min(procs or os.cpu_count() or 1, len(todo)))
        log(f"rendering {len(todo)} frames of {width}x{height} into {files} ({procs} processes) ...")
        jobs = [(i, width, height, str(files)) for i in todo]
        if procs == 1:
            for j in jobs:
                _render_frame(j)
        else:
            with mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None).Pool(procs) as pool:
                pool.map(_render_frame, jobs, chunksize=1)
        log(f"rendered in {time.perf_counter() - t0:.1f} s")
    pairs = [(str(files / f"frame_{i:05d}.jpg"), str(files / f"frame_{i:05d}.png")) for i in range(frames)]

    shard_dir = root / f"shards-{frames}x{per_shard}"
    index = shard_dir / "index.json"
    if not index.is_file():
        with ShardWriter(shard_dir, prefix="bench", max_samples=per_shard, overwrite=True) as writer:
            for i, (jpg_path, png_path) in enumerate(pairs):
                jpg = Path(jpg_path).read_bytes()
                rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                raw = cv2.imread(png_path, cv2.IMREAD_UNCHANGED)
                sky = cv2.imread(png_path[:-4] + "_sky.png", cv2.IMREAD_UNCHANGED) > 127
                cam = json.loads(Path(png_path[:-4] + ".json").read_text())
                meta = {"source": "bench", "scene": "vkitti2size", "frame": i, "width": width, "height": height,
                        "depth_scale": DEPTH_SCALE, **cam}
                writer.write(encode_sample(make_key("bench", "vkitti2size", i), rgb, raw, meta, sky=sky,
                                           rgb_format="jpg", rgb_bytes=jpg))
    urls = sorted(str(p) for p in shard_dir.glob("bench-*.tar"))
    # Warm the page cache so that neither loader pays for the first read from disk.
    for path in [p for pair in pairs for p in pair] + urls:
        Path(path).read_bytes()
    return pairs, urls


# ---------------------------------------------------------------------------- measurement


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(worker_pids: list[int]) -> float:
    """User + system CPU time of this process and of the given (running) loader workers, read
    from /proc: the workers' time over a window, without waiting for them to end."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    total = me.ru_utime + me.ru_stime
    for pid in worker_pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    return total


def _time_batches(loader, batches: int, batch_size: int, finish=None, warmup: int = 0
                  ) -> tuple[int, float, float, float]:
    """(samples, wall seconds, CPU seconds, start-up seconds) of ``batches`` batches in steady
    state: the clock starts after ``warmup`` batches (start-up seconds: creating the iterator
    until then), as a training run with persistent workers pays its start-up once per run.
    ``finish(batch)``, if given, runs on each batch inside the timing.

    CPU time counts the main process and every worker over the timed window, so it stays
    meaningful on a machine shared with other jobs, where wall time is not.
    """
    t_start = time.perf_counter()
    it = iter(loader)
    pids = [w.pid for w in getattr(it, "_workers", [])]

    def one() -> int:
        b = next(it)
        if finish is not None:
            b = finish(b)
        return len(b["key"]) if "key" in b else int(b["image"].shape[0])  # ours arrive packed without finish

    for _ in range(warmup):
        one()
    c0, t0 = _cpu_seconds(pids), time.perf_counter()
    seen = sum(one() for _ in range(batches))
    dt = time.perf_counter() - t0
    cpu = _cpu_seconds(pids) - c0
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    if seen != batches * batch_size:
        raise RuntimeError(f"expected {batches * batch_size} samples, got {seen}")
    return seen, dt, cpu, t0 - t_start


def _finish_on(device: torch.device, crop: int):
    """What DepthModule does to each batch on arrival (transfer, metres, resizing the crops with
    ``device_resize``), synchronised on CUDA."""

    def finish(batch: dict) -> dict:
        batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        finish_train_batch(batch, crop, crop)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return batch

    return finish


def measure_ours(urls: list[str], workers: int, batches: int, batch_size: int, crop: int, seed: int = 0,
                 device_resize: bool = False, device: torch.device = torch.device("cpu")):
    spec = TrainSpec(batch_size=batch_size, batches_per_rank=batches + _warmup(workers), crop_height=crop,
                     crop_width=crop, scale_jitter=0.0, hflip=True, color_jitter=0.0, shuffle_buffer=16,
                     device_resize=device_resize)
    stream = TrainStream(urls, spec, rank=0, world_size=1, seed=seed)
    loader = train_loader(stream, lambda: 0, num_workers=workers)
    # On a GPU machine the device-side finish is timed (it costs GPU, not CPU, time); without one
    # it is left out, as the normalisation is, unless device_resize moves CPU work there.
    finish = _finish_on(device, crop) if device.type == "cuda" or device_resize else None
    return _time_batches(loader, batches, batch_size, finish, warmup=_warmup(workers))


def measure_reference(pairs, workers: int, batches: int, batch_size: int, crop: int, seed: int = 0):
    n = (batches + _warmup(workers)) * batch_size
    loader = reference_loader(pairs, batch_size, workers, num_samples=n, size=crop, seed=seed)
    return _time_batches(loader, batches, batch_size, warmup=_warmup(workers))


def _warmup(workers: int) -> int:
    """Untimed batches first: two per worker, so that every worker is past its start-up."""
    return 2 * max(1, workers)


def check_outputs(urls, pairs, crop: int) -> None:
    """One batch of each loader has the expected shapes and types (what the numbers are for)."""
    spec = TrainSpec(batch_size=2, batches_per_rank=1, crop_height=crop, crop_width=crop, shuffle_buffer=1)
    ours = unpack_batch(next(iter(train_loader(TrainStream(urls, spec, 0, 1, 0), lambda: 0, num_workers=0))))
    assert ours["image"].dtype == torch.uint8 and tuple(ours["image"].shape) == (2, 3, crop, crop), ours["image"].shape
    assert ours["depth_raw"].dtype == torch.int16 and tuple(ours["depth_raw"].shape) == (2, crop, crop)
    ref = next(iter(reference_loader(pairs, 2, 0, num_samples=2, size=crop)))
    assert ref["image"].dtype == torch.float32 and tuple(ref["image"].shape) == (2, 3, crop, crop), ref["image"].shape
    assert tuple(ref["depth"].shape) == (2, crop, crop)


def _parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def default_workers() -> list[int]:
    n = os.cpu_count() or 1
    out = [0]
    w = 1
    while w <= n:
        out.append(w)
        w *= 2
    if out[-1] != n:
        out.append(n)
    return out


def format_table(rows: list[dict]) -> str:
    head = (f"{'workers':>7} | {'ours s/s':>8} {'/core':>6} {'/cpu-s':>6} | {'ref s/s':>7} {'/core':>6} {'/cpu-s':>6} |"
            f" {'ratio/core':>10} {'ratio/cpu-s':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['workers']:>7} | {r['ours_samples_per_s']:>8.1f} {r['ours_per_core']:>6.1f} "
            f"{r['ours_samples_per_cpu_s']:>6.1f} | {r['reference_samples_per_s']:>7.1f} "
            f"{r['reference_per_core']:>6.1f} "
            f"{r['reference_samples_per_cpu_s']:>6.1f} | {r['ratio']:>9.2f}x {r['ratio_cpu']:>10.2f}x"
        )
    return "\n".join(lines)


def build_result(args, rows: list[dict], frames: int, per_shard: int, urls: list[str], workers: list[int], device,
                 device_resize: bool) -> dict:
    """The JSON of the rows measured so far (written after each worker count: a run cut short keeps them)."""
    table = format_table(rows)
    best = max(rows, key=lambda r: r["ours_samples_per_s"])
    summary = {
        "ratio_per_cpu_s_min": min(r["ratio_cpu"] for r in rows),
        "ratio_per_cpu_s_max": max(r["ratio_cpu"] for r in rows),
        "target_ratio": TARGET_RATIO,
        "best_ours_samples_per_s": best["ours_samples_per_s"],
        "best_ours_workers": best["workers"],
    }
    result = {
        "benchmark": "data_pipeline",
        "date": _dt.date.today().isoformat(),
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": {"torch": torch.__version__, "opencv": cv2.__version__, "numpy": np.__version__},
        "config": {"frames": frames, "frame_size": [args.width, args.height], "crop": args.crop,
                   "batch": args.batch, "per_shard": per_shard, "shards": len(urls), "cv2_threads": args.cv2_threads,
                   "jpeg_quality": JPEG_QUALITY, "workers": workers, "device_resize": device_resize,
                   "device": str(device),
                   "repeats": args.repeats},
        "rows": rows,
        "summary": summary,
        "table": table,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=None,
                    help="distinct frames (default max(32, per-shard x max workers): a full shard per worker)")
    ap.add_argument("--per-shard", type=int, default=16,
                    help="samples per shard (default 16; fewer if the frames do not give every worker a shard)")
    ap.add_argument("--width", type=int, default=1242)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--crop", type=int, default=518)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=_parse_ints, default=None,
                    help="comma-separated worker counts (default 0,1,2,4,.. up to the CPU count)")
    ap.add_argument("--batches", type=int, default=16,
                    help="batches timed for our loader, per core (x max(1, workers))")
    ap.add_argument("--ref-batches", type=int, default=6,
                    help="batches timed for the reference loader, per core (x max(1, workers))")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per loader; the best counts")
    ap.add_argument("--device-resize", choices=("auto", "on", "off"), default="auto",
                    help="ours: resize the crops on the training device (data.device_resize); auto = on iff CUDA")
    ap.add_argument("--cv2-threads", type=int, default=1, help="OpenCV threads per process (default 1)")
    ap.add_argument("--cache", type=Path, default=None, help=f"frame cache (default {default_cache()})")
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "data_pipeline.json",
                    help="result file (default runs/bench/data_pipeline.json)")
    args = ap.parse_args(argv)

    workers = args.workers if args.workers is not None else default_workers()
    if not workers or min(workers) < 0:
        ap.error("--workers needs non-negative counts")
    # Every worker reads whole shards of --per-shard samples, as from a real dataset's shards (a
    # worker with a shard of two would reopen its tar every two samples).
    frames = args.frames or max(32, args.per_shard * max(1, max(workers)))
    per_shard = max(1, min(args.per_shard, frames // max(1, max(workers))))
    cv2.setNumThreads(args.cv2_threads)  # inherited by forked loader workers
    torch.set_num_threads(1)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_resize = args.device_resize == "on" or (args.device_resize == "auto" and device.type == "cuda")
    pairs, urls = prepare_frames(args.cache or default_cache(), frames, args.width, args.height, per_shard)
    check_outputs(urls, pairs, args.crop)
    rows = []
    ours_fn = functools.partial(measure_ours, device_resize=device_resize, device=device)
    for w in workers:
        cores = max(1, w)
        best = {"ours": (0.0, 0.0, None, None), "reference": (0.0, 0.0, None, None)}
        for _ in range(args.repeats):  # interleaved, best of: other jobs on the machine only slow a run down
            for name, fn, src, n in (("ours", ours_fn, urls, args.batches),
                                     ("reference", measure_reference, pairs, args.ref_batches)):
                samples, wall, cpu, startup = fn(src, w, n * cores, args.batch, args.crop)
                rate, per_cpu, _, first = best[name]
                best[name] = (max(rate, samples / wall), max(per_cpu, samples / max(cpu, 1e-9)), samples,
                              startup if first is None else min(first, startup))
        (ours, ours_cpu, n_ours, ours_start), (ref, ref_cpu, n_ref, ref_start) = best["ours"], best["reference"]
        rows.append({
            "workers": w, "cores": cores,
            "ours_samples": n_ours, "ours_samples_per_s": ours, "ours_per_core": ours / cores,
            "ours_samples_per_cpu_s": ours_cpu,
            "reference_samples": n_ref, "reference_samples_per_s": ref, "reference_per_core": ref / cores,
            "reference_samples_per_cpu_s": ref_cpu,
            "ratio": ours / ref, "ratio_cpu": ours_cpu / ref_cpu,
            "ours_startup_s": ours_start, "reference_startup_s": ref_start, "warmup_batches": _warmup(w),
        })
        print(f"  workers={w}: ours {ours:.1f} samples/s ({ours_cpu:.1f} per CPU-s), "
              f"reference {ref:.1f} samples/s ({ref_cpu:.1f} per CPU-s)", flush=True)
        if args.json:  # a run cut short (a time limit) keeps the worker counts measured
            write_json(args.json, build_result(args, rows, frames, per_shard, urls, workers, device, device_resize))

    result = build_result(args, rows, frames, per_shard, urls, workers, device, device_resize)
    table, summary, best = result["table"], result["summary"], max(rows, key=lambda r: r["ours_samples_per_s"])
    print(f"\nData pipeline, {frames} frames {args.width}x{args.height} -> {args.crop}x{args.crop} crops, "
          f"batch {args.batch}; {cpu_model()} ({os.cpu_count()} cores); ours finished on {device}"
          f"{' with device_resize' if device_resize else ''}")
    print(table)
    print(f"ours / reference per CPU-second: {summary['ratio_per_cpu_s_min']:.2f}x .. "
          f"{summary['ratio_per_cpu_s_max']:.2f}x (target >= {TARGET_RATIO:.0f}x); "
          f"best {best['ours_samples_per_s']:.0f} samples/s with {best['workers']} workers")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
