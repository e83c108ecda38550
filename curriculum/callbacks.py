"""The curriculum callback: which mask policy is active, decided from the global step."""
from __future__ import annotations

import lightning.pytorch as pl

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

    def on_train_start(self, trainer, module) -> None:
        self._sync(trainer, module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._sync(trainer, module)
        module.log("curriculum/stage", float(module.stage_index), on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"switches": [list(s) for s in self.switches], "starts": list(self.starts)}

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("starts", [])) != self.starts:
            raise ValueError(
                f"checkpoint stage boundaries {state.get('starts')} differ from the recipe's {self.starts}: "
                "resume needs the same stage schedule (use init_from to start a new stage)"
            )
        self.switches = [(int(step), str(name)) for step, name in state.get("switches", [])]
