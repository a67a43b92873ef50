"""Recipe -> composer.Trainer -> fit."""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from composer import Trainer
from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist, get_device, reproducibility
from omegaconf import DictConfig, OmegaConf

from llmfoundry_lite import builders
from llmfoundry_lite.config import to_yaml
from llmfoundry_lite.errors import RecipeError

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


def default_run_name(recipe_path: str | None) -> str:
    """``<recipe stem>-<UTC timestamp>``; RUN_NAME from the environment wins (as launchers set it)."""
    if os.environ.get("RUN_NAME"):
        return os.environ["RUN_NAME"]
    stem = Path(recipe_path).stem if recipe_path else "run"
    return f"{stem}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"


def run_folder(cfg: DictConfig) -> Path | None:
    """Local folder that holds the run's recipe (the save folder when local), or None for remote saves."""
    save_folder = cfg.get("save_folder")
    if save_folder and "://" in save_folder:
        return None
    folder = save_folder or os.path.join("runs", "{run_name}")
    return Path(folder.replace("{run_name}", cfg.run_name))


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


def build_trainer(cfg: DictConfig, recipe_path: str | None = None) -> Trainer:
    """Build every component of a validated recipe and the Composer Trainer that runs it."""
    cfg = cfg.copy()
    if not cfg.get("run_name"):
        cfg.run_name = default_run_name(recipe_path)
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
    loggers = builders.build_multi(cfg, "loggers")
    if cfg.log_to_console:
        loggers.append(ProgressLine(cfg.console_log_interval))
    precision = _precision(cfg, device_name)
    if device_name == "cpu" and precision == "amp_bf16":
        callbacks.append(CPUAutocast())
        precision = "fp32"

    save_folder = cfg.get("save_folder")
    autoresume = cfg.get("autoresume")
    if autoresume is None:  # on by default when a rerun can find its checkpoints
        autoresume = bool(save_folder) and bool(cfg.get("run_name"))

    parallelism = None
    if cfg.get("fsdp"):
        if world > 1 and device_name == "gpu":
            parallelism = {"fsdp": OmegaConf.to_container(cfg.fsdp, resolve=True)}
        elif dist.get_global_rank() == 0:
            print(
                "warning: the fsdp block is ignored (FSDP needs several GPU processes); training without it",
                file=sys.stderr,
            )

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
    # The resolved recipe goes to every logger (wandb config, tensorboard hparams, ...).
    trainer.logger.log_hyperparameters(OmegaConf.to_container(cfg, resolve=True))
    return trainer


def train(cfg: DictConfig, recipe_path: str | None = None) -> Trainer:
    """Build the Trainer for a validated recipe and fit it."""
    trainer = build_trainer(cfg, recipe_path)
    if cfg.get("eval_first") and trainer.state.evaluators:
        trainer.eval()
    trainer.fit()
    return trainer
