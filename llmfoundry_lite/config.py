"""Recipes: load YAML (``base:`` chain, ``${...}`` interpolation, CLI overrides), then validate strictly.

Validation happens before anything is built: the typed top-level schema (:class:`RecipeSchema`), then every
component block against its registry entry's constructor signature. Every error names the file that set the
key (a base file, the recipe itself, or the command line) and the dotted key path.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError, suggest
from llmfoundry_lite.hardware import CostConfig

OVERRIDE_ORIGIN = "command-line override"

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


SCHEMA_FIELDS = {f.name: f for f in dataclasses.fields(RecipeSchema)}
_SCHEMA_HINTS = typing.get_type_hints(RecipeSchema)
DURATION_KEYS = ("max_duration", "eval_interval", "save_interval", "console_log_interval")


# ---------------------------------------------------------------------------------------------------------
# Loading: base chain + overrides, remembering which file set each key
# ---------------------------------------------------------------------------------------------------------


class Origins:
    """Which file (or the command line) last set each dotted key path."""

    def __init__(self, default: str):
        self.default = default
        self._by_path: dict[str, str] = {}

    def record(self, data: Any, source: str, prefix: str = "") -> None:
        """Mark every key path in ``data`` as set by ``source``."""
        if prefix:
            self._by_path[prefix] = source
        if isinstance(data, Mapping):
            for k, v in data.items():
                self.record(v, source, f"{prefix}.{k}" if prefix else str(k))

    def file_of(self, keypath: str | None) -> str:
        """The source of the longest recorded prefix of ``keypath``."""
        parts = (keypath or "").split(".")
        while parts and parts != [""]:
            src = self._by_path.get(".".join(parts))
            if src:
                return src
            parts.pop()
        return self.default


def _read_yaml(path: Path, referenced_from: tuple[str, str] | None) -> dict:
    if not path.is_file():
        if referenced_from:
            src, key = referenced_from
            raise RecipeError(
                f"base file {str(path)!r} does not exist; fix the path (relative to {src})", file=src, key=key
            )
        raise RecipeError(f"recipe file {str(path)!r} does not exist", file=str(path))
    try:
        with open(path, encoding="utf-8") as f:
            cfg = OmegaConf.load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"invalid YAML: {where}{problem}", file=str(path)) from None
    except OmegaConfBaseException as e:
        raise RecipeError(f"invalid recipe: {str(e).splitlines()[0]}", file=str(path)) from None
    if cfg is None or (isinstance(cfg, DictConfig) and len(cfg) == 0 and path.stat().st_size == 0):
        raise RecipeError("the recipe file is empty", file=str(path))
    if not isinstance(cfg, DictConfig):
        raise RecipeError(
            "a recipe must be a YAML mapping of keys to values at the top level", file=str(path)
        )
    return OmegaConf.to_container(cfg, resolve=False)


def deep_merge(base: Any, top: Any) -> Any:
    """``top`` over ``base``: mappings merge key by key, anything else (lists, scalars, null) replaces."""
    if isinstance(base, Mapping) and isinstance(top, Mapping):
        out = dict(base)
        for k, v in top.items():
            out[k] = deep_merge(out[k], v) if k in out else v
        return out
    return top


def _load_chain(path: Path, origins: Origins, stack: tuple[Path, ...], ref: tuple[str, str] | None) -> dict:
    """Load ``path`` merged over its ``base:`` files (depth first, later wins)."""
    resolved = path.resolve()
    if resolved in stack:
        cycle = " -> ".join(str(p) for p in (*stack, resolved))
        raise RecipeError(
            f"base cycle: {cycle}; remove one of the base references", file=str(stack[-1]), key="base"
        )
    data = _read_yaml(path, ref)
    bases = data.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise RecipeError("'base' must be a path or a list of paths", file=str(path), key="base")
    merged: dict = {}
    for i, b in enumerate(bases):
        key = "base" if len(bases) == 1 else f"base[{i}]"
        merged = deep_merge(
            merged, _load_chain(path.parent / b, origins, (*stack, resolved), (str(path), key))
        )
    origins.record(data, str(path))
    return deep_merge(merged, data)


def _parse_overrides(overrides: list[str], origins: Origins) -> dict:
    for ov in overrides:
        if "=" not in ov or ov.startswith("="):
            raise RecipeError(
                f"malformed override {ov!r}; use key.path=value (e.g. optimizer.lr=3e-4)",
                file=OVERRIDE_ORIGIN,
            )
    try:
        cfg = OmegaConf.from_dotlist([ov.lstrip("+") for ov in overrides])
    except OmegaConfBaseException as e:
        raise RecipeError(f"malformed override: {str(e).splitlines()[0]}", file=OVERRIDE_ORIGIN) from None
    data = OmegaConf.to_container(cfg, resolve=False)
    origins.record(data, OVERRIDE_ORIGIN)
    return data


def compose(path: str | os.PathLike, overrides: list[str] | None = None) -> tuple[dict, Origins]:
    """Merge the base chain and overrides and resolve interpolations; no validation."""
    path = Path(path)
    origins = Origins(str(path))
    merged = _load_chain(path, origins, (), None)
    if overrides:
        merged = deep_merge(merged, _parse_overrides(list(overrides), origins))
    try:
        data = OmegaConf.to_container(OmegaConf.create(merged), resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or None
        msg = str(e).splitlines()[0]
        raise RecipeError(
            f"cannot resolve interpolation: {msg}", file=origins.file_of(key), key=key
        ) from None
    return data, origins


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


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


def _duration_value(value: str | int) -> float:
    from composer.core import Time

    return value if isinstance(value, int) else Time.from_timestring(value).value


def world_size() -> int:
    """Processes in this run (WORLD_SIZE from the launcher; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate(data: dict, nproc: int | None = None) -> None:
    """Raise RecipeError (key only; the caller adds the file) for the first problem in a resolved recipe."""
    for k in data:
        if k not in SCHEMA_FIELDS:
            raise RecipeError(f"unknown top-level key {k!r}{suggest(k, SCHEMA_FIELDS)}", key=str(k))
    for name, f in SCHEMA_FIELDS.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and data.get(name) is None:
            raise RecipeError(f"missing required key {name!r}", key=name)
        if name in data and data[name] is not None:
            err = registry.type_error(data[name], _SCHEMA_HINTS[name])
            if err:
                raise RecipeError(err, key=name)
    for key in DURATION_KEYS:
        if key in data and data[key] is not None:
            err = registry.time_error(data[key])
            if err:
                raise RecipeError(err, key=key)
            if _duration_value(data[key]) <= 0:
                raise RecipeError(f"must be positive, got {data[key]!r}", key=key)
    for section, reg in COMPONENT_SECTIONS.items():
        if data.get(section) is not None:
            registry.check_component(reg, data[section], section)
    for section, reg in MULTI_SECTIONS.items():
        for keypath, default_name, block in iter_multi(section, data.get(section)):
            registry.check_component(reg, block if block is not None else {}, keypath, default_name)
    from llmfoundry_lite.builders import check_model_shape

    check_model_shape(data["model"])
    if data.get("fsdp") is not None:
        from llmfoundry_lite.train import validate_fsdp

        validate_fsdp(data["fsdp"])
    if data.get("cost") is not None:
        from llmfoundry_lite.hardware import parse_cost

        parse_cost(data["cost"])
    if data.get("glue") is not None:
        from llmfoundry_lite.glue import parse_glue_section

        parse_glue_section(data["glue"])
    _check_batch_sizes(data, nproc or world_size())


def _check_batch_sizes(data: dict, nproc: int) -> None:
    gbs = data["global_train_batch_size"]
    if gbs <= 0:
        raise RecipeError(f"must be a positive integer, got {gbs}", key="global_train_batch_size")
    if gbs % nproc:
        raise RecipeError(
            f"{gbs} is not divisible by the number of processes ({nproc}); "
            f"use a multiple of {nproc} such as {max(nproc, gbs // nproc * nproc)}",
            key="global_train_batch_size",
        )
    micro = data.get("device_train_microbatch_size")
    if isinstance(micro, int):
        if micro <= 0:
            raise RecipeError(
                f"must be a positive integer or 'auto', got {micro}", key="device_train_microbatch_size"
            )
        if micro > gbs // nproc:
            raise RecipeError(
                f"{micro} is larger than the per-device batch ({gbs} / {nproc} processes = {gbs // nproc})",
                key="device_train_microbatch_size",
            )


def load_recipe(
    path: str | os.PathLike, overrides: list[str] | None = None, nproc: int | None = None
) -> DictConfig:
    """Load, resolve and validate a recipe; return it as a DictConfig (``base`` removed)."""
    data, origins = compose(path, overrides)
    try:
        validate(data, nproc)
    except RecipeError as e:
        raise RecipeError(e.detail, file=e.file or origins.file_of(e.key), key=e.key) from None
    return OmegaConf.create(with_defaults(data))


def with_defaults(data: dict) -> dict:
    """The recipe with every unset top-level key at its schema default (what the run actually uses)."""
    out = dict(data)
    for name, f in SCHEMA_FIELDS.items():
        if name not in out and f.default is not dataclasses.MISSING:
            out[name] = f.default
    return out


def to_yaml(cfg: DictConfig | dict) -> str:
    """The resolved recipe as YAML text."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
