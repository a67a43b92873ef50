"""Run a recipe in this process, or launch it on several processes/nodes through Composer's launcher.

Exit codes: 0 done, 2 recipe error, 3 non-finite loss, 143 preempted (SIGTERM/SIGUSR1; checkpoint written when
there was progress to save; rerun to resume), 130 interrupted (SIGINT).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback

import click

from llmfoundry_lite import startup
from llmfoundry_lite.errors import RecipeError

# Only the standard library here: the stop-signal handlers go in before torch and Composer load (seconds).
from llmfoundry_lite.train.callbacks.stop_signals import (
    GUARD,
    PREEMPTED_EXIT_CODE,
    PREEMPTION_SIGNALS,
    StopNow,
    signal_name,
    stop_signals,
)

DEFAULT_MASTER_PORT = 29500
_COMPOSER_SIGNAL_EXITS = (128 + signal.SIGTERM, 128 + signal.SIGINT)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _run(recipe: str, overrides: list[str]) -> None:
    from llmfoundry_lite.recipe import load_recipe
    from llmfoundry_lite.train.run import train

    GUARD.reassert()  # importing Composer replaced the SIGTERM/SIGINT handlers with its own
    cfg = load_recipe(recipe, overrides)
    try:
        train(cfg, recipe_path=recipe)
    except RecipeError as e:  # raised while building (a missing dataset, ...): name the recipe
        if e.file is None:
            raise RecipeError(e.detail, file=recipe, key=e.key) from None
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
    """The ``composer`` launcher command line that runs this recipe on ``nproc`` processes per node."""
    cmd = [
        sys.executable,
        "-m",
        "composer.cli.launcher",
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


def _forward_to_ranks(launcher: subprocess.Popen, forwarded: list[int]):
    """A signal handler passing SIGTERM/SIGUSR1 to the training processes (Composer's launcher would die)."""

    def handler(signum: int, frame: object) -> None:
        import psutil

        forwarded.append(signum)

        try:
            ranks = psutil.Process(launcher.pid).children()
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
    """Start Composer's launcher for this node and return its exit code.

    SIGTERM/SIGUSR1 sent to this process go to the training processes, which checkpoint and exit with 143.
    """
    cmd = launcher_command(recipe, overrides, nproc, nnodes, node_rank, master_addr, master_port)
    # Composer's launcher has no SIGUSR1 handler: a scheduler signalling the whole job would kill it and
    # orphan the ranks mid-checkpoint. It starts with SIGUSR1 ignored (inherited); the ranks install their
    # own handler when training starts. SIGTERM is left alone: the launcher passes it on to the ranks.
    previous_usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(cmd, env=os.environ.copy())
    finally:
        signal.signal(signal.SIGUSR1, previous_usr1)
    forwarded: list[int] = []
    previous = {sig: signal.signal(sig, _forward_to_ranks(proc, forwarded)) for sig in PREEMPTION_SIGNALS}
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reaches the launcher too (same process group); let it clean up
                continue
        # The ranks leave only after the checkpoint that all of them agreed on. When one leaves first, Composer's
        # launcher takes its exit as a crash and terminates the others (still closing loggers), so the launcher's
        # code can be the SIGTERM of a rank rather than 143.
        killed = (
            256 - signal.SIGTERM,
            256 - signal.SIGKILL,
        )  # the launcher exits with a rank's negative code
        if forwarded and rc in killed:
            return PREEMPTED_EXIT_CODE
        return rc
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)


def _die_with_parent() -> None:
    """Under a launcher: get SIGTERM when the launcher dies (e.g. it was itself sent SIGTERM), to checkpoint."""
    if not sys.platform.startswith("linux") or "LOCAL_RANK" not in os.environ:
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
            return _stopped(e)
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(sys.argv[1:]))
