"""SIGTERM, SIGUSR1 and SIGINT stop a run within seconds, at any point (standard library only).

This module imports nothing heavy, so the handlers are in place from the first moment of a run, before torch and
Composer load (seconds on a busy machine). The first signal:

* before training starts, or before the first batch of this process finishes, or without a ``save_folder``:
  there is nothing to save, so the handler raises :class:`StopNow` right there (imports, building, dataloader
  workers starting, the first batch);
* during training: the run checkpoints at the next batch boundary (``Preemption`` in ``preemption.py``, which also
  looks between evaluation batches and at epoch ends) and exits. If no boundary comes within
  ``max(30 s or $LLMFOUNDRY_LITE_STOP_WAIT, 3 x the slowest batch)``, a watchdog thread exits without one.

A second signal exits at once, except a repeat of the first within ``REPEAT_S``: a scheduler or the terminal
signalling every process of a job while the command also forwards it to the ranks (``launch.py``). Exit codes: 143 for SIGTERM and SIGUSR1 (128 + SIGTERM, "terminated" to
schedulers), 130 for SIGINT (Ctrl-C).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Optional

PREEMPTED_EXIT_CODE = 143
INTERRUPTED_EXIT_CODE = 130
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# How long the first signal waits for a batch boundary to checkpoint at (schedulers commonly allow 30 s before
# SIGKILL); $LLMFOUNDRY_LITE_STOP_WAIT (seconds) changes it, e.g. for a scheduler that signals minutes ahead.
BOUNDARY_WAIT_S = 30.0
STOP_WAIT_ENV = "LLMFOUNDRY_LITE_STOP_WAIT"
# A repeat of the first signal within this many seconds is the same stop delivered twice, not a second one.
REPEAT_S = 1.0
# After stopping without waiting, how long closing (loggers, dataloader workers) may take before a hard exit.
CLEANUP_S = 15.0


def boundary_wait_s() -> float:
    """Seconds the first signal waits for a batch boundary: $LLMFOUNDRY_LITE_STOP_WAIT, else BOUNDARY_WAIT_S."""
    try:
        return max(0.0, float(os.environ.get(STOP_WAIT_ENV, BOUNDARY_WAIT_S)))
    except ValueError:
        return BOUNDARY_WAIT_S


def exit_code_for(signum: int) -> int:
    """130 for SIGINT, 143 for SIGTERM/SIGUSR1 (a preemption)."""
    return INTERRUPTED_EXIT_CODE if signum == signal.SIGINT else PREEMPTED_EXIT_CODE


def signal_name(signum: int) -> str:
    """'SIGTERM' for 15."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopNow(BaseException):
    """Raised by the signal handler where waiting for a batch boundary would gain nothing.

    A ``BaseException`` (like ``KeyboardInterrupt``), so that ``except Exception`` in library code on the way
    up does not swallow it. ``str(self)`` is the one line to print, ``exit_code`` the process status.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """The process's stop-signal handlers; one instance (``GUARD``), installed while a run is in progress.

    ``training`` is set by the ``Preemption`` callback while ``fit`` runs: a callable that returns None when a
    checkpoint at the next batch boundary is worth waiting for, else the line explaining why not (nothing new
    since the start, no save folder). ``echo`` prints a line to the console and the run's train.log.
    """

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._received_at = 0.0
        self.training: Optional[Callable[[int], Optional[str]]] = None
        self.echo: Optional[Callable[[str], None]] = None
        self.slowest_batch_s = 0.0
        self._depth = 0
        self._pid: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._timer: Optional[threading.Timer] = None

    # -- installation ----------------------------------------------------------------------------------------

    def install(self) -> bool:
        """Install the handlers (nested calls only count); False off the main thread, where Python cannot."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if self._depth == 0:
            self.received = None
            self.slowest_batch_s = 0.0
            self._pid = os.getpid()
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        else:
            self.reassert()
        self._depth += 1
        return True

    def reassert(self) -> None:
        """Put the handlers back where an import replaced them (Composer's engine installs its own at import)."""
        if not self._depth or threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) != self._handler:
                signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        """Undo one :meth:`install`; the last one restores the previous handlers and stops the watchdog."""
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth:
            return
        self.disarm()
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
        self.training = None
        self.echo = None

    @property
    def installed(self) -> bool:
        """Whether the handlers are in place."""
        return self._depth > 0

    # -- the handler -------------------------------------------------------------------------------------------

    def _handler(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            # A forked child (a dataloader worker) inherited this handler: behave as it would without it.
            if signum == signal.SIGINT:
                return  # Ctrl-C reaches the whole group; the parent stops the run and the workers with it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        name, code = signal_name(signum), exit_code_for(signum)
        if self.received is not None:
            if signum == self.received and time.monotonic() - self._received_at < REPEAT_S:
                return  # the same stop, delivered both to the process group and forwarded
            self.hard_exit(f"second {name}: exiting now, without a checkpoint", code)
        self.received, self._received_at = signum, time.monotonic()
        why_not = "during start-up" if self.training is None else self.training(signum)
        if why_not is None:  # training with unsaved progress: Preemption checkpoints at the next boundary
            wait = max(boundary_wait_s(), 3 * self.slowest_batch_s)
            self._arm(
                wait,
                f"stopped by {name}: no batch boundary within {wait:.0f}s to checkpoint at; rerun the same "
                "command to resume from the last checkpoint",
                code,
            )
            return
        self._arm(CLEANUP_S, f"stopped by {name}; closing took over {CLEANUP_S:.0f}s, exiting now", code)
        if why_not == "during start-up":
            raise StopNow(f"stopped by {name} during start-up; rerun the same command to start again", code)
        raise StopNow(f"stopped by {name} {why_not}", code)

    # -- the watchdog ------------------------------------------------------------------------------------------

    def _arm(self, seconds: float, message: str, code: int) -> None:
        self.disarm()
        self._timer = threading.Timer(seconds, self.hard_exit, args=(message, code))
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        """Stop the watchdog (a checkpoint is being written: it may take longer; a second signal still exits)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def hard_exit(self, message: str, code: int) -> None:
        """Print ``message`` and end the process now, whatever any thread is doing."""
        try:
            if self.echo is not None:
                self.echo(message)
            else:
                print(message, flush=True)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


GUARD = StopSignals()


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Handle SIGTERM/SIGUSR1/SIGINT as described above for the duration of the block (nesting is free)."""
    installed = GUARD.install()
    try:
        yield GUARD
    finally:
        if installed:
            GUARD.uninstall()
