"""Hyperparameter sweeps: grid or random search over recipe keys, one ``llmfoundry-lite train`` per trial.

``llmfoundry-lite sweep RECIPE.yaml optimizer.lr=1e-4,3e-4 model.n_layers=2,4 max_duration=50ba``

- ``key=a,b,c`` is a grid axis (brackets, braces, parentheses and quotes are not split: ``key=[1,2],[3,4]``);
  ``key=loguniform(a,b)``, ``uniform(a,b)``, ``int(a,b)``, ``choice(a,b,c)`` are sampled with
  ``--samples N --seed S``; any other ``key=value`` is a fixed override for every trial.
- Every trial is validated with :func:`llmfoundry_lite.recipe.load_recipe` before any starts.
- Each trial has a folder ``<out>/tNNN`` holding ``trial.json`` (its overrides and command), ``recipe.yaml``
  (resolved), ``train.log``, ``metrics.jsonl`` (written by the ``jsonl_metrics`` logger the sweep adds),
  ``checkpoints/`` and ``status.json`` (``"done"`` only after a successful run, so reruns skip it; an
  interrupted trial reruns the same command and autoresumes from its checkpoints).
- Results: ``summary.csv``, ``summary.md`` and ``summary.png`` in the sweep folder, and a table on the console.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError

OVERRIDE_ORIGIN = "command-line override"
SWEEP_FILE = "sweep.json"
TRIAL_FILE = "trial.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
RECIPE_FILE = "recipe.yaml"
SLURM_FILE = "sweep.sbatch"
LOCK_FILE = ".sweep.lock"
# Concurrent trials start a little apart, and one that loses streaming's start-up race is retried: two
# StreamingDatasets opening at the same moment in two processes can pick the same shared-memory name.
STAGGER_S = 2.0
RACE_RETRIES = 2
_STARTUP_RACE = re.compile(r"FileExistsError: .*File exists: '/\d+_locals'")
_ALREADY_TRAINED = "No training would occur"  # Composer's error when resuming a run that already finished
METRICS_LOGGER = "jsonl_metrics"
TRAIN_LOSS = "loss/train/total"
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
_DIST_RE = re.compile(r"^(loguniform|uniform|int|choice)\((.*)\)$", re.S)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Keys whose name says "higher is better" (accuracy, F1, ...); every other metric is minimised.
_HIGHER_IS_BETTER = re.compile(r"acc|f1|mcc|corr|auc|bleu|rouge|score|spearman|pearson", re.I)


# ---------------------------------------------------------------------------------------------------------
# Metrics logger: what each trial writes for the summary (a subprocess cannot share an in-memory logger)
# ---------------------------------------------------------------------------------------------------------


@registry.loggers.register(METRICS_LOGGER)
def jsonl_metrics(filename: str, stop_on_nan: bool = False) -> Any:
    """Append every logged metric to a JSON-lines file (rank 0); sweeps read trials' results from it."""
    # Every run writes one (train/run.py); a trial names its file. Imported here: it loads torch and Composer.
    from llmfoundry_lite.train.callbacks.progress import JSONLMetricsLogger

    return JSONLMetricsLogger(filename, stop_on_nan)


# ---------------------------------------------------------------------------------------------------------
# Parsing the command line: fixed overrides, grid axes, distributions
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Axis:
    """One swept key: a grid (``values``) or a distribution (``kind`` with ``low``/``high`` or ``values``)."""

    key: str
    kind: str  # "grid" or one of DISTRIBUTIONS
    values: list[str] = dataclasses.field(default_factory=list)
    low: float = 0.0
    high: float = 0.0

    def sample(self, rng: random.Random) -> str:
        """One value as override text."""
        if self.kind in ("grid", "choice"):
            return rng.choice(self.values)
        if self.kind == "int":
            return str(rng.randint(int(self.low), int(self.high)))
        if self.kind == "uniform":
            x = rng.uniform(self.low, self.high)
        else:  # loguniform
            x = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return _short_float(x, self.low, self.high)

    def describe(self) -> str:
        """The axis as the user wrote it."""
        if self.kind == "grid":
            return f"{self.key}={','.join(self.values)}"
        if self.kind == "choice":
            return f"{self.key}=choice({','.join(self.values)})"
        lo, hi = (int(self.low), int(self.high)) if self.kind == "int" else (self.low, self.high)
        return f"{self.key}={self.kind}({lo},{hi})"


def _short_float(x: float, low: float, high: float) -> str:
    """``x`` with 4 significant digits (readable run names and tables), unless rounding leaves the bounds."""
    text = f"{x:.4g}"
    return text if low <= float(text) <= high else repr(x)


def split_values(text: str) -> list[str]:
    """Split on commas that are not inside brackets, braces, parentheses or quotes."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    quote: str | None = None
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def _number(text: str, key: str, kind: str, integer: bool = False) -> float:
    try:
        return int(text) if integer else float(text)
    except ValueError:
        what = "an integer" if integer else "a number"
        raise RecipeError(
            f"{kind}(...) bounds must be {'integers' if integer else 'numbers'}: {text!r} is not {what}",
            file=OVERRIDE_ORIGIN,
            key=key,
        ) from None


def _parse_distribution(key: str, kind: str, inner: str) -> Axis:
    args = split_values(inner)
    if kind == "choice":
        if any(a == "" for a in args):
            raise RecipeError(
                "choice(...) needs comma-separated values, e.g. choice(2,4,8)", file=OVERRIDE_ORIGIN, key=key
            )
        return Axis(key, kind, values=args)
    if len(args) != 2 or any(a == "" for a in args):
        raise RecipeError(
            f"{kind}(...) takes two bounds, e.g. {key}={kind}({'1,8' if kind == 'int' else '1e-5,1e-3'})",
            file=OVERRIDE_ORIGIN,
            key=key,
        )
    low, high = (_number(a, key, kind, integer=kind == "int") for a in args)
    if low > high or (low == high and kind != "int"):
        raise RecipeError(
            f"{kind}({args[0]},{args[1]}): the low bound must be below the high bound",
            file=OVERRIDE_ORIGIN,
            key=key,
        )
    if kind == "loguniform" and low <= 0:
        raise RecipeError(f"loguniform bounds must be positive, got {args[0]}", file=OVERRIDE_ORIGIN, key=key)
    return Axis(key, kind, low=float(low), high=float(high))


def parse_arguments(args: Sequence[str]) -> tuple[list[str], list[Axis]]:
    """Split ``key=...`` arguments into fixed overrides (kept verbatim) and swept axes, in order."""
    fixed: list[str] = []
    axes: list[Axis] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(
                f"malformed argument {arg!r}; use key=value, key=v1,v2,... or key=loguniform(a,b)",
                file=OVERRIDE_ORIGIN,
            )
        m = _DIST_RE.match(value.strip())
        if m:
            axes.append(_parse_distribution(key, m.group(1), m.group(2)))
            continue
        values = split_values(value)
        if len(values) == 1:
            fixed.append(arg)
            continue
        if any(v == "" for v in values):
            raise RecipeError(
                f"empty value in {value!r}; separate values with single commas", file=OVERRIDE_ORIGIN, key=key
            )
        axes.append(Axis(key, "grid", values=values))
    seen: dict[str, str] = {}
    for a in axes:
        if a.key.lstrip("+") in seen:
            raise RecipeError("swept twice; give each key once", file=OVERRIDE_ORIGIN, key=a.key)
        seen[a.key.lstrip("+")] = a.key
    for f in fixed:
        k = f.partition("=")[0].strip().lstrip("+")
        if k in seen:
            raise RecipeError("both swept and fixed; give it once", file=OVERRIDE_ORIGIN, key=k)
    return fixed, axes


def grid_points(axes: Sequence[Axis]) -> list[dict[str, str]]:
    """Every combination of the grid axes (the first axis varies slowest)."""
    for a in axes:
        if a.kind != "grid":
            raise RecipeError(
                f"{a.kind}(...) is a distribution: add --samples N for random search",
                file=OVERRIDE_ORIGIN,
                key=a.key,
            )
    return [dict(zip([a.key for a in axes], combo)) for combo in itertools.product(*(a.values for a in axes))]


def random_points(axes: Sequence[Axis], samples: int, seed: int) -> list[dict[str, str]]:
    """``samples`` draws of every axis (a grid axis is a uniform choice), reproducible from ``seed``."""
    rng = random.Random(seed)
    return [{a.key: a.sample(rng) for a in axes} for _ in range(samples)]


# ---------------------------------------------------------------------------------------------------------
# The plan: trials, their overrides and commands
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trial:
    """One run of the sweep."""

    index: int
    id: str  # "t003"
    run_name: str
    folder: Path
    params: dict[str, str]  # swept key -> value text
    overrides: list[str]  # everything passed to `llmfoundry-lite train` after the recipe
    resolved_yaml: str = ""

    @property
    def status_path(self) -> Path:
        """Where the trial's status lives."""
        return self.folder / STATUS_FILE


@dataclasses.dataclass
class Sweep:
    """A validated sweep: the recipe, the swept axes and the trials."""

    name: str
    out: Path
    recipe: str
    fixed: list[str]
    axes: list[Axis]
    trials: list[Trial]
    mode: str  # "grid" or "random"
    seed: int
    nproc: int = 1
    notes: list[str] = dataclasses.field(default_factory=list)

    def train_args(self, trial: Trial) -> list[str]:
        """Arguments after ``llmfoundry-lite`` that run ``trial``."""
        args = ["train", self.recipe, *trial.overrides]
        return [*args, "--nproc", str(self.nproc)] if self.nproc > 1 else args

    def command(self, trial: Trial) -> str:
        """The trial's ``llmfoundry-lite train ...`` command, shell-quoted."""
        return shlex.join(["llmfoundry-lite", *self.train_args(trial)])


def _default_name(recipe: str, args: Sequence[str], samples: int | None, seed: int, nproc: int) -> str:
    # Deterministic, so rerunning the same command finds (and resumes) the same sweep folder.
    ident = json.dumps([recipe, list(args), samples, seed if samples else None, nproc])
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


def plan_sweep(
    recipe: str,
    args: Sequence[str],
    *,
    name: str | None = None,
    out: str | os.PathLike | None = None,
    samples: int | None = None,
    seed: int = 0,
    nproc: int = 1,
) -> Sweep:
    """Parse the arguments, build every trial's overrides and validate each trial's recipe (nothing runs)."""
    from llmfoundry_lite.recipe import compose, load_recipe, to_yaml

    if samples is not None and samples < 1:
        raise RecipeError(f"--samples must be at least 1, got {samples}")
    if nproc < 1:
        raise RecipeError(f"--nproc must be at least 1, got {nproc}")
    if name is not None and not _NAME_RE.match(name):
        raise RecipeError(
            f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names folders and runs)"
        )
    fixed, axes = parse_arguments(args)
    if not axes:
        raise RecipeError(
            "nothing to sweep: give at least one key with several values (optimizer.lr=1e-4,3e-4) "
            "or a distribution with --samples N (optimizer.lr=loguniform(1e-5,1e-3))",
            file=OVERRIDE_ORIGIN,
        )
    name = name or _default_name(recipe, args, samples, seed, nproc)
    out_dir = Path(out) if out is not None else Path("sweeps") / name
    points = random_points(axes, samples, seed) if samples else grid_points(axes)
    mode = "random" if samples else "grid"

    notes: list[str] = []
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
    width = max(3, len(str(len(points) - 1)))
    trials: list[Trial] = []
    for i, point in enumerate(points):
        tid = f"t{i:0{width}d}"
        folder = out_dir / tid
        run_name = f"{name}-{tid}"
        managed = [f"run_name={run_name}"]
        if own_save is None:
            managed.append(f"save_folder={folder / 'checkpoints'}")
        managed += _loggers_overrides(base, folder, name, fixed_keys)
        overrides = [*fixed, *(f"{k}={v}" for k, v in point.items()), *managed]
        trials.append(Trial(i, tid, run_name, folder, dict(point), overrides))

    # Validate every trial before anything is written or started.
    for t in trials:
        try:
            cfg = load_recipe(recipe, t.overrides, nproc=nproc)
        except RecipeError as e:
            swept = " ".join(f"{k}={v}" for k, v in t.params.items())
            raise RecipeError(f"{e.detail} [sweep trial {t.id}: {swept}]", file=e.file, key=e.key) from None
        t.resolved_yaml = to_yaml(cfg)
    return Sweep(name, out_dir, recipe, fixed, axes, trials, mode, seed, nproc, notes)


def _trial_record(sweep: Sweep, t: Trial) -> dict:
    return {
        "trial": t.id,
        "run_name": t.run_name,
        "recipe": sweep.recipe,
        "params": t.params,
        "overrides": t.overrides,
        "nproc": sweep.nproc,
        "command": sweep.command(t),
    }


def write_plan(sweep: Sweep) -> None:
    """Create the sweep and trial folders with their records; refuse a folder that holds another sweep."""
    for t in sweep.trials:
        path = t.folder / TRIAL_FILE
        if not path.exists():
            continue
        old = json.loads(path.read_text())
        new = _trial_record(sweep, t)
        if any(old.get(k) != new[k] for k in ("recipe", "overrides", "nproc")):
            raise RecipeError(
                f"{t.folder} already holds a different trial ({old.get('command')}); "
                "choose another --name or --out, or delete that folder",
                key="--out",
            )
    sweep.out.mkdir(parents=True, exist_ok=True)
    for t in sweep.trials:
        t.folder.mkdir(parents=True, exist_ok=True)
        (t.folder / TRIAL_FILE).write_text(json.dumps(_trial_record(sweep, t), indent=2) + "\n")
        (t.folder / RECIPE_FILE).write_text(t.resolved_yaml)
    record = {
        "name": sweep.name,
        "recipe": sweep.recipe,
        "mode": sweep.mode,
        "seed": sweep.seed if sweep.mode == "random" else None,
        "axes": [a.describe() for a in sweep.axes],
        "fixed": sweep.fixed,
        "nproc": sweep.nproc,
        "trials": [t.id for t in sweep.trials],
    }
    (sweep.out / SWEEP_FILE).write_text(json.dumps(record, indent=2) + "\n")


def write_slurm_script(sweep: Sweep, parallel: int = 0) -> Path:
    """A Slurm array job (one task per trial) that runs each trial's command and records its status."""
    out = sweep.out.resolve()
    n = len(sweep.trials)
    throttle = f"%{parallel}" if parallel > 0 else ""
    lines = [
        "#!/bin/bash",
        f"# Sweep {sweep.name}: {n} trials of {sweep.recipe}. Submit with: sbatch {shlex.quote(str(out / SLURM_FILE))}",
        "# Finished trials are skipped on resubmission; interrupted ones resume from their checkpoints.",
        "# Afterwards, rerun the same `llmfoundry-lite sweep ...` command with --summary-only for the summary.",
        f"#SBATCH --job-name={sweep.name}",
        f"#SBATCH --array=0-{n - 1}{throttle}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        "# GPUs per trial (delete the next line on CPU-only clusters):",
        f"#SBATCH --gpus-per-node={sweep.nproc}",
        f"#SBATCH --output={out}/slurm-%A_%a.log",
        "set -uo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for i, t in enumerate(sweep.trials):
        cmd = " ".join(shlex.quote(a) for a in ["llmfoundry-lite", *sweep.train_args(t)])
        lines.append(f"  {i}) dir={shlex.quote(str(t.folder))}; cmd=({cmd}) ;;")
    lines += [
        '  *) echo "no trial number $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
        "esac",
        'if grep -qs \'"status": "done"\' "$dir/status.json"; then echo "already done: $dir"; exit 0; fi',
        'mkdir -p "$dir"',
        "start=$(date +%s)",
        '"${cmd[@]}" 2>&1 | tee -a "$dir/train.log"',
        "rc=${PIPESTATUS[0]}",
        "wall=$(( $(date +%s) - start ))",
        'if [ "$rc" -eq 0 ]; then state=done; else state=failed; fi',
        'printf \'{"status": "%s", "returncode": %s, "wall_s": %s, "runner": "slurm"}\\n\' '
        '"$state" "$rc" "$wall" > "$dir/status.json"',
        'exit "$rc"',
    ]
    path = sweep.out / SLURM_FILE
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------


def read_status(trial: Trial) -> dict:
    """The trial's status record ({} when it never ran)."""
    try:
        return json.loads(trial.status_path.read_text())
    except (OSError, ValueError):
        return {}


def _write_status(trial: Trial, record: dict) -> None:
    tmp = trial.status_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(trial.status_path)  # atomic: a reader never sees half a status


def error_line(text: str) -> str:
    """The most telling line of a failed run's output: the exception or ``error:`` line, else the last one."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pattern = re.compile(r"^(error:|[\w.]*(Error|Exception|Interrupt)\b)")
    for ln in reversed(lines):
        if pattern.match(ln):
            return ln[:300]
    return lines[-1][:300] if lines else "(no output)"


def _gpu_slots(parallel: int, nproc: int, echo: Any) -> list[str | None]:
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


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_trials(sweep: Sweep, parallel: int = 1, echo: Any = print) -> dict[str, dict]:
    """Run the unfinished trials, ``parallel`` at a time; returns each trial's status record."""
    if parallel < 1:
        raise RecipeError(f"--parallel must be at least 1, got {parallel}")
    results: dict[str, dict] = {}
    todo: list[Trial] = []
    for t in sweep.trials:
        st = read_status(t)
        if st.get("status") == "done":
            echo(f"[{t.id}] already done, skipped")
            results[t.id] = st
        else:
            todo.append(t)
    if not todo:
        return results

    slots = _gpu_slots(parallel, sweep.nproc, echo)
    free = list(range(len(slots)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if parallel > 1 and slots[0] is None and "OMP_NUM_THREADS" not in env:
        # Concurrent CPU trials would each start one thread per core and fight over them.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (parallel * sweep.nproc)))
    running: dict[str, tuple[Trial, subprocess.Popen, Any, int, float, int]] = {}
    queue = list(todo)
    restore = _exit_on_termination()
    retries: dict[str, int] = {}
    last_start = -math.inf
    try:
        while queue or running:
            while queue and len(running) < parallel and time.perf_counter() - last_start >= STAGGER_S:
                last_start = time.perf_counter()
                t = queue.pop(0)
                slot = free.pop(0) if free else 0
                trial_env = dict(env)
                if slots[slot % len(slots)] is not None:
                    trial_env["CUDA_VISIBLE_DEVICES"] = slots[slot % len(slots)]
                t.folder.mkdir(parents=True, exist_ok=True)
                log = open(t.folder / LOG_FILE, "a", encoding="utf-8")  # noqa: SIM115 (closed when it ends)
                prev = read_status(t)
                attempt = int(prev.get("attempts", 0)) + 1
                stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                log.write(f"===== {stamp} attempt {attempt}: {sweep.command(t)}\n")
                log.flush()
                offset = log.tell()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "llmfoundry_lite.cli", *sweep.train_args(t)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=trial_env,
                    start_new_session=True,  # its own process group: stopped as a whole on Ctrl-C
                )
                _write_status(
                    t,
                    {
                        "status": "running",
                        "pid": proc.pid,
                        "attempts": attempt,
                        "started": stamp,
                        "wall_s": prev.get("wall_s", 0.0),
                    },
                )
                swept = " ".join(f"{k}={v}" for k, v in t.params.items())
                resumed = " (resuming)" if prev else ""
                echo(f"[{t.id}] started{resumed}: {swept}")
                running[t.id] = (t, proc, log, offset, time.perf_counter(), slot)
            time.sleep(0.2)
            for tid in list(running):
                t, proc, log, offset, t0, slot = running[tid]
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del running[tid]
                free.append(slot)
                results[tid] = _finish(t, rc, offset, time.perf_counter() - t0)
                st = results[tid]
                if st.get("startup_race") and retries.get(tid, 0) < RACE_RETRIES:
                    retries[tid] = retries.get(tid, 0) + 1
                    echo(f"[{tid}] clashed with another trial's start-up (streaming shared memory); retrying")
                    queue.insert(0, t)
                elif st["status"] == "done":
                    echo(f"[{tid}] done in {_fmt_seconds(st['last_wall_s'])}")
                else:
                    echo(f"[{tid}] FAILED after {_fmt_seconds(st['last_wall_s'])}: {st['error']}")
    except BaseException:
        for t, proc, log, _, t0, _ in running.values():
            _stop(proc)
            log.close()
            prev = read_status(t)
            _write_status(
                t,
                {
                    **prev,
                    "status": "interrupted",
                    "wall_s": prev.get("wall_s", 0.0) + time.perf_counter() - t0,
                },
            )
        raise
    finally:
        for sig, handler in restore.items():
            signal.signal(sig, handler)
    return results


def _exit_on_termination() -> dict:
    """Turn SIGTERM/SIGHUP into SystemExit, so a killed sweep still stops its trials (they run in their own
    sessions and would otherwise keep running unattended). Returns the previous handlers."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def _raise(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            previous[sig] = signal.signal(sig, _raise)
    return previous


def _finish(t: Trial, rc: int, offset: int, wall: float) -> dict:
    prev = read_status(t)
    with open(t.folder / LOG_FILE, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        output = f.read()
    record: dict[str, Any] = {
        "status": "done",
        "returncode": rc,
        "attempts": prev.get("attempts", 1),
        "started": prev.get("started"),
        "last_wall_s": wall,
        "wall_s": float(prev.get("wall_s", 0.0)) + wall,
    }
    if rc != 0 and _ALREADY_TRAINED in output:
        # Autoresume found a checkpoint at max_duration (the trial finished but its status was not written,
        # e.g. the sweep was stopped at that moment): Composer refuses to fit again, yet the trial is complete.
        rc = 0
        record["note"] = "already trained to max_duration"
    if rc != 0:
        tail = output.strip().splitlines()[-20:]
        record.update(status="failed", error=error_line(output), error_tail=tail)
        record["startup_race"] = bool(_STARTUP_RACE.search(output))
        if rc < 0:
            try:
                sig = signal.Signals(-rc).name
            except ValueError:
                sig = str(-rc)
            hint = " (out of memory?)" if -rc == signal.SIGKILL else ""
            record["error"] = f"killed by {sig}{hint}"
    else:
        loss = final_train_loss(read_metrics(t.folder / METRICS_FILE))
        if loss is not None and not math.isfinite(loss):
            record.update(status="failed", error=f"final training loss is {loss}")
    _write_status(t, record)
    return record


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (a partial last line from a killed run is ignored)."""
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return records
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def loss_curve(records: list[dict]) -> list[tuple[int, float]]:
    """(batch number from 1, train loss) pairs; a batch logged twice (a resumed run) keeps its last value."""
    by_step: dict[int, float] = {}
    for r in records:
        if TRAIN_LOSS in r and r.get("step") is not None:
            by_step[int(r["step"]) + 1] = r[TRAIN_LOSS]  # logged at step k = the loss of batch k + 1
    return sorted(by_step.items())


def final_train_loss(records: list[dict]) -> float | None:
    """The last logged training loss."""
    curve = loss_curve(records)
    return curve[-1][1] if curve else None


def eval_metric_names(records: list[dict]) -> list[str]:
    """Names of the evaluation metrics logged (``metrics/eval/LanguageCrossEntropy``, ...)."""
    names = {k for r in records for k in r if k.startswith("metrics/") and not k.startswith("metrics/train/")}
    return sorted(names)


def higher_is_better(metric: str) -> bool:
    """Whether larger values of ``metric`` are better (accuracy, F1, ...)."""
    return bool(_HIGHER_IS_BETTER.search(metric.rsplit("/", 1)[-1]))


def choose_metric(all_names: set[str], requested: str | None = None) -> str:
    """The metric that ranks trials: the requested one, else eval cross-entropy/perplexity/accuracy, else loss."""
    if requested:
        for n in sorted(all_names):
            if requested in (n, n.rsplit("/", 1)[-1]):
                return n
        if requested in ("train_loss", TRAIN_LOSS):
            return TRAIN_LOSS
    for preferred in ("LanguageCrossEntropy", "LanguagePerplexity", "CrossEntropy", "Accuracy"):
        for n in sorted(all_names):
            if preferred in n.rsplit("/", 1)[-1]:
                return n
    return sorted(all_names)[0] if all_names else TRAIN_LOSS


@dataclasses.dataclass
class Row:
    """One line of the summary."""

    trial: Trial
    status: str
    final_loss: float | None
    metric: float | None  # best value of the ranking metric over the run
    tokens_per_s: float | None
    wall_s: float | None
    error: str
    curve: list[tuple[int, float]]
    best: bool = False


def collect(sweep: Sweep, metric: str | None = None) -> tuple[list[Row], str]:
    """Read every trial's status and metrics; returns the rows and the name of the ranking metric."""
    per_trial = [(t, read_status(t), read_metrics(t.folder / METRICS_FILE)) for t in sweep.trials]
    names = {n for _, _, recs in per_trial for n in eval_metric_names(recs)}
    chosen = choose_metric(names, metric)
    maximize = higher_is_better(chosen)
    rows = []
    for t, st, recs in per_trial:
        status = st.get("status", "pending")
        loss = final_train_loss(recs)
        if status == "done" and loss is not None and not math.isfinite(loss):
            status = "failed"
        values = [r[chosen] for r in recs if chosen in r and r[chosen] is not None]
        values = [v for v in values if math.isfinite(v)]
        if chosen == TRAIN_LOSS:
            best_value = loss if loss is not None and math.isfinite(loss) else None
        else:
            best_value = (max(values) if maximize else min(values)) if values else None
        ends = [r for r in recs if r.get("event") == "fit_end"]
        tokens = sum(r.get("tokens", 0) for r in ends)
        seconds = sum(r.get("seconds", 0.0) for r in ends)
        tps = tokens / seconds if tokens and seconds > 0 else None
        error = st.get("error", "") or ("" if status != "failed" else f"final training loss is {loss}")
        rows.append(Row(t, status, loss, best_value, tps, st.get("wall_s"), error, loss_curve(recs)))
    ranked = [r for r in rows if r.status == "done" and r.metric is not None]
    if ranked:
        best = (max if maximize else min)(ranked, key=lambda r: r.metric)
        best.best = True
    return rows, chosen


def _metric_label(metric: str) -> str:
    if metric == TRAIN_LOSS:
        return "final train loss"
    return f"best {metric.removeprefix('metrics/').replace('/', ' ')}"


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


def _table(sweep: Sweep, rows: list[Row], metric: str) -> tuple[list[str], list[list[str]]]:
    header = ["best", "trial", *(a.key for a in sweep.axes), "status", "final train loss"]
    if metric != TRAIN_LOSS:
        header.append(_metric_label(metric))
    header += ["tokens/s", "wall time"]
    body = []
    for r in rows:
        cells = ["*" if r.best else "", r.trial.id, *(r.trial.params.get(a.key, "") for a in sweep.axes)]
        cells += [r.status, _fmt(r.final_loss, ".4f")]
        if metric != TRAIN_LOSS:
            cells.append(_fmt(r.metric, ".4g"))
        cells += [_fmt(r.tokens_per_s, ",.0f"), _fmt_seconds(r.wall_s)]
        body.append(cells)
    return header, body


def format_table(sweep: Sweep, rows: list[Row], metric: str) -> str:
    """The summary as an aligned plain-text table."""
    header, body = _table(sweep, rows, metric)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in body]
    return "\n".join(lines)


def write_summary(sweep: Sweep, rows: list[Row], metric: str) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``summary.md`` into the sweep folder."""
    csv_path = sweep.out / "summary.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        label = "final_train_loss" if metric == TRAIN_LOSS else metric
        w.writerow(
            ["trial", "run_name", *(a.key for a in sweep.axes), "overrides", "status", "final_train_loss"]
            + ([f"best_{label}"] if metric != TRAIN_LOSS else [])
            + ["tokens_per_s", "wall_s", "best", "error"]
        )
        for r in rows:
            swept = " ".join(f"{k}={v}" for k, v in r.trial.params.items())
            w.writerow(
                [r.trial.id, r.trial.run_name, *(r.trial.params.get(a.key, "") for a in sweep.axes), swept]
                + [r.status, "" if r.final_loss is None else r.final_loss]
                + ([] if metric == TRAIN_LOSS else ["" if r.metric is None else r.metric])
                + [
                    "" if r.tokens_per_s is None else round(r.tokens_per_s, 1),
                    "" if r.wall_s is None else round(r.wall_s, 2),
                    "yes" if r.best else "",
                    r.error,
                ]
            )
    header, body = _table(sweep, rows, metric)
    direction = "higher is better" if higher_is_better(metric) else "lower is better"
    md = [
        f"# Sweep `{sweep.name}`",
        "",
        f"Recipe `{sweep.recipe}`, {len(sweep.trials)} trials ({sweep.mode}"
        + (f", seed {sweep.seed}" if sweep.mode == "random" else "")
        + f"). Ranked by {_metric_label(metric)} ({direction}); the best trial is marked ★.",
        "",
        "Swept: "
        + ", ".join(f"`{a.describe()}`" for a in sweep.axes)
        + (". Fixed: " + ", ".join(f"`{f}`" for f in sweep.fixed) if sweep.fixed else "")
        + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for cells in body:
        cells = ["★" if c == "*" and i == 0 else c for i, c in enumerate(cells)]
        md.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    failed = [r for r in rows if r.status == "failed"]
    if failed:
        md += ["", "## Failed trials", ""]
        md += [f"- {r.trial.id}: {r.error} (log: `{r.trial.folder / LOG_FILE}`)" for r in failed]
    md_path = sweep.out / "summary.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return csv_path, md_path


def _as_number(text: str) -> float | None:
    try:
        x = float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _plot_metric_vs_key(
    ax: Any, sweep: Sweep, rows: list[Row], axis: Axis, colors: dict, short: dict[str, str]
) -> None:
    """Scatter the ranking metric of finished trials against one swept key's value."""
    pts = [(r, r.trial.params.get(axis.key, "")) for r in rows if r.metric is not None and r.status == "done"]
    if not pts:
        ax.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=ax.transAxes)
        return
    values_in_order = list(dict.fromkeys(r.trial.params.get(axis.key, "") for r in rows))
    numeric = all(_as_number(v) is not None for _, v in pts)
    if numeric:
        xs = [float(_as_number(v)) for _, v in pts]  # type: ignore[arg-type]
        if min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        distinct = sorted({(x, v) for x, (_, v) in zip(xs, pts)})
        if axis.kind in ("grid", "choice", "int") and len(distinct) <= 8:
            # Discrete values: tick exactly those, written as on the command line.
            ax.set_xticks([x for x, _ in distinct], [v for _, v in distinct])
            ax.minorticks_off()
    else:
        cats = [v for v in values_in_order if any(v == pv for _, pv in pts)]
        xs = [float(cats.index(v)) for _, v in pts]
        ax.set_xticks(range(len(cats)), cats, rotation=20 if max(len(c) for c in cats) > 6 else 0)
        ax.set_xlim(-0.5, len(cats) - 0.5)
    # Trials that differ only in this key are joined by a line: with a grid, one line per setting of the others.
    others = [a.key for a in sweep.axes if a.key != axis.key]
    groups: dict[tuple, list[tuple[float, float]]] = {}
    for (r, _), x in zip(pts, xs):
        groups.setdefault(tuple(r.trial.params.get(k) for k in others), []).append((x, r.metric))
    lines = {g: sorted(p) for g, p in groups.items() if len(p) > 1} if sweep.mode == "grid" else {}
    if lines and len(lines) <= 8:
        for g, p in lines.items():
            label = " ".join(f"{short[k]}={v}" for k, v in zip(others, g))
            ax.plot([a for a, _ in p], [b for _, b in p], color="0.55", linewidth=1, zorder=1)
            ax.annotate(label, p[-1], textcoords="offset points", xytext=(6, -10), fontsize=7, color="0.35")
    ax.margins(x=0.15)
    for (r, _), x in zip(pts, xs):
        ax.scatter(
            [x],
            [r.metric],
            s=160 if r.best else 50,
            color=colors[r.trial.id],
            marker="*" if r.best else "o",
            edgecolors="black",
            linewidths=0.6,
            zorder=3,
        )
        ax.annotate(r.trial.id, (x, r.metric), textcoords="offset points", xytext=(5, 4), fontsize=7)


def plot_summary(sweep: Sweep, rows: list[Row], metric: str) -> Path:
    """``summary.png``: every trial's loss curve, and the ranking metric against each swept key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_panels = 1 + len(sweep.axes)
    cols = min(3, n_panels)
    nrows = math.ceil(n_panels / cols)
    fig, axs = plt.subplots(nrows, cols, figsize=(6.0 * cols, 4.4 * nrows), squeeze=False)
    flat = list(axs.flat)
    cmap = plt.get_cmap("tab10" if len(rows) <= 10 else "viridis")
    colors = {
        r.trial.id: cmap(i if len(rows) <= 10 else i / max(1, len(rows) - 1)) for i, r in enumerate(rows)
    }
    short = {a.key: a.key.rsplit(".", 1)[-1] for a in sweep.axes}

    ax = flat[0]
    for r in rows:
        pts = [(s, v) for s, v in r.curve if math.isfinite(v)]
        if not pts:
            continue
        label = f"{r.trial.id} " + " ".join(f"{short[k]}={v}" for k, v in r.trial.params.items())
        if r.status == "failed":
            label += " (failed)"
        if r.best:
            label += " ★ best"
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o" if len(pts) < 30 else None,
            markersize=3,
            linewidth=2.6 if r.best else 1.4,
            linestyle="--" if r.status == "failed" else "-",
            color=colors[r.trial.id],
            label=label,
        )
    ax.set_title("Training loss", fontsize=10)
    ax.set_xlabel("batch")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.lines and len(rows) <= 16:
        ax.legend(fontsize=8, loc="best")
    elif not ax.lines:
        ax.text(0.5, 0.5, "no training loss logged", ha="center", va="center", transform=ax.transAxes)

    ylabel = _metric_label(metric)
    direction = "higher is better" if higher_is_better(metric) else "lower is better"
    n_failed = sum(1 for r in rows if r.status == "failed")
    for i, axis in enumerate(sweep.axes, start=1):
        _plot_metric_vs_key(flat[i], sweep, rows, axis, colors, short)
        ax = flat[i]
        ax.set_title(
            f"{ylabel} vs {axis.key}" + (f"\n({n_failed} failed trial(s) not shown)" if n_failed else ""),
            fontsize=10,
        )
        ax.set_xlabel(axis.key)
        ax.set_ylabel(f"{ylabel}\n({direction})")
        ax.grid(alpha=0.3)
    for ax in flat[n_panels:]:
        ax.axis("off")
    fig.suptitle(f"Sweep {sweep.name}: {len(rows)} trials of {Path(sweep.recipe).name}", fontsize=12)
    fig.tight_layout()
    path = sweep.out / "summary.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize(sweep: Sweep, metric: str | None = None, echo: Any = print) -> list[Row]:
    """Collect results, print the table and write summary.csv, summary.md and summary.png."""
    rows, chosen = collect(sweep, metric)
    if metric and chosen != metric and chosen.rsplit("/", 1)[-1] != metric and metric != "train_loss":
        echo(f"warning: no trial logged a metric called {metric!r}; ranking by {_metric_label(chosen)}")
    echo("")
    echo(format_table(sweep, rows, chosen))
    best = next((r for r in rows if r.best), None)
    if best:
        swept = " ".join(f"{k}={v}" for k, v in best.trial.params.items())
        echo(f"best: {best.trial.id} ({swept}) {_metric_label(chosen)} {best.metric:.4g}")
    csv_path, md_path = write_summary(sweep, rows, chosen)
    png_path = plot_summary(sweep, rows, chosen)
    echo(f"summary: {md_path}  {csv_path}  {png_path}")
    return rows


class _Lock:
    """An exclusive lock on the sweep folder so that two processes do not run the same trials."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self._f: Any = None

    def __enter__(self) -> _Lock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a+")  # noqa: SIM115 (closed in __exit__)
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            raise RecipeError(
                f"sweep folder {self.path.parent} is in use by another sweep process; wait for it or stop it",
                key="--out",
            ) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._f is not None:
            self._f.close()


def _remote_data_warning(sweep: Sweep) -> str | None:
    import yaml

    cfg = yaml.safe_load(sweep.trials[0].resolved_yaml) or {}
    for section in ("train_loader", "eval_loader"):
        block = cfg.get(section) or {}
        if isinstance(block, dict) and isinstance(block.get("remote"), str) and "://" in block["remote"]:
            return (
                f"warning: {section}.remote is set: parallel trials on one machine share its local cache "
                f"({block.get('local')}) and streaming may refuse it; use --parallel 1 or one node per trial"
            )
    return None


def run_sweep(
    sweep: Sweep,
    parallel: int = 1,
    dry_run: bool = False,
    summary_only: bool = False,
    metric: str | None = None,
    echo: Any = print,
) -> int:
    """Write the plan, then print (dry run), summarise, or run the trials and summarise. Returns the exit code."""
    if parallel < 1:
        raise RecipeError(f"--parallel must be at least 1, got {parallel}")
    if dry_run:
        write_plan(sweep)
        script = write_slurm_script(sweep, parallel if parallel > 1 else 0)
        for t in sweep.trials:
            echo(sweep.command(t))
        print(f"# {len(sweep.trials)} trials; Slurm array script: {script}", file=sys.stderr)
        return 0
    with _Lock(sweep.out):
        write_plan(sweep)
        echo(f"sweep {sweep.name}: {len(sweep.trials)} trials ({sweep.mode}) in {sweep.out}")
        for note in sweep.notes:
            echo(f"note: {note}")
        if not summary_only:
            if parallel > 1:
                warning = _remote_data_warning(sweep)
                if warning:
                    echo(warning)
            run_trials(sweep, parallel, echo)
        rows = summarize(sweep, metric, echo)
    failed = [r for r in rows if r.status == "failed"]
    if failed:
        echo(f"{len(failed)} of {len(rows)} trials failed: " + ", ".join(r.trial.id for r in failed))
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


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
            "int(a,b) | choice(a,b,c) (with --samples), or key=value (fixed for every trial).",
        ),
        name: Optional[str] = typer.Option(
            None, "--name", help="Sweep name: trial runs are <name>-tNNN. Default: recipe name + a hash."
        ),
        out: Optional[str] = typer.Option(None, "--out", help="Sweep folder. Default: sweeps/<name>."),
        samples: Optional[int] = typer.Option(None, "--samples", help="Random search with N trials."),
        seed: int = typer.Option(0, "--seed", help="Seed of the random search."),
        parallel: int = typer.Option(1, "--parallel", help="Trials to run at once on this machine."),
        nproc: int = typer.Option(1, "--nproc", help="Processes (GPUs) per trial."),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="Print each trial's command and write a Slurm array script; run nothing."
        ),
        summary_only: bool = typer.Option(
            False, "--summary-only", help="Only (re)build the summary from the trials' folders."
        ),
        metric: Optional[str] = typer.Option(
            None,
            "--metric",
            help="Metric that ranks trials (e.g. MaskedAccuracy). Default: eval cross-entropy.",
        ),
    ) -> None:
        """Run a grid or random search over recipe keys; trials are `llmfoundry-lite train` runs."""
        plan = plan_sweep(
            recipe, list(params or []), name=name, out=out, samples=samples, seed=seed, nproc=nproc
        )
        code = run_sweep(
            plan,
            parallel=parallel,
            dry_run=dry_run,
            summary_only=summary_only,
            metric=metric,
            echo=typer.echo,
        )
        if code:
            raise typer.Exit(code)
