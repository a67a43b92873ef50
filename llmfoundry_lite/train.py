"""Recipe -> composer.Trainer -> fit."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import re
import shutil
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from composer import Trainer
from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger, LoggerDestination
from composer.utils import collect_env, dist, get_device, reproducibility
from omegaconf import DictConfig, OmegaConf

from llmfoundry_lite import builders
from llmfoundry_lite.bench import cpu_model
from llmfoundry_lite.callbacks.cost import apply_recipe_cost
from llmfoundry_lite.callbacks.preemption import NonFiniteLossGuard, Preemption, RunStopped
from llmfoundry_lite.config import to_yaml
from llmfoundry_lite.errors import RecipeError, suggest

RECIPE_FILENAME = "recipe.yaml"


class ProgressLine(LoggerDestination):
    """One console line per interval: batch, loss, tokens/s, learning rate, elapsed and ETA."""

    def __init__(self, interval: str | int = "10ba", stream: Any = None):
        self.interval = Time.from_input(interval, TimeUnit.BATCH)
        self.stream = stream or sys.stdout
        self._metrics: dict[str, float] = {}
        self._t0: float | None = None
        self._tok0 = 0
        self._ba0 = 0

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
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

    def batch_end(self, state: State, logger: Logger) -> None:
        """Print a line when the interval divides the batch count (and at the last batch)."""
        ts = state.timestamp
        frac = _fraction_done(state)
        last = frac is not None and frac >= 1.0
        unit_value = int(ts.get(self.interval.unit))
        if unit_value % max(1, self.interval.value) == 0 or int(ts.batch) == 1 or last:
            self._print(state)

    def eval_end(self, state: State, logger: Logger) -> None:
        """Print the evaluation metrics on one line."""
        evals = {k: v for k, v in self._metrics.items() if k.startswith("metrics/eval")}
        if evals:
            text = "  ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in sorted(evals.items()))
            print(f"[eval  batch {int(state.timestamp.batch)}] {text}", file=self.stream, flush=True)

    def _print(self, state: State) -> None:
        ts = state.timestamp
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        tokens = int(ts.token) - self._tok0
        batches = int(ts.batch) - self._ba0
        parts = [f"[batch {int(ts.batch)}{self._of_total(state)}]"]
        loss = self._metrics.get("loss/train/total")
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
        frac = _fraction_done(state)
        if frac and 0 < frac < 1 and batches and elapsed > 0:
            parts.append(
                f"ETA {_fmt_seconds(elapsed * (1 - frac) / max(1e-9, frac - self._frac_start(state)))}"
            )
        print(" | ".join(parts), file=self.stream, flush=True)

    def _frac_start(self, state: State) -> float:
        if state.max_duration is None or state.max_duration.unit != TimeUnit.BATCH:
            return 0.0
        return self._ba0 / max(1, state.max_duration.value)

    @staticmethod
    def _of_total(state: State) -> str:
        md = state.max_duration
        if md is not None and md.unit == TimeUnit.BATCH:
            return f"/{md.value}"
        return ""


def _fraction_done(state: State) -> float | None:
    try:
        return float(state.get_elapsed_duration())
    except Exception:
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
    """Composer's ``parallelism_config`` from the recipe's ``fsdp:`` block; None on one process or on CPU."""
    block = validate_fsdp(cfg.get("fsdp"))
    if not block:
        return None
    if world > 1 and device_name == "gpu":
        return {"fsdp": block}
    if dist.get_global_rank() == 0:
        why = "one process" if world == 1 else "CPU processes"
        print(f"warning: the fsdp block is ignored on {why} (FSDP shards across GPUs); training without it")
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


def build_trainer(cfg: DictConfig, recipe_path: str | None = None) -> Trainer:
    """Build every component of a validated recipe and the Composer Trainer that runs it."""
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{pattern}.*")
    cfg = cfg.copy()
    if not cfg.get("run_name"):
        cfg.run_name = default_run_name(recipe_path, cfg)
    device_name = _device_name(cfg)
    device = get_device(device_name)
    if not dist.is_initialized() and dist.get_world_size() > 1:
        dist.initialize_dist(device, timeout=cfg.dist_timeout)
    reproducibility.seed_all(cfg.seed)

    world = dist.get_world_size()
    device_batch = cfg.global_train_batch_size // world
    micro = cfg.get("device_train_microbatch_size")
    if micro == "auto" and device_name != "gpu":
        micro = None  # auto microbatching searches for the largest size that fits in GPU memory
    parallelism = parallelism_config(cfg, world, device_name)  # checks the fsdp block before building

    tokenizer = builders.build_tokenizer(cfg)
    model = builders.build_model(cfg, tokenizer)
    train_loader = builders.build_dataloader(cfg, "train_loader", tokenizer, device_batch)
    eval_loader = None
    if cfg.get("eval_loader") is not None:
        eval_bs = cfg.get("device_eval_batch_size") or device_batch
        eval_loader = builders.build_dataloader(cfg, "eval_loader", tokenizer, eval_bs)
    optimizer = builders.build_optimizer(cfg, model)
    scheduler = builders.build_scheduler(cfg)
    algorithms = builders.build_multi(cfg, "algorithms")
    callbacks = builders.build_multi(cfg, "callbacks")
    apply_recipe_cost(cfg, callbacks)
    loggers = builders.build_multi(cfg, "loggers")
    if cfg.log_to_console and dist.get_global_rank() == 0:
        loggers.append(ProgressLine(cfg.console_log_interval))
    precision = _precision(cfg, device_name)
    if device_name == "cpu" and precision == "amp_bf16":
        callbacks.append(CPUAutocast())
        precision = "fp32"
    # Always on, not a recipe option: every run survives preemption and stops on a diverged loss.
    resume_rng = ResumeRNG()
    callbacks += [NonFiniteLossGuard(), Preemption(), resume_rng]

    save_folder = cfg.get("save_folder")
    autoresume = cfg.get("autoresume")
    if autoresume is None:  # on by default when a rerun can find its checkpoints
        autoresume = bool(save_folder) and bool(cfg.get("run_name"))

    if save_folder and not is_remote(save_folder) and dist.get_local_rank() == 0:
        # Fail before training, not at the first save hours later.
        local_folder = Path(save_folder.replace("{run_name}", cfg.run_name))
        sharded = (
            bool(parallelism) and "SHARDED" in str(parallelism["fsdp"].get("state_dict_type", "")).upper()
        )
        check_save_folder(local_folder, estimate_checkpoint_bytes(model, world, sharded))
        if autoresume and dist.get_global_rank() == 0:  # Composer resumes from what rank 0 finds
            resume_from = repair_latest_checkpoint(local_folder)
            if resume_from is not None:
                print(f"resuming {cfg.run_name} from {resume_from}", flush=True)

    folder = run_folder(cfg)
    if folder is not None and dist.get_global_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RECIPE_FILENAME).write_text(to_yaml(cfg))

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
    return trainer


def train(cfg: DictConfig, recipe_path: str | None = None) -> Trainer:
    """Build the Trainer for a validated recipe and fit it; raises ``RunStopped`` on preemption or NaN/Inf loss."""
    trainer = build_trainer(cfg, recipe_path)
    if cfg.get("eval_first") and trainer.state.evaluators:
        trainer.eval()
    state = trainer.state
    done = state.max_duration is not None and not state.timestamp < state.max_duration
    if done and dist.get_global_rank() == 0:
        print(
            f"run {state.run_name} is already complete (batch {int(state.timestamp.batch)}); set another run_name, "
            "or autoresume=false save_overwrite=true, to train again",
            flush=True,
        )
    if done:  # Composer's fit() would raise "No training would occur"; a finished run is a success
        trainer.close()
        return trainer
    try:
        trainer.fit()
    except RunStopped:
        trainer.close()  # flush loggers and finish uploads of the checkpoint just written
        raise
    return trainer
