"""Dependency warnings a user cannot act on, hidden from the console unless ``--debug``.

Composer and streaming warn on every small eval set, last partial batch or zero-length warmup of a tiny run;
printed dozens of times they bury the lines that matter. One list, used by every verb that runs a Trainer.
``--debug`` (which sets ``LLMFOUNDRY_LITE_DEBUG=1``, inherited by worker processes) shows them all.
"""

from __future__ import annotations

import os
import warnings

DEBUG_ENV = "LLMFOUNDRY_LITE_DEBUG"

# Message patterns (regular expressions matched at the start of the warning text).
NOT_ACTIONABLE = (
    r".*DataloaderNumBatchesWarning",  # an eval set smaller than eval_subset_num_batches
    r"Cannot split tensor of length",  # the last partial batch is smaller than the microbatch
    r"The warmup duration is 0",  # a fractional warmup of a few-batch run rounds to zero
)
# (message, module) pairs, hidden only when the module named warns: torch's DataLoader when a recipe asks for more
# workers than this machine has cores (it still runs); numpy's arithmetic warnings where lm-eval pools standard
# errors of single-sample tasks (n - 1 = 0), not in anyone else's code.
NOT_ACTIONABLE_IN = (
    (r"This DataLoader will create \d+ worker processes", r"torch\.utils\.data(\..*)?$"),
    (r"divide by zero encountered", r"lm_eval(\..*)?$"),
    (r"invalid value encountered", r"lm_eval(\..*)?$"),
    (r"Degrees of freedom <= 0", r"lm_eval(\..*)?$"),
)


def debug_enabled() -> bool:
    """Whether ``--debug`` was given to this command (or to the command that started this process)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def quiet_dependency_warnings() -> None:
    """Hide the warnings in :data:`NOT_ACTIONABLE` unless debugging."""
    if debug_enabled():
        return
    for pattern in NOT_ACTIONABLE:
        warnings.filterwarnings("ignore", message=pattern)
    for pattern, module in NOT_ACTIONABLE_IN:
        warnings.filterwarnings("ignore", message=pattern, module=module)
