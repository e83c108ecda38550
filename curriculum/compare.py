"""`curriculum compare`: the baseline and the curriculum, same data, seed and step budget, one report.

Arms (built here from the budget, so that only the mask-policy schedule differs between them):
- A  baseline:   one `max_depth` stage (Depth-Anything-V2's 80 m mask) for the whole budget;
- B  curriculum: `unclipped` for `stage1_fraction` of the budget, then the 80 m mask;
- C  mixed:      as B, but stage 2 keeps far pixels and sky at `mixed_far_weight` (`mixed` policy).
Every arm is one training run with all its stages (the curriculum callback switches), so step
budget, learning-rate schedule, data order and initial weights are identical for a given seed.
B and C switch at the same step.

Each arm x seed trains into `<out_dir>/<arm>/seed<k>/`; a finished one (its `done.json` and final
checkpoint exist) is not trained again, and an interrupted one resumes from its last checkpoint,
so an interrupted comparison continues where it stopped. Every finished run is checked against
the current setup before any training: the same training recipe (evaluation and logging settings
aside) and the same training shards (names, sizes, modification times).
All arms are evaluated with `curriculum.evaluate.evaluate` on the same validation shards, and
`report.md` / `report.json` state what the numbers are, nothing more.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, List

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from curriculum.config import (RECIPES_DIR, RecipeError, as_node_type, load_recipe, load_yaml_mapping, parse_override,
                               resolved, to_plain, unknown_key)
from curriculum.module import EVAL_MAX_DEPTH
from data_prep.files import atomic_write_text


class CompareError(RuntimeError):
    """A comparison that cannot go on, in one line."""


# Recipe keys that do not change how an arm trains: a finished arm stays valid when they change.
NOT_TRAINING = ("resume", "logging", "run.name", "run.overwrite", "trainer.log_every_steps", "trainer.progress", "data.val_shards",
                "data.val_height", "data.val_width", "data.val_batch_size", "data.val_max_images")

ARMS = {
    "A": ("baseline", "80 m mask only (Depth-Anything-V2)"),
    "B": ("curriculum", "unclipped, then 80 m mask"),
    "C": ("mixed", "unclipped, then 80 m mask with far pixels and sky at a small weight"),
}
# Recipe keys the comparison sets itself; an override of them would break the like-for-like setup.
OWNED_KEYS = ("stages", "run.seed", "run.out_dir", "init_from", "resume")
NEAR_COLUMNS = (("near/d1", "d1 ↑"), ("near/abs_rel", "abs_rel ↓"), ("near/rmse", "rmse [m] ↓"))
BIN_COLUMNS = (("near/0_20/abs_rel", "[0, 20) m"), ("near/20_40/abs_rel", "[20, 40) m"),
               ("near/40_80/abs_rel", "[40, 80] m"), ("far/abs_rel", "far (> 80 m)"))
PHANTOM_COLUMNS = (("phantom_rate", "overall ↓"), ("far/phantom_rate", "far (> 80 m) ↓"),
                   ("sky/phantom_rate", "sky ↓"))
PHANTOM_COLOUR = (230, 20, 20)
SUMMARY_KEYS = tuple(k for k, _ in NEAR_COLUMNS + BIN_COLUMNS + PHANTOM_COLUMNS)


@dataclass
class CompareConfig:
    name: str = "compare"
    recipes: List[str] = field(default_factory=lambda: ["demo.yaml"])  # training recipes (recipes/ or paths)
    overrides: List[str] = field(default_factory=list)  # key=value for every arm's recipe
    out_dir: str = "runs/compare"
    total_steps: int = 600  # optimizer steps of every arm
    stage1_fraction: float = 0.5  # share of the budget on unclipped depth (arms B and C)
    rewarm_steps: int = 0  # learning-rate re-warm-up at the switch (arms B and C)
    max_depth: float = 80.0  # the stage-2 mask of every arm
    far_target: float = 655.35  # where unclipped/mixed supervise sky and beyond-range pixels
    mixed_far_weight: float = 0.1  # arm C's stage-2 weight of far pixels and sky
    seeds: List[int] = field(default_factory=lambda: [0])
    arms: List[str] = field(default_factory=lambda: ["A", "B", "C"])
    val_shards: str = ""  # "" = the training recipe's data.val_shards
    protocol: str = "synthetic"
    eval_batch_size: int = 8
    examples: int = 2  # validation frames shown side by side
    near_tolerance: float = 0.05  # relative near abs_rel difference called "within" in the summary
    topdown_range: float = 120.0  # metres shown in the top-down views
    device: str = ""  # evaluation device; "" = cuda if available


# ------------------------------------------------------------------------------------ config

def load_compare(files: list[str | Path], overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Compose compare files and `key=value` overrides (strictly: unknown keys are one-line errors).

    `train.<recipe key>=value` on the command line is appended to `overrides` (every arm).
    """
    valid = [f.name for f in fields(CompareConfig)]
    cfg = OmegaConf.structured(CompareConfig)
    for f in files:
        path = Path(f)
        data = load_yaml_mapping(path, what="compare")
        for key in data:
            if key not in valid:
                raise unknown_key(str(key), valid, str(path))
        for key, value in data.items():  # key by key, so that an error names its key
            try:
                cfg = OmegaConf.merge(cfg, {key: value})
            except (OmegaConfBaseException, TypeError, ValueError) as exc:  # TypeError: a mapping for a list
                raise RecipeError(f"{path}: key '{key}': {str(exc).splitlines()[0]}") from None
    extra = []
    for text in overrides:
        key, value, raw = parse_override(text)
        if key.startswith("train."):
            extra.append(f"{key[len('train.'):]}={raw}")
            continue
        if key not in valid:
            raise unknown_key(key, valid + ["train.<recipe key>"], "command line")
        try:
            cfg[key] = as_node_type(cfg._get_node(key), value, raw)
        except (OmegaConfBaseException, ValueError) as exc:
            raise RecipeError(f"command line: key '{key}': {str(exc).splitlines()[0]}") from None
    plain = resolved(cfg, "compare", "a compare file")
    plain["overrides"] = list(plain["overrides"]) + extra
    validate_compare(plain)
    return plain


def validate_compare(c: dict) -> None:
    if c["total_steps"] < 2:
        raise RecipeError(f"total_steps: must be at least 2 (two stages), got {c['total_steps']}")
    if not 0.0 < c["stage1_fraction"] < 1.0:
        raise RecipeError(f"stage1_fraction: must be strictly between 0 and 1, got {c['stage1_fraction']}")
    s1 = stage1_steps(c)
    if not 0 < s1 < c["total_steps"]:
        raise RecipeError(f"stage1_fraction {c['stage1_fraction']} of {c['total_steps']} steps leaves a stage empty")
    if not c["seeds"]:
        raise RecipeError("seeds: give at least one seed")
    if len(set(c["seeds"])) != len(c["seeds"]):
        raise RecipeError(f"seeds: duplicate seed in {c['seeds']}")
    if not c["arms"] or any(a not in ARMS for a in c["arms"]) or len(set(c["arms"])) != len(c["arms"]):
        raise RecipeError(f"arms: a non-empty list of distinct arms from {list(ARMS)}, got {c['arms']}")
    if not c["recipes"]:
        raise RecipeError("recipes: give at least one training recipe (e.g. [demo.yaml])")
    for key in ("max_depth", "far_target", "near_tolerance", "topdown_range"):
        if not (math.isfinite(c[key]) and c[key] > 0):
            raise RecipeError(f"{key}: must be a positive number, got {c[key]}")
    if not (math.isfinite(c["mixed_far_weight"]) and c["mixed_far_weight"] >= 0):
        raise RecipeError(f"mixed_far_weight: must be >= 0, got {c['mixed_far_weight']}")
    for key in ("eval_batch_size", "examples"):
        if c[key] <= 0:
            raise RecipeError(f"{key}: must be positive, got {c[key]}")
    if c["rewarm_steps"] < 0 or c["rewarm_steps"] > c["total_steps"] - stage1_steps(c):
        raise RecipeError(f"rewarm_steps: must be between 0 and stage 2's {c['total_steps'] - stage1_steps(c)} steps, "
                          f"got {c['rewarm_steps']}")
    if not c["far_target"] > c["max_depth"]:
        raise RecipeError(f"far_target: the sky's target ({c['far_target']:g} m) must lie beyond max_depth "
                          f"({c['max_depth']:g} m), outside the 80 m mask")
    from curriculum.metrics import PROTOCOLS

    if c["protocol"] not in PROTOCOLS:
        raise RecipeError(f"protocol: unknown evaluation protocol '{c['protocol']}' (choose from {', '.join(PROTOCOLS)})")
    device = str(c["device"])
    if device not in ("", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise RecipeError(f"device: '{device}' is not '', cpu, cuda or cuda:N")
    for text in c["overrides"]:
        if "=" not in text:
            raise RecipeError(f"overrides: '{text}' is not of the form key=value")
        key = text.split("=", 1)[0].strip()
        owned = next((k for k in OWNED_KEYS if key == k or key.startswith(k + ".")), None)
        if owned:
            raise RecipeError(f"overrides: '{key}' is set by the comparison for every arm (stages, seeds and "
                              "output folders come from the compare file); remove it")


def stage1_steps(c: dict) -> int:
    return int(round(c["total_steps"] * c["stage1_fraction"]))


def recipe_files(c: dict) -> list[Path]:
    out = []
    for name in c["recipes"]:
        p = Path(name)
        if not p.is_file() and (RECIPES_DIR / name).is_file():
            p = RECIPES_DIR / name
        if not p.is_file():
            raise RecipeError(f"recipes: training recipe not found: {name} (looked in . and {RECIPES_DIR})")
        out.append(p)
    return out


def arm_stages(c: dict, arm: str) -> list[dict]:
    """The stage schedule of an arm: the only thing that differs between arms."""
    total, s1 = int(c["total_steps"]), stage1_steps(c)
    mask = {"name": "max_depth", "max_depth": float(c["max_depth"])}
    if arm == "A":
        return [{"name": "finetune", "steps": total, "rewarm_steps": 0, "policy": mask}]
    pre = {"name": "pretrain", "steps": s1, "rewarm_steps": 0,
           "policy": {"name": "unclipped", "far_target": float(c["far_target"])}}
    if arm == "B":
        second = mask
    else:
        second = {"name": "mixed", "max_depth": float(c["max_depth"]), "far_weight": float(c["mixed_far_weight"]),
                  "far_target": float(c["far_target"])}
    return [pre, {"name": "finetune", "steps": total - s1, "rewarm_steps": int(c["rewarm_steps"]), "policy": second}]


def run_dir(c: dict, arm: str, seed: int) -> Path:
    return Path(c["out_dir"]) / arm / f"seed{seed}"


def _run_files(c: dict, arm: str, seed: int) -> tuple[Path, Path, Path]:
    """(folder, done.json, final checkpoint) of one arm x seed."""
    folder = run_dir(c, arm, seed)
    return folder, folder / "done.json", folder / "checkpoints" / "last.ckpt"


def arm_recipe(c: dict, arm: str, seed: int):
    """The full training recipe of one arm and seed."""
    folder = run_dir(c, arm, seed)
    arm_part = {
        "run": {"name": f"{c['name']}-{arm}-{ARMS[arm][0]}-s{seed}", "out_dir": str(folder), "seed": int(seed)},
        "stages": arm_stages(c, arm),
        # In-training validation once, at the end: the comparison evaluates every arm itself.
        "trainer": {"val_every_steps": int(c["total_steps"])},
        "logging": {"group": c["name"]},
    }
    # A temporary file: nothing is written under out_dir before every arm's recipe is valid.
    with tempfile.TemporaryDirectory() as tmp:
        arm_file = Path(tmp) / f"arm-{arm}-seed{seed}.yaml"
        arm_file.write_text(OmegaConf.to_yaml(OmegaConf.create(arm_part)))
        try:
            cfg = load_recipe([*recipe_files(c), arm_file], list(c["overrides"]))
        except RecipeError as exc:
            raise RecipeError(f"arm {arm} training recipe: {exc}") from None
    if c["val_shards"]:
        cfg.data.val_shards = c["val_shards"]
    return cfg


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        # Only keys both recipes know: a key the recipe schema gained or lost since that run was
        # trained is not a difference in how it was trained.
        for k in sorted(set(a) & set(b)):
            d = _first_difference(a[k], b[k], f"{prefix}{k}.")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{prefix}{i}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} before vs {b!r} now"


# ------------------------------------------------------------------------------------ running

def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _training_part(recipe: dict) -> dict:
    """The recipe without the keys that do not change how an arm trains (NOT_TRAINING)."""
    out = json.loads(json.dumps(recipe))
    for dotted in NOT_TRAINING:
        *path, last = dotted.split(".")
        node = out
        for k in path:
            node = node.get(k, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def shard_fingerprint(pattern: str) -> list[list]:
    """(name, size, modification time) of every shard a pattern names: regenerated data differs."""
    from curriculum.data import expand_shards

    out = []
    for url in expand_shards(pattern):
        st = os.stat(url) if os.path.exists(url) else None
        out.append([url, st.st_size if st else None, st.st_mtime_ns if st else None])
    return out


def _previous_run(c: dict, arm: str, seed: int, cfg) -> tuple[str, dict | None]:
    """("done", done.json), ("partial", None) for an interrupted run to resume, or ("new", None).
    A run made with another training recipe or other training shards is an error: the report
    must compare like with like."""
    from curriculum.checkpoint import metadata, read_checkpoint

    folder, done_file, final = _run_files(c, arm, seed)
    recipe = to_plain(cfg)
    if done_file.is_file() and final.is_file():
        done = json.loads(done_file.read_text())
        before, data_before = done.get("recipe"), done.get("train_shards")
        state = "done"
    elif final.is_file():
        before, done = metadata(read_checkpoint(final, mmap=True), final).get("recipe"), None
        data_before = _earlier_attempts(folder).get("train_shards")  # None after a kill -9
        state = "partial"
    else:
        return "new", None
    diff = _first_difference(_training_part(before or {}), _training_part(recipe))
    if diff:
        raise RecipeError(f"{folder} holds a run of a different training recipe ({diff}); "
                          "remove that folder or choose another out_dir")
    if data_before is not None and data_before != shard_fingerprint(recipe["data"]["train_shards"]):
        raise RecipeError(f"{folder} was trained on other shards than data.train_shards "
                          f"'{recipe['data']['train_shards']}' holds now (names, sizes or times differ); "
                          "remove that folder or choose another out_dir")
    return state, done


EARLIER_ATTEMPTS = "attempts.json"  # beside done.json: time and data of a run's interrupted attempts


def _earlier_attempts(folder: Path) -> dict:
    try:
        return json.loads((folder / EARLIER_ATTEMPTS).read_text())
    except (OSError, ValueError):
        return {}


def _train_one(c: dict, arm: str, seed: int, cfg, previous: tuple[str, dict | None], log) -> dict:
    """Train one arm x seed, resume it, or reuse its finished run (``previous``: _previous_run's
    verdict, taken for every run before any trained)."""
    from curriculum.faults import RunInterrupted
    from curriculum.train import train

    folder, done_file, final = _run_files(c, arm, seed)
    state, done = previous
    if state == "done":
        log(f"[compare] {arm} seed {seed}: finished checkpoint exists ({final}), skipping training")
        return {**done, "skipped": True}
    if state == "partial":
        log(f"[compare] {arm} seed {seed}: resuming the interrupted run from {final}")
        cfg.resume = str(final)
    else:  # no checkpoint: whatever a run stopped before its first one left is replaced
        cfg.run.overwrite = True
        done_file.unlink(missing_ok=True)  # a done.json without its checkpoint describes nothing
        (folder / EARLIER_ATTEMPTS).unlink(missing_ok=True)
    recipe = to_plain(cfg)
    recipe["resume"] = ""  # what the run is, not how this process got there
    fingerprint = shard_fingerprint(recipe["data"]["train_shards"])
    earlier = _earlier_attempts(folder).get("seconds", 0.0) if state == "partial" else 0.0
    start = time.perf_counter()
    try:
        result = train(cfg)
    except BaseException as exc:
        if final.is_file():  # a later compare resumes from it: its time so far, and its data, go with it
            atomic_write_text(folder / EARLIER_ATTEMPTS, json.dumps(
                {"seconds": earlier + time.perf_counter() - start, "train_shards": fingerprint}, default=float))
        if isinstance(exc, RunInterrupted):
            log("[compare] interrupted: run the same compare command again to continue (finished runs are "
                "kept, this one resumes from its checkpoint)")
        raise
    seconds = earlier + time.perf_counter() - start  # every attempt's
    done = {"recipe": recipe, "train_shards": fingerprint, "checkpoint": str(final),
            "global_step": result["global_step"], "switches": [list(s) for s in result["switches"]],
            "train_seconds": seconds}
    if result["global_step"] != c["total_steps"]:
        raise CompareError(f"{arm} seed {seed} stopped at step {result['global_step']} of {c['total_steps']}")
    atomic_write_text(done_file, json.dumps(done, indent=1, default=float))
    (folder / EARLIER_ATTEMPTS).unlink(missing_ok=True)
    return {**done, "skipped": False}


def _val_size(cfg) -> tuple[int, int]:
    return int(cfg.data.val_height), int(cfg.data.val_width)


def _stats(values: list[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None, None
    mean = float(np.mean(v))
    return mean, (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def run_compare(c: dict, log=print) -> dict:
    """Train (or reuse) every arm x seed, evaluate them all, write report.md and report.json."""
    from curriculum.data import expand_shards
    from curriculum.evaluate import evaluate, write_json

    t0 = time.perf_counter()
    out = Path(c["out_dir"])
    runs = [(seed, arm) for seed in c["seeds"] for arm in c["arms"]]
    cfgs = {(seed, arm): arm_recipe(c, arm, seed) for seed, arm in runs}  # every recipe checked before training
    first = to_plain(cfgs[runs[0]])
    tcfg = first["trainer"]
    if str(tcfg["devices"]) != "1" or int(tcfg["num_nodes"]) != 1:
        # Each arm trains inside this process, one after the other; a multi-process launch would
        # re-run the whole comparison in every rank.
        raise RecipeError(f"trainer.devices={tcfg['devices']}, trainer.num_nodes={tcfg['num_nodes']}: the comparison "
                          "trains every arm on one device (add train.trainer.devices=1)")
    if not c["max_depth"] < float(first["model"]["max_depth"]):
        raise RecipeError(f"max_depth: the mask's {c['max_depth']:g} m must lie within the model's range "
                          f"(model.max_depth {first['model']['max_depth']:g} m)")
    val_shards = c["val_shards"] or first["data"]["val_shards"]
    expand_shards(val_shards)
    expand_shards(first["data"]["train_shards"])
    # Every earlier run checked before any training (training one arm leaves the others' folders as they are).
    previous = {run: _previous_run(c, run[1], run[0], cfgs[run]) for run in runs}
    log(f"[compare] {len(c['arms'])} arms x {len(c['seeds'])} seeds, {c['total_steps']} steps each "
        f"(switch at step {stage1_steps(c)} for B/C), out {out}")

    trained_times: list[float] = []
    results: dict[tuple[int, str], dict] = {}
    for i, (seed, arm) in enumerate(runs):
        elapsed = time.perf_counter() - t0
        left = len(runs) - i
        eta = f", training ETA {_fmt_time(left * float(np.mean(trained_times)))}" if trained_times else ""
        log(f"[compare] run {i + 1}/{len(runs)}: arm {arm} ({ARMS[arm][0]}), seed {seed} -> {run_dir(c, arm, seed)}"
            f"  (elapsed {_fmt_time(elapsed)}{eta})")
        res = _train_one(c, arm, seed, cfgs[(seed, arm)], previous[(seed, arm)], log)
        if not res["skipped"]:
            trained_times.append(res["train_seconds"])
            log(f"[compare] arm {arm} seed {seed} trained in {_fmt_time(res['train_seconds'])}")
        results[(seed, arm)] = res

    log("[compare] evaluating every arm on the same validation shards")
    evals: dict[tuple[int, str], dict] = {}
    shards_mtime = max((os.stat(u).st_mtime_ns for u in expand_shards(val_shards) if os.path.exists(u)), default=0)
    for seed, arm in runs:
        ckpt = results[(seed, arm)]["checkpoint"]
        # This run's input size, not the one a reused checkpoint recorded: data.val_height/width
        # do not retrain an arm (NOT_TRAINING), so they must reach its evaluation.
        height, width = _val_size(cfgs[(seed, arm)])
        settings = {"checkpoint_mtime_ns": os.stat(ckpt).st_mtime_ns, "shards": val_shards,
                    "shards_mtime_ns": shards_mtime, "protocol": c["protocol"], "batch_size": c["eval_batch_size"],
                    "input_size": [height, width]}
        eval_file = run_dir(c, arm, seed) / "eval.json"
        ev = json.loads(eval_file.read_text()) if eval_file.is_file() else {}
        if ev.get("compare_settings") != settings:  # a reused run keeps its evaluation
            ev = evaluate(ckpt, val_shards, c["protocol"], c["eval_batch_size"], height=height, width=width,
                          device=c["device"] or None, progress=False)
            ev["compare_settings"] = settings
            write_json(ev, eval_file)
            ev = json.loads(eval_file.read_text())
        evals[(seed, arm)] = ev

    arms: dict[str, dict] = {}
    for arm in c["arms"]:
        per_seed = [evals[(s, arm)]["metrics"] for s in c["seeds"]]
        mean, std = {}, {}
        for key in evals[(c["seeds"][0], arm)]["metrics"]:
            mean[key], std[key] = _stats([m.get(key) for m in per_seed])
        arms[arm] = {
            "name": ARMS[arm][0], "description": ARMS[arm][1], "stages": arm_stages(c, arm),
            "runs": [{"seed": s, "checkpoint": results[(s, arm)]["checkpoint"], "skipped": results[(s, arm)]["skipped"],
                      "train_seconds": results[(s, arm)]["train_seconds"], "metrics": evals[(s, arm)]["metrics"]}
                     for s in c["seeds"]],
            "mean": mean, "std": std,
        }
    ev0 = evals[runs[0]]
    report = {
        "config": c,
        "recipe_files": [str(p) for p in recipe_files(c)],
        "protocol": c["protocol"],
        "protocol_text": ev0["protocol_text"],
        "val_shards": val_shards,
        "train_shards": first["data"]["train_shards"],
        "images": ev0["metrics"].get("images"),
        "input_size": ev0["input_size"],
        "model": ev0["model"],
        "arms": arms,
    }
    report["summary"] = summarize(report)
    figures = make_figures(c, report, cfgs, results, val_shards, out)
    report["figures"] = {k: str(v) for k, v in figures.items()}
    report["wall_seconds"] = time.perf_counter() - t0
    write_json(report, out / "report.json")
    md = render_markdown(report, figures, first)
    atomic_write_text(out / "report.md", md)
    log(near_table(report))
    log(f"[compare] done in {_fmt_time(report['wall_seconds'])}: {out / 'report.md'}")
    return {"report": str(out / "report.md"), "json": str(out / "report.json"), "data": report}


# ------------------------------------------------------------------------------------ numbers

def _cell(arm: dict, key: str, seeds: int) -> str:
    m, s = arm["mean"].get(key), arm["std"].get(key)
    if m is None:
        return "n/a"
    return f"{m:.4f} ± {s:.4f}" if seeds > 1 and s is not None else f"{m:.4f}"


def _table(report: dict, columns) -> str:
    seeds = len(report["config"]["seeds"])
    head = "| arm | " + " | ".join(label for _, label in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    rows = [f"| {a} {d['name']} | " + " | ".join(_cell(d, k, seeds) for k, _ in columns) + " |"
            for a, d in report["arms"].items()]
    return "\n".join([head, rule, *rows])


def near_table(report: dict) -> str:
    """The console's table: near-range metrics and the phantom rate, each column saying which."""
    near = tuple((k, f"near {label}") for k, label in NEAR_COLUMNS)
    return _table(report, near + (("phantom_rate", "phantom rate ↓"),))


def _pct(x: float) -> str:
    return f"{_pct_value(x):.1f} %"


def _pct_value(x: float) -> float:
    """A rate as the percentage the report prints (one decimal): ties and differences are
    decided on these, so a sentence never contradicts the numbers beside it."""
    return round(100.0 * x, 1)


def summarize(report: dict) -> list[str]:
    """Sentences that only restate comparisons computed from the numbers."""
    arms = report["arms"]
    seeds = len(report["config"]["seeds"])
    tol = report["config"]["near_tolerance"]
    out = []

    def mean(a, k):
        return arms[a]["mean"].get(k)

    def spread_note(a, b, k, points=False):
        """``points``: the rates' sentence gives its difference in percentage points, so does this."""
        if seeds < 2:
            return ""
        sa, sb = arms[a]["std"].get(k), arms[b]["std"].get(k)
        if sa is None or sb is None:
            return ""
        diff = abs(mean(a, k) - mean(b, k))
        spread = f"{100 * (sa + sb):.1f} percentage points" if points else f"{sa + sb:.4f}"
        return (f" (the difference is {'larger' if diff > sa + sb else 'smaller'} than the two arms' seed standard "
                f"deviations added, {spread})")

    def lowest(have, k, shown):
        """The arms at the lowest value as printed (``shown`` gives it; several = a tie) and how
        to name them."""
        top = min(shown(mean(a, k)) for a in have)
        tied = [a for a in have if shown(mean(a, k)) == top]
        if len(tied) == 1:
            return tied, f"{tied[0]} {arms[tied[0]]['name']}"
        if len(tied) == len(have):
            return tied, "a tie of all arms"
        return tied, "a tie of " + " and ".join(f"{a} {arms[a]['name']}" for a in tied)

    key = "near/abs_rel"
    have = [a for a in arms if mean(a, key) is not None]
    if have:
        tied, who = lowest(have, key, lambda x: round(x, 4))  # printed with 4 decimals
        out.append(f"Lowest near-range abs_rel (≤ {EVAL_MAX_DEPTH:g} m): {who} ({mean(tied[0], key):.4f}).")
        if "A" in have:
            for a in [x for x in have if x != "A"]:
                d = mean(a, key) - mean("A", key)
                rel = d / mean("A", key) if mean("A", key) else math.inf
                verdict = (f"within the {_pct(tol)} tolerance of A" if abs(rel) <= tol else
                           f"{'higher' if d > 0 else 'lower'} than A by more than the {_pct(tol)} tolerance")
                out.append(f"{a} {arms[a]['name']} near abs_rel {mean(a, key):.4f} vs A {mean('A', key):.4f}: "
                           f"{d:+.4f} ({rel:+.2%}), {verdict}{spread_note(a, 'A', key)}.")
    for key, what in (("phantom_rate", "phantom rate"), ("sky/phantom_rate", "sky phantom rate"),
                      ("far/phantom_rate", "far (finite > 80 m) phantom rate")):
        have = [a for a in arms if mean(a, key) is not None]
        if not have:
            out.append(f"No validation pixel for the {what}: the validation set has none of those pixels.")
            continue
        tied, who = lowest(have, key, _pct_value)
        best = tied[0]
        text = f"Lowest {what}: {who} ({_pct(mean(best, key))})"
        if "A" in have and "A" not in tied:
            a0, b0 = _pct_value(mean("A", key)), _pct_value(mean(best, key))
            text += (f", {a0 - b0:.1f} percentage points below A ({_pct(mean('A', key))})"
                     + f", {(a0 - b0) / a0:.0%} fewer phantom pixels" + spread_note(best, "A", key, points=True))
        elif tied == ["A"] and len(have) > 1:
            others = ", ".join(f"{a} {_pct(mean(a, key))}" for a in have if a != "A")
            text += f"; the others: {others}"
        out.append(text + ".")
    if seeds < 2:
        out.append("One seed only: no spread is available, so differences of this size may be seed noise.")
    else:
        out.append(f"Means over {seeds} seeds; ± is the sample standard deviation over seeds.")
    return out


# ------------------------------------------------------------------------------------ figures

def read_samples(urls: list[str], n: int) -> list[dict]:
    """The first n decoded samples of the shards, in shard order, as the validation stream reads
    them: any shard it reads (``pipe:`` and URLs too), bad samples and truncated tails skipped."""
    from curriculum.data import _raw_samples
    from data_prep.schema import SampleError, decode_sample

    out: list[dict] = []
    if n <= 0:
        return out
    samples = _raw_samples(urls, lambda url, why: None)  # evaluation has counted and reported these
    try:
        for raw in samples:
            try:
                out.append(decode_sample(raw))
            except SampleError:
                continue
            if len(out) >= n:
                break
    finally:
        samples.close()  # ends a pipe: command still writing
    return out


def _predict_sample(model, rgb: np.ndarray, height: int, width: int, device: str) -> np.ndarray:
    """As evaluate() does: resize to the network size, predict, resize back bilinearly."""
    import cv2
    import torch

    from curriculum.data import normalize_images
    from curriculum.layers import upsample_depth

    h, w = rgb.shape[:2]
    x = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_CUBIC)
    t = torch.from_numpy(x).permute(2, 0, 1)[None].to(device)
    with torch.no_grad():
        pred = model(normalize_images(t)).depth.float().cpu()
    return upsample_depth(pred, (h, w))[0].numpy()


def make_figures(c: dict, report: dict, cfgs: dict, results: dict, val_shards: str, out: Path) -> dict:
    import torch
    from matplotlib.figure import Figure

    from curriculum.checkpoint import load_model
    from curriculum.data import expand_shards
    from curriculum.pointcloud import filter_points, topdown_view
    from curriculum.viz import bar_chart, colorize_depth, save_figure, side_by_side

    figures: dict[str, Path] = {}
    arms = report["arms"]
    cats = [label for _, label in BIN_COLUMNS]
    series = {f"{a} {d['name']}": [d["mean"].get(k) for k, _ in BIN_COLUMNS] for a, d in arms.items()}
    seeds = len(c["seeds"])
    figures["bins"] = bar_chart(cats, series, out / "abs_rel_per_bin.png", ylabel="abs_rel (lower is better)",
                                title="abs_rel per depth bin" + (f" (mean over {seeds} seeds)" if seeds > 1 else ""))

    n = int(c["examples"])
    samples = read_samples(expand_shards(val_shards), n)
    if not samples:
        return figures
    device = c["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    seed = c["seeds"][0]
    first = to_plain(cfgs[(seed, c["arms"][0])])
    vmax = float(first["logging"]["depth_vmax"])
    vmin = 1.0
    preds: dict[str, list[np.ndarray]] = {}
    for arm in arms:
        model, _ = load_model(results[(seed, arm)]["checkpoint"])
        model = model.to(device).eval()
        height, width = _val_size(cfgs[(seed, arm)])
        preds[arm] = [_predict_sample(model, s["rgb"], height, width, device) for s in samples]

    def shown_gt(s):
        gt = s["depth"].astype(np.float64).copy()
        gt[np.isposinf(gt) | s["sky"]] = vmax  # sky / beyond range: the top colour
        return gt

    images, labels = [], []
    for j, s in enumerate(samples):
        images += [s["rgb"], colorize_depth(shown_gt(s), vmin, vmax)]
        labels += [f"{s['key']}: rgb", "ground truth"]
        for arm in arms:
            images.append(colorize_depth(preds[arm][j], vmin, vmax))
            labels.append(f"{arm} {arms[arm]['name']}")
    figures["examples"] = side_by_side(
        images, labels, out / "examples.png", ncols=2 + len(arms),
        title=f"depth, log colour scale {vmin:g}..{vmax:g} m (same for every panel; grey = no measurement)")

    s = samples[0]
    meta = s["meta"]
    intr = (float(meta["fx"]), float(meta["fy"]), float(meta["cx"]), float(meta["cy"]))
    beyond = (np.isposinf(s["depth"]) | s["sky"] | (np.isfinite(s["depth"]) & (s["depth"] > EVAL_MAX_DEPTH)))
    panels = [("ground truth", np.where(s["sky"], np.inf, s["depth"]), None)]
    panels += [(f"{a} {arms[a]['name']}", preds[a][0], beyond) for a in arms]
    fig = Figure(figsize=(5.0 * len(panels), 5.4), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    phantoms = {}
    for ax, (label, depth, far_mask) in zip(axes, panels):
        rgb = s["rgb"].copy()
        title = label
        if far_mask is not None:
            # Points drawn in red: a non-finite prediction makes no point, so it is not counted
            # here, although the phantom_rate metric counts it as a failure.
            phantom = far_mask & np.isfinite(depth) & (depth <= EVAL_MAX_DEPTH)
            rgb[phantom] = PHANTOM_COLOUR
            phantoms[label] = int(phantom.sum())
            title += f": {phantoms[label]} phantom points (red)"
        points, colours, _ = filter_points(depth, rgb, intr)  # filters off: phantom points stay
        topdown_view(points, colours, ax, max_range=float(c["topdown_range"]), title=title,
                     line_at=EVAL_MAX_DEPTH)
    fig.suptitle(f"top-down view of frame {s['key']} (seed {seed}), no point filter; phantom = ground truth sky or "
                 f"beyond {EVAL_MAX_DEPTH:g} m, predicted within {EVAL_MAX_DEPTH:g} m", parse_math=False)
    figures["topdown"] = save_figure(fig, out / "topdown.png")
    report["topdown_phantom_points"] = phantoms
    report["example_keys"] = [x["key"] for x in samples]
    return figures


# ------------------------------------------------------------------------------------ markdown

def render_markdown(report: dict, figures: dict, first_recipe: dict) -> str:
    c = report["config"]
    seeds = c["seeds"]
    s1 = stage1_steps(c)
    rel = {k: os.path.relpath(v, c["out_dir"]) for k, v in figures.items()}
    d = first_recipe["data"]
    m = first_recipe["model"]
    o = first_recipe["optim"]
    lines = [
        f"# Baseline vs curriculum: {c['name']}",
        "",
        "Generated by `curriculum compare`; every number below is computed from the runs in this folder.",
        "",
        "## Protocol",
        "",
        f"- Training recipe: {', '.join(Path(p).name for p in report['recipe_files'])}"
        + (f" with overrides `{' '.join(c['overrides'])}`" if c["overrides"] else "") + ", the same for every arm.",
        f"- Model: {m['encoder']} encoder, {m['head']} head, range {m['min_depth']:g}..{m['max_depth']:g} m"
        + (f", encoder initialised from {m['pretrained']}" if m.get("pretrained") else ", random initialisation") + ".",
        f"- Data: train `{report['train_shards']}`, batch {d['batch_size']}, crops {d['crop_height']}x{d['crop_width']}; "
        f"validation `{report['val_shards']}` ({int(report['images'] or 0)} images at network size "
        f"{report['input_size'][0]}x{report['input_size'][1]}).",
        f"- Budget: {c['total_steps']} optimizer steps per arm, lr {o['lr']:g} (head x{o['head_lr_mult']:g}), "
        f"warm-up {o['warmup_steps']} steps, poly decay {o['poly_power']:g} over the whole run; "
        f"seeds {', '.join(str(x) for x in seeds)} (a seed fixes initial weights and data order for every arm).",
        "- Arms (only the mask-policy schedule differs):",
    ]
    for a, arm in report["arms"].items():
        sched = " → ".join(
            f"{st['policy']['name']}" + (f" (far weight {st['policy']['far_weight']:g})" if st['policy']['name'] == 'mixed' else "")
            + f" for {st['steps']} steps" + (f", lr re-warm-up {st['rewarm_steps']}" if st.get("rewarm_steps") else "")
            for st in arm["stages"])
        lines.append(f"  - **{a} {arm['name']}**: {arm['description']}: {sched}.")
    if len(c["arms"]) > 1 and any(a in c["arms"] for a in ("B", "C")):
        mask = (f"the mask keeps depths up to {c['max_depth']:g} m" if c["max_depth"] == EVAL_MAX_DEPTH else
                f"the mask keeps depths up to {c['max_depth']:g} m (evaluation still splits near and far at "
                f"{EVAL_MAX_DEPTH:g} m)")
        lines.append(f"  - B and C switch at step {s1}; {mask}; the far target is {c['far_target']:g} m.")
    lines += [
        f"- Evaluation: {report['protocol_text']}.",
        ("- Spread: " + (f"mean ± sample standard deviation over {len(seeds)} seeds." if len(seeds) > 1 else
                         "one seed, so no spread is available; treat small differences as possibly seed noise.")),
        "- Training time per run: " + "; ".join(
            f"{a} " + ", ".join(f"seed {r['seed']} {_fmt_time(r['train_seconds'])}" + (" (reused)" if r["skipped"] else "")
                                for r in arm["runs"]) for a, arm in report["arms"].items()) + ".",
        "",
        f"## Near range (≤ {EVAL_MAX_DEPTH:g} m)",
        "",
        _table(report, NEAR_COLUMNS),
        "",
        "## abs_rel per depth bin",
        "",
        _table(report, BIN_COLUMNS),
        "",
        *([f"![abs_rel per depth bin]({rel['bins']})", ""] if "bins" in rel else []),
        "## Phantom rate",
        "",
        f"Share of validation pixels whose ground truth is sky or beyond {EVAL_MAX_DEPTH:g} m but whose prediction is "
        f"within {EVAL_MAX_DEPTH:g} m (points that land in front of the camera in a point cloud), pooled over pixels.",
        "",
        _table(report, PHANTOM_COLUMNS),
        "",
        "## What the numbers say",
        "",
        *[f"- {s}" for s in report["summary"]],
        "",
        "## Example predictions",
        "",
    ]
    if "examples" in rel:
        lines += [f"Seed {seeds[0]}; columns: rgb, ground truth (sky and beyond range at the top colour), then each arm; "
                  "one fixed colour range for every panel.", "", f"![example predictions]({rel['examples']})", ""]
    else:
        lines += ["No validation sample could be read for examples.", ""]
    lines += ["## Top-down point clouds", ""]
    if "topdown" in rel:
        lines += [f"One validation frame, seed {seeds[0]}, point filters off so phantom points show (red: ground truth sky "
                  f"or beyond {EVAL_MAX_DEPTH:g} m, predicted within it; other points in image colour); the dashed line "
                  f"is {EVAL_MAX_DEPTH:g} m. Points beyond {c['topdown_range']:g} m are counted in each legend.",
                  "", f"![top-down views]({rel['topdown']})", ""]
    else:
        lines += ["No validation sample could be read for the top-down views.", ""]
    return "\n".join(lines)
