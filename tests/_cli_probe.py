"""The CLI in a fresh interpreter, reporting which heavy packages it imported (fast show/validate tests)."""

from __future__ import annotations

import ast
import subprocess
import sys

HEAVY = ("torch", "composer", "transformers", "streaming")


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``llmfoundry-lite ARGS`` in a fresh interpreter; stderr's line ``HEAVY [...]`` lists what it imported."""
    code = (
        "import sys\nfrom llmfoundry_lite.cli import main\nrc = main(sys.argv[1:])\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)\nsys.exit(rc)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300
    )


def heavy_imported(proc: subprocess.CompletedProcess) -> list[str]:
    """The heavy packages a :func:`run_cli` process imported."""
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("HEAVY"))
    return ast.literal_eval(line.split(" ", 1)[1])
