"""The ``llmfoundry-lite`` command: thin; parses, calls into the modules, maps user errors to exit code 2."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Optional

import click
import typer

from llmfoundry_lite.errors import RecipeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="YAML-driven pretraining recipes (MosaicBERT, LLaMA) on Composer.",
)

_DEBUG = {"on": False}

# Verbs that live in other modules, which add them through ``register_cli(app)``. Only the module of the verb
# being run is imported (some import torch and Composer, seconds of start-up); help lists them all.
CLI_MODULES = {
    "data": "llmfoundry_lite.data.cli",
    "export": "llmfoundry_lite.export",
    "glue": "llmfoundry_lite.glue",
    "sweep": "llmfoundry_lite.sweep",
    "estimate": "llmfoundry_lite.estimate",
    "doctor": "llmfoundry_lite.doctor",
}
BUILTIN_VERBS = ("train", "show", "validate", "list")

RecipeArg = typer.Argument(..., help="Path to the recipe YAML.")
OverridesArg = typer.Argument(None, help="Overrides in dotlist syntax: optimizer.lr=3e-4 max_duration=10ba")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    """YAML-driven pretraining recipes (MosaicBERT, LLaMA) on Composer."""
    if debug:
        _DEBUG["on"] = True


@app.command()
def train(
    recipe: str = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    nproc: int = typer.Option(1, "--nproc", help="Processes (GPUs) per node; >1 uses Composer's launcher."),
    nnodes: int = typer.Option(1, "--nnodes", help="Number of nodes."),
    node_rank: int = typer.Option(0, "--node-rank", help="Rank of this node."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Address of node 0."),
    master_port: Optional[int] = typer.Option(None, "--master-port", help="Port on node 0."),
) -> None:
    """Train a recipe (locally, or with --nproc/--nnodes through Composer's launcher)."""
    from llmfoundry_lite import launch

    overrides = list(overrides or [])
    world = nproc * nnodes
    if world > 1 and "WORLD_SIZE" not in os.environ:
        from llmfoundry_lite.config import load_recipe

        load_recipe(recipe, overrides, nproc=world)  # fail fast, before any process starts
        raise typer.Exit(launch.launch(recipe, overrides, nproc, nnodes, node_rank, master_addr, master_port))
    launch.run_local(recipe, overrides)


@app.command()
def show(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Print the fully resolved recipe as YAML, with its parameter count."""
    from llmfoundry_lite.builders import count_parameters
    from llmfoundry_lite.config import load_recipe, to_yaml

    cfg = load_recipe(recipe, list(overrides or []))
    counts = count_parameters(cfg)
    if counts is not None:
        total, non_emb = counts
        typer.echo(f"# parameters: {total:,} ({total / 1e6:.1f}M; non-embedding {non_emb:,})")
    else:
        typer.echo(
            "# parameters: unknown (the model needs its tokenizer, which is not available here; "
            "set model.vocab_size to count without it)"
        )
    typer.echo(to_yaml(cfg), nl=False)


@app.command()
def validate(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Check a recipe without training: exit 0 when valid, 2 with a message otherwise."""
    from llmfoundry_lite.config import load_recipe

    load_recipe(recipe, list(overrides or []))
    typer.echo(f"{recipe}: valid")


@app.command("list")
def list_(
    registry_name: Optional[str] = typer.Argument(None, metavar="[REGISTRY]", help="e.g. callbacks"),
) -> None:
    """List the names a recipe may use, with a one-line description each."""
    from llmfoundry_lite import registry

    regs = [registry_name] if registry_name else list(registry.REGISTRY_NAMES)
    for reg in regs:
        reg_obj = registry.get_registry(reg)
        typer.echo(f"{reg}:")
        entries = reg_obj.get_all()
        width = max((len(n) for n in entries), default=0)
        for name in sorted(entries):
            typer.echo(f"  {name.ljust(width)}  {registry.describe(entries[name])}")


_registered: set[str] = set()


def register_plugins(argv: list[str] | None = None) -> None:
    """Add the verbs of other modules: only the one ``argv`` asks for, or all of them (help, unknown verb)."""
    verb = next((a for a in argv or [] if not a.startswith("-")), None)
    if verb in BUILTIN_VERBS:
        return
    wanted = [CLI_MODULES[verb]] if verb in CLI_MODULES else list(CLI_MODULES.values())
    for mod in wanted:
        if mod in _registered:
            continue
        _registered.add(mod)
        importlib.import_module(mod).register_cli(app)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    register_plugins(argv)
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="llmfoundry-lite", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except RecipeError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except click.ClickException as e:
        e.show()
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
