"""Command line: `curriculum train | eval | predict | compare`.

Every user error ends in one line on stderr and exit status 2; nothing is half-written.
"""
from __future__ import annotations

import argparse
import sys


def _train(argv: list[str]) -> int:
    from curriculum.config import load_recipe

    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    if not files:
        raise SystemExit("usage: curriculum train RECIPE.yaml [MORE.yaml ...] [key=value ...]")
    cfg = load_recipe(files, overrides)
    from curriculum.train import train

    result = train(cfg)
    if result["rank"] == 0:
        print(f"final checkpoint: {result['checkpoint']}  (global step {result['global_step']}, "
              f"stages {result['switches']})")
    return 0


def _eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="curriculum eval", description="evaluate a checkpoint on shards")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--shards", required=True, help="brace pattern or glob of validation shards")
    p.add_argument("--protocol", default="synthetic", choices=["synthetic", "none", "kitti_garg", "kitti_eigen", "nyu"])
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--height", type=int, help="network input height (default: the checkpoint's recipe)")
    p.add_argument("--width", type=int)
    p.add_argument("--max-depth", type=float, help="must agree with the checkpoint's range if given")
    p.add_argument("--max-images", type=int, default=0)
    args = p.parse_args(argv)
    from curriculum.checkpoint import load_model
    from curriculum.evaluate import evaluate, format_table, write_json

    model, meta = load_model(args.checkpoint)
    if args.max_depth is not None and args.max_depth != meta["model"]["max_depth"]:
        raise ValueError(f"--max-depth {args.max_depth:g} conflicts with the checkpoint's range "
                         f"{meta['model']['max_depth']:g} m ({args.checkpoint}); drop the flag")
    report = evaluate(args.checkpoint, args.shards, args.protocol, args.batch_size, args.height, args.width,
                      max_images=args.max_images, model=model, meta=meta)
    print(format_table(report))
    if args.out:
        write_json(report, args.out)
        print(f"report written to {args.out}")
    return 0


COMMANDS = {"train": _train, "eval": _eval}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: curriculum {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    from curriculum.checkpoint import CheckpointError
    from curriculum.config import RecipeError
    from curriculum.data import DataError
    from curriculum.train import SetupError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (RecipeError, DataError, CheckpointError, SetupError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
