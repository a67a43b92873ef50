"""Arrows point down: the package's imports (those inside functions too) form no circle, and the recipe layer
imports nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmfoundry_lite"
# What recipe/ may import from the package: the layers below it.
RECIPE_MAY_IMPORT = {"llmfoundry_lite.errors", "llmfoundry_lite.registry", "llmfoundry_lite.hardware"}


def package_modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    mods = {}
    for p in root.rglob("*.py"):
        name = ".".join(p.relative_to(root.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def import_edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (function bodies included).

    ``from a.b import c`` counts ``a.b.c`` when that is a module, else ``a.b``; a module importing its own
    parent package, or the top-level package, is not an edge (the parent runs first in any case).
    """
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in names:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and t != "llmfoundry_lite" and not m.startswith(t + "."):
                    edges[m].add(t)
    return edges


def circles(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Pairs (a, b) with a path a -> b and a path b -> a."""

    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for n in edges[todo.pop()]:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return seen

    reach = {m: reachable(m) for m in edges}
    return sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in reach[b]})


def test_walker_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "llmfoundry_lite"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from llmfoundry_lite.sub import b\n")
    (pkg / "sub" / "b.py").write_text("import llmfoundry_lite.a\n")
    edges = import_edges(package_modules(pkg))
    assert edges["llmfoundry_lite.a"] == {"llmfoundry_lite.sub", "llmfoundry_lite.sub.b"}
    assert circles(edges) == [("llmfoundry_lite.a", "llmfoundry_lite.sub.b")]


# Circles in modules outside the recipe/train work, to be removed here when their owners break them:
# BertEncoder.from_hf (models/bert/model.py) imports hf_adapter, which imports model.py; the fix is a
# hf_adapter.encoder_from_hf(path, **overrides) called by apps/glue/model.py and tests/test_bert.py.
KNOWN_ELSEWHERE: set[tuple[str, str]] = set()


def test_no_import_circle():
    found = set(circles(import_edges(package_modules()))) - KNOWN_ELSEWHERE
    assert not found, "import circles: " + "; ".join(f"{a} <-> {b}" for a, b in sorted(found))


def test_recipe_imports_nothing_above_it():
    edges = import_edges(package_modules())
    for m, targets in edges.items():
        if m == "llmfoundry_lite.recipe" or m.startswith("llmfoundry_lite.recipe."):
            upward = {
                t
                for t in targets
                if not t.startswith("llmfoundry_lite.recipe") and t not in RECIPE_MAY_IMPORT
            }
            assert not upward, f"{m} imports {sorted(upward)}"
