"""Recipe -> composer.Trainer -> fit, saying what happens: run name, folder, fresh or resumed, progress, the end.

Every run writes its console lines to ``train.log`` and one JSON object per logged step to ``metrics.jsonl`` in
its run folder (next to the file of a configured ``jsonl_metrics`` logger instead, as sweep trials have).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional, TextIO

import torch
from composer import Trainer
from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger, LoggerDestination
from composer.utils import collect_env, dist, get_device, reproducibility
from omegaconf import DictConfig, OmegaConf

from llmfoundry_lite import builders
from llmfoundry_lite.bench import cpu_model
from llmfoundry_lite.callbacks.cost import apply_recipe_cost
from llmfoundry_lite.callbacks.preemption import (
    EmptyEpochGuard,
    NonFiniteLossGuard,
    Preemption,
    RunStopped,
)
from llmfoundry_lite.callbacks.stop_signals import GUARD, StopNow, stop_signals
from llmfoundry_lite.config import to_yaml
from llmfoundry_lite.data.loaders import SplitTooSmall
from llmfoundry_lite.errors import RecipeError, suggest

RECIPE_FILENAME = "recipe.yaml"
LOG_FILENAME = "train.log"
METRICS_FILENAME = "metrics.jsonl"
TRAIN_LOSS = "loss/train/total"


# ---------------------------------------------------------------------------------------------------------
# What a run writes: console lines (also to train.log) and metrics (metrics.jsonl)
# ---------------------------------------------------------------------------------------------------------


class RunConsole:
    """Prints a run's lines to the console and appends them to its ``train.log`` (rank 0 only).

    ``quiet`` (a recipe's ``log_to_console: false``) writes train.log only.
    """

    def __init__(self, stream: Optional[TextIO] = None, quiet: bool = False) -> None:
        self._stream = stream
        self.quiet = quiet
        self._file: Optional[TextIO] = None
        self.path: Optional[Path] = None

    def open(self, path: Path) -> None:
        """Start appending to ``path`` (not when stdout already goes there, as a sweep trial's does)."""
        if self._file is not None or dist.get_global_rank() != 0:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        if _same_file(sys.stdout, path):
            return
        self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed in close())
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._file.write(f"===== {stamp} {' '.join(sys.argv)}\n")

    def say(self, line: str) -> None:
        """Print ``line`` (rank 0) and append it to train.log."""
        if dist.get_global_rank() != 0:
            return
        if not self.quiet:
            print(line, file=self._stream or sys.stdout, flush=True)
        if self._file is not None and not self._file.closed:
            self._file.write(line + "\n")

    def close(self) -> None:
        """Close train.log (the console keeps working)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _same_file(stream: Any, path: Path) -> bool:
    try:
        return path.exists() and os.path.samestat(os.fstat(stream.fileno()), os.stat(path))
    except (AttributeError, OSError, ValueError):  # no real file descriptor (pytest capture, notebooks)
        return False


class _CloseConsole(Callback):
    def __init__(self, console: RunConsole) -> None:
        self.console = console

    def close(self, state: State, logger: Logger) -> None:  # noqa: D102
        self.console.close()


class JSONLMetricsLogger(LoggerDestination):
    """Appends one ``{"step": batch, metric: value, ...}`` line per logged step, and one ``fit_end`` line per fit.

    Rank 0 only. Every run has one (``metrics.jsonl`` in the run folder); sweeps read their trials' results from
    it. ``stop_on_nan`` stops the run at the first non-finite training loss.
    """

    def __init__(self, filename: str, stop_on_nan: bool = False):
        self.filename = str(filename)
        self.stop_on_nan = stop_on_nan
        self._file: Optional[TextIO] = None
        self._bad_loss: Optional[float] = None
        self._start: tuple[int, int, float] = (0, 0, 0.0)
        self._step: Optional[int] = None
        self._pending: dict[str, float] = {}

    def _write(self, record: dict) -> None:
        if dist.get_global_rank() != 0:
            return
        if self._file is None:
            Path(self.filename).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.filename, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._file.write(json.dumps(record) + "\n")  # NaN/Infinity are written as such; json.loads reads them
        self._file.flush()

    def _flush(self) -> None:
        if self._pending:
            self._write({"step": self._step, **self._pending})
            self._pending = {}

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        """Collect the step's metrics; a new step writes the previous one's line."""
        values = {}
        for k, v in metrics.items():
            if hasattr(v, "numel") and v.numel() == 1:
                v = v.item()
            # Composer's time/* counters are repeated every batch and say nothing the steps don't.
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("time/"):
                values[k] = float(v)
        if not values:
            return
        loss = values.get(TRAIN_LOSS)
        if loss is not None and not math.isfinite(loss):
            self._bad_loss = loss
        if step != self._step:
            self._flush()
            self._step = step
        self._pending.update(values)

    def fit_start(self, state: State, logger: Logger) -> None:  # noqa: D102
        ts = state.timestamp
        self._start = (int(ts.batch), int(ts.token), ts.total_wct.total_seconds())

    def batch_end(self, state: State, logger: Logger) -> None:  # noqa: D102
        if self.stop_on_nan and self._bad_loss is not None:
            raise RuntimeError(
                f"training loss is {self._bad_loss} at batch {int(state.timestamp.batch)} "
                "(the run diverged; stop_on_nan stopped it)"
            )

    def fit_end(self, state: State, logger: Logger) -> None:
        """Write the step in progress and a ``fit_end`` line: batches, tokens and training seconds of this fit."""
        self._flush()
        # Composer's total_wct excludes evaluation, so tokens / seconds is training throughput.
        ts = state.timestamp
        b0, t0, s0 = self._start
        self._write(
            {
                "event": "fit_end",
                "batch": int(ts.batch),
                "batches": int(ts.batch) - b0,
                "tokens": int(ts.token) - t0,
                "seconds": ts.total_wct.total_seconds() - s0,
            }
        )

    def close(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._flush()
        if self._file is not None:
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------------------------------------------
# Progress line
# ---------------------------------------------------------------------------------------------------------

_UNIT_WORDS = {TimeUnit.SAMPLE: "sample", TimeUnit.TOKEN: "token", TimeUnit.EPOCH: "epoch"}


class ProgressLine(LoggerDestination):
    """One console line per interval: batch and total, loss, tokens/s, learning rate, elapsed and ETA.

    The interval and ``max_duration`` may be in any unit (ba, sp, tok, ep; the interval also in dur): a line is
    printed whenever the run crosses a multiple of the interval, at the first batch and at the last.
    """

    def __init__(
        self, interval: str | int = "10ba", stream: Any = None, console: Optional[RunConsole] = None
    ):
        self.interval = Time.from_input(interval, TimeUnit.BATCH)
        if self.interval.value <= 0:
            raise RecipeError(f"must be positive, got {interval!r}", key="console_log_interval")
        self.console = console or RunConsole(stream)
        self._metrics: dict[str, float] = {}
        self._t0: Optional[float] = None
        self._tok0 = 0
        self._ba0 = 0
        self._frac0 = 0.0
        self._bucket = 0

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        """Remember the latest value of each metric."""
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float)):
                self._metrics[k] = float(v)

    def fit_start(self, state: State, logger: Logger) -> None:
        """Start the clock (resumed runs measure from here)."""
        self._t0 = time.perf_counter()
        self._tok0 = int(state.timestamp.token)
        self._ba0 = int(state.timestamp.batch)
        self._frac0 = fraction_done(state) or 0.0
        self._bucket = self._bucket_of(state)

    def _bucket_of(self, state: State) -> int:
        """How many whole intervals the run has done (in the interval's unit)."""
        step = float(self.interval.value)
        if self.interval.unit == TimeUnit.DURATION:
            value = fraction_done(state) or 0.0
        else:
            value = float(state.timestamp.get(self.interval.unit).value)
        return int(value // step + 1e-9)

    def batch_end(self, state: State, logger: Logger) -> None:
        """Print a line when the run crosses a multiple of the interval (and at the first and last batch)."""
        frac = fraction_done(state)
        last = frac is not None and frac >= 1.0
        bucket = self._bucket_of(state)
        crossed = bucket > self._bucket
        self._bucket = max(bucket, self._bucket)
        if crossed or int(state.timestamp.batch) == 1 or last:
            self._print(state)

    def eval_end(self, state: State, logger: Logger) -> None:
        """Print the evaluation metrics on one line."""
        evals = {k: v for k, v in self._metrics.items() if k.startswith("metrics/eval")}
        if evals:
            text = "  ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in sorted(evals.items()))
            self.console.say(f"[eval  batch {int(state.timestamp.batch)}] {text}")

    def _print(self, state: State) -> None:
        ts = state.timestamp
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        tokens = int(ts.token) - self._tok0
        batches = int(ts.batch) - self._ba0
        parts = [f"[{position(state)}]"]
        loss = self._metrics.get(TRAIN_LOSS)
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if elapsed > 0 and tokens:
            parts.append(f"{tokens / elapsed:,.0f} tok/s")
        elif elapsed > 0 and batches:
            parts.append(f"{batches / elapsed:.2f} ba/s")
        lr = next((v for k, v in self._metrics.items() if k.startswith("lr-")), None)
        if lr is not None:
            parts.append(f"lr {lr:.3g}")
        mfu = self._metrics.get("cost/mfu")
        if mfu is not None:
            parts.append(f"MFU {100 * mfu:.1f}%")
        usd = self._metrics.get("cost/usd")
        if usd is not None:
            projected = self._metrics.get("cost/usd_projected")
            parts.append(f"${usd:,.2f}" + (f" of ~${projected:,.2f}" if projected else ""))
        parts.append(f"elapsed {_fmt_seconds(elapsed)}")
        frac = fraction_done(state)
        if frac is not None and 0 < frac < 1 and batches and elapsed > 0 and frac > self._frac0:
            parts.append(f"ETA {_fmt_seconds(elapsed * (1 - frac) / (frac - self._frac0))}")
        self.console.say(" | ".join(parts))


def position(state: State) -> str:
    """``batch 3/6``; ``batch 3, sample 12/800`` (or token, epoch) when max_duration is in another unit."""
    ts, md = state.timestamp, state.max_duration
    batch = int(ts.batch)
    if md is None:
        return f"batch {batch}"
    if md.unit == TimeUnit.BATCH:
        return f"batch {batch}/{md.value}"
    if md.unit == TimeUnit.EPOCH:
        return f"batch {batch}, epoch {min(int(ts.epoch) + 1, md.value)}/{md.value}"
    word = _UNIT_WORDS.get(md.unit, md.unit.value)
    return f"batch {batch}, {word} {int(ts.get(md.unit)):,}/{md.value:,}"


def fraction_done(state: State) -> Optional[float]:
    """Fraction of max_duration done, in any unit; within an epoch too when the epoch length is known."""
    md = state.max_duration
    if md is None:
        return None
    ts = state.timestamp
    try:
        if md.unit == TimeUnit.EPOCH:
            epochs = float(int(ts.epoch))
            n = state.dataloader_len
            if n is not None and int(n) > 0:
                epochs += min(1.0, int(ts.batch_in_epoch) / int(n))
            return min(1.0, epochs / max(1, md.value))
        return float(state.get_elapsed_duration())
    except Exception:  # a duration Composer cannot measure (e.g. no dataloader yet)
        return None


def _fmt_seconds(s: float) -> str:
    return str(datetime.timedelta(seconds=int(s)))


def default_run_name(recipe_path: str | None, cfg: DictConfig | None = None) -> str:
    """``<recipe stem>-<hash of the resolved recipe>``; RUN_NAME from the environment wins (as launchers set it).

    The name is a function of the recipe, so rerunning the same command finds the same save folder and
    autoresumes, and every rank of a distributed run computes the same name without talking to the others.
    """
    if os.environ.get("RUN_NAME"):
        return os.environ["RUN_NAME"]
    stem = Path(recipe_path).stem if recipe_path else "run"
    if cfg is None:
        return f"{stem}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    digest = hashlib.sha1(to_yaml(cfg).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def is_remote(path: str | None) -> bool:
    """True for object-store URIs (s3://, gs://, oci://, ...) that Composer uploads to."""
    return bool(path) and "://" in str(path)


def run_folder(cfg: DictConfig) -> Path | None:
    """Local folder that holds the run's recipe (the save folder when local), or None for remote saves."""
    save_folder = cfg.get("save_folder")
    if is_remote(save_folder):
        return None
    folder = save_folder or os.path.join("runs", "{run_name}")
    return Path(folder.replace("{run_name}", cfg.run_name))


# ---------------------------------------------------------------------------------------------------------
# FSDP
# ---------------------------------------------------------------------------------------------------------


def fsdp_keys() -> list[str]:
    """Keys an ``fsdp:`` block may set: the public fields of Composer's ``FSDPConfig``."""
    from composer.utils import FSDPConfig

    return [f.name for f in dataclasses.fields(FSDPConfig) if not f.name.startswith("_")]


def validate_fsdp(block: Any) -> dict:
    """The ``fsdp:`` block as a plain dict, checked against Composer's FSDPConfig (RecipeError otherwise)."""
    if block is None:
        return {}
    if isinstance(block, DictConfig):
        block = OmegaConf.to_container(block, resolve=True)
    if not isinstance(block, dict):
        raise RecipeError(f"expected a mapping of FSDP settings, got {block!r}", key="fsdp")
    keys = fsdp_keys()
    for k in block:
        if k not in keys:
            raise RecipeError(f"unknown FSDP setting {k!r}{suggest(str(k), keys)}", key=f"fsdp.{k}")
    from composer.utils import FSDPConfig

    try:
        FSDPConfig(**block)  # Composer's own checks (sharding strategy names, state dict type, ...)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"invalid FSDP settings: {e}", key="fsdp") from None
    return block


def parallelism_config(cfg: DictConfig, world: int, device_name: str) -> dict | None:
    """Composer's ``parallelism_config`` from the recipe's ``fsdp:`` block on GPUs (one or more); None on CPU."""
    block = validate_fsdp(cfg.get("fsdp"))
    if not block:
        return None
    if device_name == "gpu":  # FSDP on one GPU is valid (Composer starts a one-process group for it)
        return {"fsdp": block}
    if dist.get_global_rank() == 0:
        print("warning: the fsdp block is ignored on CPU (FSDP shards across GPUs); training without it")
    return None


# ---------------------------------------------------------------------------------------------------------
# Save folder checks and checkpoint repair (before the Trainer touches anything)
# ---------------------------------------------------------------------------------------------------------


def estimate_checkpoint_bytes(model: torch.nn.Module, world: int = 1, sharded: bool = False) -> int:
    """Bytes one checkpoint takes on one process's disk: fp32 weights plus two Adam moments."""
    n = sum(p.numel() for p in model.parameters())
    total = n * 4 * 3
    return total // max(1, world) if sharded else total


def check_save_folder(folder: str | os.PathLike, need_bytes: int = 0) -> None:
    """RecipeError naming ``save_folder`` when the folder cannot be created/written or lacks room for a checkpoint."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RecipeError(
            f"cannot write checkpoints to {str(path)!r} ({e.strerror or e}); choose a writable folder",
            key="save_folder",
        ) from None
    free = shutil.disk_usage(path).free
    if need_bytes and free < need_bytes:
        raise RecipeError(
            f"only {free / 2**20:,.0f} MiB free under {str(path)!r}, a checkpoint needs about "
            f"{need_bytes / 2**20:,.0f} MiB; free space or choose another folder",
            key="save_folder",
        )


_CKPT_RE = re.compile(r"ep(\d+)-ba(\d+)-rank0\.pt$")


def _readable_checkpoint(path: Path) -> bool:
    # torch.save writes a zip whose directory is at the end: a file cut short by a kill has none.
    try:
        if path.is_dir():  # sharded checkpoints are folders; trust them
            return True
        with zipfile.ZipFile(path) as z:
            return len(z.namelist()) > 0
    except (OSError, zipfile.BadZipFile):
        return False


def repair_latest_checkpoint(folder: str | os.PathLike, latest: str = "latest-rank0.pt") -> Path | None:
    """Point ``latest`` at the newest complete checkpoint in ``folder`` (a kill can leave a partial file).

    Returns the checkpoint autoresume will load, or None when there is none.
    """
    folder = Path(folder)
    link = folder / latest
    if link.exists() and _readable_checkpoint(link.resolve()):
        return link.resolve()
    if not link.is_symlink() and not link.exists():
        return None
    found = []
    for p in folder.glob("ep*-ba*-rank0.pt"):
        m = _CKPT_RE.search(p.name)
        if m and _readable_checkpoint(p):
            found.append((int(m.group(2)), p))
    target = os.readlink(link) if link.is_symlink() else str(link)
    print(f"warning: {link} -> {target} is missing or incomplete", file=sys.stderr)
    link.unlink()
    if not found:
        return None
    best = max(found, key=lambda t: t[0])[1]
    os.symlink(best.name, link)
    print(f"warning: resuming from {best.name} instead", file=sys.stderr)
    return best


class ResumeRNG(Callback):
    """Restore the checkpoint's RNG state right before the first batch of a mid-epoch resume.

    Composer restores RNG on resume only at an epoch boundary or while spinning a dataloader; with a streaming
    dataset (which resumes itself) a mid-epoch resume would draw random numbers (MLM masks, dropout) from a
    fresh stream. Restoring here, after the dataloader iterator exists, makes a resumed run bit-identical.
    """

    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    def before_dataloader(self, state: State, logger: Logger) -> None:  # noqa: D102
        trainer = self.trainer
        if trainer is None or getattr(trainer, "_rng_state", None) is None:
            return
        reproducibility.load_rng_state(trainer._rng_state)  # noqa: SLF001
        trainer._rng_state = None  # noqa: SLF001


class CPUAutocast(Callback):
    """bf16 autocast around forward and loss on CPU (Composer accepts only fp32 precision on CPU)."""

    def __init__(self) -> None:
        self._ctx: Any = None

    def _enter(self) -> None:
        self._ctx = torch.autocast("cpu", dtype=torch.bfloat16)
        self._ctx.__enter__()

    def _exit(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def before_forward(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._enter()

    def after_loss(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._exit()

    def eval_before_forward(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._enter()

    def eval_after_forward(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._exit()


def _precision(cfg: DictConfig, device_name: str) -> str:
    if cfg.get("precision"):
        if device_name == "cpu" and cfg.precision not in ("fp32", "amp_bf16"):
            raise RecipeError(f"{cfg.precision} needs a GPU; use fp32 or amp_bf16 on CPU", key="precision")
        return cfg.precision
    return "amp_bf16" if device_name == "gpu" else "fp32"


def _device_name(cfg: DictConfig) -> str:
    requested = cfg.get("device") or "auto"
    if requested == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if requested == "gpu" and not torch.cuda.is_available():
        raise RecipeError("device 'gpu' requested but CUDA is not available; use device: auto", key="device")
    return requested


# Trainer.__init__ logs the CPU model through py-cpuinfo, which takes about a second to start (a subprocess):
# a sixth of a small run's start-up. Reading /proc/cpuinfo gives the same string.
collect_env.get_cpu_model = cpu_model

# Composer warnings that fire on every small eval set or last partial batch and tell the user nothing actionable.
_QUIET_WARNINGS = (r"DataloaderNumBatchesWarning", r"Cannot split tensor of length")


def build_loader(cfg: DictConfig, section: str, tokenizer: Any, device_batch_size: int, world: int) -> Any:
    """The ``train_loader``/``eval_loader`` of a recipe, refused when it could never yield a batch."""
    try:
        loader = builders.build_dataloader(cfg, section, tokenizer, device_batch_size)
    except SplitTooSmall as e:  # the text loader checks before it starts any worker
        message = too_few_samples(cfg, section, e.per_rank, e.batch, e.total, world)
        raise RecipeError(message, key=section) from None
    check_loader_batches(cfg, section, loader, world)
    return loader


def check_loader_batches(cfg: DictConfig, section: str, loader: Any, world: int) -> None:
    """RecipeError naming ``section`` when one rank's share of its split is less than one batch under drop_last.

    Such a loader yields no batch at all: Composer would loop over empty epochs forever (train) or evaluate
    nothing. For any registered loader; datasets that cannot tell their size (iterable ones without
    ``__len__``) are left to ``EmptyEpochGuard``.
    """
    dl = getattr(loader, "dataloader", loader)  # a DataSpec or a DataLoader
    dataset, batch = getattr(dl, "dataset", None), getattr(dl, "batch_size", None)
    if dataset is None or not batch:
        return
    try:
        per_rank = len(dl.sampler)  # a map-style dataset: the sampler decides what a rank sees
    except (AttributeError, TypeError):
        try:
            per_rank = len(dataset)  # streaming: already this rank's share
        except TypeError:
            return
    drop_last = bool(getattr(dl, "drop_last", False))
    if per_rank >= (batch if drop_last else 1):
        return
    total = getattr(dataset, "epoch_size", None) or per_rank * world
    raise RecipeError(too_few_samples(cfg, section, per_rank, batch, int(total), world), key=section)


def too_few_samples(cfg: DictConfig, section: str, per_rank: int, batch: int, total: int, world: int) -> str:
    """The message for a split with fewer samples per rank than one batch: the numbers and the fix."""
    block = cfg.get(section) or {}
    where = f"split {block.get('split')!r} of " if block.get("split") else ""
    where += repr(str(block.get("remote") or block.get("local") or "the dataset"))
    if per_rank == 0:
        return f"{where} has no samples; check it with `llmfoundry-lite data inspect`"
    ranks = f", {per_rank} per rank on {world} ranks" if world > 1 else ""
    if section == "train_loader":
        setting = f"global_train_batch_size {cfg.global_train_batch_size}"
        if world > 1:
            setting += f" = {batch} per rank x {world} ranks"
        fix = f"set global_train_batch_size to at most {per_rank * world}, or use more data"
        what = "no batch could ever be trained"
    else:
        setting = f"device_eval_batch_size {batch}"
        fix = f"set device_eval_batch_size to at most {per_rank}, or {section}.drop_last: false"
        what = "nothing would be evaluated"
    return f"{where} has {total} samples{ranks}, fewer than one batch ({setting}, drop_last: true), so {what}; {fix}"


def with_run_name(cfg: DictConfig, recipe_path: str | None = None) -> DictConfig:
    """A copy of ``cfg`` with its ``run_name`` set (the default is the recipe stem plus a hash of it)."""
    cfg = cfg.copy()
    if not cfg.get("run_name"):
        cfg.run_name = default_run_name(recipe_path, cfg)
    return cfg


def _folder_text(cfg: DictConfig) -> str:
    folder = run_folder(cfg)
    if folder is None:  # remote checkpoints
        return str(cfg.save_folder).replace("{run_name}", cfg.run_name)
    return str(folder)


def build_trainer(
    cfg: DictConfig, recipe_path: str | None = None, console: Optional[RunConsole] = None
) -> Trainer:
    """Build every component of a validated recipe and the Composer Trainer that runs it.

    Prints the run's first line (name, folder, fresh or resumed) and opens its ``train.log``/``metrics.jsonl``.
    """
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{pattern}.*")
    cfg = with_run_name(cfg, recipe_path)
    console = console or RunConsole(quiet=not cfg.log_to_console)
    device_name = _device_name(cfg)
    device = get_device(device_name)
    if not dist.is_initialized() and dist.get_world_size() > 1:
        dist.initialize_dist(device, timeout=cfg.dist_timeout)
    reproducibility.seed_all(cfg.seed)

    # The run's files: next to a configured jsonl_metrics logger's file (sweep trials), else in the run folder.
    loggers = builders.build_multi(cfg, "loggers")
    metrics = next((d for d in loggers if isinstance(d, JSONLMetricsLogger)), None)
    folder = run_folder(cfg)
    if metrics is None:
        logs = folder if folder is not None else Path("runs") / cfg.run_name
        metrics = JSONLMetricsLogger(str(logs / METRICS_FILENAME))
        loggers.append(metrics)

    world = dist.get_world_size()
    device_batch = cfg.global_train_batch_size // world
    micro = cfg.get("device_train_microbatch_size")
    if micro == "auto" and device_name != "gpu":
        micro = None  # auto microbatching searches for the largest size that fits in GPU memory
    parallelism = parallelism_config(cfg, world, device_name)  # checks the fsdp block before building

    tokenizer = builders.build_tokenizer(cfg)
    model = builders.build_model(cfg, tokenizer)
    train_loader = build_loader(cfg, "train_loader", tokenizer, device_batch, world)
    eval_loader = None
    if cfg.get("eval_loader") is not None:
        eval_bs = cfg.get("device_eval_batch_size") or device_batch
        eval_loader = build_loader(cfg, "eval_loader", tokenizer, eval_bs, world)
    optimizer = builders.build_optimizer(cfg, model)
    scheduler = builders.build_scheduler(cfg)
    algorithms = builders.build_multi(cfg, "algorithms")
    callbacks = builders.build_multi(cfg, "callbacks")
    apply_recipe_cost(cfg, callbacks)
    if cfg.log_to_console and dist.get_global_rank() == 0:
        loggers.append(ProgressLine(cfg.console_log_interval, console=console))
    precision = _precision(cfg, device_name)
    if device_name == "cpu" and precision == "amp_bf16":
        callbacks.append(CPUAutocast())
        precision = "fp32"
    # Always on, not recipe options: every run survives preemption, stops on a diverged loss or on a dataloader
    # that yields nothing, and closes its train.log.
    # Preemption first: from its fit_start on, a signal checkpoints instead of stopping as during start-up.
    resume_rng = ResumeRNG()
    callbacks = [Preemption(), *callbacks, NonFiniteLossGuard(), EmptyEpochGuard(), resume_rng]
    callbacks.append(_CloseConsole(console))

    save_folder = cfg.get("save_folder")
    autoresume = cfg.get("autoresume")
    if autoresume is None:  # on by default when a rerun can find its checkpoints
        autoresume = bool(save_folder) and bool(cfg.get("run_name"))

    resume_from = None
    if save_folder and not is_remote(save_folder) and dist.get_local_rank() == 0:
        # Fail before training, not at the first save hours later.
        local_folder = Path(save_folder.replace("{run_name}", cfg.run_name))
        sharded = (
            bool(parallelism) and "SHARDED" in str(parallelism["fsdp"].get("state_dict_type", "")).upper()
        )
        check_save_folder(local_folder, estimate_checkpoint_bytes(model, world, sharded))
        if autoresume and dist.get_global_rank() == 0:  # Composer resumes from what rank 0 finds
            resume_from = repair_latest_checkpoint(local_folder)

    if folder is not None and dist.get_global_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RECIPE_FILENAME).write_text(to_yaml(cfg))
    # Opened once everything is built, so a recipe that fails to build leaves no run folder behind.
    console.open(Path(metrics.filename).parent / LOG_FILENAME)

    trainer = Trainer(
        run_name=cfg.run_name,
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=eval_loader,
        eval_interval=cfg.eval_interval if eval_loader is not None else 1,
        eval_subset_num_batches=cfg.eval_subset_num_batches,
        optimizers=optimizer,
        schedulers=scheduler,
        max_duration=cfg.max_duration,
        algorithms=algorithms,
        callbacks=callbacks,
        loggers=loggers,
        device=device,
        precision=precision,
        device_train_microbatch_size=micro,
        save_folder=save_folder,
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=cfg.save_overwrite,
        save_weights_only=cfg.save_weights_only,
        load_path=cfg.get("load_path"),
        load_weights_only=cfg.load_weights_only,
        load_strict_model_weights=cfg.load_strict_model_weights,
        autoresume=autoresume,
        seed=cfg.seed,
        deterministic_mode=cfg.deterministic,
        parallelism_config=parallelism,
        log_to_console=False,
        progress_bar=cfg.progress_bar,
        python_log_level=cfg.get("python_log_level"),
        dist_timeout=cfg.dist_timeout,
    )
    resume_rng.trainer = trainer
    # The resolved recipe goes to every logger (wandb config, tensorboard hparams, ...).
    trainer.logger.log_hyperparameters(OmegaConf.to_container(cfg, resolve=True))

    batch = int(trainer.state.timestamp.batch)
    load_path = cfg.get("load_path")
    name, where = cfg.run_name, f"in {_folder_text(cfg)}; training to {cfg.max_duration}"
    if batch > 0:
        console.say(
            f"resuming run {name} from batch {batch} ({resume_from or load_path or 'its checkpoint'}) {where}"
        )
    elif load_path:
        what = "weights" if cfg.load_weights_only else "checkpoint"
        console.say(f"starting run {name} from the {what} of {load_path} {where}")
    else:
        console.say(f"starting run {name} fresh {where}")
    return trainer


def _last_loss(state: State, batch0: int) -> Optional[float]:
    if int(state.timestamp.batch) <= batch0:  # nothing trained in this process: no loss to report
        return None
    value = (getattr(state, "total_loss_dict", None) or {}).get(TRAIN_LOSS)
    if value is None and isinstance(state.loss, torch.Tensor):
        value = state.loss.detach().float().sum()
    return None if value is None else float(value)


def end_line(state: State, folder: str, batch0: int = 0, stopped: bool = False) -> str:
    """The run's last line: name, folder, batches done and the last training loss (``batch0``: at the start)."""
    loss = _last_loss(state, batch0)
    md = state.max_duration
    batch = int(state.timestamp.batch)
    of = f"/{md.value}" if md is not None and md.unit == TimeUnit.BATCH else ""
    what = "stopped" if stopped else "finished"
    text = f"{what} run {state.run_name} at batch {batch}{of} in {folder}"
    if loss is not None:
        text += f"; {'last' if stopped else 'final'} loss {loss:.4f}"
    return text


def train(cfg: DictConfig, recipe_path: str | None = None) -> Trainer:
    """Build the Trainer for a validated recipe and fit it, printing its first and last lines.

    Raises ``RunStopped`` on preemption (or NaN/Inf loss) and ``StopNow`` on a signal with nothing to save; both
    carry ``exit_code`` and are marked ``reported`` once their line is printed.
    """
    cfg = with_run_name(cfg, recipe_path)
    console = RunConsole(quiet=not cfg.log_to_console)
    with stop_signals():
        previous_echo, GUARD.echo = GUARD.echo, console.say
        trainer: Optional[Trainer] = None
        batch0 = 0
        try:
            trainer = build_trainer(cfg, recipe_path, console=console)
            state = trainer.state
            batch0 = int(state.timestamp.batch)
            if cfg.get("eval_first") and state.evaluators:
                trainer.eval()
            if state.max_duration is not None and not state.timestamp < state.max_duration:
                # Composer's fit() would raise "No training would occur"; a finished run is a success.
                console.say(
                    f"run {state.run_name} is already complete (batch {int(state.timestamp.batch)}) in "
                    f"{_folder_text(cfg)}; to train further, raise max_duration and keep run_name="
                    f"{state.run_name}; to start over, set another run_name (or autoresume=false "
                    "save_overwrite=true)"
                )
                trainer.close()
                return trainer
            trainer.fit()
            console.say(end_line(state, _folder_text(cfg), batch0))
            return trainer
        except (RunStopped, StopNow) as e:
            if trainer is not None:
                console.say(end_line(trainer.state, _folder_text(cfg), batch0, stopped=True))
            console.say(str(e))
            e.reported = not console.quiet  # else launch.py prints it
            if trainer is not None:
                trainer.close()  # flush loggers and finish uploads of the checkpoint just written
            raise
        finally:
            GUARD.echo = previous_echo
