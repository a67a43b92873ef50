"""The ``glue:`` recipe section: the GLUE tasks with their published finetuning settings, recipe loading, jobs.

The published MosaicBERT settings (mosaicml/examples ``benchmarks/bert``, ``yamls/finetuning/glue``) are written
here once: per task in :data:`TASKS` (learning rate, weight decay, batch size, epochs, seeds) and for every task in
:class:`GlueConfig`'s defaults (AdamW betas and eps, 6% warmup, sequence length). A recipe overrides any of them.
"""

from __future__ import annotations

import dataclasses
import os
import random
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError, suggest
from llmfoundry_lite.recipe.sections import register_section

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
    # Training order: the reference keeps each task's dataset order (finetuning_jobs.py samples with
    # shuffle=False); true reshuffles every epoch, seeded by the job's seed.
    shuffle: bool = False
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


# ---------------------------------------------------------------------------------------------------------
# Loading a GLUE recipe
# ---------------------------------------------------------------------------------------------------------

# Top-level keys finetuning reads. A GLUE recipe may consist of these alone, or carry a whole pretraining recipe
# (usually through `base:`), which is then validated as one, as `train` would.
FINETUNE_KEYS = ("model", "tokenizer", "algorithms", "glue", "variables")
# Where a GLUE recipe sets what some pretraining keys set for a pretraining run.
_GLUE_EQUIVALENT = {
    "optimizer": "glue.tasks.<task>.lr, glue.betas, glue.eps",
    "scheduler": "glue.t_warmup, glue.alpha_f",
    "max_seq_len": "glue.max_seq_len",
    "seed": "glue.seeds",
    "precision": "glue.precision",
    "device": "glue.device",
    "eval_interval": "glue.eval_interval",
    "device_train_microbatch_size": "glue.device_train_microbatch_size",
}


def _validate_recipe(data: Mapping[str, Any]) -> None:
    """Validate what finetuning reads: the whole recipe if it is a pretraining recipe, else its GLUE keys."""
    from llmfoundry_lite import recipe
    from llmfoundry_lite.train.meta import check_model_shape

    required = [
        name
        for name, f in recipe.SCHEMA_FIELDS.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [k for k in required if data.get(k) is None and k not in FINETUNE_KEYS]
    if not missing:
        recipe.validate(dict(data))
        return
    for k in data:
        if k not in recipe.SCHEMA_FIELDS:
            raise RecipeError(f"unknown top-level key {k!r}{suggest(k, recipe.SCHEMA_FIELDS)}", key=str(k))
        if k not in FINETUNE_KEYS:
            instead = f"; GLUE uses {_GLUE_EQUIVALENT[k]}" if k in _GLUE_EQUIVALENT else ""
            raise RecipeError(
                f"finetuning does not read {k!r}{instead}; remove it, or make this a whole pretraining recipe "
                f"(base: PRETRAINING.yaml; missing here: {', '.join(missing)})",
                key=str(k),
            )
    for k in ("model", "tokenizer"):
        if data.get(k) is None:
            raise RecipeError(f"missing required key {k!r}", key=k)
        registry.check_component(recipe.COMPONENT_SECTIONS[k], data[k], k)
    err = registry.type_error(data.get("variables"), typing.get_type_hints(recipe.RecipeSchema)["variables"])
    if err:
        raise RecipeError(err, key="variables")
    for keypath, default_name, block in recipe.iter_multi("algorithms", data.get("algorithms")):
        registry.check_component(
            recipe.MULTI_SECTIONS["algorithms"], block if block is not None else {}, keypath, default_name
        )
    check_model_shape(data["model"])


def load_glue_recipe(
    path: str | os.PathLike, overrides: Sequence[str] | None = None
) -> tuple[Any, GlueConfig]:
    """Load a GLUE recipe: the resolved, validated recipe (DictConfig) and its parsed ``glue:`` section.

    The recipe needs ``model``, ``tokenizer`` and ``glue`` (and ``algorithms`` where the pretraining run
    rewrote the model); a whole pretraining recipe with a ``glue:`` section works too.
    """
    from omegaconf import OmegaConf

    from llmfoundry_lite.recipe import compose

    data, origins = compose(path, list(overrides or []))
    try:
        _validate_recipe(data)
        if data.get("glue") is None:
            what = (
                "a pretraining recipe: llmfoundry-lite train " + str(path) + "; "
                if data.get("train_loader")
                else ""
            )
            raise RecipeError(
                f"this is {what or 'not a GLUE recipe: '}it has no 'glue:' section; to finetune on GLUE, use a recipe "
                "with one that bases this one (see recipes/glue/tiny.yaml)",
                key="glue",
            )
        glue = parse_glue_section(data["glue"])
    except RecipeError as e:
        raise _section_error(e, origins) from None
    return OmegaConf.create(data), glue


# ---------------------------------------------------------------------------------------------------------
# Jobs: one task, its resolved hyperparameters, one seed
# ---------------------------------------------------------------------------------------------------------


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


register_section("glue", parse_glue_section)  # validation of any recipe with a glue: section runs it
