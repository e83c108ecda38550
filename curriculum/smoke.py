"""`make smoke`: tiny synthetic shards, both stages under 2-process DDP (gloo, CPU), then eval.

A few minutes at most; it exercises the same code path as a real multi-GPU run: Lightning's
launcher, rank-aware shard splitting, the stage switch on every rank, the cross-rank metric
reduction and the checkpoint metadata.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from curriculum.config import RECIPES_DIR


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m curriculum.smoke")
    ap.add_argument("--out", type=Path, default=Path("runs/smoke"))
    ap.add_argument("--devices", type=int, default=2)
    args = ap.parse_args(argv)
    start = time.time()
    data = args.out / "data"
    for split, seed, frames in (("train", 0, 16), ("val", 1000000, 6)):
        if not (data / split / "index.json").is_file():
            run([sys.executable, "-m", "data_prep.synthetic", "--out", str(data / split), "--frames", str(frames),
                 "--seed", str(seed), "--width", "112", "--height", "42", "--shard-size", "2", "--workers", "1",
                 "--no-progress", "--overwrite"])
    run([sys.executable, "-m", "curriculum.cli", "train", str(RECIPES_DIR / "smoke.yaml"),
         f"data.train_shards={data}/train/*.tar", f"data.val_shards={data}/val/*.tar",
         f"run.out_dir={args.out}/run", "run.overwrite=true", f"trainer.devices={args.devices}", "trainer.strategy=ddp"])
    report = args.out / "eval.json"
    run([sys.executable, "-m", "curriculum.cli", "eval", "--checkpoint", f"{args.out}/run/checkpoints/last.ckpt",
         "--shards", f"{data}/val/*.tar", "--height", "42", "--width", "112", "--out", str(report)])
    images = json.loads(report.read_text())["metrics"]["images"]
    if images != 6:
        print(f"smoke: evaluation counted {images} images, expected 6", file=sys.stderr)
        return 1
    # What the ranks did: the same stage switches, and validation reduced across ranks to every
    # image once (rank 0 alone reads about half of them).
    summaries = [json.loads((args.out / "run" / "summary" / f"rank{r}.json").read_text()) for r in range(args.devices)]
    switches = {json.dumps(s["switches"]) for s in summaries}
    counted = {float(s["val"].get("images", -1)) for s in summaries}
    if len(switches) != 1 or len(json.loads(switches.pop())) != 2 or counted != {6.0}:
        print(f"smoke: ranks disagree (switches {[s['switches'] for s in summaries]}, "
              f"validation images {[s['val'].get('images') for s in summaries]}); expected 2 switches and 6 images "
              "on every rank", file=sys.stderr)
        return 1
    print(f"smoke passed in {time.time() - start:.0f} s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
