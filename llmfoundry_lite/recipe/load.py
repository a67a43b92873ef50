"""Reading a recipe: YAML files merged along their ``base:`` chain, CLI overrides, ``${...}`` interpolation, and
which file (or the command line) set each key, so every error can name it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmfoundry_lite.errors import RecipeError, first_line

OVERRIDE_ORIGIN = "command-line override"


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
        problem = getattr(e, "problem", None) or first_line(e)
        raise RecipeError(f"invalid YAML: {where}{problem}", file=str(path)) from None
    except OmegaConfBaseException as e:
        raise RecipeError(f"invalid recipe: {first_line(e)}", file=str(path)) from None
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
        raise RecipeError(f"malformed override: {first_line(e)}", file=OVERRIDE_ORIGIN) from None
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
        msg = first_line(e)
        raise RecipeError(
            f"cannot resolve interpolation: {msg}", file=origins.file_of(key), key=key
        ) from None
    return data, origins
