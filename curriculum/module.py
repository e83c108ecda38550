"""The Lightning module: wires model, active mask policy, loss, optimizer and metrics together.

Everything numeric lives in model.py, masks.py, losses.py and metrics.py; this file only decides
when each runs, what is logged, and what a checkpoint carries.
"""
from __future__ import annotations

import functools
import json
import math
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from curriculum.checkpoint import META_KEY, build_metadata
from curriculum.config import total_steps
from curriculum.data import DataError, StreamPositions, finish_train_batch, normalize_images
from curriculum.layers import upsample_depth
from curriculum.losses import compute_loss
from curriculum.masks import build_policy, policy_to_dict
from curriculum.metrics import MetricAccumulator
from curriculum.model import build_model
from curriculum.optim import NonFiniteCounter, before_step, match_restored_groups, release
from curriculum.schedule import lr_factor
from data_prep.files import atomic_write_text

MODEL_KEYS = ("encoder", "head", "min_depth", "max_depth", "uncertainty")
VALIDATED_NOTE = "validated.json"  # beside a run's checkpoints: the step its last finished validation measured
EVAL_MAX_DEPTH = 80.0  # the near/far split of every report (DESIGN.md, Metrics)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with non-finite gradients."""


class DepthModule(pl.LightningModule):
    def __init__(self, recipe: dict):
        super().__init__()
        self.recipe = recipe
        mcfg = recipe["model"]
        self.model = build_model({k: mcfg[k] for k in MODEL_KEYS})
        if mcfg.get("grad_checkpointing"):
            self.model.set_grad_checkpointing(True)
        if mcfg.get("channels_last"):
            self.model.depth_head.to(memory_format=torch.channels_last)
        lcfg = recipe["loss"]
        self.loss_args = {"silog_lambda": float(lcfg["silog_lambda"]), "grad_weight": float(lcfg["grad_weight"]),
                          "nll_weight": float(lcfg["nll_weight"])}
        self._build_step_callables()
        self.stages = recipe["stages"]
        self.stage_index = -1
        self.set_stage(0)
        self.val_metrics = MetricAccumulator(min_depth=1e-3, max_depth=EVAL_MAX_DEPTH)
        self.max_nonfinite = int(recipe["trainer"]["max_nonfinite_steps"])
        self.grad_clip = float(recipe["optim"]["grad_clip"])  # total 2-norm; 0 = no clipping
        self.nonfinite = NonFiniteCounter()
        self._uncounted_skips = 0  # skips of a step a checkpoint saved inside it will run again
        self._predicted_nonfinite: torch.Tensor | bool = False  # this step's prediction held NaN/inf
        self.data_error: str | None = None  # this rank's training-data error (DDP: _StopTogether)
        self.bad_samples = 0
        self.stream_positions = StreamPositions(max(1, int(recipe["data"]["num_workers"])))
        self._pending_batch: tuple | None = None  # (step, stream position, bad samples) until the step is taken
        self.train_batches = 0  # batches this rank trained on in this process
        self.validated_step = -1  # global step of the last finished validation in this process
        # (step, epoch) a validation reports instead of the trainer's: set for the validation of a
        # checkpoint's step that a resume runs before training on (train.validate_pending_step)
        self.validating_checkpoint_at: tuple[int, int] | None = None
        self.trained_epoch = -1  # epoch of the last step trained (Lightning's moves on after fit)
        self._t_last = None
        # seconds since then that were not training: validations, panels, checkpoint writes
        self._paused, self._val_t0, self._saved_seen = 0.0, None, 0.0
        self.extra_metadata: dict = {}

    # ------------------------------------------------------------------ stages
    def set_stage(self, index: int) -> None:
        self.stage_index = index
        self.policy = build_policy(dict(self.stages[index]["policy"]))

    @property
    def stage_name(self) -> str:
        return self.stages[self.stage_index]["name"]

    def on_train_start(self) -> None:
        # restored optimizer state (resume) carries the saved run's kernel choice
        for optimizer in self.trainer.optimizers:
            match_restored_groups(getattr(optimizer, "optimizer", optimizer))

    def on_fit_start(self) -> None:
        # The W&B run id goes into every checkpoint so stage 2 can name its parent run.
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger" and self.trainer.is_global_zero:
                self.extra_metadata["wandb_run_id"] = logger.experiment.id

    # ------------------------------------------------------------------ steps
    def forward(self, images: torch.Tensor):
        return self._forward_model(images)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        finish_train_batch(batch, self.recipe["data"]["crop_height"], self.recipe["data"]["crop_width"])
        batch["image_uint8"] = batch["image"]
        fmt = torch.channels_last if self.recipe["model"].get("channels_last") else torch.contiguous_format
        batch["image"] = normalize_images(batch["image"]).contiguous(memory_format=fmt)
        return batch

    def _predict_and_loss(self, images, target, weight, model=None):
        pred = (self.model if model is None else model)(images)
        return pred.depth, compute_loss(pred, target, weight, **self.loss_args)

    _STEP_CALLABLES = ("_forward_model", "_predict_and_loss_fn")

    def _build_step_callables(self) -> None:
        """What forward and training call: the model, compiled under ``model.compile``, and
        ``_predict_and_loss`` around it. The loss runs eagerly after the compiled model: traced
        into one graph with it, its fused reduction kernels failed to compile for CUDA (Triton's
        "PassManager::run failed" in make_ttgir, torch 2.11 on an H200, 2026-11-27), though
        inductor's CPU code for them built; the mask policy stays outside either way.

        Held outside the module tree, so state dicts never hold `_orig_mod.` keys (what a compiled module saves).
        The plain function is compiled, not a bound method: one held by the instance would tie a
        deep copy to the original's weights and make the module refer to itself. Compiled
        wrappers cannot be pickled, so __getstate__ drops these and __setstate__ rebuilds them."""
        mcfg = self.recipe["model"]
        forward, step = self.model, DepthModule._predict_and_loss
        if mcfg.get("compile"):
            forward = torch.compile(self.model, mode=mcfg.get("compile_mode", "default"))
            step = functools.partial(DepthModule._predict_and_loss, model=forward)
        object.__setattr__(self, "_forward_model", forward)
        object.__setattr__(self, "_predict_and_loss_fn", step)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for name in self._STEP_CALLABLES:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._build_step_callables()

    def training_losses(self, batch: dict, compiled: bool = True):
        """(predicted depth, loss weights, ``compute_loss`` parts) of a batch finished by
        ``on_after_batch_transfer``, under the active mask policy. ``compiled=False`` runs the
        eager model and loss even under the compile switch."""
        weight, target = self.policy(batch["depth"], batch["sky"], batch["no_measurement"])
        run = self._predict_and_loss_fn if compiled else DepthModule._predict_and_loss
        depth, losses = run(self, batch["image"], target, weight)
        return depth, weight, losses

    def training_step(self, batch, batch_idx):
        depth, weight, losses = self.training_losses(batch)
        self._predicted_nonfinite = losses["nonfinite_prediction"]  # a device flag, read only at a stop
        self._take_pending_batch()
        self.bad_samples += batch.get("bad_samples", 0)  # plain ints from the loader: no device sync
        self._pending_batch = (self.global_step, batch.get("stream_position"), batch.get("bad_samples", 0))
        self.train_batches += 1
        self.trained_epoch = self.current_epoch
        if batch.get("data_error"):  # see _data_position
            self.data_error = str(batch["data_error"])
        bs = batch["image"].shape[0]
        log = {f"train/{k}": v.detach().float() for k, v in losses.items()}
        log["train/valid_fraction"] = (weight > 0).float().mean()
        # Host numbers go to the logger as CPU tensors: Lightning would turn a Python number into
        # a tensor on the module's device, a blocking copy that drains the device's queue each step.
        host = {"train/bad_samples": self.bad_samples, "train/skipped_steps": self.skipped_steps,
                **self._row_step(self.global_step + 1)}  # this step's update is taken when the row is written
        now = time.perf_counter()
        saved = float(getattr(self.trainer.strategy.checkpoint_io, "save_seconds", 0.0)) if self._trainer else 0.0
        self._paused += saved - self._saved_seen
        self._saved_seen = saved
        if self._t_last is not None:
            host["train/images_per_sec"] = bs * self.trainer.world_size / max(now - self._t_last - self._paused, 1e-9)
        self._t_last, self._paused = now, 0.0
        for i, group in enumerate(self.optimizers().param_groups if self._trainer else []):
            host[f"train/lr_{group.get('name', i)}"] = group["lr"]
        log.update({k: torch.tensor(float(v)) for k, v in host.items()})
        # No prog_bar metrics: Lightning converts those to Python numbers after every step (a device
        # sync); StepProgressBar shows the loss, read a step late.
        self.log_dict(log, on_step=True, on_epoch=False, batch_size=bs)
        every = self.recipe["logging"]["image_every_steps"]
        if every and self.global_step % every == 0 and self.global_rank == 0:
            start = time.perf_counter()
            self._log_panel("train/panel", batch, depth.detach(), 0)
            self._paused += time.perf_counter() - start  # drawing it is not the next step's time
        return losses["loss"]

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """Skips the update when the loss or any gradient is non-finite (``curriculum.optim``:
        decided on the device where the optimizer is fused, so no step waits for the host).

        Under DDP the ranks agree on the decision (one all-reduce of a flag): a loss that is
        non-finite on one rank only can leave the averaged gradients finite, and a rank that
        stepped alone would leave the replicas different for the rest of the run.
        """
        opt = getattr(optimizer, "optimizer", optimizer)  # under Lightning's wrapper
        ddp = dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1
        params = [p for p in self.parameters() if p.requires_grad]

        def closure():
            loss = optimizer_closure()
            # clipped here, not through Lightning's gradient_clip_val: its bf16 precision plugin
            # refuses to clip for fused optimizers
            before_step(opt, params, loss, self.nonfinite, self.grad_clip,
                        all_reduce=(lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX)) if ddp else None)
            return loss

        try:
            optimizer.step(closure=closure)
        finally:
            release(opt)
        # the streak as of this step on the CPU, as of the step before on a device (read late, unsynced)
        if self.nonfinite.streak >= self.max_nonfinite:
            streak = self.nonfinite.streak  # the sync below may read a newer streak, reset by a good step
            self.nonfinite.sync()
            what = f"{streak} consecutive steps with non-finite loss or gradients at step {self.global_step}"
            # skipped steps leave the weights as they were; only weights that are finite are "good"
            if not all(bool(torch.isfinite(p).all()) for p in params):
                raise NonFiniteError(f"{what}; the weights themselves are non-finite, so no checkpoint was "
                                     "saved: resume from an earlier one")
            # finite weights that predict NaN, on any rank: every rank decides alike (one that left
            # alone would leave the others waiting in the checkpoint's gather)
            predicted = torch.as_tensor(self._predicted_nonfinite, dtype=torch.float32,
                                        device=self.trainer.strategy.root_device).clone()
            if ddp:
                dist.all_reduce(predicted, op=dist.ReduceOp.MAX)
            if bool(predicted):
                raise NonFiniteError(f"{what}; the weights predict non-finite depth, so no checkpoint was "
                                     "saved: resume from an earlier one (with a lower optim.lr?)")
            path = Path(self.recipe["run"]["out_dir"]) / "checkpoints" / "nonfinite-stop.ckpt"
            # saved inside this step, which a resume runs again: its own skip is not counted yet
            self._uncounted_skips = int(self.nonfinite.streak > 0)
            try:
                self.trainer.save_checkpoint(path, weights_only=False)
            finally:
                self._uncounted_skips = 0
            raise NonFiniteError(f"{what}; last good weights saved to {path}")

    @property
    def skipped_steps(self) -> int:
        return self.nonfinite.skipped

    def _row_step(self, steps_taken: int, epoch: int | None = None) -> dict:
        """The step and epoch of a metrics row (metrics.csv, W&B's trainer/global_step): the number of
        optimizer steps taken, as the console, panels and checkpoints count. Lightning's own default
        is the 0-based index of the last step inside fit and the count after it, which put a
        validation after 60 steps at 59 and the final one at the count."""
        epoch = self.current_epoch if epoch is None else epoch
        return {"step": torch.tensor(float(steps_taken)), "epoch": torch.tensor(float(epoch))}

    def _validated_at(self) -> tuple[int, int]:
        """(step, epoch) of the weights a validation measures."""
        return self.validating_checkpoint_at or (self.global_step, self.current_epoch)

    def validation_due(self, step: int) -> bool:
        """Whether the run's schedule validates after ``step`` steps: every ``val_every_steps``,
        else at each epoch's end, and after the last step."""
        if step <= 0:
            return False
        if step >= total_steps(self.recipe):
            return True
        every = int(self.recipe["trainer"]["val_every_steps"])
        if every:
            return step % every == 0
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        return datamodule is not None and step % datamodule.batches_per_rank(trainer.world_size) == 0

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()

    def validation_step(self, batch, batch_idx):
        pred = self(batch["image"]).depth.float()
        for i in range(pred.shape[0]):
            h, w = (int(v) for v in batch["size"][i])
            p = upsample_depth(pred[i][None], (h, w))
            self.val_metrics.update(p, batch["depth"][i : i + 1, :h, :w], batch["sky"][i : i + 1, :h, :w],
                                    batch["valid"][i : i + 1, :h, :w])
            if batch_idx == 0 and i == 0 and self.global_rank == 0:
                self._log_panel("val/panel", batch, p, 0, size=(h, w), step=self._validated_at()[0])

    def on_validation_epoch_end(self) -> None:
        # One reduction of sums and counts per epoch: every image counts once across ranks and
        # no collective runs per step (a per-step sync_dist deadlocks when ranks validate unevenly).
        state = self.val_metrics.state().to(self.device)
        if dist.is_available() and dist.is_initialized():
            # with a flag for a rank whose validation data failed (curriculum.data._EndOnDataError):
            # every rank stops here with it, none waits for that rank
            error = self._val_data_error()
            flagged = torch.cat([state, torch.full((1,), float(error is not None), dtype=state.dtype, device=state.device)])
            dist.all_reduce(flagged, op=dist.ReduceOp.SUM)
            state = flagged[:-1]
            if flagged[-1].item() > 0:
                raise DataError(error or f"rank {self.global_rank} stopped validating at step {self._validated_at()[0]}: "
                                "another rank's validation data failed (its error is above)")
        self.val_metrics.load_state(state.cpu())
        results = self.val_metrics.compute()
        logged = {f"val/{k}": float(v) for k, v in results.items() if not (isinstance(v, float) and math.isnan(v))}
        step, epoch = self._validated_at()
        logged.update({k: float(v) for k, v in self._row_step(step, epoch).items()})
        with warnings.catch_warnings():  # already reduced above; Lightning's sync hint does not apply
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
            self.log_dict(logged, on_step=False, on_epoch=True, sync_dist=False)
        self.last_val_results = results
        self.validated_step = step  # the weights of this step are validated

    def on_validation_start(self) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self) -> None:
        if self._val_t0 is not None:  # not training time: the next step's rate leaves it out
            self._paused += time.perf_counter() - self._val_t0
            self._val_t0 = None
        # A checkpoint of this step, saved before this validation, says it was pending; this note
        # keeps a resume from running it again (train.resume_from_checkpoint). Written once the
        # loggers have put the validation's row on disk, so a kill between the two loses neither.
        if self.global_rank != 0 or self._trainer is None or self.validated_step < 0:
            return
        for logger in self.loggers:
            logger.save()
        atomic_write_text(Path(self.recipe["run"]["out_dir"]) / "checkpoints" / VALIDATED_NOTE,
                          json.dumps({"step": int(self.validated_step)}))

    def _val_data_error(self) -> str | None:
        stream = getattr(getattr(self._trainer, "datamodule", None), "val_stream", None)
        return getattr(stream, "data_error", None)

    # ------------------------------------------------------------------ images
    def _log_panel(self, key, batch, pred, i, size=None, step=None):
        from curriculum.evaluate import PANEL_VMIN, image_panel, save_panels

        h, w = size or pred.shape[-2:]
        p = pred[i] if pred.dim() == 3 else pred
        vmax = self.recipe["logging"]["depth_vmax"]
        panel = image_panel(batch, i, p[:h, :w], vmax, rgb_key="image_uint8")
        out = Path(self.recipe["run"]["out_dir"]) / "panels"
        out.mkdir(parents=True, exist_ok=True)
        step = self.global_step if step is None else step
        name = f"{key.replace('/', '_')}_step{step:07d}.png"
        # the same titled figure (column titles, colour bar in metres) on disk and in W&B
        label = f"{self.recipe['run']['name']} {key} after {step} steps ({self.stage_name})"
        figure = save_panels([panel], out / name, label, PANEL_VMIN, vmax)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=key, images=[str(figure)], step=step, caption=[label])

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        ocfg = self.recipe["optim"]
        fused = bool(ocfg["fused"]) and self.device.type == "cuda"  # the module is on its device by now
        groups = [
            {"params": [p for p in self.model.encoder_parameters() if p.requires_grad], "lr": ocfg["lr"], "name": "encoder"},
            {"params": [p for p in self.model.head_parameters() if p.requires_grad],
             "lr": ocfg["lr"] * ocfg["head_lr_mult"], "name": "head"},
        ]
        optimizer = torch.optim.AdamW(groups, lr=ocfg["lr"], betas=(ocfg["beta1"], ocfg["beta2"]),
                                      weight_decay=ocfg["weight_decay"], fused=fused or None)
        schedule = functools.partial(lr_factor, stages=[dict(s) for s in self.stages],
                                     warmup_steps=ocfg["warmup_steps"], poly_power=ocfg["poly_power"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite.sync()
        position = self._data_position()
        checkpoint[META_KEY] = build_metadata(
            self.model.metadata(), policy_to_dict(self.policy), self.stage_name, self.recipe,
            {"stage_index": self.stage_index, "skipped_steps": self.skipped_steps - self._uncounted_skips,
             "bad_samples": position["bad_samples"][0],  # rank 0's, as logged
             "data_position": position,
             # saved before this step's scheduled validation ran (a stop or a periodic save at
             # that step): a resume runs it first (train.validate_pending_step)
             "validation_pending": self.validation_due(self.global_step) and self.validated_step != self.global_step,
             "trained_epoch": self.trained_epoch if self.trained_epoch >= 0 else self.current_epoch,
             **self.extra_metadata},
        )
        # Weights without any compile wrapper prefix (`_orig_mod.`).
        checkpoint["state_dict"] = {k.replace("_orig_mod.", ""): v for k, v in checkpoint["state_dict"].items()}

    def _take_pending_batch(self) -> None:
        """The last trained batch counts as consumed once its step is taken (the global step has
        moved past it): a checkpoint saved inside the step (the non-finite stop) resumes at that
        step and so must read the batch again."""
        if self._pending_batch is not None and self._pending_batch[0] < self.global_step:
            if self._pending_batch[1] is not None:
                self.stream_positions.note(self._pending_batch[1])
            self._pending_batch = None

    def _data_layout(self) -> dict:
        """What stream positions hold for: a resume with another layout falls back (curriculum.data)."""
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        datamodule = getattr(trainer, "datamodule", None)
        return {"world_size": world, "streams": len(self.stream_positions.drawn),
                "batch_size": int(self.recipe["data"]["batch_size"]),
                "batches_per_rank": datamodule.batches_per_rank(world) if datamodule is not None else 0}

    @staticmethod
    def _gather(row: torch.Tensor) -> torch.Tensor:
        """(world size, n): every rank's ``row``, by c10d's all_gather (LightningModule.all_gather
        goes through a torch path that warns it is deprecated)."""
        gathered = [torch.empty_like(row) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, row)
        return torch.stack(gathered)

    def _data_position(self) -> dict:
        """Every rank's bad-sample count and stream positions, gathered: the file is written by
        rank 0, but each rank resumes its own streams. Every rank saves every checkpoint (Lightning's
        save is collective), so the gather is too."""
        self._take_pending_batch()
        bad = self.bad_samples - (self._pending_batch[2] if self._pending_batch is not None else 0)
        row = [bad, self.stream_positions.epoch, *self.stream_positions.drawn, int(self.data_error is not None)]
        layout = self._data_layout()
        if layout["world_size"] > 1:
            # the strategy's device: after fit, Lightning moves the module to the CPU, which NCCL cannot gather
            device = self.trainer.strategy.root_device
            rows = self._gather(torch.tensor(row, dtype=torch.int64, device=device)).tolist()
        else:
            rows = [row]
        if any(r[-1] for r in rows):
            # a rank trained on empty batches since its data failed (curriculum.data._StopTogether);
            # on GPUs the stop comes a step late, after this save: every rank stops here instead
            raise DataError(self.data_error or f"rank {self.global_rank} stopped at step {self.global_step}: "
                            "another rank's training data failed (its error is above)")
        rows = [r[:-1] for r in rows]
        return {**layout, "bad_samples": [r[0] for r in rows], "epoch": [r[1] for r in rows],
                "drawn": [r[2:] for r in rows]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get(META_KEY, {})
        self.nonfinite = NonFiniteCounter(skipped=int(meta.get("skipped_steps", 0)))
        # counted on, as skipped_steps; each rank its own count where the checkpoint has them for
        # this world size (else rank 0's), and its stream positions where the whole data layout
        # is unchanged (else the stream skips one sample per trained sample: see curriculum.data)
        self.bad_samples = int(meta.get("bad_samples", 0))
        self.trained_epoch = int(meta.get("trained_epoch", -1))
        self._pending_batch = None
        position, rank = meta.get("data_position"), self.global_rank
        if not position or position["world_size"] != self.trainer.world_size:
            return
        self.bad_samples = int(position["bad_samples"][rank])
        layout = self._data_layout()
        if all(position.get(k) == v for k, v in layout.items()):
            self.stream_positions = StreamPositions(layout["streams"], int(position["epoch"][rank]),
                                                    position["drawn"][rank])
