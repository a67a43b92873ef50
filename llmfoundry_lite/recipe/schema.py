"""The recipe's shape: its top-level keys (:class:`RecipeSchema`) with their defaults, its component sections,
the sequence length it trains on, and its YAML text."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.hardware import CostConfig

# Top-level sections that are one component block each ({name: ..., **kwargs}).
COMPONENT_SECTIONS = {
    "model": "models",
    "tokenizer": "tokenizers",
    "train_loader": "dataloaders",
    "eval_loader": "dataloaders",
    "optimizer": "optimizers",
    "scheduler": "schedulers",
}
# Sections holding several components: a mapping keyed by name (``{speed_monitor: {window_size: 10}}``,
# an explicit ``name:`` allows two of a kind) or a list of blocks with ``name:``.
MULTI_SECTIONS = {"algorithms": "algorithms", "callbacks": "callbacks", "loggers": "loggers"}

Duration = Union[str, int]


@dataclasses.dataclass
class CompileConfig:
    """``compile:`` settings: ``torch.compile`` applied to each transformer block (the FSDP/checkpointing unit).

    ``compile: true`` takes these defaults. ``dynamic: auto`` marks a dimension dynamic once it changes (one
    recompile), ``true`` traces every size symbolically from the start, ``false`` specialises on each size.
    ``warn_recompiles``: more recompiles or graph breaks than this print one warning line naming the cause.
    """

    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    dynamic: Union[bool, Literal["auto"]] = "auto"
    fullgraph: bool = False
    backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    warn_recompiles: int = 3


@dataclasses.dataclass
class RecipeSchema:
    """Top-level keys of a recipe. Component sections are validated against the registries."""

    model: dict
    tokenizer: dict
    train_loader: dict
    optimizer: dict
    max_duration: Duration
    global_train_batch_size: int
    variables: Optional[dict] = None
    run_name: Optional[str] = None
    seed: int = 17
    max_seq_len: Optional[int] = None
    eval_loader: Optional[dict] = None
    scheduler: Optional[dict] = None
    algorithms: Optional[Union[dict, list]] = None
    callbacks: Optional[Union[dict, list]] = None
    loggers: Optional[Union[dict, list]] = None
    device_train_microbatch_size: Optional[Union[int, Literal["auto"]]] = None
    device_eval_batch_size: Optional[int] = None
    eval_interval: Duration = "1ep"
    eval_first: bool = False
    eval_subset_num_batches: int = -1
    precision: Optional[Literal["fp32", "amp_bf16", "amp_fp16", "amp_fp8"]] = None
    device: Literal["auto", "cpu", "gpu", "mps"] = "auto"
    save_folder: Optional[str] = None
    save_interval: Duration = "1000ba"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    save_weights_only: bool = False
    load_path: Optional[str] = None
    load_weights_only: bool = False
    load_strict_model_weights: bool = True
    autoresume: Optional[bool] = None
    console_log_interval: Duration = "10ba"
    log_to_console: bool = True
    progress_bar: bool = False
    python_log_level: Optional[str] = None
    dist_timeout: float = 600.0
    deterministic: bool = False
    fsdp: Optional[dict] = None
    glue: Optional[dict] = None
    cost: Optional[CostConfig] = None
    compile: Optional[Union[bool, CompileConfig]] = None


SCHEMA_FIELDS = {f.name: f for f in dataclasses.fields(RecipeSchema)}
_SCHEMA_HINTS = typing.get_type_hints(RecipeSchema)
# Duration keys and the units each accepts. Composer reads a bare number as epochs (`max_duration: 100` is 100
# epochs), so a unit is always required. Composer refuses `dur` and `sec` for max_duration; the other intervals
# take any unit, `dur` as a fraction of the run.
DURATION_UNITS = {
    "max_duration": ("ba", "sp", "tok", "ep", "iter"),
    "eval_interval": ("ba", "sp", "tok", "ep", "iter", "dur", "sec"),
    "save_interval": ("ba", "sp", "tok", "ep", "iter", "dur", "sec"),
    "console_log_interval": ("ba", "sp", "tok", "ep", "iter", "dur", "sec"),
}
DURATION_KEYS = tuple(DURATION_UNITS)


def compile_settings(value: Any, key: str = "compile") -> Optional[CompileConfig]:
    """The recipe's ``compile:`` value as settings (None when off); RecipeError naming the key otherwise."""
    if value is None or value is False:
        return None
    if value is True:
        return CompileConfig()
    if not isinstance(value, Mapping):
        raise RecipeError(
            f"expected true, false or a mapping such as {{mode: default, dynamic: auto}}, got {value!r}",
            key=key,
        )
    registry.check_dataclass(CompileConfig, dict(value), key)
    settings = CompileConfig(**value)
    if settings.warn_recompiles < 0:
        raise RecipeError(f"must be >= 0, got {settings.warn_recompiles}", key=f"{key}.warn_recompiles")
    return settings


def iter_multi(section: str, value: Any) -> list[tuple[str, str | None, Any]]:
    """(keypath, default_name, block) for each entry of a dict-of-components or list section."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [(f"{section}.{k}", str(k), v) for k, v in value.items()]
    if isinstance(value, list):
        return [(f"{section}[{i}]", None, v) for i, v in enumerate(value)]
    raise RecipeError(
        f"expected a mapping of name -> arguments (or a list of blocks with 'name:'), got {value!r}",
        key=section,
    )


def with_defaults(data: dict) -> dict:
    """The recipe with every unset top-level key at its schema default (what the run actually uses)."""
    out = dict(data)
    for name, f in SCHEMA_FIELDS.items():
        if name not in out and f.default is not dataclasses.MISSING:
            out[name] = f.default
    return out


def section(cfg: Any, name: str) -> Any:
    """A top-level recipe section as plain data (None when absent), from a dict or a DictConfig."""
    value = cfg.get(name) if hasattr(cfg, "get") else None
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return value


LOADER_SECTIONS = ("train_loader", "eval_loader")


def _loader_takes_seq_len(block: Any) -> bool:
    """Whether a loader block's registry entry has a ``max_seq_len`` key (unknown names: no)."""
    if not isinstance(block, Mapping) or not isinstance(block.get("name"), str):
        return False
    try:
        spec = registry.entry_spec("dataloaders", block["name"])
    except RecipeError:
        return False
    return "max_seq_len" in spec.params


def with_sequence_length(data: dict) -> dict:
    """The recipe with the top-level ``max_seq_len`` given to each loader that does not state its own.

    A recipe states its sequence length once, at the top; the loaders (which cut the sequences) read it from there.
    """
    top = data.get("max_seq_len")
    if top is None:
        return data
    out = dict(data)
    for name in LOADER_SECTIONS:
        block = out.get(name)
        if isinstance(block, Mapping) and "max_seq_len" not in block and _loader_takes_seq_len(block):
            out[name] = {**block, "max_seq_len": top}
    return out


def sequence_length(cfg: Any, loader: str = "train_loader") -> Optional[int]:
    """The sequence length a run trains on (evaluates on, for ``eval_loader``): the one place to read it.

    The loader's ``max_seq_len`` (what cuts the batches), else the recipe's top-level ``max_seq_len``, else the
    model block's; None when the recipe states none.
    """
    for value in (
        (section(cfg, loader) or {}).get("max_seq_len"),
        cfg.get("max_seq_len"),
        (section(cfg, "model") or {}).get("max_seq_len"),
    ):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def to_yaml(cfg: DictConfig | dict) -> str:
    """The resolved recipe as YAML text."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
