"""`curriculum train`: one code path for a single stage, a stage-2 init, or both stages in one run."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import netrc
import os
import shutil
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig

from curriculum.callbacks import CurriculumCallback, StepProgressBar
from curriculum.checkpoint import (
    CheckpointError, check_same_model, file_sha256, fitting_weights, load_weights, metadata, read_checkpoint,
    taught_far_target,
)
from curriculum.config import to_plain, total_steps
from curriculum.datamodule import DepthDataModule
from curriculum.faults import ReportingCheckpointIO, SignalCheckpoint, stop_during_validation
from curriculum.module import MODEL_KEYS, VALIDATED_NOTE, DepthModule
from curriculum.schedule import stage_index_at
from data_prep.files import atomic_write_text


class SetupError(RuntimeError):
    """An environment problem found before training starts, in one line."""


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{socket.gethostname()}-{os.getpid()}"  # nodes may share a folder and pids
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SetupError(f"run.out_dir '{folder}' is not writable ({exc.strerror or exc})") from None


# What a run writes into its folder; a new run into a folder holding these replaces them.
RUN_FILES = ("checkpoints", "metrics.csv", "panels", "summary", "wandb")


def _claim_folder(folder: Path, recipe: dict) -> bool:
    """A new run never silently replaces another one (its checkpoints, its metrics.csv): only a
    resume of that run continues its folder, and only run.overwrite=true replaces it. Returns
    whether the old run's files are to be cleared (``_clear_folder``, once every input is read)."""
    held = [name for name in ("checkpoints/last.ckpt", "metrics.csv") if (folder / name).exists()]
    if not held or (recipe["resume"] and _inside(recipe["resume"], folder)):
        return False
    if not recipe["run"]["overwrite"]:
        how = (f"continue it with resume={folder / 'checkpoints' / 'last.ckpt'}, " if held[0].endswith(".ckpt") else "")
        raise SetupError(f"run.out_dir '{folder}' already holds a run ({held[0]}): {how}replace it with "
                         "run.overwrite=true, or choose another run.out_dir")
    for key, value in (("init_from", recipe["init_from"]), ("resume", recipe["resume"]),
                       ("model.pretrained", recipe["model"]["pretrained"])):
        if value and any(_inside(value, folder / name) for name in RUN_FILES):
            raise SetupError(f"run.overwrite=true would delete {key} '{value}', which lies in run.out_dir "
                             f"'{folder}': choose another run.out_dir")
    return True


def _inside(path: str | os.PathLike, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def _clear_folder(folder: Path) -> None:
    """Remove a replaced run's files (rank 0 only: the other ranks of a launch may start after it
    has begun to write)."""
    # any of them: Lightning's own launcher sets only LOCAL_RANK for the ranks it starts, inside
    # a SLURM allocation whose SLURM_PROCID (0) they inherit; srun sets SLURM_PROCID alone
    if any(int(os.environ.get(k) or 0) != 0 for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID")):
        return
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


# WANDB_MODE's values as wandb reads them, in this project's modes
_WANDB_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                    "disabled": "disabled"}


def wandb_mode(mode: str) -> str:
    """`auto`: what WANDB_MODE (or WANDB_DISABLED) says if set, else online only when an API key
    is configured. An explicit recipe mode wins over the environment."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return "disabled"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        if env not in _WANDB_ENV_MODES:
            raise SetupError(f"WANDB_MODE={env!r}: unknown mode (online, offline, disabled); logging.mode=auto "
                             "follows it")
        return _WANDB_ENV_MODES[env]
    return "online" if wandb_key_configured() else "offline"


# wandb's hosted servers: a CoreWeave Forge host and the W&B API host behind it. wandb (0.31) reads
# a netrc key of either, and `wandb login` writes the first (api.forge.coreweave.com, the default
# server); older clients wrote api.wandb.ai.
_WANDB_HOSTED = {"forge.coreweave.com": "api.wandb.ai", "qa.forge.coreweave.com": "api.qa.wandb.ai"}


def _wandb_netrc_hosts(base_url: str) -> list[str]:
    """The netrc machine names wandb looks a key up under, in its order, for the server at
    `base_url`: its host and port as `wandb login` writes them, then for a Forge proxy the W&B
    API host behind it."""
    url = urlparse(base_url)
    for forge, api in _WANDB_HOSTED.items():
        if url.hostname in (forge, f"api.{forge}"):
            return [f"api.{forge}", api]
    return [url.netloc]


def wandb_key_configured() -> bool:
    """An API key in the environment, or in netrc for the W&B server (WANDB_BASE_URL) in use."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    hosts = _wandb_netrc_hosts(os.environ.get("WANDB_BASE_URL") or "https://api.forge.coreweave.com")
    try:  # read as wandb reads it (a `default` entry counts too)
        entries = netrc.netrc(Path(os.environ.get("NETRC") or "~/.netrc").expanduser())
    except (OSError, netrc.NetrcParseError):
        return False
    for host in hosts:
        entry = entries.authenticators(host)  # this host's entry, else a `default` one
        if entry:
            return bool(entry[2])  # wandb stops at the first entry, with a key or not
    return False


def _check_wandb_login(recipe: dict) -> None:
    """Online logging needs a key: refused here, before anything is cleared or built, instead of
    from inside wandb once training has started."""
    if wandb_mode(recipe["logging"]["mode"]) == "online" and not wandb_key_configured():
        raise SetupError("logging.mode: online, but no W&B API key is configured (WANDB_API_KEY or `wandb login`); "
                         "log offline with logging.mode=offline and sync later with `wandb sync`")


class _ResumedMetricsWriter(ExperimentWriter):
    """metrics.csv of a resumed run: the rows up to the checkpoint's step are kept (Lightning's
    writer deletes the file), the rows of the steps the resumed run trains again are dropped. A
    row's step is the number of steps taken (``DepthModule._row_step``)."""

    def __init__(self, log_dir: str, resume_step: int):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if not r.get("step") or int(float(r["step"])) <= self.resume_step]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.metrics_file_path, text.getvalue())
        self.metrics_keys = sorted(header)  # new columns widen the header, old ones stay


class _MetricsCSV(CSVLogger):
    def __init__(self, out_dir: Path, resume_step: int | None):
        super().__init__(save_dir=str(out_dir), name="", version="")
        self.resume_step = resume_step

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if "epoch" in metrics:  # logged through the module as a float tensor; a count reads as one
            metrics = {**metrics, "epoch": int(metrics["epoch"])}
        super().log_metrics(metrics, step)

    @property
    @rank_zero_experiment  # as Lightning's own: the other ranks get a dummy, and leave metrics.csv alone
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self.resume_step is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumedMetricsWriter(self.log_dir, self.resume_step)
        return super().experiment


def make_loggers(recipe: dict, out_dir: Path, resumed: dict | None = None) -> list:
    """metrics.csv, plus W&B unless disabled. ``resumed`` (from ``resume_from_checkpoint``)
    continues the run's metrics.csv and its W&B run instead of starting over."""
    loggers = [_MetricsCSV(out_dir, resumed["global_step"] if resumed else None)]
    lcfg = recipe["logging"]
    mode = wandb_mode(lcfg["mode"])
    if mode != "disabled":
        stages = [s["name"] for s in recipe["stages"]]
        job_type = stages[0] if len(stages) == 1 else "curriculum"
        os.environ.setdefault("WANDB_SILENT", "true")
        run_id = (resumed or {}).get("wandb_run_id") or None
        # a resumed stage-2 run is started without init_from; its W&B config keeps the parent checkpoint
        config = {**recipe, "init_from": recipe["init_from"] or (resumed or {}).get("lineage", {}).get("init_from", "")}
        wandb_logger = WandbLogger(
            project=lcfg["project"], entity=lcfg["entity"] or None, name=recipe["run"]["name"],
            group=lcfg["group"] or recipe["run"]["name"], job_type=job_type, save_dir=str(out_dir), config=config,
            # the mode goes to wandb.init: Lightning's offline=True would set WANDB_MODE for the
            # rest of the process, and a later run's `auto` would read it
            mode=mode,
            id=run_id, resume="allow" if run_id else None,
        )
        # Lightning always passes wandb an `anonymous` setting, which wandb now warns about on every run
        wandb_logger._wandb_init.pop("anonymous", None)
        loggers.append(wandb_logger)
    return loggers


class _NoAdvert(logging.Filter):
    """Drops Lightning's advert for its cloud logger, printed on every run without it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


_NO_ADVERT = _NoAdvert()


@contextlib.contextmanager
def quiet_lightning_notices():
    """Lightning's warnings and adverts that do not apply to runs built by ``build_trainer`` (each
    filter says why), off the console inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
        # Lightning's alarms about a folder in use and a mid-epoch resume: _claim_folder decides
        # who may write into the folder, and the streams resume exactly (data positions).
        warnings.filterwarnings("ignore", message=".*directory .* exists and is not empty.*")
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
        # an epoch (one pass over small shards) shorter than the logging interval: rows still come
        # every log_every_steps steps, which Lightning counts across epochs
        warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
        # a run resumed from another folder or with another checkpoint interval: there is no
        # best-k ranking to reload, only last.ckpt (any other missing callback is still reported)
        warnings.filterwarnings("ignore", message=".*The dirpath has changed from.*")
        warnings.filterwarnings("ignore", message=r".*callbacks used to create the checkpoint need to be provided.*"
                                                  r"Please add the following callbacks: \[(\"ModelCheckpoint\{[^}]*\}\"(, )?)+\]\.$")
        # on every run: DepthModule finishes batches on the device on purpose, and Lightning's own
        # use of a deprecated torch name is not ours to fix
        warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*LightningDataModule.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        # validation metrics are all-reduced by DepthModule itself (sums, then ratios); Lightning's
        # hint to sync them again comes when it reduces the epoch's values, outside log_dict
        warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
        for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
            if _NO_ADVERT not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_NO_ADVERT)
        yield


def _device_count(tcfg: dict) -> int:
    """How many devices trainer.devices asks for (its forms: see config._check_devices)."""
    devices = tcfg["devices"]
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).replace(" ", "")
    if text in ("auto", "-1"):  # every device there is: the GPUs, or one CPU process
        gpu = tcfg["accelerator"] in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        return torch.cuda.device_count() if gpu else 1
    if "," in text:  # indices
        return len([d for d in text.split(",") if d])
    return int(text)


def _one_process(tcfg: dict) -> bool:
    """One device on one node, and no launcher (torchrun, SLURM) started other processes."""
    launched = [k for k in ("WORLD_SIZE", "SLURM_NTASKS") if os.environ.get(k, "1").strip() not in ("", "1")]
    return _device_count(tcfg) == 1 and int(tcfg["num_nodes"]) == 1 and not launched


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
    if strategy == "auto" and not _one_process(tcfg):
        # Lightning's own pick for several devices forks or spawns in a notebook, leaving this
        # process's model untrained for the checkpoint saved after fit: the recipe's DDP instead
        strategy = "ddp"
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
        # a run shorter than the logging interval still logs its last step
        log_every_n_steps=min(tcfg["log_every_steps"], steps), callbacks=callbacks, logger=loggers,
        plugins=[ReportingCheckpointIO()], default_root_dir=str(out_dir), num_sanity_val_steps=0,
        enable_progress_bar=tcfg["progress"], enable_model_summary=False,
        benchmark=tcfg["cudnn_benchmark"],  # gradients are clipped by DepthModule.optimizer_step
    )


def init_from_checkpoint(module: DepthModule, path: str, recipe: dict) -> dict:
    """Stage-2 start: weights and metadata only. Optimizer, schedule and step counters start
    fresh (a full resume would carry stage 1's)."""
    ckpt = read_checkpoint(path)
    meta = metadata(ckpt, path)
    check_same_model({k: recipe["model"][k] for k in MODEL_KEYS}, meta["model"], f"init_from '{path}'")
    load_weights(module.model, ckpt, f"init_from '{path}'")
    parent_recipe = meta.get("recipe", {}) or {}
    return {
        "init_from": str(path),
        "init_from_sha256": file_sha256(path),
        "parent_stage": meta.get("stage"),
        "parent_run": meta.get("wandb_run_id", ""),
        "parent_far_target": taught_far_target(meta),  # where predict's --drop-sky starts
        "parent_group": parent_recipe.get("logging", {}).get("group") or parent_recipe.get("run", {}).get("name", ""),
        "parent_step": int(ckpt.get("global_step", 0)),
        "parent_data_seed": int(meta.get("data_seed", parent_recipe.get("run", {}).get("seed", 0))),
    }


def data_seed(seed: int, lineage: dict) -> int:
    """The training stream's seed: ``run.seed``, mixed, for a stage started with ``init_from``,
    with where its parent stood (the parent's data seed, step and stage). Such a run counts its
    steps from 0 again, so with the parent's seed it would replay the parent's batches (shard
    order, crops, flips, jitter) in the same order. Not the parent file's hash: that holds a W&B
    run id, and the same two-stage recipe would then draw other batches on every run. A resume
    keeps the seed its checkpoint records."""
    if "parent_step" not in lineage:
        return int(seed)
    key = f"{int(seed)}:{lineage['parent_data_seed']}:{lineage['parent_step']}:{lineage.get('parent_stage')}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1  # 63 bits: any seed


LINEAGE_KEYS = ("init_from", "init_from_sha256", "parent_stage", "parent_run", "parent_far_target", "parent_group",
                "parent_step", "parent_data_seed")


def _check_same_schedule(recipe: dict, old: dict, path: str) -> None:
    """A resume continues the run's schedule: its stages (lengths, policies, re-warm-ups) and the
    learning-rate curve's shape. Changed, the learning rate would jump and a stage would train
    under a policy the run never had; a new schedule is a new stage (init_from)."""
    advice = "resume needs the run's own schedule (init_from starts a new stage from its weights)"
    theirs = old.get("stages")
    if not theirs:  # a checkpoint without its recipe: nothing to compare
        return
    mine = recipe["stages"]
    if len(mine) != len(theirs):
        raise CheckpointError(f"resume '{path}': the recipe has {len(mine)} stages, the checkpoint's run "
                              f"{len(theirs)}; {advice}")
    for i, (a, b) in enumerate(zip(mine, theirs)):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                raise CheckpointError(f"resume '{path}': stages.{i}.{key} is {a.get(key)!r} in the recipe but "
                                      f"{b.get(key)!r} in the checkpoint's run; {advice}")
    # the learning rates, weight decay and betas come from the checkpoint's optimizer state: a
    # changed value would be ignored while the recipe recorded from here on claimed it
    was = (old.get("run") or {}).get("seed", recipe["run"]["seed"])
    if was != recipe["run"]["seed"]:  # the recorded stream positions point into the old seed's stream
        raise CheckpointError(f"resume '{path}': run.seed is {recipe['run']['seed']!r} in the recipe but {was!r} "
                              f"in the checkpoint's run; {advice}")
    for key in ("warmup_steps", "poly_power", "lr", "head_lr_mult", "weight_decay", "beta1", "beta2"):
        was = (old.get("optim") or {}).get(key, recipe["optim"][key])
        if was != recipe["optim"][key]:
            raise CheckpointError(f"resume '{path}': optim.{key} is {recipe['optim'][key]!r} in the recipe but "
                                  f"{was!r} in the checkpoint's run; {advice}")


def resume_from_checkpoint(path: str, recipe: dict, model: torch.nn.Module) -> dict:
    """Checks before a full resume (Lightning restores the state itself): the checkpoint is a
    training checkpoint of the recipe's model, its weights fit ``model``. Returns its step, W&B
    run and stage-2 lineage, which the resumed run carries on."""
    ckpt = read_checkpoint(path, mmap=True)  # Lightning reads the whole file itself
    meta = metadata(ckpt, path)
    if "global_step" not in ckpt or "optimizer_states" not in ckpt:
        raise CheckpointError(f"resume '{path}': holds no training state (optimizer, step); "
                              "init_from starts a new stage from its weights")
    check_same_model({k: recipe["model"][k] for k in MODEL_KEYS}, meta["model"], f"resume '{path}'")
    fitting_weights(model, ckpt, f"resume '{path}'")
    _check_same_schedule(recipe, meta.get("recipe") or {}, path)
    lineage = {k: meta[k] for k in LINEAGE_KEYS if k in meta}
    step = int(ckpt["global_step"])
    # pending when saved before its step's validation, unless that validation finished later
    # (its note beside the checkpoint; a kill after it is the usual case)
    note = Path(path).parent / VALIDATED_NOTE
    try:
        validated = int(json.loads(note.read_text())["step"]) if note.is_file() else -1
    except (OSError, ValueError, KeyError, TypeError):
        validated = -1
    # validations run in order, so a note at or past this step means this step's finished too
    done = validated >= step
    return {"global_step": step, "epoch": int(meta.get("trained_epoch", ckpt.get("epoch", 0))),
            "wandb_run_id": meta.get("wandb_run_id", ""), "lineage": lineage,
            "group": meta.get("recipe", {}).get("logging", {}).get("group", ""),
            "validation_pending": bool(meta.get("validation_pending", False)) and not done,
            "validated": done, "data_seed": meta.get("data_seed")}


def validate_pending_step(trainer: pl.Trainer, module: DepthModule, datamodule, path: str, resumed: dict) -> None:
    """Run the validation the checkpoint's step was due when the checkpoint was saved before it
    (a stop at that step, or a kill during it after a periodic save). Lightning's own restore
    skips a validation pending at a train-batch-end checkpoint, so this runs it on the
    checkpoint's weights before training goes on; its row and panel carry the checkpoint's step."""
    step = resumed["global_step"]
    if trainer.is_global_zero:
        print(f"resume: validating step {step} first (the checkpoint was saved before its scheduled validation)",
              flush=True)
    module.load_state_dict(read_checkpoint(path, mmap=True)["state_dict"], strict=True)
    module.validating_checkpoint_at = (step, resumed["epoch"])
    try:
        with _stop_during(trainer, f"the validation of step {step} that resume runs first", path):
            trainer.validate(module, datamodule=datamodule, verbose=False)
    finally:
        module.validating_checkpoint_at = None


def _forget_later_validations(out_dir: Path, resumed: dict) -> None:
    """A validation note past the checkpoint's step is an earlier attempt's, which trained beyond
    it: this attempt trains and validates those steps again, and a stop before it gets there must
    not leave the note saying they are validated (the next resume would skip one)."""
    note = out_dir / "checkpoints" / VALIDATED_NOTE
    try:
        noted = int(json.loads(note.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if noted > resumed["global_step"]:
        if resumed["validated"]:
            atomic_write_text(note, json.dumps({"step": resumed["global_step"]}))
        else:
            note.unlink(missing_ok=True)


def _stop_during(trainer: pl.Trainer, what: str, checkpoint):
    """A stop signal during a validation outside fit ends the run at once (see faults.stop_during_validation)."""
    signals = next(cb for cb in trainer.callbacks if isinstance(cb, SignalCheckpoint))
    return stop_during_validation(trainer, what, checkpoint, signals.requeue_command)


def train(cfg: DictConfig) -> dict:
    """Run a recipe; returns the final checkpoint path, the output folder and the W&B run id."""
    recipe = to_plain(cfg)
    out_dir = Path(recipe["run"]["out_dir"])
    _check_writable(out_dir)
    replace_old_run = _claim_folder(out_dir, recipe)  # refused here, before any heavy work
    _check_wandb_login(recipe)
    if recipe["trainer"]["accelerator"] in ("gpu", "cuda") and not torch.cuda.is_available():
        raise SetupError(f"trainer.accelerator={recipe['trainer']['accelerator']}, but no CUDA device is visible")
    datamodule = DepthDataModule(recipe["data"], recipe["run"]["seed"])  # shard checks before heavy work
    pl.seed_everything(recipe["run"]["seed"], workers=True, verbose=False)
    module = DepthModule(recipe)
    if recipe["model"]["pretrained"]:
        from curriculum.model import load_encoder_weights

        try:
            report = load_encoder_weights(module.model, recipe["model"]["pretrained"])
        except (CheckpointError, ValueError) as exc:
            raise CheckpointError(f"model.pretrained: {exc}") from None
        print(f"encoder initialised from {recipe['model']['pretrained']}: {report}")
    resumed = resume_from_checkpoint(recipe["resume"], recipe, module.model) if recipe["resume"] else None
    if resumed:
        # the stage that trained the checkpoint's last step, as in the run that saved it: what a
        # pending validation and a finished run's final save report (fit runs no hook for those)
        module.set_stage(stage_index_at(max(resumed["global_step"] - 1, 0), module.stages))
    lineage = init_from_checkpoint(module, recipe["init_from"], recipe) if recipe["init_from"] else \
        (resumed or {}).get("lineage", {})
    # a resumed run keeps the seed its stream was drawn with (runs from before the seed was
    # recorded used run.seed)
    datamodule.seed = data_seed(recipe["run"]["seed"], lineage) if resumed is None else \
        int(resumed["data_seed"] if resumed["data_seed"] is not None else recipe["run"]["seed"])
    module.extra_metadata["data_seed"] = datamodule.seed
    if lineage:
        module.extra_metadata.update(lineage)
        recipe["logging"]["parent_run"] = lineage.get("parent_run", "")
        recipe["logging"]["parent_checkpoint_sha256"] = lineage.get("init_from_sha256", "")
    if not recipe["logging"]["group"]:  # one W&B group for the stages of one experiment
        recipe["logging"]["group"] = (resumed or {}).get("group") or lineage.get("parent_group") or recipe["run"]["name"]
    with quiet_lightning_notices():
        if replace_old_run:  # every input read and checked: only now is the old run removed
            _clear_folder(out_dir)
        loggers = make_loggers(recipe, out_dir, resumed)
        wandb_logger = next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)
        trainer = build_trainer(recipe, out_dir, loggers)
        if resumed and trainer.is_global_zero:
            _forget_later_validations(out_dir, resumed)
        if resumed and resumed["validation_pending"]:
            validate_pending_step(trainer, module, datamodule, recipe["resume"], resumed)
        elif resumed and resumed["validated"]:  # a finished run resumed: its final validation is done
            module.validated_step = resumed["global_step"]
        final = out_dir / "checkpoints" / "last.ckpt"
        signals = next(cb for cb in trainer.callbacks if isinstance(cb, SignalCheckpoint))
        signals.hold_after_fit = True  # a stop signal between fit's end and the final save waits for it
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=recipe["resume"] or None,
                        weights_only=False if recipe["resume"] else None)
            # Saved before the final validation: a signal during it then costs the validation only,
            # not the steps since the last periodic save.
            trainer.save_checkpoint(final, weights_only=False)  # the full state, resumable
            signals.after_final_save(trainer, final)
        finally:
            signals.hold_after_fit = False
            signals._restore()
        # the final model, always, unless the run's own schedule has just validated it (every N
        # steps, or at an epoch's end); a resumed run whose stop came before that validation does it here
        if module.validated_step != trainer.global_step:
            # at the epoch of the last step trained: Lightning's epoch count has moved on after fit
            trained = module.trained_epoch if module.trained_epoch >= 0 else trainer.current_epoch
            module.validating_checkpoint_at = (trainer.global_step, trained)
            try:
                with _stop_during(trainer, "the final validation", final):
                    trainer.validate(module, datamodule=datamodule, verbose=False)
            finally:
                module.validating_checkpoint_at = None
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
