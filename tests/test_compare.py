"""`curriculum compare`: strict config, arm schedules, a tiny end-to-end comparison and its report."""
import json
import math
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from conftest import assert_each_override_loads_or_fails_in_one_line, read_metrics
from curriculum.cli import main as cli_main
from curriculum.compare import arm_recipe, arm_stages, load_compare
from curriculum.config import RECIPES_DIR, RecipeError, to_plain


def _compare_file(tmp_path, tiny_shards, **extra):
    train_dir, val_dir, _, _ = tiny_shards
    lines = [
        "name: tiny",
        "recipes: [smoke.yaml]",
        f"overrides: ['data.train_shards={train_dir}/*.tar', 'data.val_shards={val_dir}/*.tar']",
        f"out_dir: {tmp_path / 'cmp'}",
        "total_steps: 4",
        "stage1_fraction: 0.5",
        "seeds: [0]",
        "examples: 1",
        "eval_batch_size: 2",
    ] + [f"{k}: {v}" for k, v in extra.items()]
    path = tmp_path / "compare.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_shipped_compare_recipes_load(tmp_path):
    for name in ("compare.yaml", "compare_gpu.yaml"):
        c = load_compare([RECIPES_DIR / name], [f"out_dir={tmp_path / name}"])
        assert c["arms"] == ["A", "B", "C"]
        for arm in c["arms"]:
            assert sum(s["steps"] for s in arm_stages(c, arm)) == c["total_steps"]
            recipe = to_plain(arm_recipe(c, arm, c["seeds"][0]))  # a valid training recipe
            assert recipe["trainer"]["devices"] == 1
        assert not (tmp_path / name).exists()
    gpu = to_plain(arm_recipe(load_compare([RECIPES_DIR / "compare_gpu.yaml"]), "A", 0))
    assert gpu["model"]["encoder"] == "vits" and gpu["data"]["crop_height"] == 518
    assert len(load_compare([RECIPES_DIR / "compare_gpu.yaml"])["seeds"]) == 3


def test_unknown_keys_and_owned_overrides_are_one_line_errors(tmp_path, tiny_shards):
    path = _compare_file(tmp_path, tiny_shards, total_step=5)
    with pytest.raises(RecipeError, match=r"unknown key 'total_step' \(did you mean 'total_steps'\?\)"):
        load_compare([path])
    path = _compare_file(tmp_path, tiny_shards)
    with pytest.raises(RecipeError, match=r"unknown key 'seed' \(did you mean 'seeds'\?\)"):
        load_compare([path], ["seed=[1]"])
    with pytest.raises(RecipeError, match="'stages.1.policy.far_weight' is set by the comparison"):
        load_compare([path], ["train.stages.1.policy.far_weight=0.3"])
    with pytest.raises(RecipeError, match="stage1_fraction"):
        load_compare([path], ["stage1_fraction=1.0"])
    # an unknown training-recipe key fails before any training, naming the key
    c = load_compare([path], ["train.optim.learning_rate=0.1"])
    with pytest.raises(RecipeError, match="optim.learning_rate"):
        arm_recipe(c, "A", 0)


def test_compare_overrides_are_typed_and_unparsable_ones_are_one_line(tmp_path, tiny_shards):
    import warnings

    path = _compare_file(tmp_path, tiny_shards)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # omegaconf's implicit int -> float and int -> str warn
        c = load_compare([path], ["far_target=700", "name=2026", "train.run.name=x"])
    assert c["far_target"] == 700.0 and isinstance(c["far_target"], float) and c["name"] == "2026"
    assert c["overrides"][-1] == "run.name=x"
    for text in ("far_target=[1", "name=a: b"):
        with pytest.raises(RecipeError) as e:
            load_compare([path], [text])
        assert str(e.value) == f"command line: cannot parse the value of '{text}' ({'ParserError' if '[' in text else 'ScannerError'})"


def test_arms_differ_only_in_their_stage_schedule(tmp_path, tiny_shards):
    c = load_compare([_compare_file(tmp_path, tiny_shards)], ["total_steps=10", "stage1_fraction=0.3",
                                                              "mixed_far_weight=0.2", "train.optim.lr=0.002"])
    recipes = {arm: to_plain(arm_recipe(c, arm, 0)) for arm in "ABC"}
    a, b, cc = (recipes[x]["stages"] for x in "ABC")
    assert [s["steps"] for s in a] == [10] and a[0]["policy"] == {"name": "max_depth", "max_depth": 80.0}
    assert [s["steps"] for s in b] == [s["steps"] for s in cc] == [3, 7]  # same switch step
    assert b[0]["policy"]["name"] == cc[0]["policy"]["name"] == "unclipped"
    assert b[1]["policy"]["name"] == "max_depth"
    assert cc[1]["policy"] == {"name": "mixed", "max_depth": 80.0, "far_weight": 0.2, "far_target": 655.35}
    for arm, r in recipes.items():
        r = dict(r)
        assert r["optim"]["lr"] == 0.002 and r["run"]["seed"] == 0
        assert r["run"]["out_dir"].endswith(f"cmp/{arm}/seed0")
        r.pop("stages"), r.pop("run")
        ref = dict(recipes["A"])
        ref.pop("stages"), ref.pop("run")
        assert r == ref, arm


def test_tiny_compare_writes_the_full_report(tmp_path, tiny_shards, capsys):
    path = _compare_file(tmp_path, tiny_shards)
    rc = cli_main(["compare", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "run 1/3: arm A" in out and "run 3/3: arm C" in out and "training ETA" in out
    # the console table's columns say their range: near-range metrics, then the phantom rate
    assert "| arm | near d1 ↑ | near abs_rel ↓ | near rmse [m] ↓ | phantom rate ↓ |" in out
    folder = tmp_path / "cmp"
    md = (folder / "report.md").read_text()
    for heading in ("## Protocol", "## Near range (≤ 80 m)", "## abs_rel per depth bin", "## Phantom rate",
                    "## What the numbers say", "## Example predictions", "## Top-down point clouds"):
        assert heading in md, heading
    for row in ("| A baseline |", "| B curriculum |", "| C mixed |"):
        assert md.count(row) == 3, row  # near, per-bin and phantom tables
    assert "one seed, so no spread is available" in md
    assert "protocol synthetic" in md
    for name in ("abs_rel_per_bin.png", "examples.png", "topdown.png"):
        assert f"]({name})" in md
        with Image.open(folder / name) as img:
            img.load()
            assert img.format == "PNG" and img.width > 200 and img.height > 100
    report = json.loads((folder / "report.json").read_text())
    assert set(report["arms"]) == {"A", "B", "C"}
    assert [s["steps"] for s in report["arms"]["B"]["stages"]] == [2, 2]
    assert report["example_keys"] and len(report["example_keys"]) == 1
    # the table shows the numbers of report.json
    mean = report["arms"]["B"]["mean"]
    row = next(line for line in md.splitlines() if line.startswith("| B curriculum |") and "|" in line)
    assert f"{mean['near/d1']:.4f}" in row and f"{mean['near/abs_rel']:.4f}" in row
    # the summary names an arm with the lowest phantom rate, computed from the numbers
    rates = {a: d["mean"]["phantom_rate"] for a, d in report["arms"].items()}
    best = min(rates, key=rates.get)
    assert any(s.startswith(f"Lowest phantom rate: {best} ") for s in report["summary"])

    # the same numbers as evaluating the checkpoint on its own
    from curriculum.evaluate import evaluate

    train_dir, val_dir, _, _ = tiny_shards
    for arm in ("A", "C"):
        ckpt = folder / arm / "seed0" / "checkpoints" / "last.ckpt"
        alone = evaluate(str(ckpt), f"{val_dir}/*.tar", "synthetic", batch_size=2, progress=False)
        assert report["arms"][arm]["runs"][0]["metrics"] == json.loads(json.dumps(alone["metrics"]))
        for key, value in alone["metrics"].items():
            if value is not None:
                assert report["arms"][arm]["mean"][key] == pytest.approx(value, rel=1e-12)

    # a second run reuses every finished arm
    mtime = (folder / "A" / "seed0" / "checkpoints" / "last.ckpt").stat().st_mtime
    rc = cli_main(["compare", str(path)])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("finished checkpoint exists") == 3
    assert (folder / "A" / "seed0" / "checkpoints" / "last.ckpt").stat().st_mtime == mtime
    again = json.loads((folder / "report.json").read_text())
    assert again["arms"]["B"]["mean"] == report["arms"]["B"]["mean"]
    # ... but not one of a different training recipe, found before any arm trains
    mtimes = {arm: (folder / arm / "seed0" / "checkpoints" / "last.ckpt").stat().st_mtime for arm in "ABC"}
    rc = cli_main(["compare", str(path), "total_steps=6", "seeds=[5,0]"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds a run of a different training recipe" in err and len(err.strip().splitlines()) == 1
    assert not (folder / "A" / "seed5").exists()
    # evaluation and logging settings do not change how an arm trains: the arms are reused
    rc = cli_main(["compare", str(path), "train.trainer.log_every_steps=3", "name=renamed"])
    assert rc == 0 and capsys.readouterr().out.count("finished checkpoint exists") == 3
    assert {arm: (folder / arm / "seed0" / "checkpoints" / "last.ckpt").stat().st_mtime for arm in "ABC"} == mtimes
    # ... and a new input size reaches the reused arms' evaluation (not only the report's heading)
    rc = cli_main(["compare", str(path), "train.data.val_height=56", "train.data.val_width=112"])
    assert rc == 0 and capsys.readouterr().out.count("finished checkpoint exists") == 3
    resized = json.loads((folder / "report.json").read_text())
    assert resized["input_size"] == [56, 112]
    for arm in "ABC":
        assert json.loads((folder / arm / "seed0" / "eval.json").read_text())["input_size"] == [56, 112]


def test_arms_trained_on_other_shards_are_not_reused(tmp_path, tiny_shards, capsys):
    path = _compare_file(tmp_path, tiny_shards, arms="[A]")
    assert cli_main(["compare", str(path)]) == 0
    train_dir = tiny_shards[0]
    shard = sorted(train_dir.glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes())  # regenerated data: same name, a new modification time
    capsys.readouterr()
    rc = cli_main(["compare", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "was trained on other shards" in err and len(err.strip().splitlines()) == 1


def _killed_at_step_2():
    """A callback that saves last.ckpt at step 2 and dies there, once: a run killed after a checkpoint."""
    import lightning.pytorch as pl

    class KilledAtStep2(pl.Callback):
        fired = False

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2 and not self.fired:
                self.fired = True
                trainer.save_checkpoint(trainer.default_root_dir + "/checkpoints/last.ckpt")
                raise RuntimeError("killed")

    return KilledAtStep2()


def test_an_interrupted_arm_resumes_from_its_last_checkpoint(tmp_path, tiny_shards, capsys, add_callback):
    """A run killed after a checkpoint (last.ckpt, no done.json) continues from it, not from step 0."""
    from curriculum.compare import run_compare

    add_callback(_killed_at_step_2())
    c = load_compare([_compare_file(tmp_path, tiny_shards, arms="[A]")], ["total_steps=6"])
    with pytest.raises(RuntimeError, match="killed"):
        run_compare(c)
    folder = tmp_path / "cmp" / "A" / "seed0"
    assert (folder / "checkpoints" / "last.ckpt").is_file() and not (folder / "done.json").exists()
    logged = []
    run_compare(c, log=logged.append)
    assert any("resuming the interrupted run" in line for line in logged)
    done = json.loads((folder / "done.json").read_text())
    assert done["global_step"] == 6 and done["recipe"]["resume"] == ""
    steps = [int(r["step"]) for r in read_metrics(folder) if r.get("train/loss")]
    assert steps == sorted(set(steps)) and max(steps) == 6  # one row per step: resumed, not restarted


def test_a_resumed_arm_counts_every_attempts_time_and_its_data_is_checked(tmp_path, tiny_shards, add_callback,
                                                                          monkeypatch):
    """The report's training time of a resumed arm is the sum of its attempts (it was the last
    one's), and an interrupted arm is not resumed on training shards that changed since."""
    from curriculum import compare as compare_mod
    from curriculum.compare import run_compare

    import time
    import types

    clock = iter(range(0, 10_000, 100))  # each reading of compare's clock 100 s after the last
    monkeypatch.setattr(compare_mod, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock)),
                                                                   time=time.time))
    add_callback(_killed_at_step_2())
    c = load_compare([_compare_file(tmp_path, tiny_shards, arms="[A]")], ["total_steps=6"])
    with pytest.raises(RuntimeError, match="killed"):
        run_compare(c)
    folder = tmp_path / "cmp" / "A" / "seed0"
    first = json.loads((folder / "attempts.json").read_text())
    assert first["seconds"] == 100.0 and first["train_shards"]
    # the training shards change before the resume: refused, like a finished arm's
    train_dir, _, _, _ = tiny_shards
    shard = sorted(train_dir.glob("*.tar"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with pytest.raises(RecipeError, match="was trained on other shards"):
        run_compare(c)
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns - 10**9))
    run_compare(c)
    done = json.loads((folder / "done.json").read_text())
    assert done["train_seconds"] == 200.0 and not (folder / "attempts.json").exists()


def test_an_arm_stopped_before_its_first_checkpoint_starts_again(tmp_path, tiny_shards, add_callback):
    """A signal stops the comparison with the advice to run it again; a run that left only its
    metrics.csv (killed before its first checkpoint) is trained from the start, not refused."""
    import os
    import signal

    import lightning.pytorch as pl

    from curriculum.compare import run_compare
    from curriculum.faults import RunInterrupted

    class SignalAtStep1(pl.Callback):
        fired = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1 and not SignalAtStep1.fired:
                SignalAtStep1.fired = True
                os.kill(os.getpid(), signal.SIGINT)

    add_callback(SignalAtStep1())
    c = load_compare([_compare_file(tmp_path, tiny_shards, arms="[A]")], ["total_steps=4"])
    logged = []
    with pytest.raises(RunInterrupted):
        run_compare(c, log=logged.append)
    assert "run the same compare command again to continue" in logged[-1]
    folder = tmp_path / "cmp" / "A" / "seed0"
    (folder / "checkpoints" / "last.ckpt").unlink()  # as if killed before its first checkpoint
    assert (folder / "metrics.csv").is_file()
    run_compare(c, log=logged.append)
    assert json.loads((folder / "done.json").read_text())["global_step"] == 4
    steps = [int(r["step"]) for r in read_metrics(folder) if r.get("train/loss")]
    assert steps == [1, 2, 3, 4]  # started again: the old run's rows are gone


def test_bad_protocol_device_and_targets_fail_before_training(tmp_path, tiny_shards):
    path = _compare_file(tmp_path, tiny_shards)
    for override, message in (("protocol=bogus", "protocol: unknown evaluation protocol 'bogus'"),
                              ("device=tpu", "device: 'tpu' is not"),
                              ("far_target=10", "far_target: the sky's target (10 m) must lie beyond max_depth"),
                              ("rewarm_steps=100", "rewarm_steps: must be between 0 and stage 2's 2 steps"),
                              ("examples=0", "examples: must be positive")):
        with pytest.raises(RecipeError, match=re.escape(message)):
            load_compare([path], [override])
    assert not (tmp_path / "cmp").exists()


def test_summary_uses_the_spread_over_seeds():
    from curriculum.compare import render_markdown, summarize

    def arm(name, abs_rel, sd, phantom):
        return {"name": name, "description": name, "stages": [{"name": "s", "steps": 4, "policy": {"name": "max_depth"}}],
                "runs": [{"seed": 0, "train_seconds": 1.0, "skipped": False}],
                "mean": {"near/abs_rel": abs_rel, "phantom_rate": phantom, "sky/phantom_rate": phantom,
                         "far/phantom_rate": None, "near/d1": 0.9, "near/rmse": 3.0},
                "std": {"near/abs_rel": sd, "phantom_rate": 0.01, "sky/phantom_rate": 0.01, "far/phantom_rate": None,
                        "near/d1": 0.01, "near/rmse": 0.1}}

    report = {"config": {"seeds": [0, 1, 2], "near_tolerance": 0.05, "arms": ["A", "B"], "out_dir": ".",
                         "name": "t", "overrides": [], "total_steps": 4, "stage1_fraction": 0.5, "max_depth": 80.0, "far_target": 655.35,
                         "topdown_range": 100.0},
              "arms": {"A": arm("baseline", 0.100, 0.002, 0.90), "B": arm("curriculum", 0.103, 0.002, 0.30)}}
    lines = summarize(report)
    text = "\n".join(lines)
    assert "B curriculum near abs_rel 0.1030 vs A 0.1000: +0.0030 (+3.00%), within the 5.0 % tolerance of A" in text
    assert "Lowest phantom rate: B curriculum (30.0 %), 60.0 percentage points below A (90.0 %), 67% fewer" in text
    assert "the difference is larger than the two arms' seed standard deviations added" in text
    assert "Means over 3 seeds" in text
    # 0.0030 apart with standard deviations 0.0020 + 0.0020: within the spread, said as such
    assert ("B curriculum near abs_rel 0.1030 vs A 0.1000: +0.0030 (+3.00%), within the 5.0 % tolerance of A "
            "(the difference is smaller than the two arms' seed standard deviations added, 0.0040).") in lines
    # a rate's difference is in percentage points, and so is its spread (it read 0.0200 beside 60.0 points)
    assert ("60.0 percentage points below A (90.0 %), 67% fewer phantom pixels (the difference is larger than the "
            "two arms' seed standard deviations added, 2.0 percentage points).") in text
    two = {**report, "config": {**report["config"], "seeds": [0, 1]}}
    text2 = "\n".join(summarize(two))
    assert "Means over 2 seeds; ± is the sample standard deviation over seeds." in text2
    assert "the difference is smaller than the two arms' seed standard deviations added, 0.0040" in text2
    assert "One seed only" not in text2
    assert "No validation pixel for the far (finite > 80 m) phantom rate" in text
    # equal as printed: a tie, not a winner
    tie = {**report, "arms": {"A": arm("baseline", 0.100, 0.002, 1.0), "B": arm("curriculum", 0.10004, 0.002, 0.99999)}}
    text = "\n".join(summarize(tie))
    assert "Lowest phantom rate: a tie of all arms (100.0 %)." in text
    assert "Lowest near-range abs_rel (≤ 80 m): a tie of all arms (0.1000)." in text
    # decided on the printed percentage: 20.25 % prints as 20.2 %, as does 20.249 %
    edge = {**report, "arms": {"A": arm("baseline", 0.1, 0.002, 0.2025), "B": arm("curriculum", 0.1, 0.002, 0.20249)}}
    assert "Lowest phantom rate: a tie of all arms (20.2 %)." in "\n".join(summarize(edge))
    edge["arms"]["B"] = arm("curriculum", 0.1, 0.002, 0.20251)  # 20.3 %: A is lowest as printed
    assert "Lowest phantom rate: A baseline (20.2 %); the others: B 20.3 %." in "\n".join(summarize(edge))
    edge["arms"] = {"A": arm("baseline", 0.1, 0.002, 0.20251), "B": arm("curriculum", 0.1, 0.002, 0.2025)}
    assert ("Lowest phantom rate: B curriculum (20.2 %), 0.1 percentage points below A (20.3 %), 0% fewer"
            in "\n".join(summarize(edge)))
    three = {**report, "arms": {**tie["arms"], "C": arm("mixed", 0.2, 0.002, 0.5)}}
    three["config"] = {**report["config"], "arms": ["A", "B", "C"]}
    text = "\n".join(summarize(three))
    assert "Lowest near-range abs_rel (≤ 80 m): a tie of A baseline and B curriculum (0.1000)." in text
    assert "Lowest phantom rate: C mixed (50.0 %), 50.0 percentage points below A (100.0 %)" in text
    report.update(summary=lines, recipe_files=["demo.yaml"], protocol_text="protocol synthetic", train_shards="t",
                  val_shards="v", images=4, input_size=[42, 84])
    recipe = {"data": {"batch_size": 2, "crop_height": 42, "crop_width": 84},
              "model": {"encoder": "tiny", "head": "log", "min_depth": 0.1, "max_depth": 1000.0, "pretrained": ""},
              "optim": {"lr": 1e-3, "head_lr_mult": 10.0, "warmup_steps": 0, "poly_power": 0.9}}
    md = render_markdown(report, {}, recipe)
    assert "0.1000 ± 0.0020" in md and "mean ± sample standard deviation over 3 seeds" in md
    assert re.search(r"\| B curriculum \| 0\.9000 ± 0\.0100 \| 0\.1030 ± 0\.0020", md)
    assert "B and C switch at step 2; the mask keeps depths up to 80 m; the far target is 655.35 m." in md
    report["config"]["max_depth"] = 50.0  # another mask: evaluation's split stays where it is, and says so
    md = render_markdown(report, {}, recipe)
    assert "the mask keeps depths up to 50 m (evaluation still splits near and far at 80 m)" in md


def test_stats_use_the_sample_standard_deviation_and_skip_missing_values():
    from curriculum.compare import _stats

    assert _stats([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    mean, std = _stats([1.0, float("nan"), 3.0])
    assert mean == 2.0 and std == pytest.approx(math.sqrt(2))
    assert _stats([1.0, None, 3.0])[0] == 2.0


def test_arm_b_starts_unclipped_and_only_its_second_stage_rewarms(tmp_path, tiny_shards):
    c = load_compare([_compare_file(tmp_path, tiny_shards)], ["total_steps=10", "rewarm_steps=2"])
    a, b = arm_stages(c, "A"), arm_stages(c, "B")
    assert b[0]["policy"] == {"name": "unclipped", "far_target": 655.35}
    assert [s["rewarm_steps"] for s in a] == [0]
    assert [s["rewarm_steps"] for s in b] == [0, 2]
    assert [s["rewarm_steps"] for s in arm_stages(c, "C")] == [0, 2]


def test_stage1_steps_rounds_the_fraction():
    from curriculum.compare import stage1_steps

    assert stage1_steps({"total_steps": 10, "stage1_fraction": 0.37}) == 4
    assert stage1_steps({"total_steps": 10, "stage1_fraction": 0.33}) == 3


@pytest.mark.parametrize("overrides, message", [
    (["train.run.seed=5"], "overrides: 'run.seed' is set by the comparison"),
    (["total_steps=2", "stage1_fraction=0.9"], "stage1_fraction 0.9 of 2 steps leaves a stage empty"),
    (["seeds=[0,0]"], "seeds: duplicate seed in [0, 0]"),
    (["arms=[A,D]"], "arms: a non-empty list of distinct arms from ['A', 'B', 'C'], got ['A', 'D']"),
    (["near_tolerance=-1.0"], "near_tolerance: must be a positive number, got -1.0"),
    (["far_target=80.0"], "far_target: the sky's target (80 m) must lie beyond max_depth (80 m)"),
    (["device=cuda:x"], "device: 'cuda:x' is not '', cpu, cuda or cuda:N"),
])
def test_compare_config_refusals(tmp_path, tiny_shards, overrides, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_compare([_compare_file(tmp_path, tiny_shards)], overrides)


def test_compare_config_edge_values_are_accepted(tmp_path, tiny_shards):
    path = _compare_file(tmp_path, tiny_shards)
    assert load_compare([path], ["mixed_far_weight=0.0"])["mixed_far_weight"] == 0
    c = load_compare([path], ["total_steps=10", "rewarm_steps=5"])  # stage 2 holds exactly 5 steps
    assert arm_stages(c, "B")[1] == {**arm_stages(c, "B")[1], "steps": 5, "rewarm_steps": 5}


@pytest.mark.parametrize("overrides, message", [
    (["train.trainer.devices=2"], "the comparison trains every arm on one device"),
    (["train.model.max_depth=80", "max_depth=80.0", "arms=[A]"],
     "max_depth: the mask's 80 m must lie within the model's range (model.max_depth 80 m)"),
])
def test_run_compare_refuses_before_training(tmp_path, tiny_shards, monkeypatch, overrides, message):
    import curriculum.train
    from curriculum.compare import run_compare

    def no_training(cfg):
        raise AssertionError("trained")

    monkeypatch.setattr(curriculum.train, "train", no_training)
    c = load_compare([_compare_file(tmp_path, tiny_shards)], overrides)
    with pytest.raises(RecipeError, match=re.escape(message)):
        run_compare(c, log=lambda *_: None)
    assert not (tmp_path / "cmp").exists()


def test_first_difference_sees_lists_of_other_lengths():
    from curriculum.compare import _first_difference

    assert _first_difference({"x": [1, 2]}, {"x": [1, 2]}) is None
    assert _first_difference({"x": [1, 2]}, {"x": [1, 2, 3]}) is not None


def test_an_arm_that_stopped_early_is_not_recorded_as_done(tmp_path, tiny_shards, monkeypatch):
    import curriculum.train
    from curriculum.compare import CompareError, _train_one

    monkeypatch.setattr(curriculum.train, "train", lambda cfg: {"global_step": 3, "switches": []})
    c = load_compare([_compare_file(tmp_path, tiny_shards, arms="[A]")], ["total_steps=4"])
    cfg = arm_recipe(c, "A", 0)
    with pytest.raises(CompareError, match="A seed 0 stopped at step 3 of 4"):
        _train_one(c, "A", 0, cfg, ("new", None), lambda *_: None)
    assert not (tmp_path / "cmp" / "A" / "seed0" / "done.json").exists()


def test_each_seed_is_evaluated_on_its_own_checkpoint_and_averaged(tmp_path, tiny_shards, monkeypatch):
    """Two seeds of one arm, training and evaluation replaced: the arm's mean and sample std are
    over both seeds, and each seed's metrics come from its own checkpoint."""
    import curriculum.compare as compare
    import curriculum.evaluate
    import curriculum.train
    from curriculum.compare import run_compare

    def fake_train(cfg):
        final = Path(cfg.run.out_dir) / "checkpoints" / "last.ckpt"
        final.parent.mkdir(parents=True, exist_ok=True)
        final.write_text(str(cfg.run.seed))  # which seed trained it
        return {"global_step": 4, "switches": [[0, "stage1"]]}

    def fake_evaluate(ckpt, *args, **kwargs):
        seed = int(Path(ckpt).read_text())
        return {"protocol_text": "protocol synthetic", "input_size": [28, 56], "model": {}, "checkpoint": str(ckpt),
                "metrics": {"images": 6, "near/abs_rel": 0.1 + 0.2 * seed, "phantom_rate": 0.5 - 0.1 * seed}}

    monkeypatch.setattr(curriculum.train, "train", fake_train)
    monkeypatch.setattr(curriculum.evaluate, "evaluate", fake_evaluate)
    monkeypatch.setattr(compare, "make_figures", lambda *a, **k: {})
    c = load_compare([_compare_file(tmp_path, tiny_shards, arms="[A]")], ["total_steps=4", "seeds=[0, 1]"])
    report = run_compare(c, log=lambda *_: None)["data"]
    arm = report["arms"]["A"]
    assert [r["metrics"]["near/abs_rel"] for r in arm["runs"]] == pytest.approx([0.1, 0.3])
    assert arm["mean"]["near/abs_rel"] == pytest.approx(0.2)
    assert arm["std"]["near/abs_rel"] == pytest.approx(math.sqrt(0.02))  # sample std of 0.1 and 0.3
    assert arm["mean"]["phantom_rate"] == pytest.approx(0.45)


@pytest.mark.parametrize("key", ["name", "recipes", "total_steps", "far_target", "seeds", "arms", "train.run.name"])
def test_any_compare_override_loads_or_is_one_line_without_warnings(key):
    """Whatever follows key= ends in a comparison config or one RecipeError line: no traceback
    (an unresolved ${...} or a ??? used to surface as omegaconf's or a comparison's TypeError),
    and no library warning (omegaconf converting arms=[1] to text)."""
    assert_each_override_loads_or_fails_in_one_line(lambda o: load_compare([RECIPES_DIR / "compare.yaml"], o), key)


@pytest.mark.parametrize("text,message", [("arms: {a: 1}\n", "key 'arms': Cannot merge incompatible container types"),
                                          ("seeds: x\n", "key 'seeds': "),
                                          ("total_steps: abc\n", "key 'total_steps': Value 'abc'")])
def test_a_compare_file_of_the_wrong_shape_is_one_line_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_compare([RECIPES_DIR / "compare.yaml", path])
    assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value)


def test_example_samples_are_read_as_evaluation_reads_them(tmp_path, tiny_shards):
    """The report's example pictures read the validation shards as evaluation does: pipe: shards,
    a sample missing its depth and a truncated shard are read or skipped, not the end of the
    comparison after every arm has trained."""
    import io
    import tarfile

    from curriculum.compare import read_samples
    from curriculum.data import expand_shards

    _, val_dir, _, _ = tiny_shards
    shards = expand_shards(f"{val_dir}/*.tar")
    every = [s["key"] for s in read_samples(shards, 100)]
    assert len(every) >= 2
    assert [s["key"] for s in read_samples([f"pipe:cat {u}" for u in shards], 2)] == every[:2]
    # the first sample without its depth.png, then the first shard cut short
    with tarfile.open(shards[0]) as src, tarfile.open(tmp_path / "nodepth.tar", "w") as dst:
        first = None
        for m in src:
            first = first or m.name.split(".")[0]
            if not (m.name.startswith(first) and m.name.endswith("depth.png")):
                dst.addfile(m, io.BytesIO(src.extractfile(m).read()))
    assert [s["key"] for s in read_samples([str(tmp_path / "nodepth.tar"), *shards[1:]], 100)] == every[1:]
    data = Path(shards[0]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    got = [s["key"] for s in read_samples([str(tmp_path / "cut.tar")], 100)]
    assert got and got == every[: len(got)] and len(got) < len(read_samples(shards[:1], 100))
