"""Run a recipe in this process, or launch it on several processes/nodes through Composer's launcher.

Exit codes: 0 done, 2 recipe error, 3 non-finite loss, 143 preempted (SIGTERM/SIGUSR1; checkpoint written when
there was progress to save; rerun to resume), 130 interrupted (SIGINT).

Under ``--nproc``/``--nnodes`` three kinds of process share a stop signal: this command, Composer's launcher and
the ranks. Only the ranks act on it (they agree on one batch, checkpoint together and print one line). Ctrl-C
reaches all of them (the terminal signals the whole process group); SIGTERM/SIGUSR1 sent to this command are
forwarded to the ranks, and a scheduler may signal every process at once, so a rank takes a repeat of the same
signal within a second as the same one. The launcher (:func:`launcher_main`) ignores them: Composer's would
take them as a crash and terminate the ranks mid-checkpoint. A stopped rank reports its code through a file
and exits 0, so the launcher waits for all of them instead of killing the rest when the first one leaves.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from llmfoundry_lite import startup
from llmfoundry_lite.errors import RecipeError

# Only the standard library here: the stop-signal handlers go in before torch and Composer load (seconds).
from llmfoundry_lite.train.callbacks.stop_signals import (
    GUARD,
    PREEMPTION_SIGNALS,
    StopNow,
    signal_name,
    stop_signals,
)

DEFAULT_MASTER_PORT = 29500
_COMPOSER_SIGNAL_EXITS = (128 + signal.SIGTERM, 128 + signal.SIGINT)
# Set by launch() for the ranks: the folder where a rank that stopped on purpose writes its exit code.
STOP_DIR_ENV = "LLMFOUNDRY_LITE_STOP_DIR"
LAUNCHER_FLAG = "--composer-launcher"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _run(recipe: str, overrides: list[str]) -> None:
    from llmfoundry_lite.recipe import load_recipe
    from llmfoundry_lite.train.checks import check_pretraining_recipe
    from llmfoundry_lite.train.run import train

    GUARD.reassert()  # importing Composer replaced the SIGTERM/SIGINT handlers with its own
    check_pretraining_recipe(recipe, overrides)
    cfg = load_recipe(recipe, overrides)
    try:
        train(cfg, recipe_path=recipe)
    except RecipeError as e:  # raised while building (a missing dataset, ...): name the file that set the key
        if e.file is None:
            from llmfoundry_lite.recipe import compose

            origin = compose(recipe, overrides)[1].file_of(e.key) if e.key else recipe
            raise RecipeError(e.detail, file=origin, key=e.key) from None
        raise


def _is_stop(e: BaseException) -> bool:
    """A signal stop, a preemption or a diverged loss (not a crash)."""
    if isinstance(e, StopNow):
        return True
    if isinstance(e, SystemExit) and e.code in _COMPOSER_SIGNAL_EXITS:
        # Composer's own handler (sys.exit(128 + signal)) was in place for a moment during its import.
        e.exit_code = e.code
        e.args = (
            f"stopped by {signal_name(e.code - 128)} during start-up; rerun the same command to start again",
        )
        return True
    preemption = sys.modules.get(
        "llmfoundry_lite.train.callbacks.preemption"
    )  # not imported yet: cannot be one
    return preemption is not None and isinstance(e, preemption.RunStopped)


def _stopped(e: BaseException) -> int:
    """Print a stopped run's one-line reason (once per job, unless train() already did) and return its code."""
    if _rank() == 0 and not getattr(e, "reported", False):
        print(str(e), flush=True)
    return int(getattr(e, "exit_code", 1))


def _rank_exit(code: int) -> int:
    """A rank's exit status: under :func:`launch`, 0 with ``code`` left in the stop folder (see the module doc)."""
    stop_dir = os.environ.get(STOP_DIR_ENV)
    if not stop_dir or not os.path.isdir(stop_dir):
        return code
    with open(os.path.join(stop_dir, f"rank{_rank()}"), "w") as f:
        f.write(str(code))
    return 0


def _stop_code(stop_dir: str) -> int | None:
    """The exit code the stopped ranks left in ``stop_dir`` (the highest), or None when none stopped."""
    codes = []
    for name in os.listdir(stop_dir):
        try:
            with open(os.path.join(stop_dir, name)) as f:
                codes.append(int(f.read().strip()))
        except (OSError, ValueError):
            continue
    return max(codes) if codes else None


def run_local(recipe: str, overrides: list[str]) -> None:
    """Load, validate and train a recipe in this process (one rank of a launched job, or alone).

    A preempted, interrupted or diverged run prints its one-line reason and exits with its code (click's
    ``Exit``). SIGTERM/SIGINT stop it within seconds from the first moment (``stop_signals``).
    """
    with stop_signals():
        try:
            _run(recipe, overrides)
        except BaseException as e:
            if not _is_stop(e):
                raise
            raise click.exceptions.Exit(_stopped(e)) from None


def launcher_command(
    recipe: str,
    overrides: list[str],
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> list[str]:
    """The command line of Composer's launcher (through :func:`launcher_main`) running ``nproc`` ranks of the recipe."""
    cmd = [
        sys.executable,
        "-m",
        "llmfoundry_lite.train.launch",
        LAUNCHER_FLAG,
        "-n",
        str(nproc),
        "--world_size",
        str(nproc * nnodes),
        "--node_rank",
        str(node_rank),
        "--base_rank",
        str(node_rank * nproc),
    ]
    if nnodes > 1:
        # Every node must agree on the rendezvous; the launcher picks a random port only for one node.
        master_addr = master_addr or os.environ.get("MASTER_ADDR")
        if not master_addr:
            raise click.UsageError(
                "--master-addr (or MASTER_ADDR) is required with --nnodes > 1: node 0's address"
            )
        master_port = master_port or int(os.environ.get("MASTER_PORT", DEFAULT_MASTER_PORT))
    if master_addr:
        cmd += ["--master_addr", master_addr]
    if master_port:
        cmd += ["--master_port", str(master_port)]
    return [*cmd, "-m", "llmfoundry_lite.train.launch", recipe, *overrides]


def _ignore(signum: int, frame: object) -> None:
    """A handler that does nothing (not SIG_IGN, which the processes started meanwhile would inherit)."""


def _forward_to_children(pid: int):
    """A signal handler passing the signal to the processes ``pid`` started (the launcher's: the ranks)."""

    def handler(signum: int, frame: object) -> None:
        import psutil

        try:
            ranks = psutil.Process(pid).children()
        except psutil.NoSuchProcess:
            return
        for p in ranks:
            try:
                p.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    return handler


def launch(
    recipe: str,
    overrides: list[str],
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> int:
    """Start Composer's launcher for this node and return the job's exit code (a stopped run's 130/143).

    SIGTERM/SIGUSR1 sent to this process go to the training processes, which checkpoint and exit with 143;
    Ctrl-C reaches them directly.
    """
    import tempfile

    cmd = launcher_command(recipe, overrides, nproc, nnodes, node_rank, master_addr, master_port)
    stop_dir = tempfile.mkdtemp(prefix="llmfoundry-lite-stop-")
    # The launcher and the ranks start with SIGUSR1 ignored (inherited), so that a scheduler signalling the whole
    # job early cannot kill them; the ranks install their own handler when they start.
    previous_usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(cmd, env={**os.environ, STOP_DIR_ENV: stop_dir})
    finally:
        signal.signal(signal.SIGUSR1, previous_usr1)
    previous = {sig: signal.signal(sig, _forward_to_children(proc.pid)) for sig in PREEMPTION_SIGNALS}
    # Ctrl-C reached the ranks too (same process group): they stop the run; this process waits for them.
    # (Composer, imported here by the recipe checks, would exit at once: its handler raises SystemExit(130).)
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, _ignore)
    try:
        rc = proc.wait()
        code = _stop_code(stop_dir)
        return code if rc == 0 and code is not None else rc
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)
        import shutil

        shutil.rmtree(stop_dir, ignore_errors=True)


def launcher_main(argv: list[str]) -> int:
    """Composer's launcher (``composer -n ...`` arguments) that leaves stop signals to the ranks.

    SIGINT and SIGUSR1 are ignored here; SIGTERM (also sent when this command dies, see ``_die_with_parent``)
    is passed on to the ranks, which checkpoint and stop. Composer's own handler would exit, print a traceback and
    SIGTERM the ranks again while they write their checkpoint.
    """
    _die_with_parent(force=True)
    from composer.cli import launcher  # imports Composer's engine, which installs its SIGTERM/SIGINT handlers

    signal.signal(signal.SIGINT, _ignore)
    signal.signal(signal.SIGTERM, _forward_to_children(os.getpid()))
    sys.stdout = _WithoutLines(sys.stdout, _launcher_noise)
    logging.getLogger(launcher.__name__).addFilter(lambda r: not _RECIPE_ERROR_EXIT.match(r.getMessage()))
    sys.argv = ["composer", *argv]
    return launcher.main()


# What Composer's launcher prints at every exit, finished or stopped, though it waits for nothing then.
_LAUNCHER_NOISE = ("Waiting up to 30 seconds for all training processes to terminate.",)
# Rank 0's exit code 2 is a recipe error it has told in one line (``entrypoint``); the launcher would add a line
# on stdout and two ERROR log lines calling it a crash. Other ranks print nothing of their own: theirs stay.
_RECIPE_ERROR_EXIT = re.compile(r"(Global rank 0 \(PID \d+\) exited|Rank 0 crashed) with (exit )?code 2\.?$")


def _launcher_noise(line: str) -> bool:
    return line.startswith(_LAUNCHER_NOISE) or bool(_RECIPE_ERROR_EXIT.match(line))


class _WithoutLines:
    """A text stream that drops the whole lines ``drop`` says (the launcher's own prints only: the ranks write to
    the file descriptor directly)."""

    def __init__(self, stream: Any, drop: Callable[[str], bool]) -> None:
        self._stream, self._drop, self._line = stream, drop, ""

    def write(self, text: str) -> int:
        self._line += text
        *lines, self._line = self._line.split("\n")
        for line in lines:
            if not self._drop(line):
                self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._line and not self._drop(self._line):
            self._stream.write(self._line)
            self._line = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _die_with_parent(force: bool = False) -> None:
    """Under a launcher (or ``force``): get SIGTERM when the parent process dies, to checkpoint and stop."""
    if not sys.platform.startswith("linux") or ("LOCAL_RANK" not in os.environ and not force):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def entrypoint(argv: list[str]) -> int:
    """One training process: ``RECIPE [key=value ...] [--debug]``; errors print one line (on rank 0)."""
    startup.install_lean_imports()  # as the CLI's main: before anything imports Composer
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv:
        print("usage: composer scripts/train.py RECIPE.yaml [key=value ...]", file=sys.stderr)
        return 2
    _die_with_parent()
    with stop_signals():
        try:
            _run(argv[0], argv[1:])
        except RecipeError as e:
            # Every rank hits the same recipe error: say it once.
            if _rank() == 0:
                if debug:
                    traceback.print_exc()
                print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        except BaseException as e:
            if not _is_stop(e):
                raise
            return _rank_exit(_stopped(e))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == [LAUNCHER_FLAG]:
        sys.exit(launcher_main(sys.argv[2:]))
    sys.exit(entrypoint(sys.argv[1:]))
