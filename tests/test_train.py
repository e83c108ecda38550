"""End-to-end training on tiny shards: stages, init, resume, checkpoints, logging."""
import csv
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import numpy as np
import torch

from conftest import read_metrics
from curriculum.callbacks import CurriculumCallback
from curriculum.checkpoint import (
    CheckpointError, build_metadata, check_same_model, file_sha256, load_model, metadata, model_state, read_checkpoint,
    taught_far_target,
)
from curriculum.cli import main as cli_main
from curriculum.config import RECIPES_DIR, load_recipe, to_plain
from curriculum.data import DataError
from curriculum.masks import build_policy
from curriculum.model import DepthModel
from curriculum.train import SetupError, data_seed, train


def _recipe(tiny_shards, out, *extra, files=("smoke.yaml",)):
    train_dir, val_dir, _, _ = tiny_shards
    overrides = [f"data.train_shards={train_dir}/*.tar", f"data.val_shards={val_dir}/*.tar",
                 f"run.out_dir={out}", *extra]
    return load_recipe([RECIPES_DIR / f for f in files], overrides)


def test_curriculum_switches_policy_at_the_exact_step(tiny_shards, tmp_path, capsys):
    result = train(_recipe(tiny_shards, tmp_path / "run", "stages.0.steps=3", "stages.1.steps=2",
                           "trainer.progress=false"))
    assert result["global_step"] == 5
    assert result["switches"] == [(0, "pretrain"), (3, "finetune")]
    rows = [r for r in read_metrics(tmp_path / "run") if r.get("curriculum/stage")]
    stage_at = {int(r["step"]): float(r["curriculum/stage"]) for r in rows}
    assert [stage_at[s] for s in range(1, 6)] == [0, 0, 0, 1, 1]  # a row's step: the steps taken
    # the policy's far weight says where in the curriculum a run stands, across the runs of a group too
    far_weight_at = {int(r["step"]): float(r["curriculum/far_weight"]) for r in rows}
    assert [far_weight_at[s] for s in range(1, 6)] == [1, 1, 1, 0, 0]
    out = capsys.readouterr().out  # each switch on the console, with the progress bar off as well
    assert "step 0: stage 'pretrain', mask policy unclipped (" in out
    assert "step 3: stage 'finetune', mask policy max_depth (min_depth=0.001, max_depth=80)" in out
    assert {r["epoch"] for r in rows} == {"0"}  # counts read as counts
    ckpt = read_checkpoint(result["checkpoint"])  # weights_only=True
    meta = ckpt["curriculum"]
    assert meta["stage"] == "finetune" and meta["policy"]["name"] == "max_depth"
    assert meta["model"]["head"] == "log" and meta["model"]["max_depth"] == 1000.0
    assert meta["schema_version"] == 1 and meta["recipe"]["stages"][1]["name"] == "finetune"
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    val_rows = [r for r in read_metrics(tmp_path / "run") if r.get("val/images")]
    assert val_rows and float(val_rows[-1]["val/images"]) == 6
    assert any(k.startswith("val/near/") for k in val_rows[-1]) and "val/phantom_rate" in val_rows[-1]


def test_a_run_shorter_than_the_logging_interval_logs_its_last_step(tiny_shards, tmp_path):
    train(_recipe(tiny_shards, tmp_path / "run", "stages.0.steps=2", "stages.1.steps=1", "trainer.log_every_steps=50"))
    assert [int(r["step"]) for r in read_metrics(tmp_path / "run") if r.get("train/loss")] == [3]


def test_device_resize_trains(tiny_shards, tmp_path):
    """data.device_resize: crops of several sizes cross unresized and DepthModule finishes them."""
    result = train(_recipe(tiny_shards, tmp_path / "run", "stages.0.steps=2", "stages.1.steps=1",
                           "data.device_resize=true", "data.scale_jitter=0.4", "data.num_workers=1"))
    assert result["global_step"] == 3
    losses = [float(r["train/loss"]) for r in read_metrics(tmp_path / "run") if r.get("train/loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_the_final_validation_row_carries_the_epoch_of_the_last_step(tiny_shards, tmp_path):
    """6 steps of an 8-batch epoch: the validation after fit is logged at epoch 0, as the step it
    measures (Lightning's epoch count has moved on to 1 by then)."""
    result = train(_recipe(tiny_shards, tmp_path / "run", "stages.0.steps=3", "stages.1.steps=3"))
    rows = read_metrics(tmp_path / "run")
    val = [r for r in rows if r.get("val/near/abs_rel")]
    assert result["global_step"] == 6 and [(r["step"], r["epoch"]) for r in val] == [("6", "0")]
    assert {r["epoch"] for r in rows if r.get("train/loss")} == {"0"}


def test_stage_two_starts_from_stage_one_weights_with_fresh_optimizer(tiny_shards, tmp_path):
    pre = train(_recipe(tiny_shards, tmp_path / "pre", "stages.0.steps=3", files=("smoke.yaml", "pretrain.yaml")))
    pre_ckpt = read_checkpoint(pre["checkpoint"])
    cfg = _recipe(tiny_shards, tmp_path / "fine", f"init_from={pre['checkpoint']}", "stages.0.steps=2",
                  files=("smoke.yaml", "finetune.yaml"))
    from curriculum.config import to_plain
    from curriculum.module import DepthModule
    from curriculum.train import init_from_checkpoint

    module = DepthModule(to_plain(cfg))
    lineage = init_from_checkpoint(module, pre["checkpoint"], to_plain(cfg))
    for k, v in model_state(pre_ckpt).items():
        assert torch.equal(module.model.state_dict()[k], v), k
    assert len(lineage["init_from_sha256"]) == 64
    fine = train(cfg)
    assert fine["global_step"] == 2  # fresh step counter, not a resume of stage 1
    ckpt = read_checkpoint(fine["checkpoint"])
    assert ckpt["curriculum"]["init_from"] == pre["checkpoint"]
    assert ckpt["curriculum"]["init_from_sha256"] == lineage["init_from_sha256"]
    assert ckpt["curriculum"]["parent_stage"] == "pretrain"
    # the sky was taught in stage 1, so predict's --drop-sky still starts at half its far target
    assert taught_far_target(ckpt["curriculum"]) == taught_far_target(pre_ckpt["curriculum"]) == 655.35
    assert ckpt["curriculum"]["recipe"]["logging"]["parent_checkpoint_sha256"] == lineage["init_from_sha256"]
    # stage 2 counts steps from 0 again: its data stream is seeded apart from stage 1's, which it
    # would otherwise replay batch for batch
    assert pre_ckpt["curriculum"]["data_seed"] == 0
    assert ckpt["curriculum"]["data_seed"] == data_seed(0, lineage) != 0
    # the same parent run gives the same seed, whatever else its file holds (its W&B run id)
    other = dict(pre_ckpt, curriculum=dict(pre_ckpt["curriculum"], wandb_run_id="another"))
    torch.save(other, tmp_path / "parent_copy.ckpt")
    copy_lineage = init_from_checkpoint(DepthModule(to_plain(cfg)), tmp_path / "parent_copy.ckpt", to_plain(cfg))
    assert copy_lineage["init_from_sha256"] != lineage["init_from_sha256"]
    assert data_seed(0, copy_lineage) == data_seed(0, lineage)
    assert data_seed(1, lineage) != data_seed(0, lineage)
    # a resume keeps the seed its checkpoint was drawn with; one recorded before seeds were
    # (no data_seed) was drawn with run.seed
    for recorded, kept in ((12345, 12345), (None, 0)):
        old = dict(ckpt, curriculum={k: v for k, v in ckpt["curriculum"].items() if k != "data_seed"})
        if recorded is not None:
            old["curriculum"]["data_seed"] = recorded
        torch.save(old, tmp_path / "old.ckpt")
        again = train(_recipe(tiny_shards, tmp_path / f"again{recorded}", f"resume={tmp_path / 'old.ckpt'}",
                              "stages.0.steps=2", files=("smoke.yaml", "finetune.yaml")))
        assert read_checkpoint(again["checkpoint"])["curriculum"]["data_seed"] == kept
    # a fresh optimizer: AdamW's step count equals stage 2's steps only
    state = ckpt["optimizer_states"][0]["state"]
    assert all(int(s["step"]) == 2 for s in state.values())


def test_init_from_another_model_is_an_error(tiny_shards, tmp_path):
    pre = train(_recipe(tiny_shards, tmp_path / "pre", "stages.0.steps=1", files=("smoke.yaml", "pretrain.yaml")))
    cfg = _recipe(tiny_shards, tmp_path / "fine", f"init_from={pre['checkpoint']}", "model.head=sigmoid",
                  "model.max_depth=80", files=("smoke.yaml", "finetune.yaml"))
    with pytest.raises(CheckpointError, match=r"head: 'log' in checkpoint vs 'sigmoid' in recipe"):
        train(cfg)


def test_resume_with_another_schedule_is_refused(tiny_shards, tmp_path):
    """A resume continues the run's own schedule: a changed stage (policy, length, re-warm-up) or
    learning-rate curve is one line naming the key, before any training."""
    common = ("stages.0.steps=1", "stages.1.steps=2", "stages.1.rewarm_steps=1")
    ckpt = train(_recipe(tiny_shards, tmp_path / "run", *common))["checkpoint"]
    for change, message in [
        ("stages.1.policy={name: mixed, far_weight: 0.5}", r"stages\.1\.policy is \{.*'mixed'.*\} in the recipe but "
                                                           r"\{.*'max_depth'.*\} in the checkpoint's run"),
        ("stages.1.steps=40", r"stages\.1\.steps is 40 in the recipe but 2 in the checkpoint's run"),
        ("stages.1.rewarm_steps=0", r"stages\.1\.rewarm_steps is 0 in the recipe but 1"),
        ("optim.lr=2e-3", r"optim\.lr is 0\.002 in the recipe but 0\.001 in the checkpoint's run"),
        ("run.seed=5", r"run\.seed is 5 in the recipe but 0 in the checkpoint's run"),
        ("optim.weight_decay=0.5", r"optim\.weight_decay is 0\.5 in the recipe but 0\.01"),
        ("optim.poly_power=2.0", r"optim\.poly_power is 2\.0 in the recipe but 0\.9"),
    ]:
        with pytest.raises(CheckpointError, match=rf"^resume '{ckpt}': {message}.*init_from starts a new stage") as e:
            train(_recipe(tiny_shards, tmp_path / "resumed", *common, change, f"resume={ckpt}"))
        assert "\n" not in str(e.value)


def test_epochs_shorter_than_the_logging_interval_log_at_the_interval(tiny_shards, tmp_path, recwarn):
    """An epoch of 2 batches (16 frames, batch 8) under a 3-step logging interval: rows come every
    3 steps across epochs, and Lightning's notice that the interval exceeds the epoch (which
    counts only within an epoch) stays off the console."""
    train(_recipe(tiny_shards, tmp_path / "run", "data.batch_size=8", "trainer.log_every_steps=3",
                  "stages.0.steps=3", "stages.1.steps=3", "trainer.progress=false"))
    steps = sorted({int(r["step"]) for r in read_metrics(tmp_path / "run") if r.get("train/loss")})
    assert steps == [3, 6]
    assert not [w for w in recwarn if "logging interval" in str(w.message)]


def test_resume_within_a_stage_matches_an_uninterrupted_run(tiny_shards, tmp_path, recwarn):
    common = ("stages.0.steps=3", "stages.1.steps=3", "trainer.ckpt_every_steps=2")
    full = train(_recipe(tiny_shards, tmp_path / "full", *common))
    periodic = _periodic_checkpoint(tiny_shards, tmp_path / "p4")  # a run stopped at step 4, in stage 2
    recwarn.clear()
    resumed = train(_recipe(tiny_shards, tmp_path / "resumed", *common, f"resume={periodic}",
                            "trainer.ckpt_every_steps=3"))
    # resumed into another folder, with another checkpoint interval: Lightning's notes that it
    # will not reload a best-k ranking (there is none, only last.ckpt) stay off the console
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message) or "ckpt_path" in str(w.message)]
    assert resumed["global_step"] == 6
    assert resumed["switches"] == [(0, "pretrain"), (3, "finetune")]
    a = model_state(read_checkpoint(full["checkpoint"]))
    b = model_state(read_checkpoint(resumed["checkpoint"]))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k


def _periodic_checkpoint(tiny_shards, out):
    """Train 4 steps of the 3+3 schedule and keep the checkpoint of step 4."""
    cfg = _recipe(tiny_shards, out, "stages.0.steps=3", "stages.1.steps=3", "trainer.ckpt_every_steps=2")
    from curriculum import train as train_mod

    # stop after step 4 by limiting max_steps through a trainer built from the same recipe
    original = train_mod.build_trainer

    def limited(recipe, out_dir, loggers):
        trainer = original(recipe, out_dir, loggers)
        trainer.fit_loop.epoch_loop.max_steps = 4
        return trainer

    train_mod.build_trainer = limited
    try:
        train_mod.train(cfg)
    finally:
        train_mod.build_trainer = original
    ckpt = Path(out) / "checkpoints" / "last.ckpt"
    assert read_checkpoint(ckpt)["global_step"] == 4
    return ckpt


def test_wandb_offline_logs_are_written(tiny_shards, tmp_path):
    out = tmp_path / "wb"
    result = train(_recipe(tiny_shards, out, "logging.mode=offline", "logging.image_every_steps=2",
                           "stages.0.steps=2", "stages.1.steps=2", "logging.group=exp1"))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and result["wandb_run_id"] and result["wandb_run_id"] in runs[0].name
    assert list(runs[0].glob("*.wandb"))
    media = list(runs[0].glob("files/media/images/**/*.png"))
    assert media, "image panels must reach the W&B run folder"
    panels = list((out / "panels").glob("train_panel_step*.png"))
    assert panels
    from PIL import Image

    for path in (panels[0], *media):  # titled figures with their colour bar, not the bare 4-image strip
        with Image.open(path) as figure:
            assert figure.width >= 1000 and figure.height >= 150, path
    ckpt = read_checkpoint(result["checkpoint"])
    assert ckpt["curriculum"]["wandb_run_id"] == result["wandb_run_id"]
    names = set().union(*(r.keys() for r in read_metrics(out)))
    for name in ("train/loss", "train/valid_fraction", "train/lr_encoder", "train/lr_head", "curriculum/stage",
                 "val/near/abs_rel", "val/near/0_20/abs_rel", "val/sky/phantom_rate", "val/phantom_rate"):
        assert name in names, name


def test_wandb_links_the_stages_of_an_experiment(tiny_shards, tmp_path, monkeypatch):
    """Stage 2's W&B config names stage 1's run and checkpoint; both runs share the group, and
    each run's job type is its stage."""
    from lightning.pytorch.loggers import WandbLogger

    import curriculum.train as train_mod

    made = []

    def recording(*args, **kwargs):
        loggers = make_loggers(*args, **kwargs)
        made.extend(lg._wandb_init for lg in loggers if isinstance(lg, WandbLogger))
        return loggers

    make_loggers = train_mod.make_loggers
    monkeypatch.setattr(train_mod, "make_loggers", recording)
    pre = train(_recipe(tiny_shards, tmp_path / "pre", "stages.0.steps=2", "logging.mode=offline", "logging.group=exp1",
                        files=("smoke.yaml", "pretrain.yaml")))
    fine = train(_recipe(tiny_shards, tmp_path / "fine", "stages.0.steps=1", "logging.mode=offline",
                         f"init_from={pre['checkpoint']}", files=("smoke.yaml", "finetune.yaml")))
    both = train(_recipe(tiny_shards, tmp_path / "both", "stages.0.steps=1", "stages.1.steps=1", "logging.mode=offline"))
    assert [(m["group"], m["job_type"]) for m in made] == [("exp1", "pretrain"), ("exp1", "finetune"),
                                                           ("smoke", "curriculum")]  # run.name
    assert pre["wandb_run_id"] and fine["wandb_run_id"] and both["wandb_run_id"]
    logged = made[1]["config"]["logging"]
    assert logged["parent_run"] == pre["wandb_run_id"]
    assert logged["parent_checkpoint_sha256"] == file_sha256(pre["checkpoint"])
    assert read_checkpoint(fine["checkpoint"])["curriculum"]["recipe"]["logging"]["parent_run"] == pre["wandb_run_id"]


def test_cli_train_and_eval(tiny_shards, tmp_path, capsys):
    train_dir, val_dir, _, _ = tiny_shards
    out = tmp_path / "cli"
    rc = cli_main(["train", str(RECIPES_DIR / "smoke.yaml"), f"data.train_shards={train_dir}/*.tar",
                   f"data.val_shards={val_dir}/*.tar", f"run.out_dir={out}", "stages.0.steps=1", "stages.1.steps=1"])
    assert rc == 0
    ckpt = out / "checkpoints" / "last.ckpt"
    rc = cli_main(["eval", "--checkpoint", str(ckpt), "--shards", f"{val_dir}/*.tar", "--out", str(tmp_path / "e.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "phantom rate" in text and "protocol synthetic" in text and "[20, 40)" in text
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["metrics"]["images"] == 6
    rc = cli_main(["eval", "--checkpoint", str(ckpt), "--shards", f"{val_dir}/*.tar", "--max-depth", "80"])
    assert rc == 2 and "conflicts" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["stages.0.steps=1", "data.batch_sise=2"], "data.batch_size"),
    (["data.train_shards=/nonexistent/*.tar"], "matches no shard"),
    pytest.param(["trainer.accelerator=gpu"], "no CUDA device is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_cli_errors_are_one_line(tiny_shards, tmp_path, capsys, args, needle):
    train_dir, val_dir, _, _ = tiny_shards
    base = [f"data.train_shards={train_dir}/*.tar", f"data.val_shards={val_dir}/*.tar", f"run.out_dir={tmp_path / 'x'}"]
    rc = cli_main(["train", str(RECIPES_DIR / "smoke.yaml"), *base, *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["train", "eval", "predict", "compare"])
def test_cli_help(command, capsys):
    """Every command answers --help with its usage (train and compare used to read it as a file)."""
    with pytest.raises(SystemExit) as exc:
        cli_main([command, "--help"])
    assert exc.value.code == 0 and f"usage: curriculum {command}" in capsys.readouterr().out
    assert cli_main(["--help"]) == 0 and f"  {command} " in capsys.readouterr().out


@pytest.mark.parametrize("module,argv", [
    ("curriculum.cli", ["eval", "--checkpoint", "x.ckpt"]),
    ("curriculum.cli", ["predict", "--input", "a.png", "--bogus"]),
    ("curriculum.cli", ["train"]),
    ("curriculum.cli", ["eval", "--checkpoint", "x", "--shards", "y", "--batch-size", "two"]),
    ("data_prep.synthetic", ["--frames", "2"]),
    ("data_prep.check", []),
    ("data_prep.kitti", ["--out", "x"]),
    ("data_prep.vkitti2", ["--out", "x"]),
    ("data_prep.hypersim", ["--out", "x"]),
])
def test_usage_errors_of_every_command_are_one_line(module, argv, capsys):
    """argparse's own refusals (missing or unknown flags, bad types) end in the one error line
    every other error is, not after the usage block."""
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "(--help lists the options)" in err


def test_cli_version_names_the_project_and_its_libraries(capsys):
    from importlib.metadata import version

    assert cli_main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"curriculum-depth {version('curriculum-depth')} (torch {torch.__version__}, lightning ")
    assert f"timm {version('timm')}" in out and len(out.splitlines()) == 1


def test_cli_unknown_command_is_one_line(capsys):
    assert cli_main(["trian"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown command 'trian'" in err and len(err.splitlines()) == 1


def test_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(bad)
    for cut, why in ((b"", "empty or zero-filled"), (b"PK", "only 2 bytes"), (bytes(4096), "empty or zero-filled"),
                     (b"hi\n", "only 3 bytes")):  # what a crash or power loss can leave
        bad.write_bytes(cut)
        with pytest.raises(CheckpointError, match=f"corrupt or truncated checkpoint \\({why}\\)"):
            read_checkpoint(bad)
    (tmp_path / "notes.md").write_text("# not a checkpoint\n")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'notes.md'}: not a torch checkpoint file$"):
        read_checkpoint(tmp_path / "notes.md")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path} is a folder, not a checkpoint file \(a run keeps its own "
                                              rf"in {tmp_path}/checkpoints/last.ckpt\)$"):
        read_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()  # a run's own checkpoints folder: its last.ckpt is inside
    with pytest.raises(CheckpointError, match=rf"\(a run keeps its own in {tmp_path}/checkpoints/last.ckpt\)$"):
        read_checkpoint(tmp_path / "checkpoints")


def test_a_bad_pretrained_file_is_one_line_naming_the_key(tiny_shards, tmp_path):
    """model.pretrained gets the checkpoint reader's one-line errors, prefixed with the key."""
    (tmp_path / "recipe.yaml").write_text("model: {}\n")
    torch.save([1, 2], tmp_path / "list.pth")
    cases = {
        tmp_path / "missing.pth": "checkpoint not found",
        tmp_path / "recipe.yaml": "not a torch checkpoint file",
        tmp_path / "list.pth": "not a checkpoint",
        tmp_path: "is a folder, not a checkpoint file",
    }
    for path, what in cases.items():
        with pytest.raises(CheckpointError, match=rf"^model\.pretrained: .*{what}") as err:
            train(_recipe(tiny_shards, tmp_path / "run", f"model.pretrained={path}", "stages.0.steps=1",
                          "stages.1.steps=1"))
        assert "\n" not in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device synchronisations exist on CUDA only")
def test_training_steps_never_wait_for_the_device(tiny_shards, tmp_path, add_callback):
    """Between two log steps, a GPU training step queues its work and returns without waiting
    for the device (a blocking copy, .item(), a sync): the host prepares step k + 1 while the
    device runs step k. torch's sync debug mode raises at any synchronising call in steps 3-5."""
    import lightning.pytorch as pl

    class SyncGuard(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("error" if 2 <= trainer.global_step < 5 else "default")

        def on_train_end(self, trainer, module):
            torch.cuda.set_sync_debug_mode("default")

    add_callback(SyncGuard())
    try:
        result = train(_recipe(tiny_shards, tmp_path / "run", "trainer.accelerator=gpu",
                               "trainer.precision=bf16-mixed", "optim.fused=true", "data.num_workers=2",
                               "data.device_resize=true", "data.scale_jitter=0.3", "trainer.progress=true",
                               "trainer.log_every_steps=1000"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result["global_step"] == 8


# Calls that make the host wait for a GPU: reading a value back, or making a tensor on the
# device from host data (torch.tensor/as_tensor with a device: a blocking copy).
_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero"}
# Where such calls touch host memory only, or are the CPU's own branch (not taken on a GPU): the
# flag and counts already on the host (curriculum.optim), LateRead on the CPU, batches received
# from loader workers (host shared memory), and torch's unfused Adam (GPU recipes fuse).
_HOST_ONLY = ("curriculum/optim.py", "curriculum/late_read.py", "curriculum/worker_buffers.py",
              "torch/optim/adam.py", "torch/optim/optimizer.py")


def test_training_steps_make_no_call_that_would_wait_for_a_gpu(tiny_shards, tmp_path, add_callback):
    """The CPU stand-in for the CUDA test above: steps 3-5 of a run (two stages, device_resize
    with scale jitter and flips, the progress bar on) under a TorchFunctionMode that records every
    call that would synchronise on a GPU, outside host-only code."""
    import traceback

    import lightning.pytorch as pl
    from torch.overrides import TorchFunctionMode

    hits = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name in _READS or (name in ("tensor", "as_tensor") and kwargs.get("device") is not None):
                stack = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-1]]
                if not any(branch in frame for frame in stack for branch in _HOST_ONLY):
                    hits.append((name, " <- ".join(reversed(stack[-4:]))))
            return func(*args, **kwargs)

    mode = Record()

    class Window(pl.Callback):
        active = False

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            want = 2 <= trainer.global_step < 5
            if want != self.active:
                mode.__enter__() if want else mode.__exit__(None, None, None)
                self.active = want

    add_callback(Window())
    # one loader worker: batches are made on the host in any case, and here outside the window
    result = train(_recipe(tiny_shards, tmp_path / "run", "data.device_resize=true", "data.scale_jitter=0.3",
                           "data.num_workers=1", "trainer.progress=true", "trainer.log_every_steps=1000"))
    assert result["global_step"] == 8
    assert hits == []


def test_compile_switch_trains_both_stages_with_one_training_graph(tiny_shards, tmp_path, compile_backend):
    """model.compile=true through Lightning (graphs captured by dynamo and run by its eager backend,
    so it takes seconds): both stages train and validate, the model is traced once for training
    and once for validation (the stage switch retraces nothing; the loss stays eager: see
    DepthModule._build_step_callables), and checkpoints hold plain keys."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = compile_backend(CompileCounterWithBackend("eager"))
    result = train(_recipe(tiny_shards, tmp_path / "run", "stages.0.steps=3", "stages.1.steps=2",
                           "model.compile=true"))
    assert result["global_step"] == 5 and result["switches"] == [(0, "pretrain"), (3, "finetune")]
    assert not [g for g in counter.graphs if any("sqrt" in str(n.target) for n in g.graph.nodes)], \
        "the loss (SiLog's sqrt) was compiled"
    assert counter.frame_count == 2, f"{counter.frame_count} graphs: training's and validation's expected"
    losses = [float(r["train/loss"]) for r in read_metrics(tmp_path / "run") if r.get("train/loss")]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    ckpt = read_checkpoint(result["checkpoint"])
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])


def test_ddp_strategy_with_one_device_builds_a_single_device_trainer(tiny_shards, tmp_path, monkeypatch):
    """The GPU recipes say strategy=ddp so that devices=N is all a multi-GPU run needs; with one
    device and no launcher, DDP would only add gradient copies and an all-reduce with itself."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from curriculum.config import to_plain
    from curriculum.train import _one_process, build_trainer

    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)

    def strategy_of(*extra):
        recipe = to_plain(_recipe(tiny_shards, tmp_path / "run", "trainer.strategy=ddp", *extra))
        return build_trainer(recipe, tmp_path / "run", []).strategy

    def ours(strategy) -> bool:  # the recipe's DDP, not one Lightning would pick by itself
        return isinstance(strategy, DDPStrategy) and strategy._ddp_kwargs == {"find_unused_parameters": False}

    for one in ("trainer.devices=1", "trainer.devices='1'"):
        assert isinstance(strategy_of(one), SingleDeviceStrategy), one
    # a list of GPU indices (Lightning refuses lists for the CPU, so checked on the rule itself)
    assert _one_process({"devices": [3], "num_nodes": 1}) and not _one_process({"devices": [0, 1], "num_nodes": 1})
    assert _one_process({"devices": "3,", "num_nodes": 1}) and not _one_process({"devices": "0,1", "num_nodes": 1})
    assert _one_process({"devices": "auto", "accelerator": "cpu", "num_nodes": 1})  # one CPU process
    assert ours(strategy_of("trainer.devices=2"))
    # auto with several processes: the recipe's DDP too, not a strategy Lightning picks (in a
    # notebook it forks, and the process that saves the final checkpoint never trains)
    assert ours(strategy_of("trainer.devices=2", "trainer.strategy=auto"))
    assert isinstance(strategy_of("trainer.devices=1", "trainer.strategy=auto"), SingleDeviceStrategy)
    assert ours(strategy_of("trainer.devices=1", "trainer.num_nodes=2"))
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun started more processes
    assert ours(strategy_of("trainer.devices=1"))
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS", "2")  # so did srun (Lightning then wants its whole SLURM set-up)
    assert not _one_process({"devices": 1, "num_nodes": 1})


def test_resumed_metrics_csv_keeps_earlier_rows_and_drops_the_retrained_ones(tmp_path):
    """After a kill, rows past the checkpoint's step were logged but their training is lost:
    the resumed run logs those steps again, so only the rows up to the checkpoint's step stay."""

    from curriculum.train import _MetricsCSV

    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "train/loss", "val/abs_rel"])
        writer.writeheader()
        writer.writerows([{"step": s, "train/loss": 1.0 / (s + 1), "val/abs_rel": "" if s % 2 else 0.5}
                          for s in range(6)])
    logger = _MetricsCSV(tmp_path, resume_step=3)
    logger.log_metrics({"train/loss": 0.1, "train/new_column": 7.0}, step=4)
    logger.save()
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["val/abs_rel"] == "0.5" and rows[4]["train/new_column"] == "7.0" and rows[0]["train/new_column"] == ""
    fresh = _MetricsCSV(tmp_path / "new", resume_step=None)  # a new run starts its own file
    fresh.log_metrics({"train/loss": 1.0}, step=0)
    fresh.save()
    assert (tmp_path / "new" / "metrics.csv").read_text().splitlines()[0] == "step,train/loss"


def test_progress_bars_cover_training_and_validation(tiny_shards, tmp_path, capfd):
    train(_recipe(tiny_shards, tmp_path / "run", "stages.0.steps=1", "stages.1.steps=2", "trainer.progress=true"))
    out, err = capfd.readouterr()
    assert "litlogger" not in out + err  # Lightning's advert for its cloud logger, on every run
    assert "train: 100%" in err and "3/3" in err and "img_s=" in err  # the run's bar: steps, rate, ETA

    assert "validate:" in err and re.search(r"validation at step 3: 6 images in [0-9.]+ s \([0-9.]+ images/s\)", err)


def test_the_bar_gets_its_step_s_stage_and_loss_before_it_draws_the_line():
    """tqdm draws on update(); a postfix set after it showed the previous refresh's stage and loss."""
    from types import SimpleNamespace

    from curriculum.callbacks import StepProgressBar

    calls = []
    bar = StepProgressBar(refresh_steps=1)
    bar.bar = SimpleNamespace(n=0, update=lambda k: calls.append(("update", k)),
                              set_postfix=lambda **kw: calls.append(("postfix", kw["stage"])))
    trainer = SimpleNamespace(global_step=1, world_size=1)
    bar.on_train_batch_end(trainer, SimpleNamespace(stage_name="finetune"), {"loss": torch.tensor(1.0)},
                           {"key": ["a"]}, 0)
    assert calls == [("postfix", "finetune"), ("update", 1)]


@pytest.mark.parametrize("steps,validated_at", [
    (("stages.0.steps=4", "stages.1.steps=4"), [8]),  # one epoch of 8 batches: its validation is the final one
    (("stages.0.steps=4", "stages.1.steps=1"), [5]),  # ends mid-epoch: validated at the end
    (("stages.0.steps=5", "stages.1.steps=5", "trainer.val_every_steps=5"), [5, 10]),
    # every N steps across epochs of 8 batches, not every N batches of each epoch
    (("stages.0.steps=8", "stages.1.steps=8", "trainer.val_every_steps=5"), [5, 10, 15, 16]),
    (("stages.0.steps=6", "stages.1.steps=6", "trainer.val_every_steps=10"), [10, 12]),  # longer than an epoch
])
def test_the_final_model_is_validated_once(tiny_shards, tmp_path, steps, validated_at):
    """Validation rows, inside fit or the final one, say the number of steps taken."""
    train(_recipe(tiny_shards, tmp_path / "run", *steps))
    rows = [r for r in read_metrics(tmp_path / "run") if r.get("val/near/abs_rel")]
    assert [int(r["step"]) for r in rows] == validated_at


def test_wandb_auto_mode_goes_online_only_with_an_api_key(tmp_path, monkeypatch):
    from curriculum.train import wandb_mode

    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode("auto") == "offline"  # no netrc file
    netrc.write_text("machine github.com login x password y\n")
    assert wandb_mode("auto") == "offline"  # a netrc without W&B
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert wandb_mode("auto") == "online"
    # what `wandb login` writes now: the default server, a CoreWeave Forge host
    netrc.write_text("machine api.forge.coreweave.com\n  login user\n  password abc\n")
    assert wandb_mode("auto") == "online"
    netrc.write_text("machine api.forge.coreweave.com.example.org login user password abc\n")
    assert wandb_mode("auto") == "offline"  # a host of another name
    netrc.write_text("default login user password abc\n")  # wandb reads a default entry too
    assert wandb_mode("auto") == "online"
    for text in ("machine api.wandb.ai login\n", "machine api.wandb.ai login user\n", "machine api.wandb.ai 'x\n"):
        netrc.write_text(text)  # no key or not readable: wandb does not use it
        assert wandb_mode("auto") == "offline", text
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "abc")
    assert wandb_mode("auto") == "online"
    for forced in ("online", "offline", "disabled"):
        assert wandb_mode(forced) == forced
    # a self-hosted server: its host in netrc is the key
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert wandb_mode("auto") == "offline"
    netrc.write_text("machine wandb.example.org\n  login user\n  password abc\n")
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "http://localhost:8080")  # a local server: host and port
    netrc.write_text("machine localhost login user password abc\n")
    assert wandb_mode("auto") == "offline"
    netrc.write_text("machine localhost:8080 login user password abc\n")
    assert wandb_mode("auto") == "online"
    # a Forge proxy also takes the key of the W&B API host behind it, not the other way round
    monkeypatch.setenv("WANDB_BASE_URL", "https://forge.coreweave.com/api/wandb")
    netrc.write_text("machine api.wandb.ai login user password abc\n")
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")
    netrc.write_text("machine api.forge.coreweave.com login user password abc\n")
    assert wandb_mode("auto") == "offline"


@pytest.mark.parametrize("env,mode", [({"WANDB_MODE": "disabled"}, "disabled"), ({"WANDB_MODE": "dryrun"}, "offline"),
                                      ({"WANDB_MODE": "Offline"}, "offline"), ({"WANDB_DISABLED": "true"}, "disabled")])
def test_wandb_auto_mode_follows_the_environment(monkeypatch, env, mode):
    from curriculum.train import wandb_mode

    monkeypatch.setenv("WANDB_API_KEY", "abc")  # would go online without the variable
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert wandb_mode("auto") == mode
    assert wandb_mode("offline") == "offline"  # the recipe's explicit mode wins


def test_wandb_disabled_in_the_environment_writes_no_wandb_run(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    train(_recipe(tiny_shards, tmp_path / "run", "logging.mode=auto", "stages.0.steps=1", "stages.1.steps=1"))
    assert not (tmp_path / "run" / "wandb").exists()
    assert read_metrics(tmp_path / "run")  # metrics.csv all the same


def test_wandb_mode_reaches_wandb_without_changing_the_environment(tmp_path, monkeypatch):
    """Lightning's offline=True would set WANDB_MODE=dryrun for the rest of the process, so that
    a later run's `auto` read it; the mode goes to wandb.init instead."""
    from lightning.pytorch.loggers import WandbLogger

    from curriculum.train import make_loggers

    monkeypatch.delenv("WANDB_MODE", raising=False)
    recipe = to_plain(load_recipe([RECIPES_DIR / "finetune.yaml"], ["logging.mode=offline", "logging.entity=team",
                                                                    "init_from="]))
    resumed = {"global_step": 3, "wandb_run_id": "abc123", "lineage": {"init_from": "runs/pre/last.ckpt"}}
    logger = next(lg for lg in make_loggers(recipe, tmp_path, resumed) if isinstance(lg, WandbLogger))
    init = logger._wandb_init
    assert init["mode"] == "offline" and init["entity"] == "team" and init["id"] == "abc123"
    # a resumed stage-2 run is started without init_from: its W&B config keeps the parent checkpoint
    assert init["config"]["init_from"] == "runs/pre/last.ckpt" and recipe["init_from"] == ""
    logger.experiment.finish()
    assert "WANDB_MODE" not in os.environ


def test_online_logging_without_a_key_is_refused_before_the_old_run_is_replaced(tiny_shards, tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    out = tmp_path / "run"
    train(_recipe(tiny_shards, out, "stages.0.steps=1", "stages.1.steps=1"))
    held = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(SetupError, match="logging.mode: online, but no W&B API key is configured"):
        train(_recipe(tiny_shards, out, "stages.0.steps=1", "stages.1.steps=1", "run.overwrite=true",
                      "logging.mode=online"))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == held  # nothing of the old run removed


def test_cli_turns_a_wandb_refusal_into_one_line(monkeypatch, capsys):
    import wandb

    from curriculum import cli

    def refuse(argv):
        raise wandb.errors.UsageError("Invalid project name 'a/b':\ncannot contain characters '/'")

    monkeypatch.setitem(cli.COMMANDS, "train", refuse)
    assert cli_main(["train", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == "error: W&B: Invalid project name 'a/b': cannot contain characters '/'\n"


def test_cli_names_an_unreachable_wandb_server_and_the_offline_mode(monkeypatch, capsys):
    import wandb

    from curriculum import cli

    def unreachable(argv):  # wandb 0.31's message when the server's name does not resolve
        raise wandb.errors.CommError('Timed out while retrying: Post "https://api.forge.coreweave.com/graphql": '
                                     "dial tcp: lookup api.forge.coreweave.com: no such host\nConsider increasing the "
                                     "init_timeout setting:\n  wandb.init(settings=wandb.Settings(init_timeout=...))")

    monkeypatch.setitem(cli.COMMANDS, "train", unreachable)
    assert cli_main(["train", "x.yaml"]) == 2
    assert capsys.readouterr().err == (
        'error: W&B: Timed out while retrying: Post "https://api.forge.coreweave.com/graphql": dial tcp: lookup '
        "api.forge.coreweave.com: no such host (the W&B server cannot be reached: logging.mode=offline keeps the run "
        "on disk, and `wandb sync` uploads it later)\n")

    def bad_key(argv):  # a refused key is not about the network
        raise wandb.errors.AuthenticationError("API key must have 40+ characters, has 3.")

    monkeypatch.setitem(cli.COMMANDS, "train", bad_key)
    assert cli_main(["train", "x.yaml"]) == 2
    assert capsys.readouterr().err == "error: W&B: API key must have 40+ characters, has 3.\n"


@pytest.mark.parametrize("precision,fused", [("32-true", False), ("bf16-mixed", True)])
def test_gradients_are_clipped_to_the_recipes_norm(tiny_shards, tmp_path, monkeypatch, add_callback, precision, fused):
    """optim.grad_clip bounds the total gradient norm of every step, also under bf16 with fused
    AdamW, where Lightning's own clipping refuses to run (fused AdamW stands in on the CPU)."""
    import lightning.pytorch as pl

    class FusedAdamW(torch.optim.AdamW):
        def __init__(self, *args, fused=None, **kwargs):
            super().__init__(*args, fused=True, **kwargs)

    if fused:
        monkeypatch.setattr(torch.optim, "AdamW", FusedAdamW)

    class Norms(pl.Callback):
        def __init__(self):
            self.norms, self.fused = [], []

        def on_before_optimizer_step(self, trainer, module, optimizer):  # after the module's closure
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            self.fused.append(bool(optimizer.defaults.get("fused")))

    seen = add_callback(Norms())  # every later trainer of this test gets it

    def run(clip, name):
        seen.norms, seen.fused = [], []
        train(_recipe(tiny_shards, tmp_path / name, f"trainer.precision={precision}", f"optim.grad_clip={clip}",
                      "stages.0.steps=2", "stages.1.steps=1"))
        return seen.norms, seen.fused

    free, _ = run(0, "free")
    clipped, fused_steps = run(1e-3, "clipped")
    assert min(free) > 1e-3  # the bound below is a real constraint
    assert len(clipped) == 3 and max(clipped) <= 1e-3 * (1 + 1e-4)
    assert fused_steps == [fused] * 3


def test_a_new_run_never_silently_replaces_another(tiny_shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = train(_recipe(tiny_shards, out, "stages.0.steps=2", "stages.1.steps=1"))
    before = (out / "checkpoints" / "last.ckpt").read_bytes()
    from curriculum.train import SetupError

    with pytest.raises(SetupError) as e:
        train(_recipe(tiny_shards, out, "stages.0.steps=1", "stages.1.steps=1"))
    msg = str(e.value)
    assert "\n" not in msg and f"run.out_dir '{out}' already holds a run (checkpoints/last.ckpt)" in msg
    assert f"resume={out}/checkpoints/last.ckpt" in msg and "run.overwrite=true" in msg
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == before  # untouched
    # a resume continues it; run.overwrite=true replaces it, leaving nothing of the old run
    assert train(_recipe(tiny_shards, out, "stages.0.steps=2", "stages.1.steps=1",
                         f"resume={first['checkpoint']}"))["global_step"] == 3
    (out / "panels").mkdir(exist_ok=True)
    (out / "panels" / "old.png").write_bytes(b"x")
    (out / "notes.txt").write_text("mine")  # not a run file: kept
    again = train(_recipe(tiny_shards, out, "stages.0.steps=1", "stages.1.steps=1", "run.overwrite=true"))
    assert again["global_step"] == 2 and read_checkpoint(again["checkpoint"])["global_step"] == 2
    assert not (out / "panels" / "old.png").exists() and (out / "notes.txt").read_text() == "mine"
    assert [int(r["step"]) for r in read_metrics(out) if r.get("train/loss")] == [1, 2]
    # nothing is removed before every input is read: a bad shard pattern leaves the old run
    keep = (out / "metrics.csv").read_text()
    with pytest.raises(DataError):
        train(_recipe(tiny_shards, out, "run.overwrite=true", "data.train_shards=/nonexistent/*.tar"))
    assert (out / "metrics.csv").read_text() == keep
    # nor would it delete what the new run starts from: stage 2 in its stage-1 folder is refused
    with pytest.raises(SetupError, match=rf"run.overwrite=true would delete init_from '{again['checkpoint']}', "
                                         rf"which lies in run.out_dir '{out}'"):
        train(_recipe(tiny_shards, out, "run.overwrite=true", f"init_from={again['checkpoint']}",
                      files=("smoke.yaml", "finetune.yaml")))
    # a resume of another run's checkpoint does not make this folder its own
    other = train(_recipe(tiny_shards, tmp_path / "other", "stages.0.steps=2", "stages.1.steps=1"))
    with pytest.raises(SetupError, match="already holds a run"):
        train(_recipe(tiny_shards, out, "stages.0.steps=2", "stages.1.steps=1", f"resume={other['checkpoint']}"))
    assert (out / "metrics.csv").read_text() == keep
    # another rank of the same launch leaves the folder to rank 0
    from curriculum.train import _clear_folder

    monkeypatch.setenv("LOCAL_RANK", "1")
    _clear_folder(out)
    assert (out / "metrics.csv").read_text() == keep
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("SLURM_PROCID", "3")  # srun sets this one alone
    _clear_folder(out)
    assert (out / "metrics.csv").read_text() == keep
    # a rank Lightning's own launcher started inside a SLURM allocation: LOCAL_RANK 1, SLURM_PROCID 0
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    _clear_folder(out)
    assert (out / "metrics.csv").read_text() == keep


def test_a_folder_with_metrics_but_no_checkpoint_is_not_offered_for_resume(tmp_path):
    from curriculum.train import SetupError, _claim_folder

    (tmp_path / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    with pytest.raises(SetupError) as e:
        _claim_folder(tmp_path, {"resume": "", "run": {"overwrite": False}})
    assert str(e.value) == (f"run.out_dir '{tmp_path}' already holds a run (metrics.csv): replace it with "
                            "run.overwrite=true, or choose another run.out_dir")


class _StageModule:
    """What CurriculumCallback touches of a DepthModule: its stage, policy and log."""

    def __init__(self):
        self.stage_index, self.logged = -1, []

    def set_stage(self, index):
        self.stage_index = index
        self.policy = build_policy(_THREE_STAGES[index]["policy"])

    def log(self, name, value, **kw):
        self.logged.append((name, float(value)))


_THREE_STAGES = [{"name": "a", "steps": 3, "policy": {"name": "unclipped"}},
                 {"name": "b", "steps": 2, "policy": {"name": "max_depth"}},
                 {"name": "c", "steps": 1, "policy": {"name": "mixed", "far_weight": 0.25}}]


def test_curriculum_callback_follows_the_global_step_and_records_each_switch_once(capsys):
    """Without a training run: the stage of every step (three stages, so a switch is not just
    'the last stage'), the stage logged with the batch that trains in it, one switch per stage."""
    cb, module = CurriculumCallback(_THREE_STAGES), _StageModule()
    trainer = SimpleNamespace(global_step=0, is_global_zero=True)
    cb.on_train_start(trainer, module)
    assert module.stage_index == 0 and cb.switches == [(0, "a")]
    seen = []
    for step in range(8):  # two steps past the end stay in the last stage
        trainer.global_step = step
        cb.on_train_batch_start(trainer, module, None, step)
        seen.append(module.stage_index)
    assert seen == [0, 0, 0, 1, 1, 2, 2, 2]
    far_weight = {0: 1.0, 1: 0.0, 2: 0.25}
    assert module.logged == [entry for s in seen
                             for entry in (("curriculum/stage", float(s)), ("curriculum/far_weight", far_weight[s]))]
    assert cb.switches == [(0, "a"), (3, "b"), (5, "c")]
    out = capsys.readouterr().out  # one line per switch, not per step
    assert out.count("stage '") == 3 and "step 5: stage 'c', mask policy mixed (" in out
    assert cb.state_dict() == {"switches": [[0, "a"], [3, "b"], [5, "c"]], "starts": [0, 3, 5]}


def test_curriculum_callback_resumes_in_the_stage_of_its_step_with_its_history():
    """A resumed run: the module is put in the stage of the restored step as training starts
    (before any batch: a validation pending from the interrupted run comes first), the history
    is the checkpoint's, and a checkpoint of another stage schedule is refused by the callback."""
    first, trainer = CurriculumCallback(_THREE_STAGES), SimpleNamespace(global_step=0, is_global_zero=True)
    for step in range(4):
        trainer.global_step = step
        first.on_train_batch_start(trainer, _StageModule(), None, step)
    state = first.state_dict()

    resumed, module = CurriculumCallback(_THREE_STAGES), _StageModule()
    resumed.load_state_dict(state)
    trainer.global_step = 4
    resumed.on_train_start(trainer, module)
    assert module.stage_index == 1 and resumed.switches == [(0, "a"), (3, "b")]
    trainer.global_step = 5
    resumed.on_train_batch_start(trainer, module, None, 0)
    assert resumed.switches == [(0, "a"), (3, "b"), (5, "c")]

    in_stage_0 = _StageModule()
    trainer.global_step = 1
    CurriculumCallback(_THREE_STAGES).on_train_start(trainer, in_stage_0)
    assert in_stage_0.stage_index == 0  # not -1, whose stage name would read as the last stage's

    for other in ([{"name": "a", "steps": 4}, {"name": "b", "steps": 1}, {"name": "c", "steps": 1}],
                  _THREE_STAGES[:2]):
        with pytest.raises(ValueError, match=r"checkpoint stage boundaries \[0, 3, 5\] differ from the recipe's"):
            CurriculumCallback(other).load_state_dict(state)


def test_a_checkpoint_saved_from_a_compiled_model_loads(tmp_path):
    """Keys with torch.compile's `_orig_mod.` (saved by code that did not strip them) load as the
    plain model's: the weights are the same."""
    model = DepthModel(encoder="tiny", head="log", min_depth=0.1, max_depth=1000.0)
    state = {f"model._orig_mod.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "compiled.ckpt"
    torch.save({"state_dict": state, "curriculum": build_metadata(model.metadata(), {"name": "unclipped"}, "s", {})},
               path)
    loaded, _ = load_model(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_read_checkpoint_takes_torchs_older_pickle_format_and_refuses_non_dicts(tmp_path):
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"global_step": 3, "w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    ckpt = read_checkpoint(legacy)
    assert ckpt["global_step"] == 3 and torch.equal(ckpt["w"], torch.ones(2))
    torch.save(torch.ones(2), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match=r"tensor.pt: not a checkpoint \(a Tensor\)$"):
        read_checkpoint(tmp_path / "tensor.pt")
    import datetime

    torch.save({"when": datetime.date(2020, 1, 1)}, tmp_path / "unsafe.ckpt")  # not tensors and containers
    with pytest.raises(CheckpointError, match=r"unsafe.ckpt: corrupt or truncated checkpoint \(unpickling refused: "
                                              r"not tensors and plain containers\)$"):
        read_checkpoint(tmp_path / "unsafe.ckpt")
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.ckpt").write_bytes(b"")  # a folder holding its checkpoint directly
    with pytest.raises(CheckpointError, match=rf"\(a run keeps its own in {run}/last.ckpt\)$"):
        read_checkpoint(run)


def test_taught_far_target_is_the_largest_along_the_lineage():
    def meta(*policies, parent=None):
        return {"recipe": {"stages": [{"policy": p} for p in policies]}, "parent_far_target": parent}

    # a parent taught farther than this run's own mixed stage: the parent's target stays the largest
    assert taught_far_target(meta({"name": "mixed", "far_weight": 0.1, "far_target": 300.0}, parent=655.35)) == 655.35
    assert taught_far_target(meta({"name": "unclipped", "far_target": 700.0},
                                  {"name": "mixed", "far_weight": 0.5, "far_target": 400.0})) == 700.0
    # an unclipped stage without its own far_target teaches the policy's default
    from curriculum.masks import DEFAULT_FAR_TARGET

    assert taught_far_target(meta({"name": "unclipped"})) == DEFAULT_FAR_TARGET > 80.0


def test_model_checks_name_every_field_and_weights_must_fit_exactly(tmp_path):
    model = DepthModel("tiny", "log", 0.1, 1000.0)
    fields = model.metadata()
    for key, other in (("uncertainty", not fields["uncertainty"]), ("min_depth", 0.5), ("head", "sigmoid")):
        with pytest.raises(CheckpointError, match=rf"^src: model mismatch \({key}: "):
            check_same_model(fields, {**fields, key: other}, "src")
    check_same_model(fields, dict(fields), "src")
    # compiled models' keys carry _orig_mod.; the weights come out without it, other prefixes left out
    t = torch.ones(1)
    assert model_state({"state_dict": {"model._orig_mod.a.w": t, "model.b": t, "loss.c": t}}) == {"a.w": t, "b": t}
    # a checkpoint's weights must fit the recorded model both ways: no missing and no unexpected key
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta = build_metadata(fields, {"name": "max_depth"}, "finetune", {"stages": []})
    path = tmp_path / "extra.ckpt"
    torch.save({"curriculum": meta, "state_dict": {**state, "model.extra.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"weights do not fit the recorded model: unexpected keys: extra.weight"):
        load_model(path)
    torch.save({"curriculum": meta, "state_dict": state}, path)
    loaded, got = load_model(path)
    assert got["stage"] == "finetune" and not loaded.training
    with pytest.raises(CheckpointError, match="no 'curriculum' metadata"):
        metadata({"curriculum": {"stage": "x"}}, "p.ckpt")  # metadata without its model


def test_make_targets_write_where_the_next_one_reads(tmp_path):
    """RUNS=dir puts make pretrain / finetune / curriculum in dir/<target>, and finetune's default
    INIT is pretrain's last checkpoint there (pretrain used to write to runs/ whatever RUNS said)."""
    import shlex
    import subprocess

    root = Path(__file__).resolve().parents[1]
    runs = tmp_path / "myruns"
    out = subprocess.run(["make", "-n", "-C", str(root), "pretrain", "finetune", "curriculum", f"RUNS={runs}"],
                         capture_output=True, text=True, check=True).stdout
    commands = {}
    for line in out.splitlines():
        if " train recipes/" in line:
            args = shlex.split(line)
            commands[Path(args[args.index("train") + 1]).stem] = dict(a.split("=", 1) for a in args if "=" in a)
    assert {k: v["run.out_dir"] for k, v in commands.items()} == {
        t: str(runs / t) for t in ("pretrain", "finetune", "curriculum")}
    assert commands["finetune"]["init_from"] == str(runs / "pretrain" / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("damage,needle", [
    (lambda c: c["state_dict"].update({"model.depth_head.scratch.output_conv1.bias": torch.zeros(3)}),
     "weights do not fit the recorded model: shape mismatches: depth_head.scratch.output_conv1.bias"),
    (lambda c: c["state_dict"].pop("model.depth_head.scratch.output_conv1.bias"),
     "weights do not fit the recorded model: missing keys: depth_head.scratch.output_conv1.bias"),
    (lambda c: c["curriculum"]["model"].pop("encoder"), "malformed 'curriculum' metadata (no model field 'encoder')"),
    (lambda c: c["curriculum"].update(model="tiny"), "malformed 'curriculum' metadata (its model is a str"),
    (lambda c: c.update(state_dict=[1, 2]), "malformed state_dict (not a mapping of tensors)"),
])
def test_a_checkpoint_whose_weights_or_metadata_do_not_fit_is_one_line(tiny_shards, tmp_path, capsys, damage, needle):
    """predict, eval, init_from and resume each refuse it in one line naming the file (torch's own
    error listed every tensor; a missing field was a KeyError traceback)."""
    from PIL import Image

    from curriculum.checkpoint import build_metadata
    from curriculum.model import build_model
    from curriculum.module import MODEL_KEYS

    cfg = _recipe(tiny_shards, tmp_path / "run")
    model = build_model({k: v for k, v in to_plain(cfg)["model"].items() if k in MODEL_KEYS})
    ckpt = {"curriculum": build_metadata(model.metadata(), {"name": "unclipped"}, "pretrain", to_plain(cfg)),
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "global_step": 2, "optimizer_states": [{}]}
    damage(ckpt)
    path = tmp_path / "bad.ckpt"
    torch.save(ckpt, path)
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((28, 56, 3), np.uint8)).save(image)
    train_dir, val_dir, _, _ = tiny_shards
    data = [f"data.train_shards={train_dir}/*.tar", f"data.val_shards={val_dir}/*.tar", "logging.mode=disabled"]
    commands = {
        "predict": ["predict", "--checkpoint", str(path), "--input", str(image), "--out", str(tmp_path / "p")],
        "eval": ["eval", "--checkpoint", str(path), "--shards", f"{val_dir}/*.tar"],
        "init_from": ["train", str(RECIPES_DIR / "smoke.yaml"), *data, f"run.out_dir={tmp_path / 'i'}", f"init_from={path}"],
        "resume": ["train", str(RECIPES_DIR / "smoke.yaml"), *data, f"run.out_dir={tmp_path / 'r'}", f"resume={path}"],
    }
    for name, argv in commands.items():
        assert cli_main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and str(path) in err and "\n" not in err, (name, err)


def test_images_per_second_leaves_out_validation_and_checkpoint_time(tiny_shards, tmp_path, add_callback, monkeypatch):
    """The rate is training time only: a validation, a checkpoint write or a panel between two
    steps is left out (the step after a validation read far too low)."""
    import time

    import lightning.pytorch as pl

    class SlowValidation(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            time.sleep(0.5)

    save = torch.save

    def slow_save(*args, **kwargs):  # a large checkpoint on a slow disk
        time.sleep(1.0)
        return save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", slow_save)
    add_callback(SlowValidation())
    out = tmp_path / "run"
    train(_recipe(tiny_shards, out, "stages.0.steps=3", "stages.1.steps=3", "trainer.val_every_steps=3",
                  "trainer.ckpt_every_steps=2", "logging.image_every_steps=0"))
    rates = {int(r["step"]): float(r["train/images_per_sec"]) for r in read_metrics(out)
             if r.get("train/images_per_sec")}
    assert sorted(rates) == [2, 3, 4, 5, 6]  # from the second step on
    # with the 1 s saves (after steps 2 and 4) or the validation's sleep counted, a rate would read
    # below 2 images / 0.5 s; tiny steps on this machine take well under 0.2 s
    assert min(rates.values()) > 2 / 0.5, rates


def test_only_rank_0_rewrites_metrics_csv_on_a_resume(tmp_path, monkeypatch):
    """Lightning asks every rank's logger for its experiment; a resume's writer reads metrics.csv,
    drops the rows past the checkpoint and writes it back, which rank 0 alone may do."""
    from lightning.pytorch.utilities import rank_zero_only

    from curriculum.train import _MetricsCSV

    rows = "step,train/loss\n1,0.5\n2,0.4\n3,0.3\n"
    (tmp_path / "metrics.csv").write_text(rows)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    _MetricsCSV(tmp_path, resume_step=1).experiment
    assert (tmp_path / "metrics.csv").read_text() == rows
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    _MetricsCSV(tmp_path, resume_step=1).experiment
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["step,train/loss", "1,0.5"]
