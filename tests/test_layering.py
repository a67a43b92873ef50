"""Arrows point down: every import of the package (those inside functions too) goes to a layer below its own, or
within its own part; and the imports form no circle. The package order is written here once."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmfoundry_lite"
# The package order, lowest first: a part (a top-level module or subpackage) may import the parts of lower
# layers only; parts of one layer are siblings and do not import each other. ``llmfoundry_lite`` is the
# package's own ``__init__`` (a facade over recipe/ and train/, like cli.py).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("compat", "startup", "quiet", "procs", "checkpoints"),  # stdlib-level helpers and dependency shims
    ("typecheck",),  # YAML values against annotations; durations without Composer
    ("registry_index",),  # generated: the built-in entries without importing them
    ("registry",),
    ("registry_listing",),  # `list` output and the index generator
    ("hardware",),  # device and price tables, checked through the registry's dataclass checker
    ("recipe",),
    ("batch",),  # the batch contract (names, ignore index, counts) between data/ and models/
    ("models", "data"),
    ("bench",),  # timing helpers over built models
    ("train",),
    ("sweep", "apps"),
    ("cli", "llmfoundry_lite"),
)
# Upward imports tolerated for now (none): an entry that is no longer needed fails the test below.
ALLOWED_UPWARD: set[tuple[str, str]] = set()


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


def part(module: str) -> str:
    """The top-level part a module belongs to: ``llmfoundry_lite.sweep.plan`` -> ``sweep``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_of(layers: tuple[tuple[str, ...], ...] = LAYERS) -> dict[str, int]:
    """Part -> its layer's index (0 lowest)."""
    return {p: i for i, parts in enumerate(layers) for p in parts}


def upward(edges: dict[str, set[str]], layers: tuple[tuple[str, ...], ...] = LAYERS) -> list[tuple[str, str]]:
    """Imports (a, b) whose target is not below a's part: a higher layer, or a sibling of the same layer."""
    layer = layer_of(layers)
    return sorted(
        (a, b)
        for a, targets in edges.items()
        for b in targets
        if part(a) != part(b) and layer[part(b)] >= layer[part(a)]
    )


def test_order_check_sees_upward_and_sibling_imports(tmp_path):
    pkg = tmp_path / "llmfoundry_lite"
    for sub in ("low", "mid", "side"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("def f():\n    import llmfoundry_lite.mid.b\n")  # lazy, upward
    (pkg / "mid" / "b.py").write_text(
        "from llmfoundry_lite.low import a\nfrom llmfoundry_lite.side import c\n"
    )
    (pkg / "side" / "c.py").write_text("")
    layers = (("low",), ("mid", "side"), ("llmfoundry_lite",))
    found = upward(import_edges(package_modules(pkg)), layers)
    assert found == [
        ("llmfoundry_lite.low.a", "llmfoundry_lite.mid.b"),
        ("llmfoundry_lite.mid.b", "llmfoundry_lite.side"),  # siblings do not import each other
        ("llmfoundry_lite.mid.b", "llmfoundry_lite.side.c"),
    ]


def test_every_part_of_the_package_has_a_layer():
    parts = {part(m) for m in package_modules()}
    missing = parts - set(layer_of())
    assert not missing, f"add {sorted(missing)} to LAYERS in tests/test_layering.py (lowest layer first)"


def test_imports_point_down_the_package_order():
    found = set(upward(import_edges(package_modules()))) - ALLOWED_UPWARD
    assert not found, "imports against the package order: " + "; ".join(
        f"{a} -> {b}" for a, b in sorted(found)
    )


def test_allow_list_holds_only_imports_that_still_exist():
    stale = ALLOWED_UPWARD - set(upward(import_edges(package_modules())))
    assert not stale, f"fixed, remove from ALLOWED_UPWARD: {sorted(stale)}"


def test_no_import_circle():
    found = circles(import_edges(package_modules()))
    assert not found, "import circles: " + "; ".join(f"{a} <-> {b}" for a, b in sorted(found))
