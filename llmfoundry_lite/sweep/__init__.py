"""Hyperparameter sweeps on Optuna: ``llmfoundry-lite sweep RECIPE key=a,b key=loguniform(x,y) --trials N``.

- :mod:`.grammar`: the command-line grammar (grid axes, distributions, fixed overrides) as Optuna distributions;
- :mod:`.study`: the plan (validation before anything runs), storage, sampler, pruner and the worker that runs
  trials as ``llmfoundry-lite train`` processes (ask-and-tell);
- :mod:`.summary`: ``summary.csv``/``summary.md`` and the plots;
- :mod:`.cli`: the ``sweep`` verb;
- ``llmfoundry_lite.train.callbacks.optuna_report``: the trial side (reports evals, stops pruned trials).

Importing this package registers only the ``jsonl_metrics`` logger (every sweep trial's metrics file); Optuna,
torch and Composer are imported when used, so ``llmfoundry-lite --help`` stays fast.
"""

from __future__ import annotations

from typing import Any

from llmfoundry_lite import registry
from llmfoundry_lite.sweep.metrics import METRICS_FILE, TRAIN_LOSS, read_metrics  # noqa: F401
from llmfoundry_lite.sweep.study import METRICS_LOGGER


@registry.loggers.register(METRICS_LOGGER)
def jsonl_metrics(filename: str, stop_on_nan: bool = False) -> Any:
    """Append every logged metric to a JSON-lines file (rank 0); sweeps read trials' results from it."""
    # In a sweep trial this logger also reports evaluations to the study (optuna_report.metrics_logger).
    # Imported here: it loads torch and Composer.
    from llmfoundry_lite.train.callbacks.optuna_report import metrics_logger

    return metrics_logger(filename, stop_on_nan)


def register_cli(app: Any) -> None:
    """Add ``llmfoundry-lite sweep``."""
    from llmfoundry_lite.sweep.cli import register_cli as register

    register(app)
