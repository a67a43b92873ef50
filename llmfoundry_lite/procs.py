"""Child processes for jobs that run side by side (GLUE tasks on several GPUs; sweep trials).

:class:`Processes` starts commands with their own environment and log file, reports the ones that ended, and
never leaves orphans behind: used as a context manager, any exception inside the block (a failed job the caller
raises on, Ctrl-C, a SIGTERM from a scheduler) stops every child still running before it propagates.

Each child runs in its own session, so a terminal's Ctrl-C does not reach it directly; a SIGINT or SIGTERM sent
to this process is forwarded to every child's whole process group (so grandchildren, such as Composer's launcher
workers or dataloader workers, get it too), which then has ``grace_s`` seconds to exit before SIGKILL. On Linux
a child also gets SIGTERM if this process dies without a chance to clean up (SIGKILL, out of memory).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Optional

# Signals forwarded to the children; SIGHUP is what a closed terminal or ssh session sends.
FORWARDED = tuple(
    s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None
)


@dataclasses.dataclass
class Child:
    """One started command: its process, log file and whatever the caller attached (``tag``)."""

    popen: subprocess.Popen
    log_path: Path
    tag: Any = None
    started: float = dataclasses.field(default_factory=time.perf_counter)
    ended: Optional[float] = None
    _log: Optional[IO[Any]] = dataclasses.field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """The child's process id (also its process group id)."""
        return self.popen.pid

    @property
    def returncode(self) -> Optional[int]:
        """Exit status once ended (negative: killed by that signal); None while running."""
        return self.popen.returncode

    @property
    def wall_s(self) -> float:
        """Seconds from start to end (or to now while running)."""
        return (self.ended if self.ended is not None else time.perf_counter()) - self.started

    def log_tail(self, chars: int = 3000) -> str:
        """The last ``chars`` characters of the log file."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def _close(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.close()
        if self.ended is None:
            self.ended = time.perf_counter()


def _parent_death_signal() -> Any:
    """A pre-exec hook asking Linux to SIGTERM the child when this process dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return hook


class Processes:
    """A set of running child processes; use as ``with Processes() as procs:`` so none outlives the block."""

    def __init__(self, grace_s: float = 20.0, poll_s: float = 0.2) -> None:
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.running: list[Child] = []
        self.received: Optional[int] = None  # the signal that interrupted the block, if any
        self._previous: dict[int, Any] = {}
        self._stopping: list[Child] = []  # children being stopped (a second signal kills them at once)

    # -- starting and polling ---------------------------------------------------------------------------

    def start(
        self,
        cmd: Sequence[str],
        log_path: str | os.PathLike,
        env: Optional[Mapping[str, str]] = None,
        tag: Any = None,
        append: bool = False,
        cwd: Optional[str | os.PathLike] = None,
    ) -> Child:
        """Start ``cmd`` with stdout and stderr into ``log_path`` and ``env`` (default: this process's)."""
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 (closed when it ends)
        try:
            popen = subprocess.Popen(
                list(cmd),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,  # its own process group, signalled as a whole
                preexec_fn=_parent_death_signal(),
            )
        except BaseException:
            log.close()
            raise
        child = Child(popen=popen, log_path=log_path, tag=tag, _log=log)
        self.running.append(child)
        return child

    def poll(self) -> list[Child]:
        """The children that ended since the last call (removed from :attr:`running`); does not wait."""
        ended = [c for c in self.running if c.popen.poll() is not None]
        for c in ended:
            c._close()
            self.running.remove(c)
        return ended

    def wait_any(self, timeout: Optional[float] = None) -> list[Child]:
        """Wait until at least one child ended (or ``timeout`` seconds passed); return the ended ones."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            ended = self.poll()
            if ended or not self.running or (deadline is not None and time.perf_counter() >= deadline):
                return ended
            time.sleep(self.poll_s)

    # -- stopping ---------------------------------------------------------------------------------------

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to every running child's process group; SIGKILL those still there after ``grace_s``."""
        children, self.running = self.running, []
        self._stopping = children
        try:
            for c in children:
                _signal_group(c, sig)
            deadline = time.perf_counter() + self.grace_s
            for c in children:
                try:
                    c.popen.wait(timeout=max(0.0, deadline - time.perf_counter()))
                except subprocess.TimeoutExpired:
                    _signal_group(c, signal.SIGKILL)
                    c.popen.wait()
                # Grandchildren that outlived their parent still belong to its group.
                _signal_group(c, signal.SIGKILL)
                c._close()
        finally:
            self._stopping = []

    def __enter__(self) -> Processes:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in FORWARDED:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stopping:  # a second Ctrl-C while children are shutting down: do not wait for them
            for c in self._stopping:
                _signal_group(c, signal.SIGKILL)
            return
        self.received = signum
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)  # the exit status a shell reports for a process killed by it

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self.running:
                forward = self.received or (
                    signal.SIGINT if exc_type is KeyboardInterrupt else signal.SIGTERM
                )
                self.stop(forward)
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = {}


def _signal_group(child: Child, sig: int) -> None:
    try:
        os.killpg(child.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # already gone
