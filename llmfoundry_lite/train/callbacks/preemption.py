"""Fault handling installed in every run: checkpoint-and-exit on SIGTERM/SIGUSR1/SIGINT, stop on a NaN/Inf loss,
stop on a dataloader that yields no batch.

The callbacks decide on values that are identical on every rank (a max-reduced flag, the all-reduced loss), so
all processes of a distributed run stop at the same batch and none is left waiting in a collective. The signal
handlers themselves live in ``stop_signals.py`` (installed before torch loads, so a run stops at any point).

Exit codes (documented in the README): 143 preempted (128 + SIGTERM, also for SIGUSR1, so schedulers read it
as "terminated"), 130 interrupted (SIGINT), 3 non-finite loss, 2 recipe error.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch
from composer.callbacks import CheckpointSaver
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from llmfoundry_lite.compat import save_checkpoint_now
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.train.callbacks.stop_signals import (
    GUARD,
    INTERRUPTED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    PREEMPTION_SIGNALS,
    STOP_SIGNALS,
    StopNow,
    exit_code_for,
)

NONFINITE_EXIT_CODE = 3
__all__ = [
    "INTERRUPTED_EXIT_CODE",
    "NONFINITE_EXIT_CODE",
    "PREEMPTED_EXIT_CODE",
    "PREEMPTION_SIGNALS",
    "STOP_SIGNALS",
    "EmptyEpochGuard",
    "NonFiniteLossGuard",
    "Preempted",
    "Preemption",
    "RunStopped",
    "StopNow",
]


class RunStopped(Exception):
    """The run stopped on purpose; ``str(self)`` is the one line to print and ``exit_code`` the status."""

    exit_code = 1

    def __init__(self, message: str, batch: int, exit_code: Optional[int] = None):
        super().__init__(message)
        self.batch = batch
        if exit_code is not None:
            self.exit_code = exit_code


class Preempted(RunStopped):
    """A stop signal arrived; the checkpoint of ``batch`` was written (when a save folder is set)."""

    exit_code = PREEMPTED_EXIT_CODE


class NonFiniteLoss(RunStopped):
    """The training loss became NaN or Inf."""

    exit_code = NONFINITE_EXIT_CODE


def _any_rank(flag: bool, state: State) -> bool:
    """True when ``flag`` is set on any rank (a max all-reduce; free on one process)."""
    if dist.get_world_size() == 1:
        return flag
    t = state.device.tensor_to_device(torch.tensor([1 if flag else 0], dtype=torch.int32))
    dist.all_reduce(t, reduce_operation="MAX")
    return bool(t.item())


def _saver(state: State) -> Optional[CheckpointSaver]:
    return next((cb for cb in state.callbacks if isinstance(cb, CheckpointSaver)), None)


class Preemption(Callback):
    """On SIGTERM/SIGUSR1/SIGINT during training: finish the batch, write a checkpoint, raise :class:`Preempted`.

    Looks for the signal at every batch and epoch boundary and between evaluation batches (an evaluation can
    take minutes; the checkpoint of the batch before it is written and the evaluation skipped). Before the first
    batch of this process finishes there is nothing new to save: the handler stops the run at once.
    """

    def __init__(self) -> None:
        self._installed = False
        self._state: Optional[State] = None
        self._batch0 = 0
        self._ended_at: Optional[int] = None
        self._t_batch: Optional[float] = None

    @property
    def received(self) -> Optional[int]:
        """The signal received, if any."""
        return GUARD.received

    def fit_start(self, state: State, logger: Logger) -> None:
        """Install the handlers unless the run already did (main thread only: Python delivers signals there)."""
        self._installed = GUARD.install()
        self._state = state
        self._batch0 = int(state.timestamp.batch)
        self._ended_at = None
        GUARD.training = self._why_not_wait

    def _why_not_wait(self, signum: int) -> Optional[str]:
        """None when a checkpoint at the next boundary is worth waiting for, else why not (for the message)."""
        if self._ended_at is not None:
            return f"while finishing (training ended at batch {self._ended_at})"
        state = self._state
        if state is None:
            return "during start-up"
        batch = int(state.timestamp.batch)
        if batch == self._batch0:
            return (
                f"before batch {batch + 1} finished, so there was nothing new to save; rerun the same command to "
                + ("resume" if batch else "start again")
            )
        if _saver(state) is None:
            return f"at batch {batch}; no save_folder is set, so nothing was saved"
        return None

    def batch_start(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._t_batch = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        """Remember the slowest batch: the watchdog waits at least three times as long for a boundary."""
        if self._t_batch is not None:
            GUARD.slowest_batch_s = max(GUARD.slowest_batch_s, time.perf_counter() - self._t_batch)

    def _finish(self, ended: bool = False) -> None:
        if ended and self._state is not None:  # a signal now (final evaluation, closing) stops at once
            self._ended_at = int(self._state.timestamp.batch)
        elif GUARD.training == self._why_not_wait:
            GUARD.training = None
        self._state = None
        if self._installed:
            self._installed = False
            GUARD.uninstall()

    def fit_end(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._finish(ended=True)

    def close(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._finish()

    def _stop_if_signalled(self, state: State, logger: Logger, where: str = "") -> None:
        if not _any_rank(GUARD.received is not None, state):
            return
        signum = GUARD.received or PREEMPTION_SIGNALS[0]  # another rank was signalled
        GUARD.disarm()  # the checkpoint may take longer than the wait for a boundary; a second signal still exits
        batch = int(state.timestamp.batch)
        verb = "interrupted" if exit_code_for(signum) == INTERRUPTED_EXIT_CODE else "preempted"
        saver = _saver(state)
        if saver is None:
            msg = f"{verb} at batch {batch}{where}; no save_folder is set, so nothing was saved"
        else:
            if saver.last_checkpoint_batch is None or int(saver.last_checkpoint_batch) != batch:
                save_checkpoint_now(saver, state, logger)  # Composer's own save: symlink, pruning, uploads
            msg = f"{verb} at batch {batch}{where}; rerun the same command to resume"
        self._finish()
        raise Preempted(msg, batch, exit_code_for(signum))

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        """After the batch (and any scheduled save): checkpoint and stop if any rank was signalled."""
        self._stop_if_signalled(state, logger)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        """At an epoch end, likewise (also the only boundary of a loop over epochs that yield no batch)."""
        self._stop_if_signalled(state, logger)

    def eval_batch_end(self, state: State, logger: Logger) -> None:
        """Between evaluation batches during training: checkpoint the last trained batch, skip the rest."""
        if self._state is not None and int(state.timestamp.batch) > self._batch0:
            self._stop_if_signalled(state, logger, " (during evaluation)")


class EmptyEpochGuard(Callback):
    """Stop a run whose train dataloader yields no batch (Composer would loop over empty epochs forever).

    The build-time check (``train.build.check_loader_batches``) catches this for sized datasets; this catches the rest
    (iterable datasets, plugins). Two empty epochs in a row: a resumed run may legitimately find the rest of its
    epoch empty once.
    """

    def __init__(self) -> None:
        self._batches_this_epoch = 0
        self._empty_in_a_row = 0

    def epoch_start(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._batches_this_epoch = 0

    def batch_end(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._batches_this_epoch += 1

    def epoch_end(self, state: State, logger: Logger) -> None:
        """Count empty epochs; raise at the second in a row."""
        if self._batches_this_epoch:
            self._empty_in_a_row = 0
            return
        self._empty_in_a_row += 1
        if self._empty_in_a_row >= 2:
            raise RecipeError(
                "the train dataloader yields no batch (two epochs in a row were empty), so training can never "
                "finish; use more data or a smaller global_train_batch_size",
                key="train_loader",
            )


class NonFiniteLossGuard(Callback):
    """Stop the run (before the batch is checkpointed) when the all-reduced training loss is NaN or Inf."""

    def batch_end(self, state: State, logger: Logger) -> None:
        """Check the loss every rank agrees on (Composer all-reduces it for logging)."""
        losses = getattr(state, "total_loss_dict", None) or {}
        value = losses.get("loss/train/total")
        if value is None:
            value = _as_float(state.loss)
            bad = _any_rank(value is not None and not math.isfinite(value), state)
        else:
            bad = not math.isfinite(float(value))
        if bad:
            batch = int(state.timestamp.batch)
            what = "nan" if value is None or math.isnan(float(value)) else "inf"
            raise NonFiniteLoss(
                f"loss is {what} at batch {batch}; training stopped (lower optimizer.lr, add "
                "algorithms.gradient_clipping, or resume from an earlier checkpoint with load_path)",
                batch,
            )


def _as_float(loss: Any) -> float | None:
    if isinstance(loss, torch.Tensor):
        return float(loss.detach().float().sum())
    if isinstance(loss, (tuple, list)):
        vals = [_as_float(v) for v in loss]
        return sum(v for v in vals if v is not None) if vals else None
    if isinstance(loss, dict):
        return _as_float(list(loss.values()))
    return None if loss is None else float(loss)
