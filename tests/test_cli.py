"""The command line as a user runs it: exit codes, one-line errors, show/validate/list/train."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")
CLI = [sys.executable, "-m", "llmfoundry_lite.cli"]


def run(*args: str, cwd: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def test_validate_ok_and_errors_exit_2_without_traceback(tmp_path):
    ok = run("validate", QUICKSTART)
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
