"""Checks of recipe sections, registered by the modules that give the sections their meaning.

Validation must not import what it validates for (training, GLUE, the models): that would point an arrow up and
close a circle. Instead a module that owns a section registers its check when imported, e.g. training's
``register_section("fsdp", validate_fsdp)``, and validation imports the :data:`PROVIDERS` by name (as
``registry.load_builtins`` imports the built-in entries), so every check still runs on every recipe.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

# Modules whose import registers section checks. Strings, not imports: they sit above recipe/.
PROVIDERS = (
    "llmfoundry_lite.train.checks",
    "llmfoundry_lite.apps.glue.config",
)

SectionCheck = Callable[[Any], Any]
RecipeCheck = Callable[[Mapping[str, Any]], Any]

_section_checks: dict[str, dict[str, SectionCheck]] = {}
_recipe_checks: dict[str, tuple[RecipeCheck, bool]] = {}
_providers_loaded = False


def _qualname(fn: Callable) -> str:
    # Keyed by name so a module imported twice (reload, tests) registers once.
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def register_section(name: str, check: SectionCheck) -> None:
    """Run ``check(value)`` on the top-level section ``name`` whenever a recipe sets it (RecipeError on a problem)."""
    from llmfoundry_lite.recipe.schema import SCHEMA_FIELDS

    if name not in SCHEMA_FIELDS:
        raise ValueError(f"{name!r} is not a top-level recipe key")
    _section_checks.setdefault(name, {})[_qualname(check)] = check


def register_check(check: RecipeCheck, *, resources: bool = False) -> None:
    """Run ``check(recipe)`` on every recipe; ``resources`` checks look outside it (files, logins) and run last,
    given the run's process count too when they take a second argument: ``check(recipe, world)``."""
    _recipe_checks[_qualname(check)] = (check, resources)


def load_providers() -> None:
    """Import the modules that register section checks (once)."""
    global _providers_loaded
    if _providers_loaded:
        return
    _providers_loaded = True
    for module in PROVIDERS:
        importlib.import_module(module)


def registered() -> dict[str, list[str]]:
    """Section (or ``*``, ``*resources``) -> names of its registered checks, providers loaded."""
    load_providers()
    out = {name: list(checks) for name, checks in _section_checks.items()}
    out["*"] = [k for k, (_, res) in _recipe_checks.items() if not res]
    out["*resources"] = [k for k, (_, res) in _recipe_checks.items() if res]
    return out


def run_section_checks(data: Mapping[str, Any]) -> None:
    """Every registered check of each section ``data`` sets, then every whole-recipe check (not resources)."""
    load_providers()
    for name, checks in _section_checks.items():
        if data.get(name) is not None:
            for check in list(checks.values()):
                check(data[name])
    for check, resources in list(_recipe_checks.values()):
        if not resources:
            check(data)


def run_resource_checks(data: Mapping[str, Any], world: int = 1) -> None:
    """The registered checks of what a run on ``world`` processes needs outside the recipe (data, tokenizer
    files, logins). ``validate`` and ``train`` both run them, before anything is built."""
    load_providers()
    for check, resources in list(_recipe_checks.values()):
        if resources and _takes_world(check):
            check(data, world)
        elif resources:
            check(data)


def _takes_world(check: Callable) -> bool:
    import inspect

    try:
        return len(inspect.signature(check).parameters) >= 2
    except (TypeError, ValueError):
        return False
