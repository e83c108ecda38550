"""Faults during a run: stop signals that end in a checkpoint, checkpoint writes that fail in one line.

Signals (SIGTERM, SIGINT, SIGUSR1, SIGHUP) only set a flag; the run acts on it at a training-batch
boundary (the next one; on GPUs under DDP the one after, see ``SignalCheckpoint._agreed``), where
every rank agrees (an all-reduce MAX of the flag) so that all ranks save and stop after the same
optimizer step, whichever rank the signal reached and when. The checkpoint then is
an ordinary mid-epoch `last.ckpt`: `resume=<it>` continues the run exactly where it stopped (the
data stream skips the batches already trained on; see curriculum/data.py).
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import pickle
import shlex
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import NoReturn

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from curriculum.checkpoint import AtomicCheckpointIO, CheckpointError
from curriculum.data import DataError
from curriculum.late_read import LateRead

# A second SIGINT this soon after the first is the same Ctrl-C arriving twice (the terminal's and a
# wrapper's relay), not a request to stop at once.
SECOND_SIGINT_AFTER_S = 1.0
# Priority when ranks received different signals: a requeue request wins over a plain stop.
# SIGHUP: a closed terminal (an ssh session that dropped) stops the run as SIGTERM does, with a
# checkpoint, unless it is ignored (nohup), as it then stays.
_PRIORITY = {signal.SIGINT: 1, signal.SIGHUP: 2, signal.SIGTERM: 3, signal.SIGUSR1: 4}
_BY_PRIORITY = {v: k for k, v in _PRIORITY.items()}
# A rank's training data failed (curriculum.data._StopTogether): above every signal, as that rank
# has nothing left to train on.
_DATA_ERROR = 5


class RunInterrupted(SystemExit):
    """A run stopped by a signal after saving a checkpoint. Exit status 128 + signal number."""

    def __init__(self, message: str, signum: int, step: int, checkpoint: str, requeued: bool = False):
        super().__init__(128 + int(signum))
        self.message = message
        self.signum = int(signum)
        self.step = int(step)
        self.checkpoint = checkpoint
        self.requeued = requeued

    def __str__(self) -> str:
        return self.message


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _distributed(trainer: pl.Trainer) -> bool:
    return dist.is_available() and dist.is_initialized() and trainer.world_size > 1


def _noop() -> None:
    return None


class SignalCheckpoint(pl.Callback):
    """Saves `checkpoint` and stops the run on SIGTERM, SIGINT or SIGUSR1 (SLURM: save, requeue).

    The handlers are installed when fitting starts, before loader workers are forked (a worker
    that inherits them only sets its own, unused flag), and the previous handlers come back
    when fitting ends. Lightning's own SIGTERM handling is held off meanwhile: it forwards the
    signal to the other local ranks and exits without a checkpoint. A second SIGINT while a stop
    is pending stops at once (KeyboardInterrupt), for a step that never ends.
    """

    read_late: bool | None = None  # None: the agreement is read one step late on GPUs only

    def __init__(self, checkpoint: str | os.PathLike, requeue_command: str = "scontrol requeue"):
        self.checkpoint = Path(checkpoint)
        self.requeue_command = requeue_command
        self.pending = 0  # priority of the strongest signal received, 0 = none
        self.received: list[int] = []
        self.data_error: str | None = None  # this rank's data error, carried by its batches
        self._late = LateRead([0], late=self.read_late)
        self._taken: tuple | None = None  # what _take_signals replaced, until fitting ends
        # kept past fit's end until the run's final checkpoint is written (train.train): a signal
        # in between would otherwise meet the default handlers and end the process unsaved
        self.hold_after_fit = False
        self._first_sigint = -math.inf

    # ------------------------------------------------------------------ handlers
    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if signum == signal.SIGINT and self.pending:
            if now - self._first_sigint < SECOND_SIGINT_AFTER_S:
                return  # the same Ctrl-C delivered twice (a wrapper such as timeout relays it)
            sys.stderr.write("second SIGINT: stopping at once, without a checkpoint (the last periodic one stands)\n")
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            self._first_sigint = now
        self.received.append(int(signum))
        self.pending = max(self.pending, _PRIORITY.get(signum, 0))

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not _in_main_thread():
            return
        self.pending = 0
        self.received = []
        self.data_error = None
        self._first_sigint = -math.inf
        self._late = LateRead([0], late=self.read_late)
        self._taken = _take_signals(trainer, self._handle)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and not self.hold_after_fit:
            self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Lightning skips the teardown hooks when fitting ends in an exception.
        self._restore()

    def _restore(self) -> None:
        if self._taken is not None:
            _give_back_signals(*self._taken, self._handle)
            self._taken = None

    def after_final_save(self, trainer, checkpoint: str | os.PathLike) -> None:
        """Once the final checkpoint is written: a stop signal received since fitting ended stops
        the run now (per rank, as there is no step left to agree on), before the final
        validation; the handlers go back either way."""
        pending, self.pending = self.pending, 0
        self._restore()
        if pending and pending != _DATA_ERROR:
            signum = _BY_PRIORITY[pending]
            _interrupt(trainer, signum, f"interrupted at step {trainer.global_step} by {signal.Signals(signum).name}"
                       f"{_after_training(trainer, trainer.lightning_module)}; checkpoint saved to {checkpoint}; "
                       f"resume with resume={checkpoint}", checkpoint, self.requeue_command)

    # ------------------------------------------------------------------ acting on a signal
    def _agreed(self, trainer, now: bool = False, reduced_only: bool = False) -> int:
        """The signal every rank acts on (0 = none); a collective, so every rank calls it each step.

        On GPUs the ranks' agreement is read one step late (``LateRead``): reading it at once
        would make the host wait for the device to finish the step it has just queued, every
        step. Every rank reads the same value at the same step, so they still stop together,
        one step after the signal. ``now``: read at once (the end of training). ``reduced_only``:
        no collective, just the last agreement, waited for (before validation)."""
        code = self.pending
        if _distributed(trainer) and reduced_only:
            return int(self._late.latest()[0])
        if _distributed(trainer):
            # torch.full, not torch.tensor: no blocking host-to-device copy
            flag = torch.full((1,), code, dtype=torch.int32, device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item()) if now else int(self._late.push(flag)[0])
        return code

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict) and batch.get("data_error"):
            self.data_error = str(batch["data_error"])
            self.pending = _DATA_ERROR
        self._maybe_stop(trainer, "", flush=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        # Read late, a stop agreed at the step before validation would wait for the whole of it
        # (and a SLURM grace period may be shorter); every rank reads the same agreement here.
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._maybe_stop(trainer, " (before validation)", reduced_only=True)

    def on_train_end(self, trainer, pl_module) -> None:
        # A signal after the last step's boundary (epoch-end validation): keep the final state.
        self._maybe_stop(trainer, _after_training(trainer, pl_module), now=True)

    def _maybe_stop(self, trainer, note: str, now: bool = False, reduced_only: bool = False,
                    flush: bool = False) -> None:
        code = self._agreed(trainer, now, reduced_only)
        if not code:
            return
        if code == _DATA_ERROR:  # no checkpoint: the periodic ones stand, as on one process
            raise DataError(self.data_error or f"rank {trainer.global_rank} stopped after step "
                            f"{trainer.global_step}: another rank's training data failed (its error is above)")
        if flush:
            # Lightning hands a step's logged values to the loggers after on_train_batch_end, which
            # this stop leaves by raising: without this the step's metrics.csv row would be lost
            # (the resumed run starts after it). Private API of the pinned Lightning version.
            trainer._logger_connector.on_batch_end()
            trainer._logger_connector.update_train_step_metrics()
            for logger in trainer.loggers:
                logger.save()
        signum = _BY_PRIORITY[code]
        trainer.save_checkpoint(self.checkpoint, weights_only=False)
        _interrupt(trainer, signum, f"interrupted at step {trainer.global_step} by {signal.Signals(signum).name}"
                   f"{note}; checkpoint saved to {self.checkpoint}; resume with resume={self.checkpoint}",
                   self.checkpoint, self.requeue_command)


def _after_training(trainer, pl_module) -> str:
    """What a stop after the last step leaves undone: the final validation, unless one scheduled
    at that step has finished (a signal during it is taken at fit's end)."""
    if getattr(pl_module, "validated_step", -1) == trainer.global_step:
        return " (training steps and their final validation done)"
    return " (training steps done; final validation skipped)"


def _take_signals(trainer, handler) -> tuple[dict, object]:
    """Installs ``handler`` for the stop signals and holds off Lightning's own SIGTERM handling
    (it forwards the signal to the other local ranks, runs a collective inside the handler and
    exits without a checkpoint); returns what ``_give_back_signals`` puts back."""
    previous = {signum: signal.getsignal(signum) for signum in _PRIORITY
                if not (signum == signal.SIGHUP and signal.getsignal(signum) is signal.SIG_IGN)}
    for signum in previous:
        signal.signal(signum, handler)
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None:
        connector.register_signal_handlers = _noop
    return previous, connector


def _give_back_signals(previous: dict, connector, handler) -> None:
    if connector is not None:
        connector.__dict__.pop("register_signal_handlers", None)
    if _in_main_thread():
        for signum, old in previous.items():
            if signal.getsignal(signum) == handler:
                signal.signal(signum, old if old is not None else signal.SIG_DFL)


def _interrupt(trainer, signum: int, message: str, checkpoint, requeue_command: str) -> NoReturn:
    """Ends the run after a stop signal: SIGUSR1 under SLURM requeues the job (rank 0), rank 0
    prints the line, and RunInterrupted carries it out (exit status 128 + signal)."""
    requeued = (signum == signal.SIGUSR1 and bool(os.environ.get("SLURM_JOB_ID")) and trainer.is_global_zero
                and requeue_slurm_job(requeue_command))
    message += "; SLURM job requeued" if requeued else ""
    if trainer.is_global_zero:
        from tqdm import tqdm

        try:
            tqdm.write(message, file=sys.stderr)  # on a line of its own below a progress bar
        except OSError:  # a terminal that hung up: the checkpoint is saved all the same
            pass
    raise RunInterrupted(message, signum, int(trainer.global_step), str(checkpoint), requeued)


def requeue_slurm_job(requeue_command: str) -> bool:
    """Requeue this SLURM job (an array job's own task); False, with a line saying why, if that fails."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ["SLURM_JOB_ID"]
    cmd = [*shlex.split(requeue_command), job]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"requeue of SLURM job {job} failed: {exc}", file=sys.stderr, flush=True)
        return False
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        print(f"requeue of SLURM job {job} failed (exit {result.returncode}"
              f"{': ' + detail[0] if detail else ''})", file=sys.stderr, flush=True)
        return False
    return True


@contextlib.contextmanager
def stop_during_validation(trainer: pl.Trainer, what: str, checkpoint: str | os.PathLike,
                           requeue_command: str = "scontrol requeue"):
    """A stop signal during a validation run outside fit (the final one, or the one a resume runs
    first) ends it at once: RunInterrupted, exit 128 + signal, SIGUSR1 requeues under SLURM.

    There is no step boundary to wait for and nothing to save: ``checkpoint`` holds every step,
    and a resume from it runs the validation again. Without this, Lightning's handling applied:
    SIGTERM ended the validation and the process with status 0, as if the run had finished
    (and its handler runs a collective inside the signal handler); SIGUSR1 killed the process.
    Like Lightning's, the stop is per rank: a signal sent to one rank only leaves the others
    waiting in the validation's all-reduce (schedulers signal every rank)."""
    if not _in_main_thread():
        yield
        return

    raised = []

    def handle(signum, frame):
        if raised:  # already on its way out (a relayed copy of the same signal, a second one)
            return
        raised.append(signum)
        _interrupt(trainer, signum, f"interrupted by {signal.Signals(signum).name} during {what} (step "
                   f"{trainer.global_step}); every step is in {checkpoint}; resume with resume={checkpoint} to run "
                   "the validation again", checkpoint, requeue_command)

    taken = _take_signals(trainer, handle)
    try:
        yield
    finally:
        _give_back_signals(*taken, handle)


class ReportingCheckpointIO(AtomicCheckpointIO):
    """Atomic writes whose OS errors (a full disk, a vanished folder) end the run in one line, and
    resume reads that refuse a missing, corrupt or truncated file in one line.

    After a failed write the temporary file is already gone and the previous checkpoint under
    the final name is untouched.
    """

    def load_checkpoint(self, path, *args, **kwargs):
        if "://" not in str(path) and not Path(path).is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first[:200]})") from None

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        try:
            super().save_checkpoint(checkpoint, path, storage_options)
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            if exc.errno == errno.ENOSPC:
                reason = "no space left on device"
            raise CheckpointError(
                f"cannot write checkpoint {path}: {reason}; the previous checkpoint (if any) is kept"
            ) from None
