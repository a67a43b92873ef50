"""Hyperparameter sweeps on Optuna: ``llmfoundry-lite sweep RECIPE key=a,b key=loguniform(x,y) --trials N``.

- :mod:`.grammar`: the command-line grammar (grid axes, distributions, fixed overrides) as Optuna distributions;
- :mod:`.plan`: the arguments parsed and the recipe validated with every swept value before anything runs;
  the sweep folder's record and the Slurm array script;
- :mod:`.storage`: the Optuna study (storage, sampler, pruner) and its trials' bookkeeping (budget, re-queue);
- :mod:`.worker`: :class:`~.worker.TrialRunner` runs trials as ``llmfoundry-lite train`` processes (ask-and-tell);
- :mod:`.report`: the trial side, inside the train process (reports evals, stops pruned trials);
- :mod:`.summary`: ``summary.csv``/``summary.md`` and the plots;
- :mod:`.cli`: the ``sweep`` verb.

Importing this package registers only the ``jsonl_metrics`` logger (every sweep trial's metrics file); Optuna,
torch and Composer are imported when used, so ``llmfoundry-lite --help`` stays fast.
"""

from __future__ import annotations

from typing import Any

from llmfoundry_lite import registry
from llmfoundry_lite.sweep.metrics import METRICS_FILE, TRAIN_LOSS, read_metrics  # noqa: F401
from llmfoundry_lite.sweep.plan import METRICS_LOGGER


@registry.loggers.register(METRICS_LOGGER)
def jsonl_metrics(filename: str, stop_on_nan: bool = False) -> Any:
    """Append every logged metric to a JSON-lines file (rank 0); sweeps read trials' results from it."""
    # In a sweep trial this logger also reports evaluations to the study (report.metrics_logger).
    # Imported here: it loads torch and Composer.
    from llmfoundry_lite.sweep.report import metrics_logger

    return metrics_logger(filename, stop_on_nan)


def register_cli(app: Any) -> None:
    """Add ``llmfoundry-lite sweep``."""
    from llmfoundry_lite.sweep.cli import register_cli as register

    register(app)
