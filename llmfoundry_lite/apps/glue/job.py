"""One GLUE finetuning job: a task, its hyperparameters and a seed, trained and evaluated with Composer.

Decoupled AdamW (betas and eps from the ``glue:`` section), linear decay with warmup, evaluation every epoch; the
job writes ``result.json`` (metrics in percent, per-evaluation history) and, for the MNLI job that later tasks
start from, a weights-only checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback

from llmfoundry_lite.apps.glue.config import TASKS, GlueConfig, Job
from llmfoundry_lite.apps.glue.data import Collate, load_task_splits, tokenize_split
from llmfoundry_lite.apps.glue.model import GlueClassifier, build_encoder, load_weights
from llmfoundry_lite.checkpoints import find_checkpoint, load_model_state
from llmfoundry_lite.train.trainer import composer_precision, make_trainer, resolve_device, resolve_precision


class _EvalHistory(Callback):
    """Records every evaluation's metrics (the per-epoch history in the results)."""

    def __init__(self) -> None:
        self.history: list[dict] = []

    def eval_after_all(self, state: Any, logger: Any) -> None:
        """Called by Composer after all evaluators ran."""
        row: dict[str, Any] = {"epoch": int(state.timestamp.epoch), "batch": int(state.timestamp.batch)}
        for label, metrics in state.eval_metrics.items():
            for name, m in metrics.items():
                row[f"{label}/{name}"] = float(m.compute())
        self.history.append(row)


class _JobProgress(Callback):
    """One console line per GLUE job as it starts, at each evaluation, and as it finishes."""

    def __init__(self, label: str, started_from: str, stream: Any = None) -> None:
        self.label = label
        self.started_from = started_from
        self.stream = stream or sys.stdout
        self._t0 = time.time()

    def _say(self, text: str) -> None:
        print(f"[glue {self.label}] {text}", file=self.stream, flush=True)

    def fit_start(self, state: Any, logger: Any) -> None:
        """Announce the job: batches to train and where the weights come from."""
        self._t0 = time.time()
        self._say(f"start: {state.max_duration.value} batches from {self.started_from}")

    def eval_after_all(self, state: Any, logger: Any) -> None:
        """Print this evaluation's metrics (percent)."""
        scores = "  ".join(
            f"{label}/{name} {100.0 * float(m.compute()):.2f}"
            for label, metrics in state.eval_metrics.items()
            for name, m in metrics.items()
        )
        self._say(f"eval at epoch {int(state.timestamp.epoch)} batch {int(state.timestamp.batch)}: {scores}")

    def done(self, score: float) -> None:
        """Say the job is done, its score and how long it took."""
        self._say(f"done in {time.time() - self._t0:.0f} s: score {score:.2f}")


def device_and_precision(glue: GlueConfig) -> tuple[str, str]:
    """The device and precision of the recipe's jobs on this machine, decided as for training (amp_bf16 on CPU
    runs under bf16 autocast, as in ``train.trainer.make_trainer``)."""
    device = resolve_device(glue.device, "glue.device")
    return device, resolve_precision(glue.precision, device, "glue.precision")


def _started_from(cfg: Any, glue: GlueConfig, checkpoint: str | None) -> str:
    hf = glue.init_from_hf or (cfg.get("model") or {}).get("init_from_hf")
    return checkpoint or glue.checkpoint or (f"hf:{hf}" if hf else "random init")


def _make_trainer(
    glue: GlueConfig,
    job: Job,
    model: GlueClassifier,
    train_dl: Any,
    evaluators: list[Any],
    callbacks: list[Callback],
    save_folder: str | None = None,
) -> Any:
    """The Composer Trainer of one job (optimizer, schedule, device, precision; a weights-only save at the end)."""
    from composer.optim import LinearWithWarmupScheduler

    from llmfoundry_lite.train.optim import DecoupledAdamW

    device, precision = device_and_precision(glue)
    # In batches, so that t_warmup=0.06dur is 6% of the steps (with "Nep" Composer rounds it to 0 epochs).
    duration = f"{job.epochs * len(train_dl)}ba"
    save_kwargs: dict[str, Any] = {}
    if save_folder is not None:
        save_kwargs = dict(
            save_folder=save_folder,
            save_interval=duration,
            save_weights_only=True,
            save_num_checkpoints_to_keep=1,
            save_overwrite=True,
        )
    return make_trainer(
        model,
        train_dl,
        evaluators,
        device=device,
        precision=precision,
        callbacks=callbacks,
        device_train_microbatch_size=glue.device_train_microbatch_size or "auto",  # auto: GPU only
        key_prefix="glue.",
        max_duration=duration,
        eval_interval=glue.eval_interval,
        optimizers=DecoupledAdamW(
            model.parameters(),
            lr=job.lr,
            betas=tuple(glue.betas),
            eps=glue.eps,
            weight_decay=job.weight_decay,
        ),
        schedulers=LinearWithWarmupScheduler(t_warmup=glue.t_warmup, alpha_f=glue.alpha_f),
        seed=job.seed,
        progress_bar=False,
        log_to_console=False,
        run_name=f"glue-{job.task}-seed{job.seed}",
        python_log_level=None,
        **save_kwargs,
    )


def make_train_loader(dataset: Any, batch_size: int, collate: Any, shuffle: bool, seed: int) -> Any:
    """A task's training DataLoader: the dataset's order (the reference's), or reshuffled each epoch from ``seed``."""
    from torch.utils.data import DataLoader

    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=gen)


def run_job(
    cfg: Any,
    glue: GlueConfig,
    job: Job,
    job_dir: str | os.PathLike,
    init_checkpoint: str | None = None,
    pretrained_checkpoint: str | None = None,
    save_checkpoint: bool = False,
) -> dict[str, Any]:
    """Finetune one task/seed; return its metrics (percent), history and checkpoint. Writes result.json."""
    from composer.core import Evaluator
    from composer.utils import reproducibility
    from torch.utils.data import DataLoader

    start = time.time()
    spec = TASKS[job.task]
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    reproducibility.seed_all(job.seed)  # the head's init depends on it

    device, precision = device_and_precision(glue)
    # Round-2 jobs overwrite the encoder with the MNLI weights, so the pretraining checkpoint is not read.
    weights = "" if init_checkpoint else pretrained_checkpoint
    encoder, tokenizer = build_encoder(cfg, glue, weights, composer_precision(device, precision))
    model = GlueClassifier(encoder, spec.num_labels, spec.metrics, dropout=glue.classifier_dropout)
    if init_checkpoint:
        # MNLI-finetuned encoder and pooler; the head is new (label spaces differ).
        load_weights(
            model,
            load_model_state(init_checkpoint, key="mnli checkpoint"),
            f"MNLI checkpoint {init_checkpoint!r}",
            "mnli checkpoint",
            skip_prefixes=("classifier.",),
        )

    raw = load_task_splits(job.task, glue.data_dir, glue.dataset_cache_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collate = Collate(pad_id, regression=spec.num_labels == 1)
    train_ds = tokenize_split(raw["train"], job.task, tokenizer, glue.max_seq_len, glue.max_train_samples)
    train_dl = make_train_loader(train_ds, job.batch_size, collate, glue.shuffle, job.seed)
    evaluators = []
    for label, split in spec.eval_splits.items():
        ds = tokenize_split(raw[split], job.task, tokenizer, glue.max_seq_len, glue.max_eval_samples)
        dl = DataLoader(ds, batch_size=glue.eval_batch_size, shuffle=False, collate_fn=collate)
        evaluators.append(Evaluator(label=label, dataloader=dl, metric_names=list(spec.metrics)))

    history = _EvalHistory()
    started_from = _started_from(cfg, glue, init_checkpoint or pretrained_checkpoint)
    progress = _JobProgress(job.name, started_from)
    save_folder = str(job_dir / "checkpoints") if save_checkpoint else None
    trainer = _make_trainer(glue, job, model, train_dl, evaluators, [history, progress], save_folder)
    try:
        trainer.fit()
        metrics = {
            f"{label}/{name}": 100.0 * float(m.compute())
            for label, ms in trainer.state.eval_metrics.items()
            for name, m in ms.items()
        }
        checkpoint = None
        if save_folder is not None:
            checkpoint = str(find_checkpoint(save_folder, key="mnli checkpoint"))
    finally:
        trainer.close()
    result = {
        "task": job.task,
        "seed": job.seed,
        "hparams": dataclasses.asdict(job),
        "metrics": metrics,
        "score": sum(metrics.values()) / len(metrics),
        "history": [{k: (100.0 * v if "/" in k else v) for k, v in row.items()} for row in history.history],
        "started_from": started_from,
        "checkpoint": checkpoint,
        "train_rows": len(train_ds),
        "seconds": round(time.time() - start, 2),
    }
    (job_dir / "result.json").write_text(json.dumps(result, indent=2))
    progress.done(result["score"])
    return result
