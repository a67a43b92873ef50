"""A worker of a sweep: it asks the study for trials and runs each as a ``llmfoundry-lite train`` process.

:class:`TrialRunner` asks for a trial (ask-and-tell), runs it through :class:`llmfoundry_lite.procs.Processes`
with the trial's coordinates in :data:`~llmfoundry_lite.sweep.storage.TRIAL_ENV`, and tells the study the outcome:
COMPLETE with the trial's best metric, PRUNED (the trial's reporter wrote :data:`PRUNED_FILE` when the pruner
stopped it) or FAIL. ``--parallel`` runs several trials at once; a worker stops when the study holds ``--trials``
trials of its own (retries of interrupted trials do not count). Interrupted, it stops its trials and queues them
to resume from their checkpoints.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import shlex
import signal
import sys
import time
from typing import Any, Optional

from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.sweep.metrics import (
    METRICS_FILE,
    best_value,
    choose_metric,
    error_line,
    eval_metric_names,
    final_train_loss,
    fmt_seconds,
    loss_curve,
    read_metrics,
)
from llmfoundry_lite.sweep.plan import SweepPlan
from llmfoundry_lite.sweep.storage import (
    A_ATTEMPTS,
    A_BATCHES,
    A_BEAT,
    A_ERROR,
    A_FOLDER,
    A_OWNER,
    A_RETRY_OF,
    A_WALL,
    HEARTBEAT_S,
    TRIAL_ENV,
    ask_next,
    me,
    own_trials,
    requeue,
    requeue_dead,
)

TRIAL_FILE = "trial.json"
LOG_FILE = "train.log"
RECIPE_FILE = "recipe.yaml"
PRUNED_FILE = "pruned.json"
# Concurrent trials start a little apart, and one that loses streaming's start-up race is retried: two
# StreamingDatasets opening at the same moment in two processes can pick the same shared-memory name.
STAGGER_S = 2.0
RACE_RETRIES = 2
_STARTUP_RACE = re.compile(r"FileExistsError: .*File exists: '/\d+_locals'")


@dataclasses.dataclass
class Running:
    """A trial being run by this worker."""

    trial: Any
    tid: str
    params: dict[str, str]
    overrides: list[str]
    env: dict[str, str]
    slot: int = -1
    offset: int = 0  # where this attempt's output starts in the trial's train.log
    races: int = 0
    beat: float = 0.0


def gpu_slots(parallel: int, nproc: int, echo: Any) -> list[Optional[str]]:
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


def _swept(params: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _signal_text(rc: int) -> str:
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = str(-rc)
    return f"killed by {name}" + (" (out of memory?)" if -rc == signal.SIGKILL else "")


class TrialRunner:
    """Runs trials of one plan's study, ``parallel`` at a time, until the study holds ``--trials`` trials."""

    def __init__(self, plan: SweepPlan, study: Any, parallel: int = 1, echo: Any = print) -> None:
        self.plan = plan
        self.study = study
        self.parallel = parallel
        self.echo = echo
        self.dists = plan.distributions()
        self.slots = gpu_slots(parallel, plan.nproc, echo)
        self.free = list(range(len(self.slots)))
        self.base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if parallel > 1 and self.slots[0] is None and "OMP_NUM_THREADS" not in self.base_env:
            # Concurrent CPU trials would each start one thread per core and fight over them.
            self.base_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (parallel * plan.nproc)))
        self.exhausted = False  # the study holds its budget: ask for no more trials
        self.last_start = -math.inf

    # -- the loop ----------------------------------------------------------------------------------------

    def run(self) -> Any:
        """Run until every trial this worker may start has ended; the study."""
        from llmfoundry_lite.procs import Processes

        with Processes(grace_s=20) as procs:
            try:
                while True:
                    self._fill(procs)
                    if not procs.running:
                        break
                    idle_slot = not self.exhausted and len(procs.running) < self.parallel
                    ended = procs.wait_any(timeout=STAGGER_S if idle_slot else HEARTBEAT_S)
                    self._heartbeat(procs)
                    for c in ended:
                        self._finish(procs, c.tag, c.returncode, c.wall_s)
            except BaseException as exc:
                self._interrupted(procs, exc)
                raise
        return self.study

    def _fill(self, procs: Any) -> None:
        """Start trials while slots are free (the second and later ones ``STAGGER_S`` apart)."""
        while (
            not self.exhausted
            and len(procs.running) < self.parallel
            and time.perf_counter() - self.last_start >= (STAGGER_S if procs.running else 0.0)
        ):
            r = self._prepare()
            if r is None:
                return
            r.slot = self.free.pop(0) if self.free else 0
            device = self.slots[r.slot % len(self.slots)]
            if device is not None:
                r.env["CUDA_VISIBLE_DEVICES"] = device
            self.last_start = time.perf_counter()
            self._start(procs, r)

    def _heartbeat(self, procs: Any) -> None:
        """Stamp running trials so that other workers do not take them for orphans."""
        now = time.time()
        for c in procs.running:
            if now - c.tag.beat >= HEARTBEAT_S:
                c.tag.trial.set_user_attr(A_BEAT, now)
                c.tag.beat = now

    def _interrupted(self, procs: Any, exc: BaseException) -> None:
        """Stop the trials first, then queue them to resume from their checkpoints on the next run."""
        running = [c.tag for c in procs.running]
        procs.stop(
            procs.received or (signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM)
        )
        for r in running:
            if requeue(self.study, r.trial, "interrupted"):
                self.echo(f"[{r.tid}] interrupted: queued to resume from its checkpoint")

    # -- one trial ---------------------------------------------------------------------------------------

    def _prepare(self) -> Optional[Running]:
        """Ask for the next trial and write its folder; None once the budget is reached."""
        from llmfoundry_lite.recipe import load_recipe, to_yaml

        plan = self.plan
        while True:
            trial = ask_next(self.study, plan.n_trials, self.dists)
            if trial is None:
                self.exhausted = True
                return None
            tid = trial.user_attrs.get(A_FOLDER) or f"t{trial.number:03d}"
            trial.set_user_attr(A_FOLDER, tid)
            trial.set_user_attr(A_OWNER, me())
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
                cfg = load_recipe(plan.recipe, overrides, nproc=plan.nproc)
            except RecipeError as e:
                self._fail(trial, tid, str(e), 0.0)
                continue
            (folder / RECIPE_FILE).write_text(to_yaml(cfg))
            report = {
                "storage": plan.storage,
                "study": plan.name,
                "trial_id": trial._trial_id,
                "number": trial.number,
                "metric": plan.metric,
                "pruner": plan.pruner_spec(),
                "marker": str((folder / PRUNED_FILE).resolve()),
            }
            return Running(trial, tid, params, overrides, {**self.base_env, TRIAL_ENV: json.dumps(report)})

    def _start(self, procs: Any, r: Running) -> None:
        """Start (or restart) the trial's train process, its output appended to the trial's train.log."""
        folder = self.plan.out / r.tid
        attempts = int(r.trial.user_attrs.get(A_ATTEMPTS, 0)) + 1
        r.trial.set_user_attr(A_ATTEMPTS, attempts)
        (folder / PRUNED_FILE).unlink(missing_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        args = self.plan.train_args(r.overrides)
        with open(folder / LOG_FILE, "a", encoding="utf-8") as log:
            log.write(f"===== {stamp} attempt {attempts} (Optuna trial {r.trial.number}): ")
            log.write(shlex.join(["llmfoundry-lite", *args]) + "\n")
            r.offset = log.tell()
        procs.start(
            [sys.executable, "-m", "llmfoundry_lite.cli", *args],
            folder / LOG_FILE,
            env=r.env,
            tag=r,
            append=True,
        )
        r.beat = time.time()
        resumed = " (resuming)" if A_RETRY_OF in r.trial.user_attrs or attempts > 1 else ""
        self.echo(f"[{r.tid}] started{resumed}: {_swept(r.params)}")

    def _fail(self, trial: Any, tid: str, error: str, wall: float) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr(A_ERROR, error)
        self.study.tell(trial, state=TrialState.FAIL)
        self.echo(f"[{tid}] FAILED after {fmt_seconds(wall)}: {error}")

    def _finish(self, procs: Any, r: Running, rc: int, wall: float) -> None:
        """Tell the study how the trial ended (or restart it once it lost streaming's start-up race)."""
        from optuna.trial import TrialState

        folder = self.plan.out / r.tid
        trial = r.trial
        trial.set_user_attr(A_WALL, float(trial.user_attrs.get(A_WALL, 0.0)) + wall)
        with open(folder / LOG_FILE, encoding="utf-8", errors="replace") as f:
            f.seek(r.offset)
            output = f.read()
        if rc != 0 and _STARTUP_RACE.search(output) and r.races < RACE_RETRIES:
            r.races += 1
            self.echo(f"[{r.tid}] clashed with another trial's start-up (streaming shared memory); retrying")
            self._start(procs, r)
            return
        self.free.append(r.slot)
        records = read_metrics(folder / METRICS_FILE)
        curve = loss_curve(records)
        batches = curve[-1][0] if curve else 0
        marker = folder / PRUNED_FILE
        if rc == 0 and marker.exists():
            info = json.loads(marker.read_text())
            trial.set_user_attr(A_BATCHES, int(info.get("batch", batches)))
            self.study.tell(trial, state=TrialState.PRUNED)
            self.echo(
                f"[{r.tid}] PRUNED at batch {info.get('batch')} after {fmt_seconds(wall)}: {_swept(r.params)}"
            )
            return
        trial.set_user_attr(A_BATCHES, batches)
        if rc != 0:
            self._fail(trial, r.tid, _signal_text(rc) if rc < 0 else error_line(output), wall)
            return
        loss = final_train_loss(records)
        if loss is not None and not math.isfinite(loss):
            self._fail(trial, r.tid, f"final training loss is {loss}", wall)
            return
        chosen = choose_metric(set(eval_metric_names(records)), self.plan.metric)
        value = best_value(records, chosen, self.plan.direction == "maximize")
        if value is None:
            self._fail(trial, r.tid, f"no finite value of {chosen} logged", wall)
            return
        self.study.tell(trial, value)
        self.echo(f"[{r.tid}] COMPLETE in {fmt_seconds(wall)}: {chosen} {value:.4g}")


def run_worker(plan: SweepPlan, parallel: int = 1, echo: Any = print, worker: bool = False) -> Any:
    """Run trials of the plan's study, ``parallel`` at a time, until it holds ``--trials`` trials; the study."""
    if parallel < 1:
        raise RecipeError(f"--parallel must be at least 1, got {parallel}", key="--parallel")
    # Workers of one study must not draw the same points: each mixes its process id into the seed.
    study = plan.open_study(worker_seed=(plan.seed * 100003 + os.getpid()) % 2**31 if worker else None)
    requeue_dead(study, echo)
    done = [t for t in own_trials(study) if t.state.is_finished()]
    if done:
        echo(f"study {plan.name}: {len(done)} of {plan.n_trials} trials already finished")
    return TrialRunner(plan, study, parallel, echo).run()
