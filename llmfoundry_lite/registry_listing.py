"""What ``llmfoundry-lite list`` prints, and the generated ``registry_index.py`` that lets it (and recipe checks)
answer without importing the built-in modules: entry descriptions, and each entry's signature table.

``python scripts/registry_index.py`` regenerates the index from the live registries; tests/test_cli.py and
tests/test_fast_validate.py fail until it matches them.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import catalogue

from llmfoundry_lite.errors import first_line
from llmfoundry_lite.registry import (
    REGISTRY_NAMES,
    EntrySpec,
    check_registry_name,
    load_builtins,
    model_family,
)


def describe(obj: Any) -> str:
    """First line of an entry's docstring, for ``llmfoundry-lite list``."""
    doc = inspect.getdoc(obj) or ""
    return first_line(doc)


def builtin_entries(registry: str) -> dict[str, Any]:
    """The built-in entries of a registry (entry-point plugins left out), importing the modules that add them."""
    check_registry_name(registry)
    load_builtins()
    namespace = ("llmfoundry_lite", registry)
    return {keys[-1]: obj for keys, obj in catalogue.REGISTRY.copy().items() if tuple(keys[:-1]) == namespace}


def plugin_entry_points(registry: str) -> list[Any]:
    """The (unloaded) entry points third-party packages declare for a registry."""
    from importlib.metadata import entry_points

    return list(entry_points(group=f"llmfoundry_lite_{registry}"))


def listing(registry: str) -> dict[str, str]:
    """Entry name -> one-line description, without importing the built-in modules.

    The built-ins' descriptions come from the generated ``registry_index`` (their modules import torch and
    Composer, seconds of start-up that a listing does not need); plugins are imported for their docstrings.
    Built-ins win over a plugin of the same name, as in ``catalogue.Registry.get_all``.
    """
    check_registry_name(registry)
    from llmfoundry_lite.registry_index import BUILTINS

    result: dict[str, str] = {}
    for ep in plugin_entry_points(registry):
        try:
            result[ep.name] = describe(ep.load())
        except Exception as e:  # a broken plugin must not hide the other names
            first = first_line(str(e))
            result[ep.name] = f"(cannot be imported from {ep.value}: {type(e).__name__}: {first})"
    result.update(BUILTINS.get(registry, {}))
    return result


def builtin_index() -> dict[str, dict[str, str]]:
    """Registry -> entry name -> description of the built-ins, read from the live registries (imports torch)."""
    return {
        reg: {name: describe(obj) for name, obj in sorted(builtin_entries(reg).items())}
        for reg in REGISTRY_NAMES
    }


def builtin_signatures() -> dict[str, dict[str, dict[str, Any]]]:
    """Registry -> entry name -> :meth:`EntrySpec.row` of the built-ins, from the live registries (imports torch)."""
    return {
        reg: {name: EntrySpec.of(obj).row() for name, obj in sorted(builtin_entries(reg).items())}
        for reg in REGISTRY_NAMES
    }


def builtin_families() -> dict[str, dict[str, Any]]:
    """Built-in ``models`` entry -> what data checks and evaluation ask of its family (imports torch)."""
    out = {}
    for name in sorted(builtin_entries("models")):
        load_builtins()
        spec = model_family(name)
        if spec is not None:
            out[name] = {
                "name": spec.name,
                "objective": spec.objective,
                "takes_sequence_id": spec.takes_sequence_id,
            }
    return out


def render_index(
    index: dict[str, dict[str, str]],
    signatures: Mapping[str, Mapping[str, Any]] | None = None,
    families: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The source of ``registry_index.py`` with ``index`` as BUILTINS, ``signatures`` as SIGNATURES and ``families``
    as FAMILIES (default: the current ones). BUILTINS is laid out as ruff formats it; the rest (one item a line)
    sits between ``fmt: off`` and ``fmt: on``."""
    from llmfoundry_lite import registry_index

    if signatures is None:
        signatures = registry_index.SIGNATURES
    if families is None:
        families = registry_index.FAMILIES
    with open(registry_index.__file__, encoding="utf-8") as f:
        head = f.read().split("BUILTINS: dict[str, dict[str, str]] = ", 1)[0]
    lines = ["{"]
    for reg, entries in index.items():
        lines.append(f"    {_quote(reg)}: {{")
        lines.extend(f"        {_quote(name)}: {_quote(desc)}," for name, desc in entries.items())
        lines.append("    },")
    lines.append("}")
    sig = ["# fmt: off", "SIGNATURES: dict[str, dict[str, dict[str, Any]]] = {"]
    for reg, entries in signatures.items():
        sig.append(f"    {_quote(reg)}: {{")
        for name, row in entries.items():
            sig.append(f"        {_quote(name)}: {{")
            sig.append(f'            "var_kw": {row["var_kw"]!r}, "nested": {row["nested"]!r}, "params": [')
            sig.extend(f"                {tuple(p)!r}," for p in row["params"])
            sig.append("            ],")
            sig.append("        },")
        sig.append("    },")
    sig += ["}", "FAMILIES: dict[str, dict[str, Any]] = {"]
    sig.extend(f"    {_quote(name)}: {dict(facts)!r}," for name, facts in families.items())
    sig += ["}", "# fmt: on"]
    return head + "BUILTINS: dict[str, dict[str, str]] = " + "\n".join(lines) + "\n\n" + "\n".join(sig) + "\n"


def _quote(text: str) -> str:
    # ruff's formatter prefers double quotes unless the text holds one.
    return '"' + text.replace("\\", "\\\\") + '"' if '"' not in text else repr(text)
