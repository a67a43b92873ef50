"""Run a recipe in this process, or launch it on several processes/nodes through Composer's launcher."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback

from llmfoundry_lite.errors import RecipeError


def run_local(recipe: str, overrides: list[str]) -> None:
    """Load, validate and train a recipe in this process (one rank of a launched job, or alone)."""
    from llmfoundry_lite.config import load_recipe
    from llmfoundry_lite.train import train

    cfg = load_recipe(recipe, overrides)
    train(cfg, recipe_path=recipe)


def launcher_command(
    recipe: str,
    overrides: list[str],
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> list[str]:
    """The ``composer`` launcher command line that runs this recipe on ``nproc`` processes per node."""
    cmd = [
        sys.executable,
        "-m",
        "composer.cli.launcher",
        "-n",
        str(nproc),
        "--world_size",
        str(nproc * nnodes),
        "--node_rank",
        str(node_rank),
        "--base_rank",
        str(node_rank * nproc),
    ]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    if master_port:
        cmd += ["--master_port", str(master_port)]
    return [*cmd, "-m", "llmfoundry_lite.launch", recipe, *overrides]


def launch(
    recipe: str,
    overrides: list[str],
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> int:
    """Start Composer's launcher for this node and return its exit code."""
    cmd = launcher_command(recipe, overrides, nproc, nnodes, node_rank, master_addr, master_port)
    return subprocess.call(cmd, env=os.environ.copy())


def entrypoint(argv: list[str]) -> int:
    """One training process: ``RECIPE [key=value ...]``; user errors exit 2 with one line."""
    if not argv:
        print("usage: composer scripts/train.py RECIPE.yaml [key=value ...]", file=sys.stderr)
        return 2
    try:
        run_local(argv[0], argv[1:])
    except RecipeError as e:
        if "--debug" in argv:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(sys.argv[1:]))
