"""Recipe -> composer.Trainer -> fit, saying what happens: run name, folder, fresh or resumed, progress, the end.

Every run writes its console lines to ``train.log`` and one JSON object per logged step to ``metrics.jsonl`` in
its run folder (next to the file of a configured ``jsonl_metrics`` logger instead, as sweep trials have).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from pathlib import Path
from typing import Optional

import torch
from composer import Trainer
from composer.core import Callback, State, TimeUnit
from composer.loggers import Logger
from composer.utils import dist, get_device, reproducibility
from omegaconf import DictConfig, OmegaConf

from llmfoundry_lite.checkpoints import is_complete
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.recipe import iter_multi, to_yaml
from llmfoundry_lite.recipe.sections import run_resource_checks
from llmfoundry_lite.train import build
from llmfoundry_lite.train.callbacks.cost import apply_recipe_cost
from llmfoundry_lite.train.callbacks.preemption import (
    EmptyEpochGuard,
    NonFiniteLossGuard,
    Preemption,
    RunStopped,
)
from llmfoundry_lite.train.callbacks.progress import (
    LOG_FILENAME,
    METRICS_FILENAME,
    TRAIN_LOSS,
    CloseConsole,
    JSONLMetricsLogger,
    ProgressLine,
    RunConsole,
)
from llmfoundry_lite.train.callbacks.stop_signals import GUARD, StopNow, stop_signals
from llmfoundry_lite.train.checkpoints import (
    SURGERY_ALGORITHMS,
    ResumeRNG,
    check_checkpoint_fits,
    check_save_folder,
    estimate_checkpoint_bytes,
    repair_latest_checkpoint,
)
from llmfoundry_lite.train.checks import checkpoint_to_load, parallelism_config, resumes_own_checkpoint
from llmfoundry_lite.train.runlock import RunLock
from llmfoundry_lite.train.trainer import make_trainer, resolve_device

RECIPE_FILENAME = "recipe.yaml"


def check_readable_checkpoints(folder: Path) -> None:
    """RecipeError when ``folder`` holds checkpoints and none can be read (all cut short): resuming is impossible.

    Composer would start fresh and then refuse to overwrite them (FileExistsError at the first save).
    """
    found = sorted(folder.glob("ep*-ba*-rank0.pt"))
    if not found or any(is_complete(p) for p in found):
        return
    names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
    raise RecipeError(
        f"every checkpoint in {str(folder)!r} is unreadable ({names}: cut short, e.g. by a crash while saving), "
        f"so the run cannot resume; to start over, delete them (rm {folder}/ep*-rank*.pt) or add "
        "autoresume=false save_overwrite=true, or give this run another run_name",
        key="save_folder",
    )


def _has_surgery(cfg: DictConfig) -> bool:
    """Whether the recipe's algorithms replace model modules inside the Trainer (``SURGERY_ALGORITHMS``)."""
    algorithms = cfg.get("algorithms")
    blocks = OmegaConf.to_container(algorithms, resolve=True) if algorithms is not None else None
    return any(
        (block or {}).get("name", name) in SURGERY_ALGORITHMS
        for _, name, block in iter_multi("algorithms", blocks)
    )


def _microbatch(value: int | str | None, device_batch: int) -> int | str | None:
    """The recipe's microbatch capped at the per-process batch, so one recipe runs on any number of processes."""
    return min(value, device_batch) if isinstance(value, int) else value


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
    # Unset top-level keys are left out, so a new optional section does not rename every existing run.
    settings = OmegaConf.create({k: v for k, v in cfg.items() if v is not None})
    digest = hashlib.sha1(to_yaml(settings).encode()).hexdigest()[:8]
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


class HoldRunLock(Callback):
    """Holds the run folder's :class:`RunLock` (taken while building) until the Trainer closes."""

    def __init__(self) -> None:
        self.lock: Optional[RunLock] = None

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def close(self, state: State, logger: Logger) -> None:  # noqa: D102
        self.release()


def build_trainer(
    cfg: DictConfig, recipe_path: str | None = None, console: Optional[RunConsole] = None
) -> Trainer:
    """Build every component of a validated recipe and the Composer Trainer that runs it.

    Prints the run's first line (name, folder, fresh or resumed) and opens its ``train.log``/``metrics.jsonl``.
    Takes the run folder's lock (one writer per folder) until the Trainer closes.
    """
    hold = HoldRunLock()
    try:
        return _build_trainer(cfg, recipe_path, console, hold)
    except BaseException:
        hold.release()
        raise


def _build_trainer(
    cfg: DictConfig, recipe_path: str | None, console: Optional[RunConsole], hold: HoldRunLock
) -> Trainer:
    cfg = with_run_name(cfg, recipe_path)
    console = console or RunConsole(quiet=not cfg.log_to_console)
    device_name = resolve_device(cfg.get("device"))
    if not dist.is_initialized() and dist.get_world_size() > 1:
        dist.initialize_dist(get_device(device_name), timeout=cfg.dist_timeout)
    reproducibility.seed_all(cfg.seed)
    # What `validate` checks outside the recipe (tokenizer, data and its size per rank, logins), by the same code.
    run_resource_checks(OmegaConf.to_container(cfg, resolve=True), dist.get_world_size())

    # The run's files: next to a configured jsonl_metrics logger's file (sweep trials), else in the run folder.
    loggers = build.build_multi(cfg, "loggers")
    metrics = next((d for d in loggers if isinstance(d, JSONLMetricsLogger)), None)
    folder = run_folder(cfg)
    if metrics is None:
        logs = folder if folder is not None else Path("runs") / cfg.run_name
        metrics = JSONLMetricsLogger(str(logs / METRICS_FILENAME))
        loggers.append(metrics)

    world = dist.get_world_size()
    device_batch = cfg.global_train_batch_size // world
    parallelism = parallelism_config(cfg, world, device_name)  # checks the fsdp block before building

    tokenizer = build.build_tokenizer(cfg)
    model = build.build_model(cfg, tokenizer)
    # load_path checked against the model before any folder is made: Composer would fail with a torch traceback.
    load_path = None if resumes_own_checkpoint(cfg) else checkpoint_to_load(cfg.get("load_path"))
    surgery = _has_surgery(cfg)
    if load_path and Path(load_path).is_file() and not surgery:
        check_checkpoint_fits(model, load_path, cfg.load_strict_model_weights)
    compile_callbacks = build.compile_model(cfg, model)  # per block, before Composer wraps FSDP/checkpointing
    train_loader = build.build_loader(cfg, "train_loader", tokenizer, device_batch, world)
    eval_loader = None
    if cfg.get("eval_loader") is not None:
        eval_bs = cfg.get("device_eval_batch_size") or device_batch
        eval_loader = build.build_loader(cfg, "eval_loader", tokenizer, eval_bs, world)
    optimizer = build.build_optimizer(cfg, model)
    scheduler = build.build_scheduler(cfg)
    algorithms = build.build_multi(cfg, "algorithms")
    callbacks = build.build_multi(cfg, "callbacks")
    apply_recipe_cost(cfg, callbacks)
    if cfg.log_to_console and dist.get_global_rank() == 0:
        loggers.append(ProgressLine(cfg.console_log_interval, console=console))
    # Always on, not recipe options: every run survives preemption, stops on a diverged loss or on a dataloader
    # that yields nothing, and closes its train.log.
    # Preemption first: from its fit_start on, a signal checkpoints instead of stopping as during start-up.
    resume_rng = ResumeRNG()
    callbacks = [
        Preemption(),
        *callbacks,
        *compile_callbacks,
        NonFiniteLossGuard(),
        EmptyEpochGuard(),
        resume_rng,
    ]
    callbacks += [CloseConsole(console), hold]

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
        if dist.get_global_rank() == 0:  # one writer per folder; Composer resumes from what rank 0 finds
            hold.lock = RunLock(local_folder).acquire()
            if autoresume:
                check_readable_checkpoints(local_folder)
                resume_from = repair_latest_checkpoint(local_folder)

    try:
        trainer = make_trainer(
            model,
            train_loader,
            eval_loader,
            device=device_name,
            precision=cfg.get("precision"),
            callbacks=callbacks,
            loggers=loggers,
            device_train_microbatch_size=_microbatch(cfg.get("device_train_microbatch_size"), device_batch),
            run_name=cfg.run_name,
            eval_interval=cfg.eval_interval if eval_loader is not None else 1,
            # Composer warns about a subset size with nothing to evaluate (a recipe with eval_loader=null).
            eval_subset_num_batches=cfg.eval_subset_num_batches if eval_loader is not None else -1,
            optimizers=optimizer,
            schedulers=scheduler,
            max_duration=cfg.max_duration,
            algorithms=algorithms,
            save_folder=save_folder,
            save_interval=cfg.save_interval,
            save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
            save_overwrite=cfg.save_overwrite,
            save_weights_only=cfg.save_weights_only,
            load_path=load_path,
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
    except RuntimeError:
        if load_path and surgery:  # the model as the algorithms changed it
            check_checkpoint_fits(model, load_path, cfg.load_strict_model_weights)
        raise
    resume_rng.trainer = trainer
    if folder is not None and dist.get_global_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if hold.lock is None:  # no local save folder: the lock guards train.log and metrics.jsonl
            hold.lock = RunLock(folder, key="run_name").acquire()
        (folder / RECIPE_FILENAME).write_text(to_yaml(cfg))
    # Written once everything is built (the Trainer too: it checks precision and the model's runtime), so a
    # recipe that fails to build leaves no run folder behind.
    console.open(Path(metrics.filename).parent / LOG_FILENAME)

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
    """Build the Trainer for a validated recipe, fit and close it (state stays readable); print first and last lines.

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
            # Flush loggers and uploads now, and free the datasets' shared memory: Composer would do it only at
            # interpreter exit, so a process training several runs (notebook, tests) would pile them up.
            trainer.close()
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
