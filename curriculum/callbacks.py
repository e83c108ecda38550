"""The curriculum callback: which mask policy is active, decided from the global step."""
from __future__ import annotations

import sys
import time

import lightning.pytorch as pl
import torch
from tqdm import tqdm

from curriculum.late_read import LateRead
from curriculum.masks import describe_policy
from curriculum.schedule import stage_index_at, stage_starts


class CurriculumCallback(pl.Callback):
    """Switches the module's stage (mask policy) at the stage boundaries of the recipe.

    The active stage is a function of `trainer.global_step` alone, so every rank switches at the
    same step and a resumed run lands in the right stage. The switch history is kept in
    checkpoints (under this callback's state key) so a resumed run can report it.
    """

    def __init__(self, stages: list[dict]):
        self.stages = stages
        self.starts = stage_starts(stages)
        self.switches: list[tuple[int, str]] = []  # (global step, stage name) of each activation

    @property
    def state_key(self) -> str:
        return "CurriculumCallback"

    def _sync(self, trainer: pl.Trainer, module) -> None:
        index = stage_index_at(trainer.global_step, self.stages)
        if index != module.stage_index:
            module.set_stage(index)
        name = self.stages[index]["name"]
        if not self.switches or self.switches[-1][1] != name:
            self.switches.append((int(trainer.global_step), name))
            if trainer.is_global_zero:  # above the progress bar, also when it is off
                tqdm.write(f"step {trainer.global_step}: stage '{name}', mask policy {describe_policy(module.policy)}",
                           file=sys.stdout)

    def on_train_start(self, trainer, module) -> None:
        self._sync(trainer, module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._sync(trainer, module)
        # a CPU tensor: Lightning makes a Python number a tensor on the device, a blocking copy
        module.log("curriculum/stage", torch.tensor(float(module.stage_index)), on_step=True, on_epoch=False)
        # the curriculum's position across the runs of one experiment (the stage index restarts
        # in a stage-2 run): 1 = far and sky supervised, 0 = the 80 m mask
        module.log("curriculum/far_weight", torch.tensor(float(module.policy.far_weight)), on_step=True,
                   on_epoch=False)

    def state_dict(self) -> dict:
        return {"switches": [list(s) for s in self.switches], "starts": list(self.starts)}

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("starts", [])) != self.starts:
            raise ValueError(
                f"checkpoint stage boundaries {state.get('starts')} differ from the recipe's {self.starts}: "
                "resume needs the same stage schedule (use init_from to start a new stage)"
            )
        self.switches = [(int(step), str(name)) for step, name in state.get("switches", [])]


class StepProgressBar(pl.callbacks.ProgressBar):
    """One bar over the whole run (global step / max_steps) with stage, loss, images/s and ETA.

    Lightning's default bar restarts every epoch, which says nothing about when a multi-stage run
    ends; epochs here are only data-pass boundaries.
    """

    def __init__(self, refresh_steps: int = 1):
        super().__init__()
        self.refresh_steps = max(1, refresh_steps)
        self._enabled = True
        self.bar = None
        self._start_step = 0
        self._t0 = 0.0
        self._loss = LateRead([float("nan")])
        self.val_bar = None
        self._val_images = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, module) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        self._start_step = trainer.global_step
        self._t0 = time.perf_counter()
        self._loss = LateRead([float("nan")])  # not the loss of an earlier fit
        self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="train", unit="step",
                        dynamic_ncols=True, smoothing=0.05)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.bar is None or trainer.global_step % self.refresh_steps:
            return
        done = trainer.global_step - self._start_step
        images = done * len(batch["key"]) * trainer.world_size
        loss = float("nan")
        if isinstance(outputs, dict) and "loss" in outputs:
            # on a GPU the loss of the previous refresh: reading this one would wait for the device
            loss = self._loss.push(outputs["loss"].detach().float().reshape(1))[0]
        self.bar.set_postfix(stage=module.stage_name, loss=f"{loss:.3f}",
                             img_s=f"{images / max(time.perf_counter() - self._t0, 1e-9):.1f}", refresh=False)
        self.bar.update(trainer.global_step - self.bar.n)  # draws the line: after its new postfix

    def on_train_end(self, trainer, module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # Validation gets its own bar (batches, images/s) under the training bar; a full-size
    # validation set takes minutes.
    def on_validation_start(self, trainer, module) -> None:
        self.val_bar = None
        if self._enabled and trainer.is_global_zero and not trainer.sanity_checking:
            self.val_bar = tqdm(desc="validate", unit="batch", dynamic_ncols=True, leave=False,
                                position=0 if self.bar is None else 1)
            self._val_images = 0
            self._val_t0 = time.perf_counter()

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.val_bar is not None:
            self._val_images += len(batch["key"])
            self.val_bar.update(1)
            self.val_bar.set_postfix(images=self._val_images, refresh=False)

    def on_validation_end(self, trainer, module) -> None:
        if self.val_bar is not None:
            seconds = time.perf_counter() - self._val_t0
            self.val_bar.close()
            self.val_bar = None
            ranks = f" on rank 0 of {trainer.world_size}" if trainer.world_size > 1 else ""
            step = module._validated_at()[0] if hasattr(module, "_validated_at") else trainer.global_step
            tqdm.write(f"validation at step {step}: {self._val_images} images{ranks} in {seconds:.1f} s "
                       f"({self._val_images / max(seconds, 1e-9):.1f} images/s)", file=sys.stderr)
