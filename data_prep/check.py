"""Validate a shard folder: ``python -m data_prep.check DIR [--quiet]``.

Reads every shard with ``shard_reader`` (webdataset yields partial samples from a truncated tar
without complaint), decodes every sample with ``schema.decode_sample``, checks
that keys are unique across shards and that index.json agrees with the shards, and prints a
summary table. Exit status 0 when everything is valid, 1 otherwise, with one line per problem:
``shard-000003.tar: <key>: <problem>``.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .arguments import ArgumentParser
from .schema import FAR_RAW, SampleError, decode_sample
from .shard_reader import iter_tar_samples
from .writer import INDEX_NAME, read_index

NEAR_LIMIT_M = 80.0
# Log-spaced histogram for depth percentiles: constant memory over any number of samples.
_HIST_EDGES = np.geomspace(1e-3, 1e4, 3501)


@dataclass
class Stats:
    samples: int = 0
    pixels: int = 0
    sky: int = 0
    no_measurement: int = 0
    far_raw: int = 0
    beyond_near: int = 0  # finite depth > 80 m or raw 65535, sky excluded
    hist: np.ndarray = field(default_factory=lambda: np.zeros(len(_HIST_EDGES) - 1, np.int64))
    dmin: float = math.inf
    dmax: float = 0.0
    resolutions: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)
    rgb_formats: Counter = field(default_factory=Counter)

    def add(self, dec: dict, rgb_format: str) -> None:
        raw, depth, sky, meta = dec["depth_raw"], dec["depth"], dec["sky"], dec["meta"]
        self.samples += 1
        self.pixels += raw.size
        self.sky += int(sky.sum())
        self.no_measurement += int((raw == 0).sum())
        far = raw == FAR_RAW
        self.far_raw += int(far.sum())
        self.beyond_near += int((((depth > NEAR_LIMIT_M) | far) & ~sky).sum())
        finite = depth[(raw > 0) & ~far]
        if finite.size:
            # clipped into the histogram's range (1 mm .. 10 km), where np.histogram would drop them
            self.hist += np.histogram(np.clip(finite, _HIST_EDGES[0], _HIST_EDGES[-1]), bins=_HIST_EDGES)[0]
            self.dmin = min(self.dmin, float(finite.min()))
            self.dmax = max(self.dmax, float(finite.max()))
        self.resolutions[f"{meta['width']}x{meta['height']}"] += 1
        self.sources[meta["source"]] += 1
        self.rgb_formats[rgb_format] += 1

    def percentiles(self, qs) -> list[float] | None:
        n = int(self.hist.sum())
        if n == 0:
            return None
        cdf = np.cumsum(self.hist)
        out = []
        for q in qs:
            i = int(np.searchsorted(cdf, q / 100.0 * n, side="left"))
            i = min(i, len(self.hist) - 1)
            # the bin's geometric middle, within the depths seen (one depth alone reads as itself)
            out.append(min(max(float(np.sqrt(_HIST_EDGES[i] * _HIST_EDGES[i + 1])), self.dmin), self.dmax))
        return out


def read_shard(path: Path, problems: list[str]):
    """Yield the complete raw samples of one shard (``shard_reader.iter_tar_samples``); its
    defects and keys that reappear non-consecutively are appended to ``problems``."""
    name = path.name
    seen_in_shard: set[str] = set()

    def problem(msg: str) -> None:
        problems.append(f"{name}: {msg}")

    try:
        with open(path, "rb") as f:
            for sample in iter_tar_samples(f, str(path), problem):
                key = sample["__key__"]
                if key in seen_in_shard:
                    problem(f"{key}: key appears in more than one place in the shard")
                seen_in_shard.add(key)
                yield sample
    except OSError as e:
        problem(f"unreadable ({e.strerror or e})")


def check_folder(folder: Path, stats: Stats | None = None, progress: bool = False) -> tuple[list[str], Stats, dict]:
    """Check every shard in ``folder``; returns (problems, stats, per-shard sample counts).
    ``progress`` shows samples/s and an ETA on stderr (the total from index.json when readable)."""
    folder = Path(folder)
    stats = stats or Stats()
    problems: list[str] = []
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        problems.append(f"{folder}: no *.tar shards")
    counts: dict[str, int] = {}
    keys: dict[str, str] = {}
    try:  # read once: its total sizes the progress bar, its shard list is checked at the end
        index, index_error = read_index(folder), None
    except (OSError, ValueError) as e:
        index, index_error = None, e
    bar = tqdm(total=index["total"] if index else None, desc=f"check {folder.name}", unit="sample", file=sys.stderr, disable=not progress,
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)
    for shard in shards:
        n = 0
        for raw in read_shard(shard, problems):
            n += 1
            bar.update(1)
            key = raw["__key__"]
            if key in keys and keys[key] != shard.name:
                problems.append(f"{shard.name}: {key}: duplicate key (also in {keys[key]})")
            keys.setdefault(key, shard.name)
            try:
                dec = decode_sample(raw)
            except SampleError as e:
                msg = str(e)
                if msg.startswith(f"{key}: "):
                    msg = msg[len(key) + 2 :]
                problems.append(f"{shard.name}: {key}: {msg}")
                continue
            stats.add(dec, "jpg" if "rgb.jpg" in raw else "png")
        counts[shard.name] = n
    bar.close()

    if index_error is not None:
        problems.append(f"{INDEX_NAME}: {index_error}")
    else:
        listed = {s["name"]: s["samples"] for s in index["shards"]}
        for name in sorted(set(listed) - set(counts)):
            problems.append(f"{INDEX_NAME}: lists {name}, which is not in the folder")
        for name in sorted(set(counts) - set(listed)):
            problems.append(f"{INDEX_NAME}: does not list {name}")
        for name in sorted(set(listed) & set(counts)):
            if listed[name] != counts[name]:
                problems.append(f"{INDEX_NAME}: says {name} holds {listed[name]} samples, it holds {counts[name]}")
    return problems, stats, counts


def _pct(n: int, d: int) -> str:
    return f"{100.0 * n / d:6.2f} %" if d else "     - "


def _counter(c: Counter) -> str:
    return ", ".join(f"{k} ({v})" for k, v in c.most_common()) or "-"


def summary_table(folder: Path, stats: Stats, counts: dict, n_bad: int) -> str:
    rows = [
        ("folder", str(folder)),
        ("shards", str(len(counts))),
        ("samples", f"{sum(counts.values())} ({stats.samples} valid, {n_bad} problems)"),
        ("resolution", _counter(stats.resolutions)),
        ("sources", _counter(stats.sources)),
        ("rgb format", _counter(stats.rgb_formats)),
    ]
    qs = (1, 5, 50, 95, 99)
    p = stats.percentiles(qs)
    if p is None:
        rows.append(("depth percentiles", "no finite measured depth"))
    else:
        rows.append(("depth p1/p5/p50/p95/p99", " / ".join(f"{v:.2f}" for v in p) + " m"))
        rows.append(("depth max (finite)", f"{stats.dmax:.2f} m"))
    px = stats.pixels
    rows += [
        ("beyond 80 m (not sky)", _pct(stats.beyond_near, px)),
        ("sky", _pct(stats.sky, px)),
        ("raw 65535 (far)", _pct(stats.far_raw, px)),
        ("no measurement (0)", _pct(stats.no_measurement, px)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m data_prep.check", description="validate a shard folder: schema, 16-bit depth, unique keys, index.json; prints depth "
                        "percentiles and far/sky fractions")
    ap.add_argument("folder", type=Path, help="folder holding <prefix>-%%06d.tar shards and index.json")
    ap.add_argument("--quiet", action="store_true", help="print only problems and the verdict")
    args = ap.parse_args(argv)
    if not args.folder.is_dir():
        print(f"error: {args.folder}: not a folder", file=sys.stderr)
        return 2
    problems, stats, counts = check_folder(args.folder, progress=not args.quiet)
    if not args.quiet:
        print(summary_table(args.folder, stats, counts, len(problems)))
    for p in problems:
        print(p)
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {args.folder}", file=sys.stderr)
        return 1
    if args.quiet:
        print(f"OK: {stats.samples} samples in {len(counts)} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
