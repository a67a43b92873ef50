"""A sweep trial reports its eval metric to the sweep's Optuna study, and stops when the pruner says so.

The sweep starts each trial as its own ``llmfoundry-lite train`` process with the study's coordinates in the
environment variable ``LLMFOUNDRY_LITE_SWEEP_TRIAL`` (storage URL, study name, trial id, metric, pruner).
The metrics logger the sweep adds to every trial (``jsonl_metrics``) is then built by :func:`metrics_logger`
as a :class:`TrialMetricsLogger`, which carries this callback: a recipe never names it (it is not in the
registry), and no train code needs to know about sweeps.
Following Optuna's multi-process pattern, the trial process loads the study and wraps its trial
(``optuna.trial.Trial(study, trial_id)``), reports each evaluation and asks ``should_prune``; the sweep process,
which asked for the trial, tells the study how it ended. A pruned run writes a marker file (the batch it
reached) and stops training cleanly, so the sweep records it as PRUNED rather than failed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from llmfoundry_lite.sweep.metrics import choose_metric
from llmfoundry_lite.sweep.storage import TRIAL_ENV, make_pruner, open_storage
from llmfoundry_lite.train.callbacks.progress import JSONLMetricsLogger


class OptunaReport(Callback):
    """Reports the ranking eval metric at every evaluation to an Optuna trial; prunes through ``state``."""

    def __init__(
        self,
        storage: str,
        study: str,
        trial_id: int,
        marker: str,
        metric: Optional[str] = None,
        pruner: Optional[dict] = None,
        number: Optional[int] = None,
    ) -> None:
        self.storage = storage
        self.study_name = study
        self.trial_id = int(trial_id)
        self.marker = Path(marker)
        self.metric = metric
        self.pruner = pruner or {"kind": "none"}
        self.number = number
        self._trial: Any = None
        self.reported: list[tuple[int, float]] = []
        self.pruned_at: Optional[int] = None

    def _optuna_trial(self) -> Any:
        if self._trial is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.load_study(
                study_name=self.study_name,
                storage=open_storage(self.storage),
                # The trial's values were chosen by the sweep process; the sampler here only has to be cheap.
                sampler=optuna.samplers.RandomSampler(),
                pruner=make_pruner(self.pruner),
            )
            self._trial = optuna.trial.Trial(study, self.trial_id)
        return self._trial

    def eval_end(self, state: State, logger: Logger) -> None:
        """Report this evaluation's value of the ranking metric; stop training if the trial is pruned."""
        metrics = {
            f"metrics/{label}/{name}": metric
            for label, by_name in (state.eval_metrics or {}).items()
            for name, metric in by_name.items()
        }
        chosen = choose_metric(set(metrics), self.metric)
        if chosen not in metrics or chosen.split("/")[1] != state.dataloader_label:
            return  # another evaluator's end, or no eval metric to rank by
        value = float(metrics[chosen].compute())
        step = int(state.timestamp.batch)
        prune = False
        if dist.get_global_rank() == 0 and math.isfinite(value):
            trial = self._optuna_trial()
            trial.report(value, step=step)
            self.reported.append((step, value))
            # At the last batch the trial is complete anyway: pruning it then would only mislabel it.
            md = state.max_duration
            last = md is not None and state.timestamp.get(md.unit) >= md
            prune = not last and bool(trial.should_prune())
        if dist.get_world_size() > 1:  # every rank must stop at the same batch
            flags = dist.all_gather_object(prune)
            prune = any(flags)
        if prune:
            self.pruned_at = step
            if dist.get_global_rank() == 0:
                record = {"batch": step, "metric": chosen, "value": value, "reported": self.reported}
                tmp = self.marker.with_suffix(".tmp")
                tmp.write_text(json.dumps(record) + "\n")
                tmp.replace(self.marker)  # atomic: the sweep never reads half a marker
                # Lands in the trial's train.log: Composer ends the run as if max_duration were this batch.
                print(f"sweep: trial pruned at batch {step} ({chosen} {value:.4g}); stopping", flush=True)
            state.stop_training()


class TrialMetricsLogger(JSONLMetricsLogger):
    """A sweep trial's metrics logger: writes metrics.jsonl and reports each evaluation to the study."""

    def __init__(self, filename: str, stop_on_nan: bool, report: OptunaReport) -> None:
        super().__init__(filename, stop_on_nan)
        self.report = report

    def eval_end(self, state: State, logger: Logger) -> None:  # noqa: D102
        self.report.eval_end(state, logger)


def from_environment() -> Optional[OptunaReport]:
    """The reporting callback of a sweep trial (None outside a sweep)."""
    spec = os.environ.get(TRIAL_ENV)
    return OptunaReport(**json.loads(spec)) if spec else None


def metrics_logger(filename: str, stop_on_nan: bool = False) -> JSONLMetricsLogger:
    """The ``jsonl_metrics`` logger; in a sweep trial, one that also reports to the trial's study."""
    report = from_environment()
    # Without a pruner nothing reads the intermediate values: the trial does not load Optuna at all.
    if report is None or report.pruner.get("kind", "none") == "none":
        return JSONLMetricsLogger(filename, stop_on_nan)
    return TrialMetricsLogger(filename, stop_on_nan, report)
