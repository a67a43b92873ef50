"""GLUE finetuning of a pretrained BERT encoder: ``llmfoundry-lite glue RECIPE``.

A GLUE recipe is a pretraining recipe (usually ``base: ../mosaicbert/base.yaml``, which supplies the ``model``
and ``tokenizer`` blocks) plus a ``glue:`` section (:class:`GlueConfig`) naming the starting weights, the data
and the tasks. For each task and seed we put a fresh classification (or, for STS-B, regression) head on the
encoder and train it with Composer's Trainer: decoupled AdamW (betas 0.9/0.98, eps 1e-6), linear decay with 6%
warmup, evaluation every epoch. RTE, MRPC and STS-B start from the MNLI-finetuned encoder (MosaicBERT's
reference protocol). With several GPUs, jobs run in parallel, one subprocess per GPU.

Scoring convention (the one of the MosaicBERT reference ``glue.py``): the score of one run is the mean of its
task metrics in percent (MNLI: accuracy on matched and mismatched; QQP and MRPC: accuracy and F1; CoLA:
Matthews correlation; STS-B: Spearman correlation; others: accuracy), measured at the end of training; a task's
score is the mean over its seeds; the GLUE average is the unweighted mean of the task scores (WNLI excluded).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import torchmetrics
from composer.core import Callback
from composer.models import ComposerModel

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError, suggest
from llmfoundry_lite.quiet import quiet_dependency_warnings

# ---------------------------------------------------------------------------------------------------------
# Tasks: schema of each dataset and the published MosaicBERT finetuning settings
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A GLUE task: its columns, label space, evaluation splits and metrics, and published settings."""

    name: str
    text_columns: tuple[str, ...]
    num_labels: int  # 1 = regression (STS-B)
    metrics: tuple[str, ...]
    eval_splits: dict[str, str]  # result label -> dataset split
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    seeds: tuple[int, ...]


_SEEDS5 = (19, 8364, 717, 10536, 90166)
_MNLI_EVAL = {"mnli_m": "validation_matched", "mnli_mm": "validation_mismatched"}
_PAIR = ("sentence1", "sentence2")
# Published settings: lr, weight decay, batch size, epochs; seeds as in the reference finetuning YAML.
# fmt: off
TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("mnli", ("premise", "hypothesis"), 3, ("accuracy",), _MNLI_EVAL, 5e-5, 5e-6, 48, 3, (19,)),
    TaskSpec("qqp", ("question1", "question2"), 2, ("accuracy", "f1"), {"qqp": "validation"}, 3e-5, 3e-6, 16, 5,
             (19,)),
    TaskSpec("qnli", ("question", "sentence"), 2, ("accuracy",), {"qnli": "validation"}, 1e-5, 1e-6, 16, 10, (19,)),
    TaskSpec("sst2", ("sentence",), 2, ("accuracy",), {"sst2": "validation"}, 3e-5, 3e-6, 16, 3, _SEEDS5[:3]),
    TaskSpec("cola", ("sentence",), 2, ("matthews",), {"cola": "validation"}, 5e-5, 5e-6, 32, 10, _SEEDS5[:4]),
    TaskSpec("mrpc", _PAIR, 2, ("accuracy", "f1"), {"mrpc": "validation"}, 8e-5, 8e-6, 32, 10, _SEEDS5),
    TaskSpec("rte", _PAIR, 2, ("accuracy",), {"rte": "validation"}, 1e-5, 1e-5, 16, 3, _SEEDS5),
    TaskSpec("stsb", _PAIR, 1, ("spearman",), {"stsb": "validation"}, 3e-5, 3e-6, 32, 10, _SEEDS5),
)}
# fmt: on
# Spellings users type (GLUE's own folder names, hyphenated forms).
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "sts": "stsb", "sst": "sst2"}
# Order in which results are reported (the GLUE paper's table order).
TASK_ORDER = ("mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte")


def canonical_task(name: str, key: str = "glue.tasks") -> str:
    """The canonical task name for ``name`` (case-insensitive, 'SST-2' -> 'sst2'); RecipeError if unknown."""
    low = str(name).strip().lower()
    low = _ALIASES.get(low, low.replace("-", "").replace("_", ""))
    if low not in TASKS:
        raise RecipeError(
            f"unknown GLUE task {name!r}{suggest(low, TASKS)}; choose from {', '.join(TASK_ORDER)}", key=key
        )
    return low


# ---------------------------------------------------------------------------------------------------------
# Recipe section
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskConfig:
    """Per-task settings; unset fields take the published MosaicBERT value for that task."""

    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    batch_size: Optional[int] = None
    epochs: Optional[int] = None
    seeds: Optional[list[int]] = None


@dataclasses.dataclass
class GlueConfig:
    """The ``glue:`` section of a recipe (the rest of the recipe supplies ``model`` and ``tokenizer``)."""

    # task name -> TaskConfig fields (or null for the published settings); default: all eight tasks
    tasks: Optional[dict] = None
    # Starting weights: a pretraining run's Composer checkpoint (file or save folder), or a Hugging Face BERT
    # (folder or hub name, through BertEncoder.from_hf); allow_random_init is for smoke tests only.
    checkpoint: Optional[str] = None
    init_from_hf: Optional[str] = None
    allow_random_init: bool = False
    # Local GLUE-schema files DIR/<task>/<split>.{jsonl,json,csv,tsv}; null = the Hugging Face hub.
    data_dir: Optional[str] = None
    make_toy_data: bool = False  # write tiny synthetic GLUE-schema data into data_dir for tasks it lacks
    dataset_cache_dir: Optional[str] = None
    output_dir: str = "./glue-results"
    max_seq_len: int = 256
    seeds: Optional[list[int]] = None  # seeds for tasks that do not list their own (default: published seeds)
    start_from_mnli: list[str] = dataclasses.field(default_factory=lambda: ["rte", "mrpc", "stsb"])
    # For start_from_mnli tasks when MNLI itself is not run: an earlier run's OUT/mnli/seed=S/checkpoints.
    mnli_checkpoint: Optional[str] = None
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    t_warmup: str = "0.06dur"
    alpha_f: float = 0.0
    classifier_dropout: float = 0.1
    eval_batch_size: int = 64
    eval_interval: str = "1ep"
    precision: Optional[Literal["fp32", "amp_bf16", "amp_fp16"]] = None  # default: amp_bf16 on GPU, else fp32
    device: Literal["auto", "cpu", "gpu"] = "auto"
    parallel: bool = True  # with >1 GPU: one job per GPU, in subprocesses
    device_train_microbatch_size: Optional[Union[int, Literal["auto"]]] = None  # default: auto on GPU
    max_train_samples: Optional[int] = None  # cap rows per split (quick runs); null = all
    max_eval_samples: Optional[int] = None


def _section_error(e: RecipeError, origins: Any) -> RecipeError:
    file = e.file or (origins.file_of(e.key) if origins is not None else None)
    return RecipeError(e.detail, file=file, key=e.key)


def parse_glue_section(section: Mapping[str, Any] | None) -> GlueConfig:
    """Validate the ``glue:`` mapping (unknown keys, types, task names) and return a GlueConfig."""
    section = dict(section or {})
    registry.check_dataclass(GlueConfig, section, "glue")
    tasks_in = section.pop("tasks", None)
    cfg = GlueConfig(**section)
    tasks: dict[str, TaskConfig] = {}
    if tasks_in is None:
        tasks_in = {t: None for t in TASK_ORDER}
    if not isinstance(tasks_in, Mapping):
        raise RecipeError(f"expected a mapping of task name -> settings, got {tasks_in!r}", key="glue.tasks")
    for name, block in tasks_in.items():
        canon = canonical_task(name, key=f"glue.tasks.{name}")
        block = dict(block or {})
        registry.check_dataclass(TaskConfig, block, f"glue.tasks.{name}")
        tasks[canon] = TaskConfig(**block)
    cfg.tasks = tasks
    cfg.start_from_mnli = [canonical_task(t, key="glue.start_from_mnli") for t in cfg.start_from_mnli]
    for key in ("t_warmup", "eval_interval"):
        err = registry.time_error(getattr(cfg, key))
        if err:
            raise RecipeError(err, key=f"glue.{key}")
    if cfg.checkpoint and cfg.init_from_hf:
        raise RecipeError("set either checkpoint or init_from_hf, not both", key="glue.init_from_hf")
    if len(cfg.betas) != 2:
        raise RecipeError(f"expected two numbers, got {cfg.betas!r}", key="glue.betas")
    return cfg


def load_glue_recipe(
    path: str | os.PathLike, overrides: Sequence[str] | None = None
) -> tuple[Any, GlueConfig]:
    """Load a GLUE recipe: the resolved, validated recipe (DictConfig) and its parsed ``glue:`` section."""
    from omegaconf import OmegaConf

    from llmfoundry_lite.config import compose, validate

    data, origins = compose(path, list(overrides or []))
    try:
        validate(data)
        if data.get("glue") is None:
            raise RecipeError(
                "this recipe has no 'glue:' section; add one (see recipes/glue/mosaicbert-base.yaml)",
                key="glue",
            )
        glue = parse_glue_section(data["glue"])
    except RecipeError as e:
        raise _section_error(e, origins) from None
    return OmegaConf.create(data), glue


@dataclasses.dataclass
class Job:
    """One finetuning run: a task with its resolved hyperparameters and one seed."""

    task: str
    seed: int
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int

    @property
    def name(self) -> str:
        """Folder name of the job inside the output directory."""
        return f"{self.task}/seed={self.seed}"


def plan_jobs(cfg: GlueConfig, tasks: Sequence[str] | None = None, num_seeds: int | None = None) -> list[Job]:
    """Expand the recipe (optionally restricted to ``tasks`` / ``num_seeds`` seeds each) into jobs."""
    assert isinstance(cfg.tasks, dict)
    if tasks:
        chosen = [canonical_task(t, key="--tasks") for t in tasks]
    else:
        chosen = list(cfg.tasks)
    if num_seeds is not None and num_seeds < 1:
        raise RecipeError(f"--seeds must be at least 1, got {num_seeds}", key="--seeds")
    jobs = []
    for task in sorted(dict.fromkeys(chosen), key=TASK_ORDER.index):
        spec, tc = TASKS[task], cfg.tasks.get(task) or TaskConfig()
        seeds = list(tc.seeds or cfg.seeds or spec.seeds)
        if num_seeds is not None:
            # More seeds than listed: extend deterministically so reruns pick the same ones.
            rng = random.Random(f"{task}-{seeds[0]}")
            while len(seeds) < num_seeds:
                s = rng.randrange(1, 2**20)
                if s not in seeds:
                    seeds.append(s)
            seeds = seeds[:num_seeds]
        for seed in seeds:
            jobs.append(
                Job(
                    task=task,
                    seed=seed,
                    lr=spec.lr if tc.lr is None else tc.lr,
                    weight_decay=spec.weight_decay if tc.weight_decay is None else tc.weight_decay,
                    batch_size=spec.batch_size if tc.batch_size is None else tc.batch_size,
                    epochs=spec.epochs if tc.epochs is None else tc.epochs,
                )
            )
    return jobs


# ---------------------------------------------------------------------------------------------------------
# Metrics (pure torch, so their definitions are visible and tested)
# ---------------------------------------------------------------------------------------------------------


def accuracy(preds: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of exact matches."""
    return float((preds == target).float().mean()) if target.numel() else 0.0


def f1_score(preds: torch.Tensor, target: torch.Tensor) -> float:
    """Binary F1 of the positive class (label 1); 0 when there are no positives at all."""
    tp = int(((preds == 1) & (target == 1)).sum())
    fp = int(((preds == 1) & (target != 1)).sum())
    fn = int(((preds != 1) & (target == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corrcoef(preds: torch.Tensor, target: torch.Tensor) -> float:
    """Matthews correlation (multiclass form of Gorodkin 2004; the binary MCC for two classes); 0 if undefined."""
    k = int(max(int(preds.max()), int(target.max())) + 1) if target.numel() else 1
    conf = torch.zeros(k, k, dtype=torch.float64)
    conf.index_put_(
        (target.long(), preds.long()), torch.ones(target.numel(), dtype=torch.float64), accumulate=True
    )
    t, p = conf.sum(1), conf.sum(0)  # true / predicted counts per class
    c, s = conf.trace(), conf.sum()
    denom = math.sqrt(float(s * s - (p * p).sum()) * float(s * s - (t * t).sum()))
    return float(c * s - (p * t).sum()) / denom if denom > 0 else 0.0


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties given their average rank (as Spearman's definition requires)."""
    _, inverse, counts = torch.unique(
        x.double().flatten(), sorted=True, return_inverse=True, return_counts=True
    )
    last = counts.cumsum(0).double()  # 1-based rank of the last member of each tie group
    return (last - (counts.double() - 1) / 2)[inverse]


def pearson_corrcoef(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation; 0 when either side is constant (correlation undefined)."""
    x, y = x.double().flatten(), y.double().flatten()
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    return float((xc * yc).sum()) / denom if denom > 0 else 0.0


def spearman_corrcoef(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks)."""
    return pearson_corrcoef(_average_ranks(x), _average_ranks(y))


METRIC_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "accuracy": accuracy,
    "f1": f1_score,
    "matthews": matthews_corrcoef,
    "spearman": spearman_corrcoef,
    "pearson": pearson_corrcoef,
}


class GlueMetric(torchmetrics.Metric):
    """Collects predictions and targets over an evaluation and computes one of METRIC_FNS at the end."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric
        self.fn = METRIC_FNS[metric]
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predictions (labels or scores) and targets."""
        self.preds.append(preds.detach().float().flatten())
        self.target.append(target.detach().float().flatten())

    def compute(self) -> torch.Tensor:
        """The metric over everything seen since the last reset."""
        preds = torchmetrics.utilities.dim_zero_cat(self.preds) if self.preds else torch.zeros(0)
        target = torchmetrics.utilities.dim_zero_cat(self.target) if self.target else torch.zeros(0)
        return torch.tensor(self.fn(preds.cpu(), target.cpu()))


# ---------------------------------------------------------------------------------------------------------
# Model: classification / regression head on the encoder
# ---------------------------------------------------------------------------------------------------------


def _hidden_size(encoder: torch.nn.Module) -> int:
    for obj in (encoder, getattr(encoder, "config", None), getattr(encoder, "cfg", None)):
        for attr in ("hidden_size", "d_model", "dim"):
            v = getattr(obj, attr, None) if obj is not None else None
            if isinstance(v, int):
                return v
    # Otherwise ask the encoder itself (one tiny forward).
    dev = next(encoder.parameters()).device
    with torch.no_grad():
        h = encoder(
            torch.ones(1, 2, dtype=torch.long, device=dev), torch.ones(1, 2, dtype=torch.long, device=dev)
        )
    return int(h.shape[-1])


class GlueClassifier(ComposerModel):
    """Encoder + BERT-style pooler ([CLS] -> dense -> tanh) + dropout + linear head; MSE for one label."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        num_labels: int,
        metrics: Sequence[str] = ("accuracy",),
        dropout: float = 0.1,
        hidden_size: int | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.num_labels = num_labels
        hidden = hidden_size or _hidden_size(encoder)
        self.pooler = torch.nn.Linear(hidden, hidden)
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = torch.nn.Linear(hidden, num_labels)
        for lin in (self.pooler, self.classifier):  # BERT's initialisation for new layers
            torch.nn.init.normal_(lin.weight, std=0.02)
            torch.nn.init.zeros_(lin.bias)
        self.metric_names = tuple(metrics)
        self.eval_metrics = {m: GlueMetric(m) for m in self.metric_names}

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Logits (B, num_labels) for a tokenized batch."""
        hidden = self.encoder(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        pooled = torch.tanh(self.pooler(hidden[:, 0]))
        return self.classifier(self.dropout(pooled))

    def loss(self, outputs: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Cross-entropy, or mean squared error for regression (STS-B)."""
        if self.num_labels == 1:
            return torch.nn.functional.mse_loss(outputs.squeeze(-1).float(), batch["labels"].float())
        return torch.nn.functional.cross_entropy(outputs.float(), batch["labels"].long())

    def eval_forward(self, batch: Mapping[str, Any], outputs: Any = None) -> torch.Tensor:
        """Logits for evaluation."""
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, torchmetrics.Metric]:
        """Task metrics for evaluation; none during training (they would only cost time)."""
        return {} if is_train else self.eval_metrics

    def update_metric(
        self, batch: Mapping[str, Any], outputs: torch.Tensor, metric: torchmetrics.Metric
    ) -> None:
        """Feed predicted labels (or scores for regression) and targets to ``metric``."""
        preds = outputs.squeeze(-1) if self.num_labels == 1 else outputs.argmax(-1)
        metric.update(preds, batch["labels"])


# ---------------------------------------------------------------------------------------------------------
# Starting weights
# ---------------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str, key: str = "glue.checkpoint") -> Path:
    """A Composer checkpoint file: ``path`` itself, or in a save folder its latest (or newest) ``*.pt``."""
    p = Path(os.path.expanduser(path))
    if p.is_file():
        return p
    if p.is_dir():
        for name in ("latest-rank0.pt", "latest-rank0.pt.tar"):
            if (p / name).exists():
                return (p / name).resolve()
        pts = sorted(p.glob("*.pt"), key=lambda f: f.stat().st_mtime)
        if pts:
            return pts[-1]
        if (p / ".metadata").exists():
            raise RecipeError(
                f"{path!r} is a sharded (FSDP) checkpoint; save a monolithic one "
                "(fsdp state_dict_type: full) and point to it",
                key=key,
            )
        raise RecipeError(f"no Composer checkpoint (*.pt) in folder {path!r}", key=key)
    raise RecipeError(
        f"checkpoint {path!r} does not exist; point to a Composer checkpoint file (e.g. "
        "CHECKPOINT_FOLDER/latest-rank0.pt) or a pretraining run's save_folder",
        key=key,
    )


def checkpoint_model_state(path: str | os.PathLike, key: str = "glue.checkpoint") -> dict[str, torch.Tensor]:
    """The model state dict stored in a Composer checkpoint (``state['model']``, DDP prefixes removed)."""
    file = resolve_checkpoint(str(path), key)
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt or not a torch file
        raise RecipeError(
            f"cannot read checkpoint {str(file)!r}: {str(e).splitlines()[0]}", key=key
        ) from None
    state = ckpt.get("state", ckpt) if isinstance(ckpt, dict) else None
    model_state = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model_state, dict):
        raise RecipeError(f"{str(file)!r} is not a Composer checkpoint (no state['model'])", key=key)
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in model_state.items()}


def load_weights(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    key: str,
    skip_prefixes: Sequence[str] = (),
) -> None:
    """Load ``state`` into ``module``; apart from keys under ``skip_prefixes`` both must have the same weights."""
    skip = tuple(skip_prefixes)
    own = module.state_dict()
    hint = "the recipe's model block (and model-surgery algorithms) must match the run that saved it"
    extra = [k for k in state if k not in own and not k.startswith(skip)]
    if extra:
        raise RecipeError(
            f"{source} has {len(extra)} weights the model lacks (e.g. {extra[0]!r}); {hint}", key=key
        )
    missing = [k for k in own if k not in state and not k.startswith(skip)]
    if missing:
        raise RecipeError(
            f"{source} lacks {len(missing)} of the model's weights (e.g. {missing[0]!r}); {hint}", key=key
        )
    wanted = {k: v for k, v in state.items() if not k.startswith(skip)}
    for k, v in wanted.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise RecipeError(
                f"{source}: {k} has shape {tuple(v.shape)} but the model built from the recipe has "
                f"{tuple(own[k].shape)}; {hint}",
                key=key,
            )
    module.load_state_dict(wanted, strict=False)


def check_starting_weights(cfg: Any, glue: GlueConfig) -> None:
    """RecipeError unless the recipe names pretrained weights (or explicitly allows a random start)."""
    if glue.checkpoint:
        resolve_checkpoint(glue.checkpoint)
    elif not (glue.init_from_hf or (cfg.get("model") or {}).get("init_from_hf") or glue.allow_random_init):
        raise RecipeError(
            "no pretrained weights to finetune; set glue.checkpoint=PATH (or --checkpoint PATH) to a pretraining "
            "run's Composer checkpoint, glue.init_from_hf=HF_BERT, or allow_random_init: true (smoke tests)",
            key="glue.checkpoint",
        )


def apply_init_surgery(model: torch.nn.Module, cfg: Any, precision: str = "fp32") -> list[str]:
    """Apply the recipe's algorithms that rewrite the model at Event.INIT (ALiBi, gated linear units,
    low-precision LayerNorm...), so the model has the pretraining run's structure before its weights load.

    Returns the names of the algorithms applied. Other algorithms (schedules, regularizers) are pretraining
    concerns and are not used for finetuning.
    """
    from composer.core import Event, State
    from composer.devices import DeviceCPU
    from composer.loggers import Logger

    from llmfoundry_lite.builders import build_multi

    algorithms = build_multi(cfg, "algorithms")
    if not algorithms:
        return []
    state = State(
        model=model, rank_zero_seed=0, run_name="glue-surgery", device=DeviceCPU(), precision=precision
    )
    applied = []
    for alg in algorithms:
        if alg.match(Event.INIT, state):
            alg.apply(Event.INIT, state, Logger(state))
            applied.append(type(alg).__name__)
    return applied


def build_encoder(
    cfg: Any, glue: GlueConfig, checkpoint: str | None = None, precision: str = "fp32"
) -> tuple[torch.nn.Module, Any]:
    """The pretrained encoder and its tokenizer, from ``glue.init_from_hf`` or the recipe's model + checkpoint."""
    from llmfoundry_lite.builders import build_model, build_tokenizer

    checkpoint = checkpoint if checkpoint is not None else glue.checkpoint
    tokenizer = build_tokenizer(cfg)
    if glue.init_from_hf:
        from llmfoundry_lite.models.bert import BertEncoder

        return BertEncoder.from_hf(glue.init_from_hf), tokenizer
    model = build_model(cfg, tokenizer)
    apply_init_surgery(model, cfg, precision)
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        raise RecipeError(
            f"model {cfg.model.get('name')!r} has no '.encoder' trunk to finetune; use a BERT-family "
            "model (e.g. mosaic_bert)",
            key="model.name",
        )
    if checkpoint:
        state = checkpoint_model_state(checkpoint)
        # Load the whole pretraining model so its own key prefixes (whatever wraps the encoder) line up.
        load_weights(model, state, f"checkpoint {checkpoint!r}", "glue.checkpoint")
    return encoder, tokenizer


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------

_DATA_EXTS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv"}


def _find_task_folder(data_dir: Path, task: str) -> Path | None:
    for p in sorted(data_dir.iterdir()) if data_dir.is_dir() else []:
        try:
            if p.is_dir() and canonical_task(p.name) == task:  # 'SST-2', 'sst2', 'CoLA'... all match
                return p
        except RecipeError:
            continue
    return None


def _task_folder(data_dir: Path, task: str) -> Path:
    folder = _find_task_folder(data_dir, task)
    if folder is None:
        raise RecipeError(
            f"no folder for task {task!r} in data_dir {str(data_dir)!r} (expected {data_dir / task}/ "
            f"with {', '.join(sorted(set(TASKS[task].eval_splits.values()) | {'train'}))} files)",
            key="glue.data_dir",
        )
    return folder


def _split_file(folder: Path, split: str) -> Path:
    for ext in _DATA_EXTS:
        f = folder / f"{split}{ext}"
        if f.is_file():
            return f
    raise RecipeError(
        f"missing split file {str(folder / split)}.jsonl (or .json/.csv/.tsv)", key="glue.data_dir"
    )


def load_task_splits(task: str, data_dir: str | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """The task's ``train`` and evaluation splits as ``datasets.Dataset``s (hub, or local GLUE-schema files)."""
    import datasets

    spec = TASKS[task]
    splits = ["train", *spec.eval_splits.values()]
    if data_dir is None:
        try:
            dsd = datasets.load_dataset("glue", task, cache_dir=cache_dir)
        except Exception as e:  # offline, hub errors: the fix is a local data_dir
            raise RecipeError(
                f"cannot load GLUE task {task!r} from the Hugging Face hub ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); set glue.data_dir to local files",
                key="glue.data_dir",
            ) from None
        return {s: dsd[s] for s in splits}
    root = Path(os.path.expanduser(data_dir))
    if not root.is_dir():
        raise RecipeError(
            f"data_dir {data_dir!r} does not exist; point it to a folder of GLUE-schema files "
            "(DIR/<task>/train.jsonl, validation.jsonl), or set make_toy_data: true for a smoke test",
            key="glue.data_dir",
        )
    folder = _task_folder(root, task)
    files = {s: _split_file(folder, s) for s in splits}
    out = {}
    for split, f in files.items():
        kind = _DATA_EXTS[f.suffix]
        kwargs = {"delimiter": "\t"} if f.suffix == ".tsv" else {}
        try:
            out[split] = datasets.load_dataset(
                kind, data_files={split: str(f)}, split=split, cache_dir=cache_dir, **kwargs
            )
        except Exception as e:
            raise RecipeError(
                f"cannot read {str(f)!r}: {str(e).splitlines()[0][:200]}", key="glue.data_dir"
            ) from None
        missing = [c for c in (*spec.text_columns, "label") if c not in out[split].column_names]
        if missing:
            raise RecipeError(
                f"{str(f)!r} lacks column(s) {', '.join(missing)}; {task} needs "
                f"{', '.join((*spec.text_columns, 'label'))}",
                key="glue.data_dir",
            )
    return out


def tokenize_split(ds: Any, task: str, tokenizer: Any, max_seq_len: int, limit: int | None = None) -> Any:
    """Tokenize a split (pairs as segment A/B), keep ``input_ids``, masks and ``labels``."""
    spec = TASKS[task]
    if spec.num_labels > 1:  # GLUE marks unlabeled rows (test splits) with -1
        ds = ds.filter(lambda ex: ex["label"] is not None and ex["label"] >= 0)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))

    def encode(batch: dict) -> dict:
        texts = [[str(t) for t in batch[c]] for c in spec.text_columns]
        enc = tokenizer(*texts, truncation=True, max_length=max_seq_len)
        enc["labels"] = batch["label"]
        return dict(enc)

    return ds.map(encode, batched=True, remove_columns=ds.column_names, load_from_cache_file=False)


class _Collate:
    """Pads a list of tokenized examples to the longest one; labels as float (regression) or long."""

    def __init__(self, pad_token_id: int, regression: bool):
        self.pad_token_id = pad_token_id
        self.regression = regression

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        n, longest = len(rows), max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(n, longest, dtype=torch.long)
        token_type_ids = torch.zeros(n, longest, dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            input_ids[i, :k] = torch.tensor(r["input_ids"])
            attention_mask[i, :k] = 1
            if "token_type_ids" in r:
                token_type_ids[i, :k] = torch.tensor(r["token_type_ids"])
        labels = torch.tensor(
            [r["labels"] for r in rows], dtype=torch.float32 if self.regression else torch.long
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "labels": labels,
        }


def make_toy_glue(
    out_dir: str | os.PathLike,
    tasks: Sequence[str] = ("mnli", "rte", "stsb"),
    rows: int = 48,
    eval_rows: int = 16,
    seed: int = 0,
) -> Path:
    """Write a tiny GLUE-schema dataset (JSONL per split) from the embedded corpus, for smoke tests.

    Labels are learnable from surface features (for pairs: whether segment B is copied from segment A; for single
    sentences: whether the sentence mentions 'the'), so a working pipeline beats chance given enough steps.
    """
    from llmfoundry_lite.data.corpus import embedded_documents

    rng = random.Random(seed)
    sents = [s.strip() for d in embedded_documents() for s in d.replace("\n", " ").split(". ")]
    sents = [s for s in sents if 20 <= len(s) <= 160]
    rng.shuffle(sents)
    out = Path(out_dir)
    pool = iter(sents * 4)

    def pair_row(task: str) -> dict:
        spec = TASKS[task]
        a = next(pool)
        same = rng.random() < 0.5
        b = " ".join(a.split()[: max(3, len(a.split()) // 2)]) if same else next(pool)
        row = {spec.text_columns[0]: a, spec.text_columns[1]: b}
        if spec.num_labels == 1:
            row["label"] = round(4.0 + rng.random(), 2) if same else round(rng.random() * 2, 2)
        elif spec.num_labels == 3:
            row["label"] = 0 if same else rng.choice([1, 2])
        else:
            row["label"] = int(same)
        return row

    def single_row(task: str) -> dict:
        s = next(pool)
        return {TASKS[task].text_columns[0]: s, "label": int(" the " in f" {s.lower()} ")}

    for task in tasks:
        task = canonical_task(task)
        spec = TASKS[task]
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        make = pair_row if len(spec.text_columns) == 2 else single_row
        for split, n in [("train", rows)] + [(s, eval_rows) for s in spec.eval_splits.values()]:
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for _ in range(n):
                    f.write(json.dumps(make(task)) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------------
# One job
# ---------------------------------------------------------------------------------------------------------


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


def _device(glue: GlueConfig) -> str:
    if glue.device == "gpu" and not torch.cuda.is_available():
        raise RecipeError("device 'gpu' requested but CUDA is not available", key="glue.device")
    if glue.device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return glue.device


def _started_from(cfg: Any, glue: GlueConfig, checkpoint: str | None) -> str:
    hf = glue.init_from_hf or (cfg.get("model") or {}).get("init_from_hf")
    return checkpoint or glue.checkpoint or (f"hf:{hf}" if hf else "random init")


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
    from composer import Trainer
    from composer.core import Evaluator
    from composer.optim import DecoupledAdamW, LinearWithWarmupScheduler
    from composer.utils import reproducibility
    from torch.utils.data import DataLoader

    start = time.time()
    spec = TASKS[job.task]
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    reproducibility.seed_all(job.seed)  # the head's init depends on it

    device = _device(glue)
    # Mixed precision is a GPU feature here; on CPU the same recipe runs in fp32.
    precision = (glue.precision or "amp_bf16") if device == "gpu" else "fp32"
    # Round-2 jobs overwrite the encoder with the MNLI weights, so the pretraining checkpoint is not read.
    encoder, tokenizer = build_encoder(cfg, glue, "" if init_checkpoint else pretrained_checkpoint, precision)
    model = GlueClassifier(encoder, spec.num_labels, spec.metrics, dropout=glue.classifier_dropout)
    if init_checkpoint:
        # MNLI-finetuned encoder and pooler; the head is new (label spaces differ).
        load_weights(
            model,
            checkpoint_model_state(init_checkpoint, key="mnli checkpoint"),
            f"MNLI checkpoint {init_checkpoint!r}",
            "mnli checkpoint",
            skip_prefixes=("classifier.",),
        )

    raw = load_task_splits(job.task, glue.data_dir, glue.dataset_cache_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collate = _Collate(pad_id, regression=spec.num_labels == 1)
    train_ds = tokenize_split(raw["train"], job.task, tokenizer, glue.max_seq_len, glue.max_train_samples)
    gen = torch.Generator().manual_seed(job.seed)
    train_dl = DataLoader(
        train_ds, batch_size=job.batch_size, shuffle=True, collate_fn=collate, generator=gen
    )
    evaluators = []
    for label, split in spec.eval_splits.items():
        ds = tokenize_split(raw[split], job.task, tokenizer, glue.max_seq_len, glue.max_eval_samples)
        dl = DataLoader(ds, batch_size=glue.eval_batch_size, shuffle=False, collate_fn=collate)
        evaluators.append(Evaluator(label=label, dataloader=dl, metric_names=list(spec.metrics)))

    micro = glue.device_train_microbatch_size or ("auto" if device == "gpu" else None)
    history = _EvalHistory()
    started_from = _started_from(cfg, glue, init_checkpoint or pretrained_checkpoint)
    progress = _JobProgress(job.name, started_from)
    quiet_dependency_warnings()
    save_kwargs: dict[str, Any] = {}
    if save_checkpoint:
        save_kwargs = dict(
            save_folder=str(job_dir / "checkpoints"),
            save_interval=f"{job.epochs * len(train_dl)}ba",
            save_weights_only=True,
            save_num_checkpoints_to_keep=1,
            save_overwrite=True,
        )
    trainer = Trainer(
        model=model,
        train_dataloader=train_dl,
        eval_dataloader=evaluators,
        # In batches, so that t_warmup=0.06dur is 6% of the steps (with "Nep" Composer rounds it to 0 epochs).
        max_duration=f"{job.epochs * len(train_dl)}ba",
        eval_interval=glue.eval_interval,
        optimizers=DecoupledAdamW(
            model.parameters(),
            lr=job.lr,
            betas=tuple(glue.betas),
            eps=glue.eps,
            weight_decay=job.weight_decay,
        ),
        schedulers=LinearWithWarmupScheduler(t_warmup=glue.t_warmup, alpha_f=glue.alpha_f),
        device=device,
        precision=precision,
        device_train_microbatch_size=micro,
        seed=job.seed,
        callbacks=[history, progress],
        loggers=[],
        progress_bar=False,
        log_to_console=False,
        run_name=f"glue-{job.task}-seed{job.seed}",
        python_log_level=None,
        **save_kwargs,
    )
    try:
        trainer.fit()
        metrics = {
            f"{label}/{name}": 100.0 * float(m.compute())
            for label, ms in trainer.state.eval_metrics.items()
            for name, m in ms.items()
        }
        checkpoint = None
        if save_checkpoint:
            checkpoint = str(resolve_checkpoint(str(job_dir / "checkpoints"), key="mnli checkpoint"))
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


# ---------------------------------------------------------------------------------------------------------
# Orchestration: rounds (MNLI first), serial on CPU / one GPU, parallel subprocesses on several GPUs
# ---------------------------------------------------------------------------------------------------------


def _ready(spec: dict, mnli_checkpoint: str | None) -> dict | None:
    """The spec with its starting checkpoint filled in, or None while it still waits for the MNLI job."""
    if not spec.get("wait_for_mnli"):
        return spec
    return (
        None
        if mnli_checkpoint is None
        else {**spec, "init_checkpoint": mnli_checkpoint, "wait_for_mnli": False}
    )


def _run_serial(cfg: Any, glue: GlueConfig, specs: list[dict]) -> list[dict]:
    """Run job specs one after another in this process (CPU, or a single GPU)."""
    results, mnli_ckpt = [], None
    for spec in specs:  # the MNLI job that saves a checkpoint comes first
        spec = _ready(spec, mnli_ckpt)
        if spec is None:
            raise RuntimeError("a job waits for the MNLI checkpoint but no MNLI job produced one")
        job = Job(**spec["job"])
        result = run_job(
            cfg, glue, job, spec["job_dir"], spec["init_checkpoint"], save_checkpoint=spec["save_checkpoint"]
        )
        mnli_ckpt = result["checkpoint"] if spec["save_checkpoint"] else mnli_ckpt
        results.append(result)
    return results


def _run_parallel(recipe: str, overrides: Sequence[str], specs: list[dict], n_gpus: int) -> list[dict]:
    """Run job specs as ``python -m llmfoundry_lite.glue SPEC.json`` subprocesses, one per GPU at a time.

    A job that starts from the MNLI checkpoint is launched as soon as the MNLI job ends (not after the whole
    first round), so GPUs do not idle while long first-round tasks such as QQP finish.
    """
    pending = list(specs)
    running: dict[int, tuple[subprocess.Popen, dict, Any]] = {}
    results: list[dict] = []
    mnli_ckpt: str | None = None
    while pending or running:
        for gpu in range(n_gpus):
            if gpu in running:
                continue
            ready = next(
                ((i, r) for i, sp in enumerate(pending) if (r := _ready(sp, mnli_ckpt)) is not None), None
            )
            if ready is None:
                break
            spec = ready[1]
            del pending[ready[0]]
            job_dir = Path(spec["job_dir"])
            job_dir.mkdir(parents=True, exist_ok=True)
            spec_file = job_dir / "job.json"
            spec_file.write_text(json.dumps({**spec, "recipe": recipe, "overrides": list(overrides)}))
            log = open(job_dir / "log.txt", "w")  # noqa: SIM115 - closed when the process ends
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
            cmd = [sys.executable, "-m", "llmfoundry_lite.glue", str(spec_file)]
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[gpu] = (proc, spec, log)
            print(
                f"[glue {Job(**spec['job']).name}] started on GPU {gpu}; log {spec_file.parent}/log.txt",
                flush=True,
            )
        if not running:
            raise RuntimeError("jobs wait for the MNLI checkpoint but no MNLI job produced one")
        time.sleep(0.5)
        for gpu, (proc, spec, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[gpu]
            result_file = Path(spec["job_dir"]) / "result.json"
            if proc.returncode != 0 or not result_file.exists():
                for other, _, other_log in running.values():  # do not leave orphans holding GPUs
                    other.terminate()
                    other_log.close()
                tail = (Path(spec["job_dir"]) / "log.txt").read_text()[-3000:]
                raise RuntimeError(
                    f"GLUE job {spec['job']['task']} seed {spec['job']['seed']} failed (exit {proc.returncode}); "
                    f"log {spec['job_dir']}/log.txt ends with:\n{tail}"
                )
            result = json.loads(result_file.read_text())
            print(
                f"[glue {Job(**spec['job']).name}] done in {result['seconds']:.0f} s: score {result['score']:.2f}",
                flush=True,
            )
            if spec["save_checkpoint"]:
                mnli_ckpt = result["checkpoint"]
            results.append(result)
    return results


def _worker_main(spec_file: str) -> None:
    """Subprocess entry: run one job spec written by _run_parallel."""
    spec = json.loads(Path(spec_file).read_text())
    cfg, glue = load_glue_recipe(spec["recipe"], spec["overrides"])
    run_job(
        cfg,
        glue,
        Job(**spec["job"]),
        spec["job_dir"],
        spec.get("init_checkpoint"),
        save_checkpoint=spec.get("save_checkpoint", False),
    )


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-task means over seeds and the GLUE average (unweighted mean of the task scores)."""
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        by_task.setdefault(r["task"], []).append(r)
    tasks: dict[str, Any] = {}
    for task in sorted(by_task, key=TASK_ORDER.index):
        rs = by_task[task]
        metric_names = list(rs[0]["metrics"])
        metrics = {}
        for m in metric_names:
            vals = [r["metrics"][m] for r in rs]
            metrics[m] = {"mean": _mean(vals), "std": _std(vals), "values": vals}
        scores = [r["score"] for r in rs]
        tasks[task] = {
            "score": _mean(scores),
            "score_std": _std(scores),
            "seeds": [r["seed"] for r in rs],
            "metrics": metrics,
        }
    avg = _mean([t["score"] for t in tasks.values()]) if tasks else None
    return {
        "glue_average": avg,
        "tasks": tasks,
        "convention": (
            "run score = mean of the task's metrics in percent (MNLI: acc matched+mismatched; QQP, "
            "MRPC: accuracy and F1; CoLA: Matthews; STS-B: Spearman; others: accuracy), at the end of "
            "training; task score = mean over seeds; GLUE average = unweighted mean of task scores"
        ),
    }


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs))


def _std(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mu = _mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def results_markdown(summary: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> str:
    """The results as markdown: per-task table with the GLUE average, then every run."""
    lines = ["# GLUE results", "", "| Task | Metrics | Seeds | Score (mean ± std) |", "|---|---|---|---|"]
    for task, t in summary["tasks"].items():
        metrics = ", ".join(f"{m} {v['mean']:.2f}" for m, v in t["metrics"].items())
        lines.append(
            f"| {task.upper()} | {metrics} | {len(t['seeds'])} | {t['score']:.2f} ± {t['score_std']:.2f} |"
        )
    if summary["glue_average"] is not None:
        lines.append(f"| **GLUE average** | | | **{summary['glue_average']:.2f}** |")
    lines += [
        "",
        summary["convention"] + ".",
        "",
        "## Runs",
        "",
        "| Task | Seed | Metrics | Started from | Time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        metrics = ", ".join(f"{m} {v:.2f}" for m, v in r["metrics"].items())
        lines.append(f"| {r['task']} | {r['seed']} | {metrics} | {r['started_from']} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def run_glue(
    recipe: str | os.PathLike,
    overrides: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    num_seeds: int | None = None,
    out: str | None = None,
    checkpoint: str | None = None,
    parallel: bool | None = None,
) -> dict[str, Any]:
    """Finetune and score a recipe's GLUE tasks; writes results.json and results.md into the output folder."""
    overrides = list(overrides or [])
    if checkpoint is not None:
        overrides.append(f"glue.checkpoint={checkpoint}")
    if out is not None:
        overrides.append(f"glue.output_dir={out}")
    cfg, glue = load_glue_recipe(recipe, overrides)
    jobs = plan_jobs(glue, tasks, num_seeds)
    check_starting_weights(cfg, glue)  # fail before any training
    if glue.mnli_checkpoint:
        glue.mnli_checkpoint = str(resolve_checkpoint(glue.mnli_checkpoint, key="glue.mnli_checkpoint"))
    if glue.make_toy_data and glue.data_dir:
        root = Path(os.path.expanduser(glue.data_dir))
        missing = sorted(
            {j.task for j in jobs if _find_task_folder(root, j.task) is None}, key=TASK_ORDER.index
        )
        if missing:
            make_toy_glue(root, missing)
    if glue.data_dir is not None:  # fail fast on missing files, before hours of MNLI
        root = Path(os.path.expanduser(glue.data_dir))
        if not root.is_dir():
            load_task_splits(jobs[0].task, glue.data_dir)  # raises the missing data_dir error
        for task in sorted({j.task for j in jobs}):
            folder = _task_folder(root, task)
            for split in ["train", *TASKS[task].eval_splits.values()]:
                _split_file(folder, split)
    out_dir = Path(glue.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    n_gpus = torch.cuda.device_count() if _device(glue) == "gpu" else 0
    use_parallel = (glue.parallel if parallel is None else parallel) and n_gpus > 1
    runs_mnli = any(j.task == "mnli" for j in jobs)
    first_mnli = next((j for j in jobs if j.task == "mnli"), None)
    specs = []
    for job in jobs:
        from_mnli = job.task in glue.start_from_mnli and job.task != "mnli"
        specs.append(
            {
                "job": dataclasses.asdict(job),
                "job_dir": str(out_dir / job.name),
                # Without an MNLI job in this run, an earlier run's MNLI checkpoint may be named instead.
                "init_checkpoint": glue.mnli_checkpoint if from_mnli and not runs_mnli else None,
                "wait_for_mnli": from_mnli and runs_mnli,
                "save_checkpoint": job is first_mnli and any(s for s in glue.start_from_mnli if s != "mnli"),
            }
        )
    # MNLI first (others wait for it), then the rest of the first round, then the jobs that start from MNLI.
    specs.sort(key=lambda sp: (not sp["save_checkpoint"], sp["wait_for_mnli"]))
    if use_parallel:
        runs = _run_parallel(str(recipe), overrides, specs, n_gpus)
    else:
        runs = _run_serial(cfg, glue, specs)
    runs.sort(key=lambda r: (TASK_ORDER.index(r["task"]), r["seed"]))
    summary = summarize(runs)
    summary["runs"] = runs
    summary["output_dir"] = str(out_dir)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "results.md").write_text(results_markdown(summary, runs))
    return summary


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def register_cli(app: Any) -> None:
    """Add ``llmfoundry-lite glue RECIPE [overrides] [--tasks ...] [--seeds N] [--out DIR] [--checkpoint P]``."""
    import typer

    @app.command("glue")
    def glue_command(
        recipe: str = typer.Argument(
            ..., help="GLUE recipe YAML (a pretraining recipe with a 'glue:' section)."
        ),
        overrides: Optional[list[str]] = typer.Argument(None, help="Overrides: glue.tasks.rte.lr=2e-5 ..."),
        tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated subset, e.g. mnli,rte."),
        seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds per task (default: the recipe's)."),
        out: Optional[str] = typer.Option(None, "--out", help="Output folder (default: glue.output_dir)."),
        checkpoint: Optional[str] = typer.Option(
            None, "--checkpoint", help="Composer checkpoint to start from."
        ),
        parallel: Optional[bool] = typer.Option(
            None, "--parallel/--serial", help="One job per GPU (>1 GPU)."
        ),
    ) -> None:
        """Finetune a pretrained checkpoint on GLUE and report per-task scores and the GLUE average."""
        import datasets

        datasets.disable_progress_bars()  # one bar per split and job drowns the results
        task_list = [t for t in (tasks or "").split(",") if t.strip()] or None
        summary = run_glue(recipe, overrides, task_list, seeds, out, checkpoint, parallel)
        md = results_markdown(summary, summary["runs"]).split("\n## Runs")[0]
        typer.echo(md.rstrip())
        typer.echo(f"\nwrote results.json and results.md to {summary['output_dir']}")


if __name__ == "__main__":
    _worker_main(sys.argv[1])
