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
# Duration keys and the units each accepts. Composer reads a bare number as epochs (`max_duration: 100` is 100
# epochs), so a unit is always required. Composer refuses `dur` and `sec` for max_duration; the progress line
# cannot count `dur` for console_log_interval; eval and save intervals take any unit, `dur` as a fraction.
DURATION_UNITS = {
    "max_duration": ("ba", "sp", "tok", "ep", "iter"),
    "eval_interval": ("ba", "sp", "tok", "ep", "iter", "dur", "sec"),
    "save_interval": ("ba", "sp", "tok", "ep", "iter", "dur", "sec"),
    "console_log_interval": ("ba", "sp", "tok", "ep", "iter", "sec"),
}
DURATION_KEYS = tuple(DURATION_UNITS)
# Keys of an optimizer block (any registry entry: llm-foundry, Composer and torch use the same names) and the
# range each must lie in; torch would only say so with a traceback once the run has started.
OPTIMIZER_RANGES = {
    "lr": ("> 0", lambda v: v > 0),
    "eps": ("> 0", lambda v: v > 0),
    "weight_decay": (">= 0", lambda v: v >= 0),
    "momentum": (">= 0", lambda v: v >= 0),
}
WANDB_FIX = (
    "run `wandb login` (or set WANDB_API_KEY), or log locally with WANDB_MODE=offline "
    "(WANDB_MODE=disabled turns wandb off)"
)


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
    from composer.core import Time

    t = Time.from_timestring(value)
    if t.value <= 0:
        raise RecipeError(f"must be positive, got {value!r}", key=key)
    unit = t.unit.value
    if unit not in allowed:
        why = {
            "dur": "a fraction of the run cannot set the run's own length" if key == "max_duration" else "",
            "sec": "Composer does not stop on wall-clock time" if key == "max_duration" else "",
        }.get(unit) or "the progress line cannot count it"
        raise RecipeError(
            f"unit {unit!r} is not allowed here ({why}); use one of {', '.join(allowed)} (e.g. '100ba')",
            key=key,
        )
    if unit == "dur" and t.value > 1:
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


def check_auto_microbatching(
    data: Mapping[str, Any], torch_version: str | None = None, composer_version: str | None = None
) -> None:
    """RecipeError for FSDP with ``device_train_microbatch_size: auto`` where Composer 0.32 breaks on it.

    Composer 0.32.x defines its FSDP unshard patch only for torch < 2.7.1, and automatic microbatching calls it
    anyway: ``NameError: patch_unshard_for_automicrobatching`` at the first batch. Versions default to the
    installed ones.
    """
    if data.get("fsdp") is None or data.get("device_train_microbatch_size") != "auto":
        return
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        torch_version = torch_version or version("torch")
        composer_version = composer_version or version("mosaicml")
    except PackageNotFoundError:
        return
    if Version(torch_version) >= Version("2.7.1") and Version(composer_version) < Version("0.33"):
        raise RecipeError(
            f"'auto' with an fsdp block fails with torch {torch_version} and Composer {composer_version} "
            "(NameError: patch_unshard_for_automicrobatching); set a number such as 8, or use torch 2.7.0",
            key="device_train_microbatch_size",
        )


def _wandb_settings_mode() -> str:
    import configparser

    config_dir = os.environ.get("WANDB_CONFIG_DIR") or os.path.join(
        os.path.expanduser("~"), ".config", "wandb"
    )
    for path in (os.path.join("wandb", "settings"), os.path.join(config_dir, "settings")):
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except configparser.Error:
            continue
        mode = parser.get("default", "mode", fallback="")
        if mode:
            return mode
    return ""


def wandb_login_problem(init_kwargs: Any = None) -> str | None:
    """Why a wandb run could not start here (no login, not offline), or None; looks only at env and files."""
    import netrc
    from urllib.parse import urlparse

    mode = os.environ.get("WANDB_MODE") or (init_kwargs or {}).get("mode") or _wandb_settings_mode()
    if str(mode).lower() in ("offline", "disabled", "dryrun"):
        return None
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return None
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    home = os.path.expanduser("~")
    # wandb's own lookup: $NETRC alone when set, else ~/.netrc or ~/_netrc.
    netrc_env = os.environ.get("NETRC")
    candidates = [netrc_env] if netrc_env else [os.path.join(home, ".netrc"), os.path.join(home, "_netrc")]
    for path in candidates:
        try:
            if netrc.netrc(os.path.expanduser(path)).authenticators(host):
                return None
        except (OSError, netrc.NetrcParseError):
            continue
    return (
        f"no wandb login found (no WANDB_API_KEY, no {host} entry in ~/.netrc) and WANDB_MODE is not offline"
    )


def validate_resources(data: Mapping[str, Any]) -> None:
    """What a run needs outside the recipe: data splits, tokenizer files (or a reachable hub), a wandb login."""
    from llmfoundry_lite.data.checks import check_recipe_data

    check_recipe_data(data)
    for keypath, default_name, block in iter_multi("loggers", data.get("loggers")):
        block = block or {}
        if block.get("name", default_name) == "wandb":
            problem = wandb_login_problem(block.get("init_kwargs"))
            if problem:
                raise RecipeError(f"{problem}; {WANDB_FIX}", key=keypath)


def world_size() -> int:
    """Processes in this run (WORLD_SIZE from the launcher; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate(data: dict, nproc: int | None = None, check_resources: bool = False) -> None:
    """Raise RecipeError (key only; the caller adds the file) for the first problem in a resolved recipe.

    With ``check_resources``, also what the run needs outside the recipe (:func:`validate_resources`).
    """
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
    from llmfoundry_lite.models.meta import check_model_shape

    check_model_shape(data["model"])
    if data.get("fsdp") is not None:
        from llmfoundry_lite.train import validate_fsdp

        validate_fsdp(data["fsdp"])
        check_auto_microbatching(data)
    if data.get("cost") is not None:
        from llmfoundry_lite.hardware import parse_cost

        parse_cost(data["cost"])
    if data.get("glue") is not None:
        from llmfoundry_lite.glue import parse_glue_section

        parse_glue_section(data["glue"])
    _check_batch_sizes(data, nproc or world_size())
    if check_resources:
        validate_resources(data)


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
    try:
        validate(data, nproc, check_resources)
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
