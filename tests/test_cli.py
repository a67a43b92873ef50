"""The command line as a user runs it: exit codes, one-line errors, show/validate/list/train."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmfoundry_lite.cli import BUILTIN_VERBS, PLUGIN_VERBS, _plugin_commands, main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")
CLI = [sys.executable, "-m", "llmfoundry_lite.cli"]

# Most tests here start the CLI several times (each a fresh interpreter importing torch and Composer: seconds when
# idle, a minute when the machine is busy): a hang guard sized for that, not the suite's 300 s default.
pytestmark = pytest.mark.timeout(900)


def run(*args: str, cwd: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def test_validate_ok_and_errors_exit_2_without_traceback(tmp_path, bert_tokenizer_dir, mlm_mds_dir):
    data = [f"variables.tokenizer_path={bert_tokenizer_dir}", f"variables.data_local={mlm_mds_dir}"]
    ok = run("validate", QUICKSTART, *data)
    assert ok.returncode == 0, ok.stderr
    bad = run("validate", QUICKSTART, "optimizer.lrr=0.1")
    assert bad.returncode == 2
    lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "optimizer.lrr" in lines[0] and "did you mean 'lr'" in lines[0]
    assert "Traceback" not in bad.stderr
    missing = run("validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    debug = run("--debug", "validate", QUICKSTART, "optimizer.lrr=0.1")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_show_prints_resolved_recipe_with_parameter_count(bert_tokenizer_dir):
    out = run(
        "show",
        QUICKSTART,
        "optimizer.lr=3e-4",
        "variables.data_local=/x/y",
        f"variables.tokenizer_path={bert_tokenizer_dir}",
    )
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first.startswith("# parameters:") and "M;" in first, first
    cfg = yaml.safe_load(out.stdout)
    assert cfg["optimizer"]["lr"] == 3e-4
    assert cfg["train_loader"]["local"] == "/x/y"  # interpolation resolved
    assert "base" not in cfg and cfg["precision"] == "fp32"


def test_list_shows_names_with_descriptions():
    out = run("list", "optimizers")
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "decoupled_adamw" in ln)
    assert len(line.split()) > 1
    out = run("list")
    for reg in (
        "models",
        "tokenizers",
        "dataloaders",
        "collators",
        "schedulers",
        "algorithms",
        "callbacks",
        "loggers",
        "metrics",
    ):
        assert f"{reg}:" in out.stdout
    bad = run("list", "optimisers")
    assert bad.returncode == 2 and "did you mean 'optimizers'" in bad.stderr


def test_train_tiny_run_from_cli(tiny_bert, tmp_path):
    out = run("train", QUICKSTART, *tiny_bert(run_name="cli"), cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[batch 4/4]" in out.stdout and "loss" in out.stdout and "tok/s" in out.stdout
    assert (tmp_path / "runs" / "cli" / "recipe.yaml").exists()


def test_composer_launcher_runs_scripts_train(tiny_bert, tmp_path):
    """`composer -n 1 scripts/train.py RECIPE key=value` (llm-foundry users' habit) works too."""
    cmd = [
        sys.executable,
        "-m",
        "composer.cli.launcher",
        "-n",
        "1",
        str(ROOT / "scripts" / "train.py"),
        QUICKSTART,
        *tiny_bert(run_name="composer-cli", max_duration="2ba"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "runs" / "composer-cli" / "latest-rank0.pt").exists()


# ---------------------------------------------------------------------------------------------------------
# Usage mistakes: one line on stderr, exit code 2, no traceback, whatever typer/click raise
# ---------------------------------------------------------------------------------------------------------

_SCRIPT = Path(sys.executable).with_name("llmfoundry-lite")
CONSOLE = [str(_SCRIPT)] if _SCRIPT.exists() else CLI  # the installed console script when there is one

# (argv, parts the one stderr line must contain). Q stands for the quickstart recipe.
USAGE_MISTAKES = [
    (["trian", "Q"], ["no such command 'trian'", "did you mean 'train'", "see llmfoundry-lite --help"]),
    (["train"], ["missing argument RECIPE", "llmfoundry-lite train [OPTIONS] RECIPE"]),
    (["validate"], ["missing argument RECIPE", "see llmfoundry-lite validate --help"]),
    (["train", "Q", "--nproc", "abc"], ["'--nproc'", "'abc'", "not a valid integer"]),
    (["train", "Q", "--nnodes"], ["'--nnodes' requires an argument", "see llmfoundry-lite train --help"]),
    (["train", "Q", "--optimizer.lr=3e-4"], ["'--optimizer.lr'", "without dashes: optimizer.lr=3e-4"]),
    (["train", "Q", "--lr", "3e-4"], ["'--lr'", "without dashes: optimizer.lr=3e-4"]),
    (["validate", "Q", "--max-duration", "10ba"], ["'--max-duration'", "max_duration=10ba"]),
    (["train", "Q", "--nprocs", "2"], ["'--nprocs'", "did you mean '--nproc'"]),
    (["show", "Q", "--nproc", "2"], ["no such option '--nproc' for show"]),
    (["--verbose", "list"], ["no such option '--verbose'"]),
    (["list", "optimizers", "adam", "extra"], ["unexpected extra argument", "extra", "list --help"]),
    (["list", "--all"], ["no such option '--all' for list"]),
    (["list", "optimisers"], ["unknown registry 'optimisers'", "did you mean 'optimizers'"]),
    (["list", "optimizers", "decoupled_adamv"], ["unknown optimizer 'decoupled_adamv'", "'decoupled_adamw'"]),
    (["data", "bogus"], ["no such command 'bogus' for data", "see llmfoundry-lite data --help"]),
    (["data", "convrt"], ["no such command 'convrt'", "did you mean 'convert'"]),
    (["data", "convert", "--bogus"], ["no such option '--bogus'", "data convert --help"]),
    (["export"], ["missing argument CHECKPOINT", "see llmfoundry-lite export --help"]),
    (["export", "a.pt", "out", "--dtyp", "fp16"], ["'--dtyp'", "did you mean '--dtype'"]),
    (["glue", "Q", "--task", "rte"], ["'--task'", "did you mean '--tasks'"]),
    (["sweep", "Q", "--paralel", "2"], ["'--paralel'", "did you mean '--parallel'"]),
    (["estimate", "Q", "--gpus", "x"], ["'--gpus'", "'x'"]),
    (["estimate", "Q", "--mfu"], ["'--mfu' requires an argument", "estimate --help"]),
    (["doctor", "--fix"], ["no such option '--fix' for doctor"]),
]


def _stderr_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv,parts", USAGE_MISTAKES, ids=[" ".join(a) for a, _ in USAGE_MISTAKES])
def test_usage_mistake_is_one_line_exit_2(argv, parts, capsys):
    argv = [QUICKSTART if a == "Q" else a for a in argv]
    assert main(argv) == 2
    line = _stderr_line(capsys.readouterr().err)
    assert line.startswith("error: ")
    for part in parts:
        assert part in line, (part, line)


def test_usage_mistakes_through_the_console_script():
    """The installed entry point (not only main()) maps typer's exceptions to one line and exit code 2."""
    for argv, part in [
        (["trian", QUICKSTART], "did you mean 'train'"),
        (["train", QUICKSTART, "--lr", "3e-4"], "optimizer.lr=3e-4"),
        (["list", "a", "b", "c"], "unexpected extra argument"),
        (["export", "--bogus"], "'--bogus'"),
    ]:
        out = subprocess.run([*CONSOLE, *argv], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        assert part in _stderr_line(out.stderr)


def test_debug_anywhere_on_the_line_shows_the_traceback():
    for argv in (
        ["--debug", "validate", QUICKSTART, "optimizer.lrr=0.1"],
        ["validate", QUICKSTART, "--debug", "optimizer.lrr=0.1"],
        ["validate", QUICKSTART, "optimizer.lrr=0.1", "--debug"],
    ):
        out = subprocess.run([*CONSOLE, *argv], capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr
        assert "Traceback" in out.stderr and "No such option" not in out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("error: command-line override: optimizer.lrr")


HELP_GARBAGE = ("{recipe}", "<str>", "<list[str]>", "[[", "]]")


@pytest.mark.parametrize(
    "argv",
    [[], ["--help"], ["train", "-h"], ["show", "--help"], ["validate", "--help"], ["list", "--help"]]
    + [["data"], ["data", "convert", "--help"], ["sweep", "--help"], ["estimate", "--help"]]
    + [["export", "--help"], ["glue", "--help"], ["doctor", "--help"], ["eval", "--help"]]
    + [["import-recipe", "--help"]],
    ids=lambda a: " ".join(a) or "(bare)",
)
def test_help_renders_cleanly(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Usage: llmfoundry-lite" in out
    for garbage in HELP_GARBAGE:
        assert garbage not in out, (garbage, out)
    if argv in ([], ["--help"]):
        for verb in (*BUILTIN_VERBS, *PLUGIN_VERBS):
            assert f" {verb} " in out
    if argv[:1] in (["train"], ["show"], ["validate"]):
        assert "RECIPE" in out and "Path to the recipe YAML." in out


def test_help_list_and_usage_errors_import_neither_torch_nor_composer():
    """The root help lists every verb from a static table; list reads the generated registry index."""
    probe = (
        "import contextlib, io, sys\n"
        "from llmfoundry_lite.cli import main\n"
        "for argv in (['--help'], ['list'], ['list', 'optimizers'], ['trian'], ['train'], ['data', 'bogus']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        main(argv)\n"
        "print(sorted(m for m in ('torch', 'composer', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_static_verb_table_matches_the_modules():
    """The root help's one-line help of each plugin verb is the first line of the real command's help."""
    for verb, (_, help_line) in PLUGIN_VERBS.items():
        command = _plugin_commands(verb)[verb]
        assert command.help.strip().splitlines()[0] == help_line, verb


def test_registry_index_matches_the_registries():
    from llmfoundry_lite import registry_index, registry_listing

    assert registry_listing.builtin_families() == registry_index.FAMILIES, (
        "built-in model families changed: run `python scripts/registry_index.py`"
    )
    assert registry_listing.builtin_index() == registry_index.BUILTINS, (
        "built-in registry entries changed: run `python scripts/registry_index.py`"
    )
    # The generator writes the module as it stands (and as ruff formats it).
    with open(registry_index.__file__, encoding="utf-8") as f:
        assert registry_listing.render_index(registry_index.BUILTINS) == f.read()


def test_list_registry_name_shows_keys_types_and_defaults(capsys):
    assert main(["list", "optimizers", "decoupled_adamw"]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines()[2:] if ln.strip()}
    assert rows["lr"] == ["float", "0.001"]
    assert rows["betas"] == ["tuple[float,", "float]", "[0.9,", "0.95]"]
    assert "params" not in rows and "set by the framework, not the recipe: params" in out
    assert main(["list", "schedulers", "cosine_with_warmup"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"t_warmup\s+duration\s+\(required\)", out) and re.search(
        r"t_max\s+duration\s+1dur", out
    )
    assert main(["list", "dataloaders", "text"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"local\s+str \| null\s+null", out) and "collators block" in out
    assert "tokenizer, device_batch_size" in out
