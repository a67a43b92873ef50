"""What a run says and writes: its console lines (also appended to ``train.log``), the progress line, and one
JSON object per logged step in ``metrics.jsonl`` (the file sweeps read their trials' results from)."""

from __future__ import annotations

import collections
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

import torch
from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

from llmfoundry_lite.errors import RecipeError

LOG_FILENAME = "train.log"
METRICS_FILENAME = "metrics.jsonl"
TRAIN_LOSS = "loss/train/total"


class RunConsole:
    """Prints a run's lines to the console and appends them to its ``train.log`` (rank 0 only).

    ``quiet`` (a recipe's ``log_to_console: false``) writes train.log only.
    """

    def __init__(self, stream: Optional[TextIO] = None, quiet: bool = False) -> None:
        self._stream = stream
        self.quiet = quiet
        self._file: Optional[TextIO] = None
        self.path: Optional[Path] = None

    def open(self, path: Path) -> None:
        """Start appending to ``path`` (not when stdout already goes there, as a sweep trial's does)."""
        if self._file is not None or dist.get_global_rank() != 0:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        if _same_file(sys.stdout, path):
            return
        self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed in close())
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._file.write(f"===== {stamp} {' '.join(sys.argv)}\n")

    def say(self, line: str) -> None:
        """Print ``line`` (rank 0) and append it to train.log."""
        if dist.get_global_rank() != 0:
            return
        if not self.quiet:
            print(line, file=self._stream or sys.stdout, flush=True)
        if self._file is not None and not self._file.closed:
            self._file.write(line + "\n")

    def close(self) -> None:
        """Close train.log (the console keeps working)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _same_file(stream: Any, path: Path) -> bool:
    try:
        return path.exists() and os.path.samestat(os.fstat(stream.fileno()), os.stat(path))
    except (AttributeError, OSError, ValueError):  # no real file descriptor (pytest capture, notebooks)
        return False


class CloseConsole(Callback):
    """Closes the run's train.log when the Trainer closes."""

    def __init__(self, console: RunConsole) -> None:
        self.console = console

    def close(self, state: State, logger: Logger) -> None:  # noqa: D102
        self.console.close()


class JSONLMetricsLogger(LoggerDestination):
    """Appends one ``{"step": batch, metric: value, ...}`` line per logged step, and one ``fit_end`` line per fit.

    Rank 0 only. Every run has one (``metrics.jsonl`` in the run folder); sweeps read their trials' results from
    it. ``stop_on_nan`` stops the run at the first non-finite training loss.
    """

    def __init__(self, filename: str, stop_on_nan: bool = False):
        self.filename = str(filename)
        self.stop_on_nan = stop_on_nan
        self._file: Optional[TextIO] = None
        self._bad_loss: Optional[float] = None
        self._start: tuple[int, int, float] = (0, 0, 0.0)
        self._step: Optional[int] = None
        self._pending: dict[str, float] = {}

    def _write(self, record: dict) -> None:
        if dist.get_global_rank() != 0:
            return
        if self._file is None:
            Path(self.filename).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.filename, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._file.write(json.dumps(record) + "\n")  # NaN/Infinity are written as such; json.loads reads them
        self._file.flush()

    def _flush(self) -> None:
        if self._pending:
            self._write({"step": self._step, **self._pending})
            self._pending = {}

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        """Collect the step's metrics; a new step writes the previous one's line."""
        values = {}
        for k, v in metrics.items():
            if hasattr(v, "numel") and v.numel() == 1:
                v = v.item()
            # Composer's time/* counters are repeated every batch and say nothing the steps don't.
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("time/"):
                values[k] = float(v)
        if not values:
            return
        loss = values.get(TRAIN_LOSS)
        if loss is not None and not math.isfinite(loss):
            self._bad_loss = loss
        if step != self._step:
            self._flush()
            self._step = step
        self._pending.update(values)

    def fit_start(self, state: State, logger: Logger) -> None:  # noqa: D102
        ts = state.timestamp
        self._start = (int(ts.batch), int(ts.token), ts.total_wct.total_seconds())

    def batch_end(self, state: State, logger: Logger) -> None:  # noqa: D102
        if self.stop_on_nan and self._bad_loss is not None:
            raise RuntimeError(
                f"training loss is {self._bad_loss} at batch {int(state.timestamp.batch)} "
                "(the run diverged; stop_on_nan stopped it)"
            )

    def fit_end(self, state: State, logger: Logger) -> None:
        """Write the step in progress and a ``fit_end`` line: batches, tokens and training seconds of this fit."""
        self._flush()
        # Composer's total_wct excludes evaluation, so tokens / seconds is training throughput.
        ts = state.timestamp
        b0, t0, s0 = self._start
        self._write(
            {
                "event": "fit_end",
                "batch": int(ts.batch),
                "batches": int(ts.batch) - b0,
                "tokens": int(ts.token) - t0,
                "seconds": ts.total_wct.total_seconds() - s0,
            }
        )

    def close(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._flush()
        if self._file is not None:
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------------------------------------------
# Progress line
# ---------------------------------------------------------------------------------------------------------

_UNIT_WORDS = {TimeUnit.SAMPLE: "sample", TimeUnit.TOKEN: "token", TimeUnit.EPOCH: "epoch"}


class ProgressLine(LoggerDestination):
    """One console line per interval: batch and total, loss, tokens/s, learning rate, elapsed and ETA.

    The interval and ``max_duration`` may be in any unit (ba, sp, tok, ep; the interval also in dur): a line is
    printed whenever the run crosses a multiple of the interval, at the first batch and at the last.
    Throughput and ETA come from the last ``WINDOW`` training batches (data loading included, evaluation,
    generation and checkpoints not), so they do not sag after each eval as an average since the start would.
    """

    WINDOW = 20  # batches

    def __init__(
        self, interval: str | int = "10ba", stream: Any = None, console: Optional[RunConsole] = None
    ):
        self.interval = Time.from_input(interval, TimeUnit.BATCH)
        if self.interval.value <= 0:
            raise RecipeError(f"must be positive, got {interval!r}", key="console_log_interval")
        self.console = console or RunConsole(stream)
        self._metrics: dict[str, float] = {}
        self._t0: Optional[float] = None
        self._tok0 = 0
        self._frac0 = 0.0
        self._bucket = 0
        # Per recent batch: (tokens, fraction of max_duration, seconds from before its data to after its step).
        self._recent: collections.deque[tuple[int, float, float]] = collections.deque(maxlen=self.WINDOW)
        self._batch_t0: Optional[float] = None
        self._batch_busy: Optional[float] = None
        self._last: tuple[int, float] = (0, 0.0)
        self._compiled = 0.0  # compile/seconds seen so far: compile time is not step time

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        """Remember the latest value of each metric."""
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float)):
                self._metrics[k] = float(v)

    def fit_start(self, state: State, logger: Logger) -> None:
        """Start the clock (resumed runs measure from here)."""
        self._t0 = time.perf_counter()
        self._tok0 = int(state.timestamp.token)
        self._frac0 = fraction_done(state) or 0.0
        self._bucket = self._bucket_of(state)
        self._recent.clear()
        self._last = (self._tok0, self._frac0)

    def before_dataloader(self, state: State, logger: Logger) -> None:
        """Start timing this batch (its data loading counts, time spent in evals before it does not)."""
        self._batch_t0 = time.perf_counter()

    def after_train_batch(self, state: State, logger: Logger) -> None:
        """Stop timing this batch: what runs at its end (checkpoints, generation, lm_eval scoring) does not count."""
        if self._batch_t0 is not None:
            self._batch_busy = time.perf_counter() - self._batch_t0

    def _bucket_of(self, state: State) -> int:
        """How many whole intervals the run has done (in the interval's unit)."""
        step = float(self.interval.value)
        if self.interval.unit == TimeUnit.DURATION:
            value = fraction_done(state) or 0.0
        else:
            value = float(state.timestamp.get(self.interval.unit).value)
        return int(value // step + 1e-9)

    def batch_end(self, state: State, logger: Logger) -> None:
        """Print a line when the run crosses a multiple of the interval (and at the first and last batch)."""
        frac = fraction_done(state)
        tokens = int(state.timestamp.token)
        if self._batch_t0 is not None:
            busy = self._batch_busy if self._batch_busy is not None else time.perf_counter() - self._batch_t0
            compiled = self._metrics.get(
                "compile/seconds", 0.0
            )  # logged by train/compile.py's CompileMonitor
            busy, self._compiled = max(busy - (compiled - self._compiled), 1e-9), compiled
            self._recent.append((tokens - self._last[0], (frac or 0.0) - self._last[1], busy))
            self._batch_t0 = self._batch_busy = None
        self._last = (tokens, frac or 0.0)
        last = frac is not None and frac >= 1.0
        bucket = self._bucket_of(state)
        crossed = bucket > self._bucket
        self._bucket = max(bucket, self._bucket)
        if crossed or int(state.timestamp.batch) == 1 or last:
            self._print(state)

    def eval_end(self, state: State, logger: Logger) -> None:
        """Print the evaluation metrics on one line."""
        # EVAL_END runs once per evaluator, with its label set: print that evaluator's metrics only (not the
        # values other evaluators, e.g. other streams of a mixture, logged at an earlier eval).
        label = state.dataloader_label or "eval"
        evals = {k: v for k, v in self._metrics.items() if k.startswith(f"metrics/{label}/")}
        if evals:
            text = "  ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in sorted(evals.items()))
            self.console.say(f"[eval  batch {int(state.timestamp.batch)}] {text}")

    def _print(self, state: State) -> None:
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        parts = [f"[{position(state)}]"]
        loss = self._metrics.get(TRAIN_LOSS)
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        busy = sum(b for _, _, b in self._recent)
        recent_tokens = sum(t for t, _, _ in self._recent)
        if busy > 0 and recent_tokens:
            parts.append(f"{recent_tokens / busy:,.0f} tok/s")
        elif busy > 0 and self._recent:
            parts.append(f"{len(self._recent) / busy:.2f} ba/s")
        lr = next((v for k, v in self._metrics.items() if k.startswith("lr-")), None)
        if lr is not None:
            parts.append(f"lr {lr:.3g}")
        mfu = self._metrics.get("cost/mfu")
        if mfu is not None:
            parts.append(f"MFU {100 * mfu:.1f}%")
        usd = self._metrics.get("cost/usd")
        if usd is not None:
            projected = self._metrics.get("cost/usd_projected")
            parts.append(f"${usd:,.2f}" + (f" of ~${projected:,.2f}" if projected else ""))
        parts.append(f"elapsed {_fmt_seconds(elapsed)}")
        if self._compiled:
            parts.append(f"compile {_fmt_seconds(self._compiled)}")
        frac = fraction_done(state)
        recent_frac = sum(f for _, f, _ in self._recent)
        if frac is not None and 0 < frac < 1 and busy > 0 and recent_frac > 0:
            parts.append(f"ETA {_fmt_seconds(busy * (1 - frac) / recent_frac)}")
        self.console.say(" | ".join(parts))


def position(state: State) -> str:
    """``batch 3/6``; ``batch 3, sample 12/800`` (or token, epoch) when max_duration is in another unit."""
    ts, md = state.timestamp, state.max_duration
    batch = int(ts.batch)
    if md is None:
        return f"batch {batch}"
    if md.unit == TimeUnit.BATCH:
        return f"batch {batch}/{md.value}"
    if md.unit == TimeUnit.EPOCH:
        return f"batch {batch}, epoch {min(int(ts.epoch) + 1, md.value)}/{md.value}"
    word = _UNIT_WORDS.get(md.unit, md.unit.value)
    return f"batch {batch}, {word} {int(ts.get(md.unit)):,}/{md.value:,}"


def fraction_done(state: State) -> Optional[float]:
    """Fraction of max_duration done, in any unit; within an epoch too when the epoch length is known."""
    md = state.max_duration
    if md is None:
        return None
    ts = state.timestamp
    try:
        if md.unit == TimeUnit.EPOCH:
            epochs = float(int(ts.epoch))
            n = state.dataloader_len
            if n is not None and int(n) > 0:
                epochs += min(1.0, int(ts.batch_in_epoch) / int(n))
            return min(1.0, epochs / max(1, md.value))
        return float(state.get_elapsed_duration())
    except Exception:  # a duration Composer cannot measure (e.g. no dataloader yet)
        return None


def _fmt_seconds(s: float) -> str:
    return str(datetime.timedelta(seconds=int(s)))
