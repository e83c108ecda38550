"""Command line: `curriculum train | eval | predict | compare`.

Every user error ends in one line on stderr and exit status 2; nothing is half-written.
"""
from __future__ import annotations

import os
import sys

from data_prep.arguments import ArgumentParser


def _files_and_overrides(prog: str, description: str, argv: list[str], example: str) -> tuple[list[str], list[str]]:
    """YAML files (later ones win) and dotted key=value overrides, in any order."""
    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("args", nargs="*", metavar="FILE.yaml | key=value",
                   help=f"files composed in order, then overrides such as {example}")
    args = p.parse_args(argv).args
    files = [a for a in args if "=" not in a]
    if not files:
        p.error("give at least one YAML file")
    return files, [a for a in args if "=" in a]


def _train(argv: list[str]) -> int:
    from curriculum.config import load_recipe

    files, overrides = _files_and_overrides(
        "curriculum train", "train the stages of a recipe (see recipes/*.yaml); init_from=CKPT starts "
        "a stage from a checkpoint's weights, resume=CKPT continues an interrupted run", argv,
        "stages.0.steps=100 data.batch_size=8")
    cfg = load_recipe(files, overrides)
    from curriculum.train import train

    result = train(cfg)
    if result["rank"] == 0:
        print(f"final checkpoint: {result['checkpoint']}  (global step {result['global_step']}, "
              f"stages {result['switches']})")
    return 0


def _eval(argv: list[str]) -> int:
    from curriculum.metrics import PROTOCOLS

    p = ArgumentParser(prog="curriculum eval", description="evaluate a checkpoint on shards")
    p.add_argument("--checkpoint", required=True, help="this project's checkpoint or an official Depth-Anything-V2 "
                   "metric one (then give --max-depth; the input size defaults to 518x518)")
    p.add_argument("--shards", required=True, help="brace pattern or glob of validation shards")
    p.add_argument("--protocol", default="synthetic", choices=PROTOCOLS)
    p.add_argument("--out", help="write the report as JSON here, with its figures beside it (<name>.png: "
                   "abs_rel per range and phantom rates; <name>_examples.png: depth panels)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--height", type=int, help="network input height (default: the checkpoint recipe's validation "
                   "size, 518x518 for official checkpoints; for frames of another aspect ratio, theirs at its "
                   "shorter side, as Depth-Anything-V2 evaluates)")
    p.add_argument("--width", type=int)
    p.add_argument("--max-depth", type=float, help="the head's range (model.max_depth); must agree with the "
                   "checkpoint's if given; needed for an official checkpoint (80 vKITTI 2, 20 Hypersim). "
                   "Evaluation splits near and far at 80 m whatever the range")
    p.add_argument("--encoder", choices=("vits", "vitb", "vitl", "tiny"),
                   help="an official checkpoint's encoder (default: inferred from its weights)")
    p.add_argument("--max-images", type=int, default=0)
    args = p.parse_args(argv)
    for flag, value, lowest in (("--batch-size", args.batch_size, 1), ("--max-images", args.max_images, 0)):
        if value < lowest:
            raise ValueError(f"{flag} {value}: must be at least {lowest}")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value < 14 or value % 14):
            raise ValueError(f"{flag} {value}: must be a positive multiple of 14 (the patch size)")
    if args.out and (os.path.isdir(args.out) or not args.out.endswith(".json")):
        raise ValueError(f"--out {args.out}: give a .json file name (the figures are written beside it)")
    from curriculum.checkpoint import META_KEY, load_model, read_checkpoint
    from curriculum.evaluate import evaluate, format_table, load_official_for_eval, save_figures, write_json

    ckpt = read_checkpoint(args.checkpoint)
    if META_KEY in ckpt:
        model, meta = load_model(args.checkpoint, ckpt)
        for flag, value, key in (("--max-depth", args.max_depth, "max_depth"), ("--encoder", args.encoder, "encoder")):
            if value is not None and value != meta["model"][key]:
                raise ValueError(f"{flag} {value} conflicts with the checkpoint's {key} {meta['model'][key]} "
                                 f"({args.checkpoint}); drop the flag")
    else:
        model, meta = load_official_for_eval(args.checkpoint, ckpt, args.encoder, args.max_depth)
    del ckpt
    report = evaluate(args.checkpoint, args.shards, args.protocol, args.batch_size, args.height, args.width,
                      max_images=args.max_images, model=model, meta=meta, examples=4 if args.out else 0)
    print(format_table(report))
    if args.out:
        write_json(report, args.out)
        figures = save_figures(report, os.path.splitext(args.out)[0])
        print(f"report written to {args.out}; figures: {', '.join(figures)}")
    return 0


def _predict(argv: list[str]) -> int:
    p = ArgumentParser(prog="curriculum predict",
                       description="depth for an image or a folder of images: colour PNG, .npy, PLY")
    p.add_argument("--checkpoint", required=True, help="this project's checkpoint or an official Depth-Anything-V2 "
                   "metric checkpoint (then --max-depth is required; a relative checkpoint has the same keys but "
                   "predicts disparity, not metres, and cannot be told apart: do not give one)")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--recursive", action="store_true", help="a folder's subfolders too; their outputs go to the "
                   "same subfolders of --out (and a --sky-mask folder is read the same way)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--encoder", choices=["tiny", "vits", "vitb", "vitl"],
                   help="official checkpoints: the encoder (default: inferred from the weights)")
    p.add_argument("--max-depth", type=float, help="official checkpoints: the range they were trained with "
                   "(80 outdoor, 20 indoor); this project's checkpoints carry it and refuse a different one")
    p.add_argument("--input-size", type=int, help="shorter side of the network input, a multiple of 14 "
                   "(default: the checkpoint's validation size; 518 for official checkpoints)")
    p.add_argument("--save-npy", action="store_true", help="also write depth in metres as float32 .npy")
    p.add_argument("--vmin", type=float, default=1.0, help="colour range bottom in metres (log scale)")
    p.add_argument("--vmax", type=float, help="colour range top in metres (default: the model's max depth)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g = p.add_argument_group("point cloud")
    g.add_argument("--pointcloud", action="store_true", help="write a binary PLY with colour per image")
    g.add_argument("--fx", type=float, help="focal length in pixels of the input image (default: from --fov)")
    g.add_argument("--fy", type=float, help="default: --fx")
    g.add_argument("--cx", type=float, help="default: image centre")
    g.add_argument("--cy", type=float, help="default: image centre")
    g.add_argument("--fov", type=float, default=60.0, help="horizontal field of view in degrees when no --fx (default 60; the fx used is printed)")
    g.add_argument("--drop-beyond", type=float, metavar="M", help="drop points deeper than M metres")
    g.add_argument("--drop-sky", action="store_true", help="drop points predicted at or beyond --sky-depth")
    g.add_argument("--sky-depth", type=float, metavar="M", help="depth from which a prediction counts as sky "
                   "(default: half the far target the checkpoint was taught; 0.98 x max depth otherwise)")
    g.add_argument("--sky-mask", metavar="PNG_OR_DIR", help="drop pixels nonzero in this mask (a folder: <name>.png "
                   "per image)")
    g.add_argument("--drop-edges", type=float, nargs="?", const=0.05, metavar="REL",
                   help="drop flying pixels whose relative depth jump to a neighbour exceeds REL (default 0.05)")
    g.add_argument("--max-uncertainty", type=float, metavar="U",
                   help="drop points whose predicted uncertainty exceeds U (models trained with uncertainty)")
    args = p.parse_args(argv)
    from curriculum.predict import PointCloudOptions, run_predict

    filters = {"--drop-beyond": args.drop_beyond is not None, "--drop-sky": args.drop_sky,
               "--sky-mask": args.sky_mask is not None, "--drop-edges": args.drop_edges is not None,
               "--max-uncertainty": args.max_uncertainty is not None}
    used = [k for k, v in filters.items() if v]
    if used and not args.pointcloud:
        raise ValueError(f"{used[0]} filters the point cloud: add --pointcloud")
    if args.sky_depth is not None and not args.drop_sky:
        raise ValueError("--sky-depth sets where --drop-sky starts: add --drop-sky")
    pc = None
    if args.pointcloud:
        pc = PointCloudOptions(fx=args.fx, fy=args.fy, cx=args.cx, cy=args.cy, fov=args.fov,
                               drop_beyond=args.drop_beyond, drop_sky=args.drop_sky, sky_mask=args.sky_mask,
                               edge_threshold=args.drop_edges, max_uncertainty=args.max_uncertainty)
    run_predict(args.checkpoint, args.input, args.out, encoder=args.encoder, max_depth=args.max_depth,
                input_size=args.input_size, save_npy=args.save_npy, pointcloud=pc, sky_depth=args.sky_depth,
                vmin=args.vmin, vmax=args.vmax, device=args.device,
                recursive=args.recursive)
    return 0


def _compare(argv: list[str]) -> int:
    files, overrides = _files_and_overrides(
        "curriculum compare", "train the baseline and curriculum arms on the same data and budget, "
        "evaluate them and write a side-by-side report; its keys are in recipes/compare.yaml, and "
        "train.<recipe key>=value overrides every arm's training recipe", argv,
        "total_steps=600 seeds=[0,1] train.data.batch_size=8")
    from curriculum.compare import load_compare, run_compare

    result = run_compare(load_compare(files, overrides))
    print(f"report: {result['report']}")
    return 0


COMMANDS = {"train": _train, "eval": _eval, "predict": _predict, "compare": _compare}
SUMMARY = """usage: curriculum {train,eval,predict,compare} ...

  train    RECIPE.yaml [MORE.yaml ...] [key=value ...]   train a recipe's stages
  eval     --checkpoint CKPT --shards PATTERN ...         near/far/sky metrics of a checkpoint
  predict  --checkpoint CKPT --input IMG_OR_DIR --out DIR  depth PNG, .npy, point cloud
  compare  COMPARE.yaml [key=value ...]                   baseline vs curriculum report

curriculum COMMAND --help shows a command's options; curriculum --version the versions in use."""


def version_line() -> str:
    """This project's version and the libraries' that decide its numbers, for a bug report."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    import torch  # its own version string names the build (+cu130, +cpu), the package's does not

    libraries = ", ".join(f"{name} {of(name)}" for name in ("lightning", "timm", "webdataset", "wandb"))
    return (f"curriculum-depth {of('curriculum-depth')} (torch {torch.__version__}, {libraries}; "
            f"Python {sys.version.split()[0]})")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(SUMMARY)
        return 0
    if argv and argv[0] == "--version":
        print(version_line())
        return 0
    if not argv:
        print(SUMMARY, file=sys.stderr)
        return 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)}; --help lists them)",
              file=sys.stderr)
        return 2
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from curriculum.checkpoint import CheckpointError
    from curriculum.compare import CompareError
    from curriculum.config import RecipeError
    from curriculum.data import DataError, one_line
    from curriculum.module import NonFiniteError
    from curriculum.train import SetupError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (RecipeError, DataError, CheckpointError, SetupError, NonFiniteError, CompareError, ValueError,
            OSError) as exc:
        _error_line(f"error: {one_line(str(exc))}")
        return 2
    except MisconfigurationException as exc:  # Lightning's refusal of a trainer setting the recipe check let through
        _error_line(f"error: trainer: {str(exc).splitlines()[0]}")
        return 2
    except Exception as exc:
        if not type(exc).__module__.startswith("wandb."):  # wandb's refusals (a login, a project) in one line
            raise
        import wandb

        if isinstance(exc, wandb.errors.CommError) and not isinstance(exc, wandb.errors.AuthenticationError):
            # the server unreachable: wandb's advice (a longer wandb.init timeout) is not the user's to apply
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            _error_line(f"error: W&B: {first} (the W&B server cannot be reached: "
                        "logging.mode=offline keeps the run on disk, and `wandb sync` uploads it later)")
            return 2
        _error_line(f"error: W&B: {one_line(str(exc))}")
        return 2


def _error_line(text: str) -> None:
    # one line whatever the message (a library's error may span several), in one write, newline
    # included: print writes the text and its end apart, so the lines of DDP ranks failing
    # together could run into each other on a shared terminal
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
