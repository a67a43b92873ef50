"""The study: Optuna storage, sampler and pruner, and the sweep's bookkeeping of trials in it.

The trial process rebuilds storage and pruner from the same specs (:data:`TRIAL_ENV`). Several workers share one
study: trial numbers come from the storage, so the first ``--trials`` fresh trials by number are the budget in
every worker (:func:`ask_next`); a trial whose worker died is marked failed and re-queued with the same parameters
and folder (:func:`requeue`), so it resumes from its checkpoints.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from llmfoundry_lite.errors import RecipeError, first_line

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "hyperband")
# The trial process finds its study here (JSON: storage, study, trial_id, metric, pruner, marker).
TRIAL_ENV = "LLMFOUNDRY_LITE_SWEEP_TRIAL"
# A worker stamps its running trials every HEARTBEAT_S; another worker re-queues one unstamped for STALE_S.
HEARTBEAT_S = 30.0
STALE_S = 600.0

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


def default_storage(out: Path) -> str:
    """A journal file in the sweep folder: nothing to start, and opened in milliseconds where SQLite's schema
    set-up takes seconds. A folder from before the journal keeps its ``study.db``."""
    if (out / "study.db").exists():
        return f"sqlite:///{(out / 'study.db').resolve()}"
    return str((out / "study.journal").resolve())


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
        raise RecipeError(f"cannot open {url!r}: {first_line(e)}", key="--storage") from None


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


def make_sampler(kind: str, seed: int, n_trials: int, grid: Optional[dict[str, Sequence[Any]]] = None) -> Any:
    """The sampler: ``grid`` over the listed values (shuffled by ``seed``), random, or TPE (seeded)."""
    import optuna

    if kind == "grid":
        return _grid_sampler(grid or {}, seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # TPE starts with random trials; Optuna's default of 10 would leave a small sweep nothing to model.
    startup = max(2, min(10, n_trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def _fresh_before(study: Any, number: int) -> int:
    """How many fresh trials (not retries) the study holds with a number below ``number``."""
    return sum(
        1 for t in study.get_trials(deepcopy=False) if t.number < number and A_RETRY_OF not in t.user_attrs
    )


def _grid_sampler(search_space: dict, seed: int) -> Any:
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
            # Past the budget: a surplus ask, never run.
            return points[_fresh_before(study, trial.number) % len(points)][name]

    return GridSampler()


def open_study(
    name: str, storage: str, direction: str, sampler: Any, pruner: Any, create: bool = True
) -> Any:
    """Create or load a study (its direction must match a study that exists)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backend = open_storage(storage)
    for attempt in range(5):
        try:
            if not create:
                return optuna.load_study(study_name=name, storage=backend, sampler=sampler, pruner=pruner)
            study = optuna.create_study(
                study_name=name,
                storage=backend,
                sampler=sampler,
                pruner=pruner,
                direction=direction,
                load_if_exists=True,
            )
            break
        except KeyError:
            raise RecipeError(
                f"no study {name!r} in {storage}; run the sweep first", key="--storage"
            ) from None
        except Exception as e:  # two workers creating one SQLite schema at once: the loser retries
            if attempt == 4 or "locked" not in str(e) and "UNIQUE" not in str(e) and "exists" not in str(e):
                raise
            time.sleep(0.5 + attempt)
    if study.direction.name.lower() != direction:
        raise RecipeError(
            f"study {name!r} in {storage} is to {study.direction.name.lower()}, not {direction}; "
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


def me() -> str:
    """This worker's owner stamp: host:pid."""
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


def unfinished(study: Any) -> list[Any]:
    """Trials of the budget that are running or queued (in any worker)."""
    return [t for t in own_trials(study) if not t.state.is_finished()]


def ask_next(study: Any, n_trials: int, dists: dict) -> Optional[Any]:
    """The next trial to run (a queued retry first), or None once the study holds its ``n_trials`` trials."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    waiting = any(t.state == TrialState.WAITING for t in trials)
    fresh = [t for t in trials if A_RETRY_OF not in t.user_attrs]
    if not waiting and len(fresh) >= n_trials:
        return None
    trial = study.ask(dists)
    if A_RETRY_OF in trial.user_attrs:
        return trial
    # Another worker may have asked in between: the first n_trials fresh trials by number are the budget,
    # the same answer in every worker.
    if _fresh_before(study, trial.number) >= n_trials:
        trial.set_user_attr(A_SURPLUS, True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    return trial
