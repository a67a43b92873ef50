"""The ``llmfoundry-lite sweep`` verb: plan, then print a Slurm array (dry run), run a worker, or summarise."""

from __future__ import annotations

import shlex
import sys
import time
from typing import Any, Optional

from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.sweep.plan import SweepPlan, plan_sweep, write_record, write_slurm_script
from llmfoundry_lite.sweep.storage import A_FOLDER, A_OWNER, requeue_dead, unfinished

# How often a sweep waiting for other workers' trials looks at the study again.
WAIT_POLL_S = 2.0


def _pending_text(trials: list[Any]) -> str:
    """``t003 (host:pid), t004 (queued)`` for trials still running or queued."""
    parts = []
    for t in trials:
        tid = t.user_attrs.get(A_FOLDER) or f"t{t.number:03d}"
        where = t.user_attrs.get(A_OWNER) if t.state.name == "RUNNING" else "queued"
        parts.append(f"{tid} ({where})" if where else tid)
    return ", ".join(parts)


def wait_for_others(plan: SweepPlan, study: Any, parallel: int, echo: Any) -> Any:
    """Wait until no trial of the study is running in another worker; run any that get queued meanwhile.

    A trial queued while waiting is a retry of one whose worker died (found by :func:`requeue_dead`):
    this worker runs it, so a dead worker never leaves the summary waiting for ever.
    """
    from llmfoundry_lite.sweep.worker import TrialRunner

    said = None
    while True:
        requeue_dead(study, echo)
        pending = unfinished(study)
        if not pending:
            return study
        if any(t.state.name == "WAITING" for t in pending):
            study = TrialRunner(plan, study, parallel, echo).run()
            continue
        text = _pending_text(pending)
        if text != said:
            echo(f"waiting for {len(pending)} trial(s) still running in other workers: {text}")
            said = text
        time.sleep(WAIT_POLL_S)


def _remote_data_warning(plan: SweepPlan) -> Optional[str]:
    for section in ("train_loader", "eval_loader"):
        block = plan.base.get(section) or {}
        if isinstance(block, dict) and isinstance(block.get("remote"), str) and "://" in block["remote"]:
            return (
                f"warning: {section}.remote is set: parallel trials on one machine share its local cache "
                f"({block.get('local')}) and streaming may refuse it; use --parallel 1 or one node per trial"
            )
    return None


def run_sweep(
    plan: SweepPlan,
    parallel: int = 1,
    dry_run: bool = False,
    summary_only: bool = False,
    worker: bool = False,
    echo: Any = print,
) -> int:
    """Write the sweep record, then write the Slurm script (dry run), or run trials and summarise; exit code."""
    from llmfoundry_lite.sweep.summary import summarize
    from llmfoundry_lite.sweep.worker import run_worker

    if parallel < 1:
        raise RecipeError(f"--parallel must be at least 1, got {parallel}", key="--parallel")
    write_record(plan)
    if dry_run:
        workers = parallel if parallel > 1 else plan.n_trials
        script = write_slurm_script(plan, workers)
        echo(shlex.join(["llmfoundry-lite", *plan.worker_args()]))
        print(
            f"# study {plan.name}: {plan.n_trials} trials ({plan.sampler}, pruning {plan.prune}) in {plan.storage}; "
            f"Slurm array of {workers} workers: {script}",
            file=sys.stderr,
        )
        return 0
    echo(
        f"sweep {plan.name}: {plan.n_trials} trials ({plan.sampler}, pruning {plan.prune}) in {plan.out}; "
        f"study in {plan.storage}"
    )
    for note in plan.notes:
        echo(f"note: {note}")
    if summary_only:
        study = plan.open_study(create=False)
    else:
        if parallel > 1:
            warning = _remote_data_warning(plan)
            if warning:
                echo(warning)
        study = run_worker(plan, parallel, echo, worker=worker)
        if worker:  # several workers share the study: the summary is a separate --summary-only run
            return 0
        study = wait_for_others(plan, study, parallel, echo)
    # After trials, the plots are drawn off the command's critical path; --summary-only draws them in place.
    rows = summarize(plan, study, echo, background_plots=not summary_only)
    pending = unfinished(study)
    if pending:  # --summary-only while workers still run
        echo(f"{len(pending)} trial(s) still running in other workers: {_pending_text(pending)}")
    failed = [r for r in rows if r.state == "FAIL"]
    if failed:
        echo(f"{len(failed)} of {len(rows)} trials failed: " + ", ".join(r.tid for r in failed))
        return 1
    return 0


def register_cli(app: Any) -> None:
    """Add ``llmfoundry-lite sweep``."""
    import typer

    @app.command("sweep")
    def sweep_command(
        recipe: str = typer.Argument(..., metavar="RECIPE.yaml", help="Path to the recipe YAML."),
        params: Optional[list[str]] = typer.Argument(  # noqa: B008
            None,
            metavar="[KEY=VALUES]...",
            help="key=v1,v2 (grid; [..] lists are not split), key=loguniform(a,b) | uniform(a,b) | "
            "int(a,b) | choice(a,b,c) (sampled), or key=value (fixed for every trial).",
        ),
        name: Optional[str] = typer.Option(
            None,
            "--name",
            "--study",
            help="Study name: trial runs are <name>-tNNN. Default: recipe name + a hash of the arguments.",
        ),
        out: Optional[str] = typer.Option(None, "--out", help="Sweep folder. Default: sweeps/<name>."),
        trials: Optional[int] = typer.Option(
            None, "--trials", "--samples", help="Number of trials. Default: the grid size (grid axes only)."
        ),
        sampler: Optional[str] = typer.Option(
            None, "--sampler", help="tpe | random | grid. Default: grid for grid axes only, else tpe."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of the sampler."),
        prune: str = typer.Option(
            "none", "--prune", help="Stop hopeless trials at an evaluation: median | hyperband | none."
        ),
        prune_startup: int = typer.Option(
            3, "--prune-startup", help="Median pruning: trials that run to the end before any is pruned."
        ),
        prune_warmup: int = typer.Option(
            0,
            "--prune-warmup",
            help="Median pruning: no trial is pruned before this batch (0: from the first evaluation).",
        ),
        metric: Optional[str] = typer.Option(
            None,
            "--metric",
            help="Metric that ranks trials (e.g. MaskedAccuracy). Default: eval cross-entropy.",
        ),
        direction: Optional[str] = typer.Option(
            None, "--direction", help="min | max. Default: max for accuracy-like metrics, else min."
        ),
        storage: Optional[str] = typer.Option(
            None,
            "--storage",
            help="Optuna storage URL (postgresql://..., sqlite:///...) or a .journal/.log file on a shared "
            "filesystem. Default: sqlite in the sweep folder.",
        ),
        parallel: int = typer.Option(1, "--parallel", help="Trials to run at once on this machine."),
        nproc: int = typer.Option(1, "--nproc", help="Processes (GPUs) per trial."),
        worker: bool = typer.Option(
            False, "--worker", help="Run trials of a shared study and exit without a summary (Slurm tasks)."
        ),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="Print the worker command and write a Slurm array script; run nothing."
        ),
        summary_only: bool = typer.Option(
            False, "--summary-only", help="Only (re)build the summary from the study and the trial folders."
        ),
    ) -> None:
        """Search recipe keys with Optuna (TPE, grid, random; median/hyperband pruning); trials are train runs."""
        plan = plan_sweep(
            recipe,
            list(params or []),
            name=name,
            out=out,
            trials=trials,
            sampler=sampler,
            seed=seed,
            nproc=nproc,
            prune=prune,
            prune_startup=prune_startup,
            prune_warmup=prune_warmup,
            metric=metric,
            direction=direction,
            storage=storage,
        )
        code = run_sweep(
            plan,
            parallel=parallel,
            dry_run=dry_run,
            summary_only=summary_only,
            worker=worker,
            echo=typer.echo,
        )
        if code:
            raise typer.Exit(code)
