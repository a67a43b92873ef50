"""A sweep is one Optuna study; a worker asks it for trials and runs each as a ``llmfoundry-lite train`` process.

- The plan (:func:`plan_sweep`) parses the arguments, validates the recipe with every listed value and both
  bounds of every range before anything runs, and names the study, its folder and its storage.
- A worker (:func:`run_worker`) asks the study for a trial (ask-and-tell), runs it through
  :class:`llmfoundry_lite.procs.Processes` with the trial's coordinates in :data:`TRIAL_ENV`, and tells the
  study the outcome: COMPLETE with the trial's best metric, PRUNED (the trial's callback wrote
  :data:`PRUNED_FILE` when the pruner stopped it) or FAIL.
- Several workers (``--parallel`` slots in one process, or processes on several nodes sharing ``--storage``)
  never run a trial twice: trial numbers come from the storage, and a worker stops when the study holds
  ``--trials`` trials of its own (retries of interrupted trials do not count).
- A trial whose worker died (same host and its process gone, or no heartbeat for :data:`STALE_S`) is marked
  failed and re-queued with the same parameters and folder, so it resumes from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.sweep.grammar import OVERRIDE_ORIGIN, Axis, grid_size, parse_arguments
from llmfoundry_lite.sweep.metrics import (
    METRICS_FILE,
    TRAIN_LOSS,
    choose_metric,
    error_line,
    eval_metric_names,
    final_train_loss,
    higher_is_better,
    loss_curve,
    read_metrics,
)

SWEEP_FILE = "sweep.json"
TRIAL_FILE = "trial.json"
LOG_FILE = "train.log"
RECIPE_FILE = "recipe.yaml"
SLURM_FILE = "sweep.sbatch"
PRUNED_FILE = "pruned.json"
METRICS_LOGGER = "jsonl_metrics"
# The trial process finds its study here (JSON: storage, study, trial_id, metric, pruner, marker).
TRIAL_ENV = "LLMFOUNDRY_LITE_SWEEP_TRIAL"
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "hyperband")
# Concurrent trials start a little apart, and one that loses streaming's start-up race is retried: two
# StreamingDatasets opening at the same moment in two processes can pick the same shared-memory name.
STAGGER_S = 2.0
RACE_RETRIES = 2
_STARTUP_RACE = re.compile(r"FileExistsError: .*File exists: '/\d+_locals'")
# A worker stamps its running trials every HEARTBEAT_S; another worker re-queues one unstamped for STALE_S.
HEARTBEAT_S = 30.0
STALE_S = 600.0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_BATCHES_RE = re.compile(r"^\s*(\d+)\s*ba\s*$")

# User attributes of a study's trials (the sweep's own bookkeeping).
A_FOLDER = "sweep_folder"  # tNNN: the trial's folder and run name; a re-queued trial keeps its original's
A_OWNER = "sweep_owner"  # host:pid of the worker running it
A_BEAT = "sweep_beat"  # time of the worker's last heartbeat
A_RETRY_OF = "sweep_retry_of"  # number of the trial this one resumes
A_REQUEUED = "sweep_requeued"  # failed because its worker stopped; a retry carries on
A_SURPLUS = "sweep_surplus"  # asked by a worker after the budget was reached by others; never ran
A_ERROR = "sweep_error"
A_BATCHES = "sweep_batches"
A_WALL = "sweep_wall_s"
A_ATTEMPTS = "sweep_attempts"


# ---------------------------------------------------------------------------------------------------------
# Storage, sampler, pruner (the trial process rebuilds storage and pruner from the same specs)
# ---------------------------------------------------------------------------------------------------------


def default_storage(out: Path) -> str:
    """The SQLite file in the sweep folder (embedded: nothing to start)."""
    return f"sqlite:///{(out / 'study.db').resolve()}"


def check_storage(url: str) -> None:
    """RecipeError unless ``url`` is a database URL or a journal file path."""
    if "://" not in url and not url.endswith((".log", ".journal")):
        raise RecipeError(
            f"{url!r} is neither a database URL (sqlite:///path/study.db, postgresql://...) nor a journal file "
            "path ending in .log or .journal",
            key="--storage",
        )


def open_storage(url: str) -> Any:
    """An Optuna storage for ``url``: any database URL, or a ``.log``/``.journal`` file path (journal storage)."""
    import optuna

    if url.endswith((".log", ".journal")) and "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(url))
    check_storage(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        Path(url.split(":///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
        # Several processes write one SQLite file: wait for the lock instead of failing at once.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
    except (ImportError, ModuleNotFoundError) as e:
        raise RecipeError(
            f"cannot open {url!r}: {e} (install the database driver)", key="--storage"
        ) from None
    except Exception as e:  # sqlalchemy's errors: bad URL, unreachable server
        raise RecipeError(f"cannot open {url!r}: {str(e).splitlines()[0]}", key="--storage") from None


def make_pruner(spec: dict) -> Any:
    """The Optuna pruner described by ``spec`` (``kind`` median|hyperband|none and its settings)."""
    import optuna

    kind = spec.get("kind", "none")
    if kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(spec.get("startup", 3)),
            n_warmup_steps=int(spec.get("warmup", 0)),
            n_min_trials=1,
        )
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=int(spec.get("min_resource") or 1),
            max_resource=spec.get("max_resource") or "auto",
            reduction_factor=3,
        )
    return optuna.pruners.NopPruner()


def _grid_sampler(search_space: dict, seed: int) -> Any:
    import itertools
    import random

    import optuna

    keys = list(search_space)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(search_space[k] for k in keys))]
    random.Random(seed).shuffle(points)  # --trials below the grid size: a seeded random subset

    class GridSampler(optuna.samplers.BaseSampler):
        """The k-th fresh trial of the study (by number) gets grid point k. Trial numbers come from the storage,
        so workers sharing a study never take the same point; Optuna's GridSampler can, when two ask at once
        (it picks among the points no trial holds yet), and it stops the study at exhaustion, which the
        ask-and-tell loop does not want: the sweep's trial budget ends workers."""

        def infer_relative_search_space(self, study: Any, trial: Any) -> dict:
            return {}

        def sample_relative(self, study: Any, trial: Any, search_space: dict) -> dict:
            return {}

        def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> Any:
            rank = sum(
                1
                for t in study.get_trials(deepcopy=False)
                if t.number < trial.number and A_RETRY_OF not in t.user_attrs
            )
            return points[rank % len(points)][name]  # past the budget: a surplus ask, never run

    return GridSampler()


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------


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
        """What :func:`make_pruner` needs, in the parent and in each trial process."""
        return {
            "kind": self.prune,
            "startup": self.prune_startup,
            "warmup": self.prune_warmup,
            "min_resource": self.eval_every,
            "max_resource": self.max_batches,
        }

    def make_sampler(self, worker_seed: Optional[int] = None) -> Any:
        """The sampler: grid over the listed values, random, or TPE (seeded)."""
        import optuna

        seed = self.seed if worker_seed is None else worker_seed
        if self.sampler == "grid":  # one order of the points for every worker: the plan's seed
            return _grid_sampler({a.key: a.grid_values() for a in self.axes}, self.seed)
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        # TPE starts with random trials; Optuna's default of 10 would leave a small sweep nothing to model.
        startup = max(2, min(10, self.n_trials // 3))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)

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


# ---------------------------------------------------------------------------------------------------------
# The study and its trials
# ---------------------------------------------------------------------------------------------------------


def open_study(plan: SweepPlan, worker_seed: Optional[int] = None, create: bool = True) -> Any:
    """Create or load the plan's study (its direction must match a study that exists)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(plan.storage)
    sampler = plan.make_sampler(worker_seed)
    pruner = make_pruner(plan.pruner_spec())
    for attempt in range(5):
        try:
            if not create:
                return optuna.load_study(
                    study_name=plan.name, storage=storage, sampler=sampler, pruner=pruner
                )
            study = optuna.create_study(
                study_name=plan.name,
                storage=storage,
                sampler=sampler,
                pruner=pruner,
                direction=plan.direction,
                load_if_exists=True,
            )
            break
        except KeyError:
            raise RecipeError(
                f"no study {plan.name!r} in {plan.storage}; run the sweep first", key="--storage"
            ) from None
        except Exception as e:  # two workers creating one SQLite schema at once: the loser retries
            if attempt == 4 or "locked" not in str(e) and "UNIQUE" not in str(e) and "exists" not in str(e):
                raise
            time.sleep(0.5 + attempt)
    if study.direction.name.lower() != plan.direction:
        raise RecipeError(
            f"study {plan.name!r} in {plan.storage} is to {study.direction.name.lower()}, not {plan.direction}; "
            "use the same --direction (and --metric) or another --name",
            key="--direction",
        )
    return study


def own_trials(study: Any, budget_only: bool = True) -> list[Any]:
    """The study's trials that stand for a trial folder: not replaced by a retry, not a surplus ask."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(A_SURPLUS) or (budget_only and t.user_attrs.get(A_REQUEUED)):
            continue
        out.append(t)
    return out


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's worker: only its heartbeat tells
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def requeue(study: Any, trial: Any, why: str) -> bool:
    """Mark a running trial failed and queue a copy (same parameters, same folder) that resumes it."""
    from optuna.trial import TrialState

    attrs = dict(trial.user_attrs)
    try:
        study._storage.set_trial_user_attr(trial._trial_id, A_REQUEUED, why)
        study.tell(trial.number, state=TrialState.FAIL)
    except Exception:  # another worker requeued it first (the trial is no longer running)
        return False
    attrs.pop(A_OWNER, None)
    attrs.pop(A_BEAT, None)
    attrs.pop(A_REQUEUED, None)
    attrs[A_RETRY_OF] = trial.number
    study.enqueue_trial(dict(trial.params), user_attrs=attrs)
    return True


def requeue_dead(study: Any, echo: Any) -> int:
    """Re-queue running trials whose worker is gone; returns how many."""
    from optuna.trial import TrialState

    n = 0
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(A_OWNER, "")
        beat = t.user_attrs.get(A_BEAT) or (t.datetime_start.timestamp() if t.datetime_start else now)
        if (owner and not _alive(owner)) or now - beat > STALE_S:
            if requeue(study, t, "worker stopped"):
                n += 1
                echo(f"[{t.user_attrs.get(A_FOLDER, t.number)}] its worker stopped: queued to resume")
    return n


def ask_next(study: Any, plan: SweepPlan, dists: dict) -> Optional[Any]:
    """The next trial to run (a queued retry first), or None once the study holds its ``--trials`` trials."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    waiting = any(t.state == TrialState.WAITING for t in trials)
    fresh = [t for t in trials if A_RETRY_OF not in t.user_attrs]
    if not waiting and len(fresh) >= plan.n_trials:
        return None
    trial = study.ask(dists)
    if A_RETRY_OF in trial.user_attrs:
        return trial
    # Another worker may have asked in between: the first n_trials fresh trials by number are the budget,
    # the same answer in every worker.
    rank = sum(
        1
        for t in study.get_trials(deepcopy=False)
        if A_RETRY_OF not in t.user_attrs and t.number < trial.number
    )
    if rank >= plan.n_trials:
        trial.set_user_attr(A_SURPLUS, True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    return trial


@dataclasses.dataclass
class Running:
    """A trial being run by this worker."""

    trial: Any
    tid: str
    params: dict[str, str]
    overrides: list[str]
    env: dict[str, str]
    slot: int
    offset: int = 0
    races: int = 0
    beat: float = 0.0


def _gpu_slots(parallel: int, nproc: int, echo: Any) -> list[Optional[str]]:
    """CUDA_VISIBLE_DEVICES for each of ``parallel`` concurrent trials (None: leave as it is)."""
    if parallel <= 1:
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d for d in visible.split(",") if d.strip()]
    else:
        try:
            import torch

            devices = [str(i) for i in range(torch.cuda.device_count())]
        except Exception:
            devices = []
    if not devices:
        return [None] * parallel
    if len(devices) < parallel * nproc:
        echo(
            f"warning: {parallel} parallel trials x {nproc} processes need {parallel * nproc} GPUs, "
            f"{len(devices)} visible: trials will share GPUs"
        )
        return [None] * parallel
    return [",".join(devices[i * nproc : (i + 1) * nproc]) for i in range(parallel)]


def _fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return ""
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


def _swept(params: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def best_value(records: list[dict], metric: str, maximize: bool) -> Optional[float]:
    """The best finite value of ``metric`` over a trial's records (final train loss for the train loss)."""
    if metric == TRAIN_LOSS:
        loss = final_train_loss(records)
        return loss if loss is not None and math.isfinite(loss) else None
    values = [r[metric] for r in records if isinstance(r.get(metric), (int, float))]
    values = [v for v in values if math.isfinite(v)]
    return (max(values) if maximize else min(values)) if values else None


def run_worker(plan: SweepPlan, parallel: int = 1, echo: Any = print, worker: bool = False) -> Any:
    """Run trials of the plan's study, ``parallel`` at a time, until it holds ``--trials`` trials; the study."""
    from llmfoundry_lite.procs import Processes
    from llmfoundry_lite.recipe import load_recipe, to_yaml

    if parallel < 1:
        raise RecipeError(f"--parallel must be at least 1, got {parallel}", key="--parallel")
    # Workers of one study must not draw the same points: each mixes its process id into the seed.
    study = open_study(plan, worker_seed=(plan.seed * 100003 + os.getpid()) % 2**31 if worker else None)
    requeue_dead(study, echo)
    done = [t for t in own_trials(study) if t.state.is_finished()]
    if done:
        echo(f"study {plan.name}: {len(done)} of {plan.n_trials} trials already finished")
    dists = plan.distributions()
    slots = _gpu_slots(parallel, plan.nproc, echo)
    free = list(range(len(slots)))
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if parallel > 1 and slots[0] is None and "OMP_NUM_THREADS" not in base_env:
        # Concurrent CPU trials would each start one thread per core and fight over them.
        base_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (parallel * plan.nproc)))
    maximize = plan.direction == "maximize"
    exhausted = False
    last_start = -math.inf

    def start(procs: Processes, r: Running) -> None:
        folder = plan.out / r.tid
        attempts = int(r.trial.user_attrs.get(A_ATTEMPTS, 0)) + 1
        r.trial.set_user_attr(A_ATTEMPTS, attempts)
        (folder / PRUNED_FILE).unlink(missing_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        command = shlex.join(["llmfoundry-lite", *plan.train_args(r.overrides)])
        with open(folder / LOG_FILE, "a", encoding="utf-8") as log:
            log.write(f"===== {stamp} attempt {attempts} (Optuna trial {r.trial.number}): {command}\n")
            r.offset = log.tell()
        cmd = [sys.executable, "-m", "llmfoundry_lite.cli", *plan.train_args(r.overrides)]
        procs.start(cmd, folder / LOG_FILE, env=r.env, tag=r, append=True)
        r.beat = time.time()
        resumed = " (resuming)" if A_RETRY_OF in r.trial.user_attrs or attempts > 1 else ""
        echo(f"[{r.tid}] started{resumed}: {_swept(r.params)}")

    def prepare() -> Optional[Running]:
        nonlocal exhausted
        trial = ask_next(study, plan, dists)
        if trial is None:
            exhausted = True
            return None
        tid = trial.user_attrs.get(A_FOLDER) or f"t{trial.number:03d}"
        trial.set_user_attr(A_FOLDER, tid)
        trial.set_user_attr(A_OWNER, _me())
        trial.set_user_attr(A_BEAT, time.time())
        params = {a.key: a.text(trial.params[a.key]) for a in plan.axes}
        overrides = plan.trial_overrides(tid, params)
        folder = plan.out / tid
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "trial": tid,
            "optuna_trial": trial.number,
            "run_name": f"{plan.name}-{tid}",
            "recipe": plan.recipe,
            "params": params,
            "overrides": overrides,
            "nproc": plan.nproc,
            "command": shlex.join(["llmfoundry-lite", *plan.train_args(overrides)]),
        }
        (folder / TRIAL_FILE).write_text(json.dumps(record, indent=2) + "\n")
        try:  # a sampled value the recipe refuses fails this trial, not the sweep
            (folder / RECIPE_FILE).write_text(to_yaml(load_recipe(plan.recipe, overrides, nproc=plan.nproc)))
        except RecipeError as e:
            fail(trial, tid, str(e), 0.0)
            return prepare()
        report = {
            "storage": plan.storage,
            "study": plan.name,
            "trial_id": trial._trial_id,
            "number": trial.number,
            "metric": plan.metric,
            "pruner": plan.pruner_spec(),
            "marker": str((folder / PRUNED_FILE).resolve()),
        }
        return Running(trial, tid, params, overrides, {**base_env, TRIAL_ENV: json.dumps(report)}, slot=-1)

    def fail(trial: Any, tid: str, error: str, wall: float) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr(A_ERROR, error)
        study.tell(trial, state=TrialState.FAIL)
        echo(f"[{tid}] FAILED after {_fmt_seconds(wall)}: {error}")

    def finish(procs: Processes, r: Running, rc: int, wall: float) -> None:
        from optuna.trial import TrialState

        folder = plan.out / r.tid
        trial = r.trial
        total = float(trial.user_attrs.get(A_WALL, 0.0)) + wall
        trial.set_user_attr(A_WALL, total)
        with open(folder / LOG_FILE, encoding="utf-8", errors="replace") as f:
            f.seek(r.offset)
            output = f.read()
        if rc != 0 and _STARTUP_RACE.search(output) and r.races < RACE_RETRIES:
            r.races += 1
            echo(f"[{r.tid}] clashed with another trial's start-up (streaming shared memory); retrying")
            start(procs, r)
            return
        free.append(r.slot)
        records = read_metrics(folder / METRICS_FILE)
        curve = loss_curve(records)
        batches = curve[-1][0] if curve else 0
        marker = folder / PRUNED_FILE
        if rc == 0 and marker.exists():
            info = json.loads(marker.read_text())
            trial.set_user_attr(A_BATCHES, int(info.get("batch", batches)))
            study.tell(trial, state=TrialState.PRUNED)
            echo(
                f"[{r.tid}] PRUNED at batch {info.get('batch')} after {_fmt_seconds(wall)}: {_swept(r.params)}"
            )
            return
        trial.set_user_attr(A_BATCHES, batches)
        if rc != 0:
            error = error_line(output)
            if rc < 0:
                import signal

                try:
                    sig = signal.Signals(-rc).name
                except ValueError:
                    sig = str(-rc)
                error = f"killed by {sig}" + (" (out of memory?)" if -rc == signal.SIGKILL else "")
            fail(trial, r.tid, error, wall)
            return
        loss = final_train_loss(records)
        if loss is not None and not math.isfinite(loss):
            fail(trial, r.tid, f"final training loss is {loss}", wall)
            return
        chosen = choose_metric(set(eval_metric_names(records)), plan.metric)
        value = best_value(records, chosen, maximize)
        if value is None:
            fail(trial, r.tid, f"no finite value of {chosen} logged", wall)
            return
        study.tell(trial, value)
        echo(f"[{r.tid}] COMPLETE in {_fmt_seconds(wall)}: {chosen} {value:.4g}")

    with Processes(grace_s=20) as procs:
        try:
            while True:
                while (
                    not exhausted
                    and len(procs.running) < parallel
                    and time.perf_counter() - last_start >= (STAGGER_S if procs.running else 0.0)
                ):
                    r = prepare()
                    if r is None:
                        break
                    r.slot = free.pop(0) if free else 0
                    if slots[r.slot % len(slots)] is not None:
                        r.env["CUDA_VISIBLE_DEVICES"] = slots[r.slot % len(slots)]  # type: ignore[assignment]
                    last_start = time.perf_counter()
                    start(procs, r)
                if not procs.running:
                    break
                wait = STAGGER_S if not exhausted and len(procs.running) < parallel else HEARTBEAT_S
                ended = procs.wait_any(timeout=wait)
                now = time.time()
                for c in procs.running:
                    if now - c.tag.beat >= HEARTBEAT_S:
                        c.tag.trial.set_user_attr(A_BEAT, now)
                        c.tag.beat = now
                for c in ended:
                    finish(procs, c.tag, c.returncode, c.wall_s)
        except BaseException as exc:
            # Stop the trials first, then queue them to resume from their checkpoints on the next run.
            import signal

            running = [c.tag for c in procs.running]
            procs.stop(
                procs.received or (signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM)
            )
            for r in running:
                if requeue(study, r.trial, "interrupted"):
                    echo(f"[{r.tid}] interrupted: queued to resume from its checkpoint")
            raise
    return study
