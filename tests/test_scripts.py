"""Every script under scripts/ imports only what the package still has (a moved module breaks no script silently).

The scripts are benchmarks and tools run by hand, not by the suite; this checks each ``from llmfoundry_lite...
import name`` (at any depth of the file) against the package as it is, without running the script.
"""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

SCRIPTS = sorted((pathlib.Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_imports_resolve(script):
    tree = ast.parse(script.read_text(encoding="utf-8"), filename=str(script))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llmfoundry_lite"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    importlib.import_module(f"{node.module}.{alias.name}")  # a submodule, or ImportError
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("llmfoundry_lite"):
                    importlib.import_module(alias.name)
