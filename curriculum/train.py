"""`curriculum train`: one code path for a single stage, a stage-2 init, or both stages in one run."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig

from curriculum.callbacks import CurriculumCallback, StepProgressBar
from curriculum.checkpoint import (
    check_same_model, file_sha256, metadata, model_state, read_checkpoint, taught_far_target,
)
from curriculum.config import to_plain, total_steps
from curriculum.datamodule import DepthDataModule
from curriculum.faults import ReportingCheckpointIO, SignalCheckpoint
from curriculum.module import MODEL_KEYS, DepthModule


class SetupError(RuntimeError):
    """An environment problem found before training starts, in one line."""


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SetupError(f"run.out_dir '{folder}' is not writable ({exc.strerror or exc})") from None


def wandb_mode(mode: str) -> str:
    """`auto` goes online only when an API key is configured (environment or netrc)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def make_loggers(recipe: dict, out_dir: Path) -> list:
    loggers = [CSVLogger(save_dir=str(out_dir), name="", version="")]
    lcfg = recipe["logging"]
    mode = wandb_mode(lcfg["mode"])
    if mode != "disabled":
        stages = [s["name"] for s in recipe["stages"]]
        job_type = stages[0] if len(stages) == 1 else "curriculum"
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(WandbLogger(
            project=lcfg["project"], name=recipe["run"]["name"], group=lcfg["group"] or recipe["run"]["name"],
            job_type=job_type, save_dir=str(out_dir), offline=(mode == "offline"), config=recipe,
        ))
    return loggers


def _one_process(tcfg: dict) -> bool:
    """One device on one node, and no launcher (torchrun, SLURM) started other processes."""
    launched = [k for k in ("WORLD_SIZE", "SLURM_NTASKS") if os.environ.get(k, "1").strip() not in ("", "1")]
    devices = tcfg["devices"]
    one_device = str(devices) == "1" or (isinstance(devices, (list, tuple)) and len(devices) == 1)
    return one_device and int(tcfg["num_nodes"]) == 1 and not launched


def build_trainer(recipe: dict, out_dir: Path, loggers: list) -> pl.Trainer:
    tcfg = recipe["trainer"]
    steps = total_steps(recipe)
    ckpt_every = tcfg["ckpt_every_steps"] or steps
    callbacks = [
        CurriculumCallback([dict(s) for s in recipe["stages"]]),
        ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), filename="last", every_n_train_steps=ckpt_every,
                        save_top_k=1, enable_version_counter=False, save_on_train_epoch_end=False),
        SignalCheckpoint(out_dir / "checkpoints" / "last.ckpt"),
    ]
    if tcfg["progress"]:
        callbacks.append(StepProgressBar(refresh_steps=max(1, min(10, steps // 100))))
    strategy = tcfg["strategy"]
    if strategy == "ddp" and _one_process(tcfg):
        # DDP around a single process only adds work: gradient bucket copies, an all-reduce with
        # itself, and a compiled step split at every bucket boundary. The GPU recipes say ddp so
        # that trainer.devices=N is all a multi-GPU run needs.
        strategy = "auto"
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # Every parameter gets a gradient (the loss stays connected on empty masks), so DDP
        # needs no unused-parameter search.
        strategy = DDPStrategy(find_unused_parameters=False, process_group_backend=None if torch.cuda.is_available() else "gloo")
    val_every = tcfg["val_every_steps"]
    return pl.Trainer(
        accelerator=tcfg["accelerator"], devices=tcfg["devices"], num_nodes=tcfg["num_nodes"], strategy=strategy,
        precision=tcfg["precision"], max_steps=steps, max_epochs=-1,
        val_check_interval=val_every if val_every else None, check_val_every_n_epoch=None if val_every else 1,
        log_every_n_steps=tcfg["log_every_steps"], callbacks=callbacks, logger=loggers,
        plugins=[ReportingCheckpointIO()], default_root_dir=str(out_dir), num_sanity_val_steps=0,
        enable_progress_bar=tcfg["progress"], enable_model_summary=False,
        gradient_clip_val=recipe["optim"]["grad_clip"] or None, benchmark=tcfg["cudnn_benchmark"],
    )


def init_from_checkpoint(module: DepthModule, path: str, recipe: dict) -> dict:
    """Stage-2 start: weights and metadata only. Optimizer, schedule and step counters start
    fresh (a full resume would carry stage 1's, PITFALLS 11)."""
    ckpt = read_checkpoint(path)
    meta = metadata(ckpt, path)
    check_same_model({k: recipe["model"][k] for k in MODEL_KEYS}, meta["model"], f"init_from '{path}'")
    module.model.load_state_dict(model_state(ckpt), strict=True)
    return {
        "init_from": str(path),
        "init_from_sha256": file_sha256(path),
        "parent_stage": meta.get("stage"),
        "parent_run": meta.get("wandb_run_id", ""),
        "parent_far_target": taught_far_target(meta),  # where predict's --drop-sky starts
    }


def train(cfg: DictConfig) -> dict:
    """Run a recipe; returns the final checkpoint path, the output folder and the W&B run id."""
    recipe = to_plain(cfg)
    out_dir = Path(recipe["run"]["out_dir"])
    _check_writable(out_dir)
    datamodule = DepthDataModule(recipe["data"], recipe["run"]["seed"])  # shard checks before heavy work
    pl.seed_everything(recipe["run"]["seed"], workers=True, verbose=False)
    module = DepthModule(recipe)
    if recipe["model"]["pretrained"]:
        from curriculum.model import load_encoder_weights

        report = load_encoder_weights(module.model, recipe["model"]["pretrained"])
        print(f"encoder initialised from {recipe['model']['pretrained']}: {report}")
    if recipe["init_from"]:
        lineage = init_from_checkpoint(module, recipe["init_from"], recipe)
        module.extra_metadata.update(lineage)
        recipe["logging"]["parent_run"] = lineage["parent_run"]
        recipe["logging"]["parent_checkpoint_sha256"] = lineage["init_from_sha256"]
    loggers = make_loggers(recipe, out_dir)
    wandb_logger = next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)
    trainer = build_trainer(recipe, out_dir, loggers)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=recipe["resume"] or None,
                    weights_only=False if recipe["resume"] else None)
        val_every = recipe["trainer"]["val_every_steps"]
        if not (val_every and trainer.global_step % val_every == 0):
            trainer.validate(module, datamodule=datamodule, verbose=False)  # the final model, always
    final = out_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(final)
    run_id = module.extra_metadata.get("wandb_run_id", "")
    if wandb_logger is not None and trainer.is_global_zero:
        wandb_logger.experiment.finish()
    result = {
        "rank": int(trainer.global_rank),
        "world_size": int(trainer.world_size),
        "checkpoint": str(final),
        "out_dir": str(out_dir),
        "wandb_run_id": run_id,
        "global_step": int(trainer.global_step),
        "switches": trainer.callbacks[0].switches,
        "val": getattr(module, "last_val_results", {}),
        "train_batches": module.train_batches,
    }
    # One summary per rank: what each rank trained and validated, for humans and multi-rank tests.
    summary = out_dir / "summary" / f"rank{trainer.global_rank}.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(result, indent=1, default=float))
    return result
