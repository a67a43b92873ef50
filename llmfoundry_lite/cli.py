"""The ``llmfoundry-lite`` command: thin; parses, calls into the modules, maps user errors to exit code 2.

Start-up matters here: ``--help``, ``list`` and usage errors import neither torch nor Composer (seconds each).
Verbs of other modules are imported only when they run; the root help lists them from a static table.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Any, Optional

import typer

from llmfoundry_lite import startup
from llmfoundry_lite.compat import NO_SUCH_COMMAND, UNEXPECTED_EXTRA_ARGS, click_classes
from llmfoundry_lite.errors import RecipeError, suggest
from llmfoundry_lite.quiet import DEBUG_ENV, quiet_dependency_warnings

PROG = "llmfoundry-lite"

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="YAML-driven pretraining recipes (MosaicBERT, LLaMA) on Composer.",
)

# Verbs that live in other modules, which add them through ``register_cli(app)``: verb -> (module, one-line
# help). Only the module of the verb being run is imported (export and glue import torch and Composer); the
# root help and did-you-mean read this table. tests/test_cli.py checks the help lines match the modules'.
PLUGIN_VERBS: dict[str, tuple[str, str]] = {
    "data": (
        "llmfoundry_lite.data.cli",
        "Convert corpora to MDS shards, train tokenizers, inspect datasets.",
    ),
    "sweep": (
        "llmfoundry_lite.sweep",
        "Search recipe keys with Optuna (TPE, grid, random; median/hyperband pruning); trials are train runs.",
    ),
    "estimate": (
        "llmfoundry_lite.apps.estimate",
        "Parameters, training FLOPs, wall time, GPU-hours and dollars of a recipe.",
    ),
    "glue": (
        "llmfoundry_lite.apps.glue.cli",
        "Finetune a pretrained checkpoint on GLUE and report per-task scores and the GLUE average.",
    ),
    "eval": (
        "llmfoundry_lite.apps.evaluate.cli",
        "Score a checkpoint or HF folder on lm-evaluation-harness tasks (zero/few-shot accuracy).",
    ),
    "export": (
        "llmfoundry_lite.apps.export",
        "Export a Composer checkpoint to a Hugging Face folder (llama, MosaicBERT, BERT; GLUE classifiers).",
    ),
    "generate": (
        "llmfoundry_lite.apps.generate",
        "Generate text from a checkpoint or HF folder (tokens streamed), or fill [MASK] with an MLM.",
    ),
    "import-recipe": (
        "llmfoundry_lite.apps.import_recipe",
        "Translate an llm-foundry YAML into a recipe; list every key with no equivalent and why.",
    ),
    "doctor": (
        "llmfoundry_lite.apps.doctor",
        "Print versions (torch, composer, streaming, flash-attn, ...), GPUs, and install problems found.",
    ),
}
CLI_MODULES = {verb: module for verb, (module, _) in PLUGIN_VERBS.items()}
BUILTIN_VERBS = ("train", "show", "validate", "list")

RecipeArg = typer.Argument(..., help="Path to the recipe YAML.")
OverridesArg = typer.Argument(None, help="Overrides in dotlist syntax: optimizer.lr=3e-4 max_duration=10ba")


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors (anywhere on the line)."),
) -> None:
    """YAML-driven pretraining recipes (MosaicBERT, LLaMA) on Composer."""
    # main() takes --debug out of the line before parsing, so that it also works after the verb.


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
    from llmfoundry_lite.train import launch

    overrides = list(overrides or [])
    world = nproc * nnodes
    if world > 1 and "WORLD_SIZE" not in os.environ:
        from llmfoundry_lite.recipe import load_recipe
        from llmfoundry_lite.train.checks import check_pretraining_recipe

        check_pretraining_recipe(recipe, overrides)  # fail fast, before any process starts
        load_recipe(recipe, overrides, nproc=world, check_resources=True)
        raise typer.Exit(launch.launch(recipe, overrides, nproc, nnodes, node_rank, master_addr, master_port))
    launch.run_local(recipe, overrides)


def _load(recipe: str, overrides: list[str], check_resources: bool = False) -> Any:
    """A pretraining recipe, or a finetuning-only one (``model``/``tokenizer``/``glue``, no ``train_loader``)."""
    from llmfoundry_lite.recipe import compose, load_recipe

    data, _ = compose(recipe, overrides)
    if data.get("glue") is not None and data.get("train_loader") is None:
        from llmfoundry_lite.apps.glue.config import load_glue_recipe

        return load_glue_recipe(recipe, overrides)[0]
    return load_recipe(recipe, overrides, check_resources=check_resources)


@app.command()
def show(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Print the fully resolved recipe as YAML, with its parameter count."""
    from llmfoundry_lite.recipe import to_yaml

    cfg = _load(recipe, list(overrides or []))
    counts = _parameter_counts(cfg)
    if counts is not None:
        total, non_emb = counts
        typer.echo(f"# parameters: {total:,} ({total / 1e6:.1f}M; non-embedding {non_emb:,})")
    else:
        typer.echo(
            "# parameters: unknown (the model needs its tokenizer, which is not available here; "
            "set model.vocab_size to count without it)"
        )
    typer.echo(to_yaml(cfg), nl=False)


def _parameter_counts(cfg: Any) -> tuple[int, int] | None:
    """(total, non-embedding) parameters of the recipe's model: a built-in family's from its config, any other's
    from a meta-device build, remembered across commands (train/memo.py)."""
    from llmfoundry_lite.recipe import section
    from llmfoundry_lite.train.memo import folder_fingerprint, remembered
    from llmfoundry_lite.train.meta import static_parameters

    counts = static_parameters(cfg)
    if counts is not None:
        return counts

    def count() -> list[int] | None:
        from llmfoundry_lite.train.meta import count_parameters  # torch, Composer and the model code

        counts = count_parameters(cfg)
        return None if counts is None else list(counts)

    tokenizer = section(cfg, "tokenizer") or {}
    local = folder_fingerprint(tokenizer.get("path")) if isinstance(tokenizer, dict) else None
    if local is None:  # a hub tokenizer (or none): its files are not ours to fingerprint
        answer = count()
    else:
        answer = remembered("parameters", [section(cfg, "model"), tokenizer, local], count)
    return None if answer is None else (answer[0], answer[1])


@app.command()
def validate(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Check a recipe without training: exit 0 when valid, 2 with a message otherwise."""
    _load(recipe, list(overrides or []), check_resources=True)
    typer.echo(f"{recipe}: valid")


@app.command("list")
def list_(
    registry: Optional[str] = typer.Argument(None, help="A registry, e.g. callbacks (all when omitted)."),
    name: Optional[str] = typer.Argument(None, help="An entry: prints its recipe keys, types and defaults."),
) -> None:
    """List the names a recipe may use, with a one-line description each; REGISTRY NAME shows one entry."""
    from llmfoundry_lite.registry import REGISTRY_NAMES
    from llmfoundry_lite.registry_listing import listing

    if name is not None:
        _print_entry(registry, name)
        return
    for reg in [registry] if registry else list(REGISTRY_NAMES):
        entries = listing(reg)
        typer.echo(f"{reg}:")
        width = max((len(n) for n in entries), default=0)
        for entry in sorted(entries):
            typer.echo(f"  {entry.ljust(width)}  {entries[entry]}".rstrip())


def _print_entry(registry: str, name: str) -> None:
    """``list REGISTRY NAME``: an entry's description and recipe keys (type, default) from its signature."""
    from llmfoundry_lite import registry as reg_mod
    from llmfoundry_lite import registry_listing

    names = registry_listing.listing(
        registry
    )  # unknown registry or name: fail before importing torch and Composer
    if name not in names:
        raise RecipeError(
            f"unknown {registry[:-1]} {name!r}{suggest(name, names)}; "
            f"`{PROG} list {registry}` shows all {len(names)}"
        )
    obj = reg_mod.lookup(registry, name)
    args, supplied, var_kw = reg_mod.entry_args(registry, obj)
    where = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', name)}"
    typer.echo(f"{name} ({registry}): {registry_listing.describe(obj)}".rstrip())
    typer.echo(f"  defined in {where}")
    if args:
        rows = [("key", "type", "default")] + [(a.name, a.type, a.default or "(required)") for a in args]
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        typer.echo("")
        for key, tp, default in rows:
            typer.echo(f"  {key.ljust(widths[0])}  {tp.ljust(widths[1])}  {default}")
    else:
        typer.echo("  takes no keys besides name")
    if var_kw:
        typer.echo("  other keys are passed on unchecked (**kwargs)")
    if supplied:
        typer.echo(f"  set by the framework, not the recipe: {', '.join(supplied)}")


# ---------------------------------------------------------------------------------------------------------
# Verbs of other modules
# ---------------------------------------------------------------------------------------------------------


def _stub_commands() -> dict[str, Any]:
    """Placeholder commands carrying the plugin verbs' help lines, for the root help and did-you-mean."""
    stubs = typer.Typer()

    @stubs.callback()
    def _group() -> None:  # a callback makes typer build a group even from one command
        pass

    def _not_loaded() -> None:
        raise RuntimeError("the verb's module was not imported; run it through llmfoundry_lite.cli.main()")

    for verb, (_, help_line) in PLUGIN_VERBS.items():
        stubs.command(verb, help=help_line)(_not_loaded)
    return dict(typer.main.get_command(stubs).commands)


def _plugin_commands(verb: str) -> dict[str, Any]:
    """The real commands of the module that adds ``verb`` (imported now)."""
    module = importlib.import_module(CLI_MODULES[verb])
    scratch = typer.Typer()

    @scratch.callback()
    def _group() -> None:
        pass

    module.register_cli(scratch)
    return dict(typer.main.get_command(scratch).commands)


def build_command(argv: list[str]) -> Any:
    """The root click command for ``argv``: built-in verbs, the plugin verb it runs, stubs for the others."""
    group = typer.main.get_command(app)
    verb = _verb(argv)
    commands = _stub_commands()
    if verb in CLI_MODULES:
        commands.update(_plugin_commands(verb))
    for name in PLUGIN_VERBS:
        group.add_command(commands[name], name)
    return group


def _verb(argv: list[str]) -> str | None:
    # The root takes no option with a value, so the first word that is not an option is the verb.
    return next((a for a in argv if not a.startswith("-")), None)


# ---------------------------------------------------------------------------------------------------------
# Usage errors: one line on stderr, exit code 2, whichever click typer carries
# ---------------------------------------------------------------------------------------------------------


_USAGE_ERRORS = click_classes("ClickException")  # UsageError, BadParameter, NoSuchOption, ... are subclasses
_EXIT = click_classes("Exit")
_ABORT = click_classes("Abort")

_OVERRIDE_HINT = "overrides are written key=value without dashes"


def _one_line(text: str) -> str:
    text = " ".join(text.split()).rstrip(".")
    return text[:1].lower() + text[1:]


def _options_of(command: Any) -> list[str]:
    return [
        o for p in getattr(command, "params", []) for o in (*p.opts, *p.secondary_opts) if o.startswith("-")
    ]


def _takes_overrides(command: Any) -> bool:
    """Whether the verb's positional arguments include free ``key=value`` words (train, show, sweep, ...)."""
    return any(p.param_type_name == "argument" and p.nargs == -1 for p in getattr(command, "params", []))


def _flag_value(argv: list[str], option: str) -> str | None:
    """The value a user gave an unknown option: ``--opt=value`` or ``--opt value``."""
    for i, arg in enumerate(argv):
        if arg.startswith(option + "="):
            return arg[len(option) + 1 :]
        if arg == option and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            return argv[i + 1]
    return None


def _key_paths(argv: list[str], leaf: str) -> list[str]:
    """Dotted paths in the recipe named on the line that end in ``leaf`` (``lr`` -> ``optimizer.lr``)."""
    recipe = next((a for a in argv[1:] if not a.startswith("-") and os.path.isfile(a)), None)
    try:
        from llmfoundry_lite.recipe import SCHEMA_FIELDS, compose

        if leaf in SCHEMA_FIELDS:
            return [leaf]
        if recipe is None:
            return []
        data, _ = compose(recipe)
    except Exception:  # only a hint: an unreadable recipe gets the generic one
        return []
    found: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                path = f"{prefix}.{k}" if prefix else str(k)
                if str(k) == leaf and not path.startswith("variables."):
                    found.append(path)
                walk(v, path)

    walk(data, "")
    return found


def _no_such_option(e: Any, argv: list[str]) -> str:
    ctx = e.ctx
    option = e.option_name
    close = suggest(option, _options_of(ctx.command)) if ctx is not None else ""
    message = f"no such option {option!r} for {ctx.info_name if ctx is not None else PROG}"
    key = option.lstrip("-")
    overridable = ctx is not None and _takes_overrides(ctx.command) and option.startswith("--") and key
    if not overridable or (close and "." not in key):  # --nprocs is a typo of --nproc, not an override
        return message + close
    # A dotlist override written like a flag: --optimizer.lr=3e-4, --lr 3e-4.
    value = _flag_value(argv, option)
    snake = key.replace("-", "_")  # --max-duration means max_duration
    paths = [key] if "." in key else (_key_paths(argv, key) or _key_paths(argv, snake) or [snake])
    fixed = " or ".join(f"{p}={value if value is not None else 'VALUE'}" for p in paths[:3])
    return f"{message}; {_OVERRIDE_HINT}: {fixed}"


def usage_message(e: Any, argv: list[str]) -> str:
    """One line for a click usage error, ending with where to read the verb's usage."""
    ctx = getattr(e, "ctx", None)
    raw = e.format_message() if hasattr(e, "format_message") else str(e)
    try:
        message = _usage_detail(e, ctx, raw, argv)
    except Exception:  # click's internals differ between versions: never let the message itself fail
        message = _one_line(raw)
    if ctx is not None:
        see = ctx.command_path
    else:  # some errors (e.g. an option missing its value) come without a context
        verb = _verb(argv)
        see = f"{PROG} {verb}" if verb in (*BUILTIN_VERBS, *PLUGIN_VERBS) else PROG
    return f"{message}; see {see} --help"


def _usage_detail(e: Any, ctx: Any, raw: str, argv: list[str]) -> str:
    kind = type(e).__name__
    if kind == "NoSuchOption":
        return _no_such_option(e, argv)
    if kind == "MissingParameter" and ctx is not None and getattr(e, "param", None) is not None:
        usage = " ".join([ctx.command_path, *ctx.command.collect_usage_pieces(ctx)])
        return f"missing {e.param.param_type_name} {e.param.human_readable_name} (usage: {usage})"
    if (m := NO_SUCH_COMMAND.match(raw)) and ctx is not None:
        where = f" for {ctx.info_name}" if ctx.parent else ""
        return f"no such command {m.group(1)!r}{where}" + suggest(m.group(1), ctx.command.list_commands(ctx))
    if m := UNEXPECTED_EXTRA_ARGS.match(raw):
        where = f" for {ctx.info_name}" if ctx is not None else ""
        return f"unexpected extra argument(s){where}: {m.group(1)}"
    return _one_line(raw.split("Did you mean")[0])  # click's own suggestions come in varying forms


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    startup.install_lean_imports()  # before any verb imports Composer
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line (users add it after the verb when a command fails).
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    previous = os.environ.get(DEBUG_ENV)
    if debug:
        os.environ[DEBUG_ENV] = "1"  # worker and launcher processes inherit it (see quiet.py)
    try:
        return _main(argv, debug)
    finally:
        if previous is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = previous


def _main(argv: list[str], debug: bool) -> int:
    quiet_dependency_warnings()  # every verb: third-party warnings a user cannot act on, unless --debug
    try:
        command = build_command(argv)
        rv = command.main(args=argv, prog_name=PROG, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except RecipeError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _EXIT as e:
        return e.exit_code
    except _ABORT:
        print("aborted", file=sys.stderr)
        return 130
    except _USAGE_ERRORS as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare group (`llmfoundry-lite`, `... data`): its help
            # Building the error rendered the help: rich printed it already, plain click returns the text.
            if e.format_message().strip():
                typer.echo(e.format_message())
            return 0
        if debug:
            traceback.print_exc()
        print(f"error: {usage_message(e, argv)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The ``llmfoundry-lite`` command: :func:`main`, then exit without the interpreter's slow teardown."""
    startup.exit_fast(main())


if __name__ == "__main__":
    run()
