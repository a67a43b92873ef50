"""Validating a recipe before anything is built: the typed top-level keys, every component block against its
registry entry, durations, optimizer ranges, batch sizes, sequence lengths, then the checks the sections' owners
registered (:mod:`llmfoundry_lite.recipe.sections`). Every error names the key path; :func:`load_recipe` adds the
file that set it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError, suggest
from llmfoundry_lite.hardware import parse_cost
from llmfoundry_lite.recipe import sections
from llmfoundry_lite.recipe.load import compose
from llmfoundry_lite.recipe.schema import (
    _SCHEMA_HINTS,
    COMPONENT_SECTIONS,
    DURATION_UNITS,
    LOADER_SECTIONS,
    MULTI_SECTIONS,
    SCHEMA_FIELDS,
    compile_settings,
    iter_multi,
    with_defaults,
    with_sequence_length,
)

# Keys of an optimizer block (any registry entry: llm-foundry, Composer and torch use the same names) and the
# range each must lie in; torch would only say so with a traceback once the run has started.
OPTIMIZER_RANGES = {
    "lr": ("> 0", lambda v: v > 0),
    "eps": ("> 0", lambda v: v > 0),
    "weight_decay": (">= 0", lambda v: v >= 0),
    "momentum": (">= 0", lambda v: v >= 0),
}

_POSITIVE = ("> 0", lambda v: v > 0)
_NON_NEGATIVE = (">= 0", lambda v: v >= 0)
# Other values that torch or Composer refuse only with a traceback once the run has started, or accept and then run
# wrongly (eval_subset_num_batches 0 gives NaN metrics; a negative clipping threshold turns the gradients around).
# Keyed by top-level key, loader key, or (for algorithms/callbacks) "<entry name>.<key>".
VALUE_RANGES = {
    "device_eval_batch_size": _POSITIVE,
    "eval_subset_num_batches": ("-1 (every batch) or > 0", lambda v: v == -1 or v > 0),
    "dist_timeout": _POSITIVE,
    "num_workers": _NON_NEGATIVE,
    "prefetch_factor": _POSITIVE,
    "speed_monitor.window_size": _POSITIVE,
    "gradient_clipping.clipping_threshold": _POSITIVE,
}


def check_value_ranges(data: Mapping[str, Any]) -> None:
    """RecipeError for a number outside its :data:`VALUE_RANGES` range, naming its key path."""
    places: list[tuple[str, str, Any]] = [(k, k, data.get(k)) for k in VALUE_RANGES if "." not in k]
    for section in LOADER_SECTIONS:
        block = data.get(section)
        if isinstance(block, Mapping):
            places += [(k, f"{section}.{k}", v) for k, v in block.items()]
    for section in ("algorithms", "callbacks"):
        for keypath, default_name, block in iter_multi(section, data.get(section)):
            if isinstance(block, Mapping):
                name = block.get("name", default_name)
                places += [(f"{name}.{k}", f"{keypath}.{k}", v) for k, v in block.items()]
    for rule_key, keypath, v in places:
        rule = VALUE_RANGES.get(rule_key)
        if rule and isinstance(v, (int, float)) and not isinstance(v, bool) and not rule[1](v):
            raise RecipeError(f"must be {rule[0]}, got {v!r}", key=keypath)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_duration(key: str, value: Any) -> None:
    """RecipeError unless ``value`` is a positive Composer duration with a unit that ``key`` accepts."""
    allowed = DURATION_UNITS[key]
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if is_num or (isinstance(value, str) and _is_number(value.strip())):
        v = str(value).strip()
        if float(v).is_integer():  # 100.0 or 1e3 -> '100ba', '1000ba'
            v = str(int(float(v)))
        frac = f", '{v}dur' (fraction of the run)" if "dur" in allowed and 0 < float(v) <= 1 else ""
        raise RecipeError(
            f"a bare number is ambiguous (Composer would read {v} as {v} epochs); add a unit: '{v}ba' (batches), "
            f"'{v}ep' (epochs), '{v}sp' (samples), '{v}tok' (tokens){frac}",
            key=key,
        )
    err = registry.time_error(value)
    if err:
        raise RecipeError(err, key=key)
    amount, unit = registry.parse_duration(value)
    if amount <= 0:
        raise RecipeError(f"must be positive, got {value!r}", key=key)
    if unit not in allowed:
        why = {
            "dur": "a fraction of the run cannot set the run's own length" if key == "max_duration" else "",
            "sec": "Composer does not stop on wall-clock time" if key == "max_duration" else "",
        }.get(unit) or "the progress line cannot count it"
        raise RecipeError(
            f"unit {unit!r} is not allowed here ({why}); use one of {', '.join(allowed)} (e.g. '100ba')",
            key=key,
        )
    if unit == "dur" and amount > 1:
        raise RecipeError(f"a fraction of the run must be in (0, 1], got {value!r}", key=key)


def check_optimizer_values(block: Any, keypath: str = "optimizer") -> None:
    """RecipeError for an optimizer value torch would reject: lr/eps > 0, weight_decay/momentum >= 0, betas in [0, 1)."""
    if not isinstance(block, Mapping):
        return
    for k, (rule, ok) in OPTIMIZER_RANGES.items():
        v = block.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not ok(v):
            raise RecipeError(f"must be {rule}, got {v!r}", key=f"{keypath}.{k}")
    betas = block.get("betas")
    if betas is None:
        return
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise RecipeError(f"expected two numbers [beta1, beta2], got {betas!r}", key=f"{keypath}.betas")
    for i, b in enumerate(betas):
        if isinstance(b, (int, float)) and not isinstance(b, bool) and not 0 <= b < 1:
            raise RecipeError(
                f"beta{i + 1} must be in [0, 1), got {b!r} (e.g. betas: [0.9, 0.98])", key=f"{keypath}.betas"
            )


def check_scheduler_values(block: Any, max_duration: Any, keypath: str = "scheduler") -> None:
    """RecipeError for a schedule that cannot do what it says: a warmup that does not end before the run does (the
    learning rate would never reach ``optimizer.lr``) or a negative final multiplier ``alpha_f``."""
    if not isinstance(block, Mapping):
        return
    alpha_f = block.get("alpha_f")
    if isinstance(alpha_f, (int, float)) and not isinstance(alpha_f, bool) and alpha_f < 0:
        raise RecipeError(
            f"must be >= 0 (the final learning rate is alpha_f x lr), got {alpha_f!r}",
            key=f"{keypath}.alpha_f",
        )
    warmup = block.get("t_warmup")
    if not isinstance(warmup, str) or registry.time_error(warmup) or registry.time_error(max_duration):
        return
    amount, unit = registry.parse_duration(warmup)
    run_amount, run_unit = registry.parse_duration(str(max_duration))
    if (unit == "dur" and amount >= 1) or (unit == run_unit and amount >= run_amount):
        raise RecipeError(
            f"warmup {warmup!r} does not end before the run does (max_duration {max_duration!r}), so the learning "
            f"rate never reaches optimizer.lr; shorten it (e.g. '0.1dur')",
            key=f"{keypath}.t_warmup",
        )


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def model_context(block: Mapping[str, Any]) -> tuple[int, str] | None:
    """The longest sequence a model block accepts and the key that sets it; None when unbounded or unknown.

    Read from the entry's keys: ``max_seq_len`` (LLaMA), or ``max_position_embeddings`` with learned positions
    (classic BERT; ALiBi extrapolates beyond it). The block's value, else the entry's default. A LLaMA started
    from a local Hugging Face folder (``init_from_hf``) takes its checkpoint's ``max_position_embeddings``.
    """
    params = registry.entry_spec("models", block.get("name"), key="model.name").params

    def value(key: str) -> Any:
        return block.get(key, params[key].default) if key in params else None

    if "max_seq_len" in params and isinstance(block.get("init_from_hf"), str):
        positions = _positive_int(_hf_config(block["init_from_hf"]).get("max_position_embeddings"))
        return (positions, "model.init_from_hf") if positions else None  # a hub name: known only once loaded
    if "max_seq_len" in params and _positive_int(value("max_seq_len")):
        return value("max_seq_len"), "model.max_seq_len"
    if value("position") == "learned" and _positive_int(value("max_position_embeddings")):
        return value("max_position_embeddings"), "model.max_position_embeddings"
    return None


def _hf_config(path: str) -> dict[str, Any]:
    """A local Hugging Face folder's config.json ({} for a hub name or an unreadable file: the build says why)."""
    try:
        with open(os.path.join(os.path.expanduser(path), "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def check_sequence_lengths(data: Mapping[str, Any]) -> None:
    """RecipeError when a loader's ``max_seq_len`` differs from the recipe's, or is longer than the model takes."""
    top = data.get("max_seq_len")
    context = model_context(data["model"]) if isinstance(data.get("model"), Mapping) else None
    for name in LOADER_SECTIONS:
        block = data.get(name)
        length = _positive_int(block.get("max_seq_len")) if isinstance(block, Mapping) else None
        if length is None:
            continue
        if top is not None and length != top:
            raise RecipeError(
                f"{length} differs from the recipe's max_seq_len {top}; state the sequence length once: set "
                f"max_seq_len (the loaders read it) and remove {name}.max_seq_len",
                key=f"{name}.max_seq_len",
            )
        if context is not None and length > context[0]:
            limit, key = context
            if key == "model.init_from_hf":  # the checkpoint fixes the context: only the data can give way
                raise RecipeError(
                    f"sequences of {length} tokens are longer than the checkpoint {data['model']['init_from_hf']!r} "
                    f"takes (max_position_embeddings {limit} in its config.json); set max_seq_len to {limit} or less",
                    key=f"{name}.max_seq_len",
                )
            raise RecipeError(
                f"sequences of {length} tokens are longer than the model takes ({key} {limit}); lower max_seq_len "
                f"or raise {key}",
                key=f"{name}.max_seq_len",
            )


def world_size() -> int:
    """Processes in this run (WORLD_SIZE from the launcher; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate(data: dict, nproc: int | None = None, check_resources: bool = False) -> None:
    """Raise RecipeError (key only; the caller adds the file) for the first problem in a resolved recipe.

    With ``check_resources``, also what the run needs outside the recipe (data, tokenizer files, logins).
    """
    data = with_sequence_length(data)
    for k in data:
        if k not in SCHEMA_FIELDS:
            raise RecipeError(f"unknown top-level key {k!r}{suggest(k, SCHEMA_FIELDS)}", key=str(k))
    for name, f in SCHEMA_FIELDS.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and data.get(name) is None:
            raise RecipeError(f"missing required key {name!r}", key=name)
        if name in data and data[name] is not None:
            if name in DURATION_UNITS:
                check_duration(name, data[name])
                continue
            if name == "compile":
                compile_settings(data[name])
                continue
            err = registry.type_error(data[name], _SCHEMA_HINTS[name])
            if err:
                raise RecipeError(err, key=name)
    for section, reg in COMPONENT_SECTIONS.items():
        if data.get(section) is not None:
            registry.check_component(reg, data[section], section)
    for section, reg in MULTI_SECTIONS.items():
        for keypath, default_name, block in iter_multi(section, data.get(section)):
            registry.check_component(reg, block if block is not None else {}, keypath, default_name)
    check_optimizer_values(data["optimizer"])
    check_scheduler_values(data.get("scheduler"), data["max_duration"])
    check_value_ranges(data)
    seed = data.get("seed")
    if isinstance(seed, int) and not 0 <= seed < 2**32:  # numpy's and Composer's range
        raise RecipeError(f"must be in [0, 2^32 - 1], got {seed}", key="seed")
    check_sequence_lengths(data)
    if data.get("cost") is not None:
        parse_cost(data["cost"])
    sections.run_section_checks(data)
    _check_batch_sizes(data, nproc or world_size())
    if check_resources:  # the same function train runs before building (train/run.py)
        sections.run_resource_checks(data, nproc or world_size())


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
        # Larger than the per-process batch is fine: train caps it (a recipe runs on any process count).


def load_recipe(
    path: str | os.PathLike,
    overrides: list[str] | None = None,
    nproc: int | None = None,
    check_resources: bool = False,
) -> DictConfig:
    """Load, resolve and validate a recipe; return it as a DictConfig (``base`` removed).

    ``check_resources=True`` (``validate``, ``train``) also checks data splits, tokenizer and logger login;
    ``show`` and ``estimate`` leave it off, as they need none of them.
    """
    data, origins = compose(path, overrides)
    filled = with_sequence_length(data)
    for name in LOADER_SECTIONS:  # an error about a loader's length names the file that set max_seq_len
        if filled.get(name) is not data.get(name):
            origins.record(data["max_seq_len"], origins.file_of("max_seq_len"), f"{name}.max_seq_len")
    data = filled
    try:
        validate(data, nproc, check_resources)
    except RecipeError as e:
        raise RecipeError(e.detail, file=e.file or origins.file_of(e.key), key=e.key) from None
    return OmegaConf.create(with_defaults(data))
