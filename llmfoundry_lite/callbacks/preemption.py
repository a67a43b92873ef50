"""Fault handling installed in every run: checkpoint-and-exit on SIGTERM/SIGUSR1, stop on a NaN/Inf loss.

Both callbacks decide on values that are identical on every rank (a max-reduced flag, the all-reduced loss), so
all processes of a distributed run stop at the same batch and none is left waiting in a collective.

Exit codes (documented in the README): 143 preempted (128 + SIGTERM, also for SIGUSR1, so schedulers read it
as "terminated"), 3 non-finite loss, 2 recipe error.
"""

from __future__ import annotations

import math
import signal
import sys
from typing import Any

import torch
from composer.callbacks import CheckpointSaver
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

PREEMPTED_EXIT_CODE = 143
NONFINITE_EXIT_CODE = 3
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class RunStopped(Exception):
    """The run stopped on purpose; ``str(self)`` is the one line to print and ``exit_code`` the status."""

    exit_code = 1

    def __init__(self, message: str, batch: int):
        super().__init__(message)
        self.batch = batch


class Preempted(RunStopped):
    """A preemption signal arrived; the checkpoint of ``batch`` was written (when a save folder is set)."""

    exit_code = PREEMPTED_EXIT_CODE


class NonFiniteLoss(RunStopped):
    """The training loss became NaN or Inf."""

    exit_code = NONFINITE_EXIT_CODE


def _any_rank(flag: bool, state: State) -> bool:
    """True when ``flag`` is set on any rank (a max all-reduce; free on one process)."""
    if dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=state.device._device)
    dist.all_reduce(t, reduce_operation="MAX")
    return bool(t.item())


class Preemption(Callback):
    """On SIGTERM/SIGUSR1: finish the current batch, write a checkpoint, raise :class:`Preempted`."""

    def __init__(self, signals: tuple[int, ...] = PREEMPTION_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        # Only record it: the batch in flight finishes and the checkpoint is written between batches.
        self.received = signum

    def fit_start(self, state: State, logger: Logger) -> None:
        """Install the signal handlers (main thread only: Python delivers signals there)."""
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook worker thread): leave defaults
                return

    def _restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def fit_end(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._restore()

    def close(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._restore()

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        """After the batch (and any scheduled save): checkpoint and stop if any rank was signalled."""
        if not _any_rank(self.received is not None, state):
            return
        batch = int(state.timestamp.batch)
        saver = next((cb for cb in state.callbacks if isinstance(cb, CheckpointSaver)), None)
        if saver is None:
            msg = f"preempted at batch {batch}; no save_folder is set, so nothing was saved"
        else:
            if saver.last_checkpoint_batch is None or int(saver.last_checkpoint_batch) != batch:
                saver._save_checkpoint(state, logger)  # noqa: SLF001 (Composer's own save: symlink + pruning)
            msg = f"preempted at batch {batch}; rerun the same command to resume"
        self._restore()
        raise Preempted(msg, batch)


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


def report(stopped: RunStopped) -> None:
    """Print the one-line message of a stopped run (rank 0 only, so it appears once per job)."""
    if dist.get_global_rank() == 0:
        print(str(stopped), file=sys.stdout, flush=True)
