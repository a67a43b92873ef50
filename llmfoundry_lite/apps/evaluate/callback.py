"""`lm_eval` callback: score lm-evaluation-harness tasks during training and log them to every logger.

Recipe block::

    callbacks:
      lm_eval:
        tasks: [hellaswag, arc_easy]   # lm-eval task names (or ones defined in include_path)
        interval: 1000ba               # any Composer duration; also at the end of training
        limit: 200                     # examples per task (keep evaluations short)
        num_fewshot: 0
        include_path: null             # folder of task YAMLs of your own
        batch_size: 8

Each evaluation runs on rank 0 with the model in eval mode under ``no_grad`` (train mode is restored after) and
logs ``eval/<task>/acc`` (``acc_norm``, ... whatever the task reports) to every logger and the console. It does
not touch the run's random state. Other ranks wait at their next collective, so keep ``limit`` such that an
evaluation takes less than Composer's ``dist_timeout``. FSDP runs are refused: each rank holds only a shard.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from typing import Any, Optional

from composer.core import Callback, Event, State, Time
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError

KEY = "callbacks.lm_eval"


@registry.callbacks.register("lm_eval")
class LMEval(Callback):
    """Score lm-evaluation-harness tasks every `interval` and log eval/<task>/<metric> to every logger."""

    def __init__(
        self,
        tasks: list[str],
        interval: str = "1000ba",
        limit: Optional[int] = None,
        num_fewshot: Optional[int] = None,
        include_path: Optional[str] = None,
        batch_size: int = 8,
        at_end: bool = True,
    ):
        from llmfoundry_lite.apps.evaluate.harness import require_lm_eval, split_tasks

        require_lm_eval(KEY)
        self.tasks = split_tasks(tasks, key=f"{KEY}.tasks")
        try:
            Time.from_timestring(interval)
        except Exception:
            raise RecipeError(
                f"malformed interval {interval!r}; use e.g. '500ba', '0.25dur' or '1ep'",
                key=f"{KEY}.interval",
            ) from None
        if limit is not None and limit < 1:
            raise RecipeError(f"must be >= 1 (examples per task), got {limit}", key=f"{KEY}.limit")
        if num_fewshot is not None and num_fewshot < 0:
            raise RecipeError(f"must be >= 0, got {num_fewshot}", key=f"{KEY}.num_fewshot")
        if batch_size < 1:
            raise RecipeError(f"must be >= 1, got {batch_size}", key=f"{KEY}.batch_size")
        self.interval = interval
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.include_path = include_path
        self.batch_size = batch_size
        self._check = create_interval_scheduler(
            interval, include_end_of_training=at_end, checkpoint_events=False, final_events={Event.BATCH_END}
        )
        self._manager: Any = None
        self.history: list[tuple[int, dict[str, float]]] = []  # (batch, metrics), for inspection

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        """Check tasks and setup at INIT (before any training); evaluate on BATCH_END events on the interval."""
        if event == Event.INIT:
            self._setup(state)
        elif event == Event.BATCH_END and self._check(state, event):
            self.evaluate(state, logger)

    def _setup(self, state: State) -> None:
        from llmfoundry_lite.apps.evaluate.harness import task_manager

        if state.fsdp_enabled:
            raise RecipeError(
                "runs on rank 0 only, which FSDP cannot do (each rank holds a shard of the weights); score the "
                "saved checkpoints with `llmfoundry-lite eval` instead",
                key=KEY,
            )
        model = _unwrap(state.model)
        if getattr(model, "tokenizer", None) is None:
            raise RecipeError("the model has no tokenizer to score lm-eval tasks with", key=KEY)
        # Every rank checks the task names, so that a typo stops all of them before training starts.
        self._manager = task_manager(
            self.tasks, self.include_path, key=f"{KEY}.tasks", include_key=f"{KEY}.include_path"
        )

    def evaluate(self, state: State, logger: Logger) -> dict[str, float]:
        """Score the tasks (rank 0), log ``eval/<task>/<metric>`` and return those metrics ({} on other ranks)."""
        if dist.get_global_rank() != 0:
            return {}
        import torch
        from composer.core.precision import get_precision_context

        from llmfoundry_lite.apps.evaluate.adapter import DecoderLM
        from llmfoundry_lite.apps.evaluate.harness import log_name, metric_rows, run_tasks

        if self._manager is None:
            self._setup(state)
        model = _unwrap(state.model)
        lm = DecoderLM(model, model.tokenizer, batch_size=self.batch_size)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), get_precision_context(state.precision), _quiet_stderr():
                results = run_tasks(
                    lm, self.tasks, self._manager, self.num_fewshot, self.limit, bootstrap_iters=0, seed=False
                )
        finally:
            model.train(was_training)
        metrics = {log_name(r): r["value"] for r in metric_rows(results)}
        step = int(state.timestamp.batch)
        logger.log_metrics(metrics)
        self.history.append((step, metrics))
        shown = "  ".join(f"{k[len('eval/') :]} {v:.4f}" for k, v in metrics.items())
        print(f"[lm_eval] ba {step}: {shown}", flush=True)
        return metrics


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence stderr, Python's and file descriptor 2: lm-eval's progress bars, and the error of the ``git
    describe`` it runs outside a repository, would break into the run's console lines at every evaluation."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _unwrap(model: Any) -> Any:
    """The ComposerModel under DDP (whose wrapper has no tokenizer)."""
    return model if hasattr(model, "tokenizer") else getattr(model, "module", model)
