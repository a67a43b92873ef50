"""The plan of a sweep: its arguments parsed, the recipe validated with every swept value before anything runs,
the study named with its folder and storage; the sweep folder's record and the Slurm array script.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.sweep.grammar import OVERRIDE_ORIGIN, Axis, grid_size, parse_arguments
from llmfoundry_lite.sweep.metrics import METRICS_FILE, higher_is_better
from llmfoundry_lite.sweep.storage import (
    PRUNERS,
    SAMPLERS,
    check_storage,
    default_storage,
    make_pruner,
    make_sampler,
    open_study,
)

SWEEP_FILE = "sweep.json"
SLURM_FILE = "sweep.sbatch"
METRICS_LOGGER = "jsonl_metrics"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_BATCHES_RE = re.compile(r"^\s*(\d+)\s*ba\s*$")


@dataclasses.dataclass
class SweepPlan:
    """A validated sweep: recipe, axes, fixed overrides, and the study's settings."""

    name: str
    out: Path
    recipe: str
    fixed: list[str]
    axes: list[Axis]
    sampler: str
    seed: int
    n_trials: int
    nproc: int
    prune: str
    prune_startup: int
    prune_warmup: int
    metric: Optional[str]
    direction: str  # "minimize" or "maximize"
    storage: str
    base: dict  # the recipe with the fixed overrides, resolved (loggers, eval interval, cost block)
    max_batches: Optional[int] = None
    eval_every: Optional[int] = None
    notes: list[str] = dataclasses.field(default_factory=list)
    own_save: Optional[str] = None

    def trial_overrides(self, tid: str, params: dict[str, str]) -> list[str]:
        """Everything passed to ``llmfoundry-lite train`` after the recipe for trial folder ``tid``."""
        folder = self.out / tid
        managed = [f"run_name={self.name}-{tid}"]
        if self.own_save is None:
            managed.append(f"save_folder={folder / 'checkpoints'}")
        fixed_keys = {f.partition("=")[0].strip().lstrip("+") for f in self.fixed}
        managed += _loggers_overrides(self.base, folder, self.name, fixed_keys)
        return [*self.fixed, *(f"{k}={v}" for k, v in params.items()), *managed]

    def train_args(self, overrides: Sequence[str]) -> list[str]:
        """Arguments after ``llmfoundry-lite`` that train with ``overrides``."""
        args = ["train", self.recipe, *overrides]
        return [*args, "--nproc", str(self.nproc)] if self.nproc > 1 else args

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions of the axes (categorical under the grid sampler)."""
        return {a.key: a.distribution(grid=self.sampler == "grid") for a in self.axes}

    def pruner_spec(self) -> dict:
        """What :func:`~llmfoundry_lite.sweep.storage.make_pruner` needs, in the parent and in each trial process."""
        return {
            "kind": self.prune,
            "startup": self.prune_startup,
            "warmup": self.prune_warmup,
            "min_resource": self.eval_every,
            "max_resource": self.max_batches,
        }

    def open_study(self, worker_seed: Optional[int] = None, create: bool = True) -> Any:
        """Create or load the plan's study; ``worker_seed`` replaces the plan's seed for sampling (grid keeps it)."""
        seed = self.seed if worker_seed is None or self.sampler == "grid" else worker_seed
        grid = {a.key: a.grid_values() for a in self.axes} if self.sampler == "grid" else None
        sampler = make_sampler(self.sampler, seed, self.n_trials, grid)
        return open_study(
            self.name, self.storage, self.direction, sampler, make_pruner(self.pruner_spec()), create
        )

    def worker_args(self) -> list[str]:
        """Arguments after ``llmfoundry-lite`` that start a worker of this study (Slurm array tasks)."""
        args = ["sweep", self.recipe, *self.fixed, *(a.describe() for a in self.axes)]
        args += ["--name", self.name, "--out", str(self.out.resolve()), "--storage", self.storage]
        args += ["--sampler", self.sampler, "--seed", str(self.seed), "--trials", str(self.n_trials)]
        args += ["--prune", self.prune, "--prune-startup", str(self.prune_startup)]
        args += ["--prune-warmup", str(self.prune_warmup), "--direction", self.direction[:3]]
        if self.metric:
            args += ["--metric", self.metric]
        if self.nproc > 1:
            args += ["--nproc", str(self.nproc)]
        return [*args, "--worker"]

    def record(self) -> dict:
        """What ``sweep.json`` holds."""
        return {
            "name": self.name,
            "recipe": self.recipe,
            "storage": self.storage,
            "sampler": self.sampler,
            "seed": self.seed,
            "trials": self.n_trials,
            "axes": [a.describe() for a in self.axes],
            "fixed": self.fixed,
            "nproc": self.nproc,
            "prune": self.prune,
            "metric": self.metric,
            "direction": self.direction,
        }


def _default_name(recipe: str, args: Sequence[str], sampler: str, seed: int, nproc: int) -> str:
    # Deterministic, so rerunning the same command finds (and continues) the same study; --trials is left out
    # so that a rerun with more trials extends it.
    ident = json.dumps([recipe, list(args), sampler, seed, nproc])
    return f"{Path(recipe).stem}-{hashlib.sha1(ident.encode()).hexdigest()[:6]}"


def _loggers_overrides(data: dict, folder: Path, name: str, fixed_keys: set[str]) -> list[str]:
    """Overrides that add the metrics logger and, with a wandb logger, group trials under the sweep name."""
    metrics_path = str(folder / METRICS_FILE)
    loggers = data.get("loggers")
    if isinstance(loggers, list):  # a list cannot be extended from the command line: replace it whole
        blocks = [dict(b) if isinstance(b, dict) else b for b in loggers]
        for b in blocks:
            if isinstance(b, dict) and b.get("name") == "wandb":
                b["group"] = name
        blocks.append({"name": METRICS_LOGGER, "filename": metrics_path, "stop_on_nan": True})
        return [f"loggers={json.dumps(blocks)}"]
    out = [
        f"loggers.{METRICS_LOGGER}.filename={metrics_path}",
        f"loggers.{METRICS_LOGGER}.stop_on_nan=true",
    ]
    for key, block in (loggers or {}).items():
        block_name = block.get("name", key) if isinstance(block, dict) else key
        group_key = f"loggers.{key}.group"
        if block_name == "wandb" and group_key not in fixed_keys:
            out.append(f"{group_key}={name}")
    return out


def _batches(value: Any) -> Optional[int]:
    """``40ba`` (or 40) as a batch count; None for other units."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _BATCHES_RE.match(str(value))
    return int(m.group(1)) if m else None


def plan_sweep(
    recipe: str,
    args: Sequence[str],
    *,
    name: Optional[str] = None,
    out: Optional[str | os.PathLike] = None,
    trials: Optional[int] = None,
    sampler: Optional[str] = None,
    seed: int = 0,
    nproc: int = 1,
    prune: str = "none",
    prune_startup: int = 3,
    prune_warmup: int = 0,
    metric: Optional[str] = None,
    direction: Optional[str] = None,
    storage: Optional[str] = None,
) -> SweepPlan:
    """Parse the arguments and validate the recipe with every swept value (nothing runs, nothing is written)."""
    from llmfoundry_lite.recipe import compose, load_recipe

    if trials is not None and trials < 1:
        raise RecipeError(f"--trials must be at least 1, got {trials}", key="--trials")
    if nproc < 1:
        raise RecipeError(f"--nproc must be at least 1, got {nproc}", key="--nproc")
    if sampler is not None and sampler not in SAMPLERS:
        raise RecipeError(f"--sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}", key="--sampler")
    if prune not in PRUNERS:
        raise RecipeError(f"--prune {prune!r}: choose one of {', '.join(PRUNERS)}", key="--prune")
    if prune_startup < 0 or prune_warmup < 0:
        raise RecipeError("--prune-startup and --prune-warmup must be 0 or more", key="--prune-warmup")
    if direction is not None and direction not in ("min", "max", "minimize", "maximize"):
        raise RecipeError(f"--direction {direction!r}: use min or max", key="--direction")
    if name is not None and not _NAME_RE.match(name):
        raise RecipeError(
            f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names folders, runs and the study)",
            key="--name",
        )
    if storage is not None:
        check_storage(storage)
    fixed, axes = parse_arguments(args)
    if not axes:
        raise RecipeError(
            "nothing to sweep: give at least one key with several values (optimizer.lr=1e-4,3e-4) "
            "or a distribution (optimizer.lr=loguniform(1e-5,1e-3)) with --trials N",
            file=OVERRIDE_ORIGIN,
        )
    all_grid = all(a.kind == "grid" for a in axes)
    sampler = sampler or ("grid" if all_grid else "tpe")
    notes: list[str] = []
    if sampler == "grid":
        size = grid_size(axes)  # RecipeError for a continuous range
        if trials is not None and trials > size:
            notes.append(f"--trials {trials} is more than the {size} grid points: running {size}")
        n_trials = min(trials or size, size)
    elif trials is None:
        if all_grid:
            n_trials = grid_size(axes)
        else:
            dist = next(a for a in axes if a.kind != "grid")
            raise RecipeError(
                f"{dist.kind}(...) is a distribution: add --trials N (how many trials to sample)",
                file=OVERRIDE_ORIGIN,
                key=dist.key,
            )
    else:
        n_trials = trials
    if direction is None:
        direction = "maximize" if metric and higher_is_better(metric) else "minimize"
    direction = {"min": "minimize", "max": "maximize"}.get(direction, direction)

    name = name or _default_name(recipe, args, sampler, seed, nproc)
    out_dir = Path(out) if out is not None else Path("sweeps") / name

    fixed_keys = {f.partition("=")[0].strip().lstrip("+") for f in fixed}
    swept_keys = {a.key.lstrip("+") for a in axes}
    if "run_name" in fixed_keys | swept_keys:
        raise RecipeError(
            f"the sweep names each trial <name>-tNNN; remove run_name and use --name (now {name!r})",
            file=OVERRIDE_ORIGIN,
            key="run_name",
        )
    if "save_folder" in swept_keys:
        raise RecipeError(
            "cannot be swept; each trial saves into its own folder", file=OVERRIDE_ORIGIN, key="save_folder"
        )
    own_save = None
    for f in fixed:
        k, _, v = f.partition("=")
        if k.strip().lstrip("+") == "save_folder":
            if "{run_name}" not in v:
                raise RecipeError(
                    f"{v!r} would be shared by every trial; drop it (trials save into <sweep>/tNNN/checkpoints) "
                    "or include {run_name} (e.g. s3://bucket/ckpt/{run_name})",
                    file=OVERRIDE_ORIGIN,
                    key="save_folder",
                )
            own_save = v
            notes.append(f"checkpoints go to save_folder={v} (from the command line), not the trial folders")

    base, _ = compose(recipe, fixed)
    plan = SweepPlan(
        name=name,
        out=out_dir,
        recipe=recipe,
        fixed=fixed,
        axes=axes,
        sampler=sampler,
        seed=seed,
        n_trials=n_trials,
        nproc=nproc,
        prune=prune,
        prune_startup=prune_startup,
        prune_warmup=prune_warmup,
        metric=metric,
        direction=direction,
        storage=storage or default_storage(out_dir),
        base=base,
        notes=notes,
        own_save=own_save,
    )

    # Validate before anything runs: every listed value and both bounds of every range, each with the other
    # axes at their first value (a product of all values would be as many loads as a grid has points).
    first = {a.key: a.checked_values()[0] for a in axes}
    checks = [dict(first)] + [{**first, a.key: v} for a in axes for v in a.checked_values()[1:]]
    cfg = None
    for i, point in enumerate(checks):
        try:
            loaded = load_recipe(recipe, plan.trial_overrides("t000", point), nproc=nproc)
        except RecipeError as e:
            swept = " ".join(f"{k}={v}" for k, v in point.items())
            raise RecipeError(f"{e.detail} [sweep values {swept}]", file=e.file, key=e.key) from None
        if i == 0:
            cfg = loaded
    plan.max_batches = _batches(cfg.get("max_duration"))
    if cfg.get("eval_loader") is not None:
        plan.eval_every = _batches(cfg.get("eval_interval"))
    if prune != "none" and cfg.get("eval_loader") is None:
        notes.append("the recipe has no eval_loader: trials report nothing to prune on")
    return plan


# ---------------------------------------------------------------------------------------------------------
# Sweep folder: its record and the Slurm array script
# ---------------------------------------------------------------------------------------------------------


def write_record(plan: SweepPlan) -> None:
    """Create the sweep folder with ``sweep.json``; refuse a folder that holds another sweep."""
    path = plan.out / SWEEP_FILE
    new = plan.record()
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        same = ("recipe", "axes", "fixed", "nproc", "sampler")
        if any(old.get(k) != new[k] for k in same):
            raise RecipeError(
                f"{plan.out} already holds a different sweep ({old.get('recipe')} "
                f"{' '.join(old.get('axes') or [])}); choose another --name or --out, or delete that folder",
                key="--out",
            )
    plan.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(new, indent=2) + "\n")


def write_slurm_script(plan: SweepPlan, workers: int) -> Path:
    """A Slurm array job whose tasks are workers of the one study (each runs trials until the budget is met)."""
    out = plan.out.resolve()
    cmd = shlex.join(["llmfoundry-lite", *plan.worker_args()])
    lines = [
        "#!/bin/bash",
        f"# Sweep {plan.name}: {plan.n_trials} trials of {plan.recipe} ({plan.sampler}, pruning {plan.prune}), "
        f"{workers} workers sharing one study.",
        f"# Submit with: sbatch {shlex.quote(str(out / SLURM_FILE))}",
        f"# Storage: {plan.storage}. Every node must reach it: a database server (postgresql://...), or a",
        "# journal file on a shared filesystem (--storage /shared/path/study.journal); SQLite suits one node.",
        "# Resubmitting continues the study (finished trials are kept, interrupted ones resume from checkpoints).",
        "# Afterwards, rerun the same `llmfoundry-lite sweep ...` command with --summary-only for the summary.",
        f"#SBATCH --job-name={plan.name}",
        f"#SBATCH --array=0-{workers - 1}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        "# GPUs per worker (delete the next line on CPU-only clusters):",
        f"#SBATCH --gpus-per-node={plan.nproc}",
        f"#SBATCH --output={out}/slurm-%A_%a.log",
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        cmd,
    ]
    path = plan.out / SLURM_FILE
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path
