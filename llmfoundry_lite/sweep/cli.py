"""The ``llmfoundry-lite sweep`` verb: plan, then print a Slurm array (dry run), run a worker, or summarise."""

from __future__ import annotations

import shlex
import sys
from typing import Any, Optional

from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.sweep.study import (
    SweepPlan,
    open_study,
    own_trials,
    plan_sweep,
    run_worker,
    write_record,
    write_slurm_script,
)


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
        study = open_study(plan, create=False)
    else:
        if parallel > 1:
            warning = _remote_data_warning(plan)
            if warning:
                echo(warning)
        study = run_worker(plan, parallel, echo, worker=worker)
        if worker:  # several workers share the study: the summary is a separate --summary-only run
            return 0
    rows = summarize(plan, study, echo)
    failed = [r for r in rows if r.state == "FAIL"]
    if failed:
        echo(f"{len(failed)} of {len(rows)} trials failed: " + ", ".join(r.tid for r in failed))
        return 1
    unfinished = [t for t in own_trials(study) if not t.state.is_finished()]
    if unfinished and not summary_only:
        echo(f"{len(unfinished)} trials still running in other workers")
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
