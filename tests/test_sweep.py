"""`llmfoundry-lite sweep` on Optuna: grammar -> distributions, validation up front, a grid run with its summary
and plots, rerun continuing the study, the dry-run Slurm array whose tasks are workers of one study (two of them
sharing a journal storage without running a trial twice). Trials are real tiny CPU runs."""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmfoundry_lite.sweep import METRICS_FILE, TRAIN_LOSS, read_metrics
from llmfoundry_lite.sweep.grammar import parse_arguments, split_values
from llmfoundry_lite.sweep.plan import plan_sweep
from llmfoundry_lite.sweep.storage import default_storage, open_storage

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")


def fixed_overrides(tiny_bert, *swept: str, **extra) -> list[str]:
    """The tiny CPU recipe (3 batches, one eval at the end) minus the keys the sweep owns or sweeps."""
    values = {"max_duration": "3ba", "eval_interval": "3ba", "save_interval": "3ba", **extra}
    overrides = tiny_bert(**values)
    return [o for o in overrides if o.partition("=")[0] not in {"save_folder", *swept}]


def sweep(capsys, *args: str) -> tuple[int, str, str]:
    """Run `llmfoundry-lite sweep QUICKSTART ...` through the CLI entry point; (exit code, stdout, stderr)."""
    from llmfoundry_lite.cli import main

    rc = main(["sweep", QUICKSTART, *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def loss_lines(folder: Path) -> int:
    return sum(1 for r in read_metrics(folder / METRICS_FILE) if TRAIN_LOSS in r)


def wait_for_plots(out: Path, timeout: float = 120.0) -> str:
    """The background plot process's log once it is done (the sweep command does not wait for it)."""
    from llmfoundry_lite.sweep.plots import DONE_LINE, LOG_FILE

    deadline = time.time() + timeout
    while time.time() < deadline:
        log = (out / LOG_FILE).read_text() if (out / LOG_FILE).exists() else ""
        if DONE_LINE in log:
            return log
        time.sleep(0.2)
    raise AssertionError(f"plots not drawn in {timeout:.0f} s: {log}")


def summary_rows(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as f:
        return {r["trial"]: r for r in csv.DictReader(f)}


def test_grammar_keeps_lists_whole_and_maps_axes_to_optuna_distributions():
    from optuna import distributions as d

    assert split_values("1e-4,3e-4") == ["1e-4", "3e-4"]
    assert split_values("[0.9,0.98],[0.9,0.95]") == ["[0.9,0.98]", "[0.9,0.95]"]
    assert split_values("[0.9,0.98]") == ["[0.9,0.98]"]
    assert split_values('"a,b",c') == ['"a,b"', "c"]
    assert split_values("${max_seq_len},64") == ["${max_seq_len}", "64"]
    assert split_values("{a: 1, b: 2},{a: 3}") == ["{a: 1, b: 2}", "{a: 3}"]
    fixed, axes = parse_arguments(
        [
            "max_duration=50ba",
            "optimizer.betas=[0.9,0.98]",
            "optimizer.lr=1e-4,3e-4",
            "model.n_layers=int(1,4)",
            "optimizer.weight_decay=uniform(0.0,0.1)",
            "optimizer.eps=loguniform(1e-8,1e-6)",
            "model.intermediate_size=choice(64,128)",
        ]
    )
    assert fixed == ["max_duration=50ba", "optimizer.betas=[0.9,0.98]"]
    dists = {a.key: a.distribution() for a in axes}
    assert dists["optimizer.lr"] == d.CategoricalDistribution(["1e-4", "3e-4"])  # the text as written
    assert dists["model.n_layers"] == d.IntDistribution(1, 4)
    assert dists["optimizer.weight_decay"] == d.FloatDistribution(0.0, 0.1)
    assert dists["optimizer.eps"] == d.FloatDistribution(1e-8, 1e-6, log=True)
    assert dists["model.intermediate_size"] == d.CategoricalDistribution(["64", "128"])
    n_layers = next(a for a in axes if a.key == "model.n_layers")
    assert n_layers.distribution(grid=True) == d.CategoricalDistribution(["1", "2", "3", "4"])
    assert n_layers.text(3) == "3" and axes[0].text(1.2345678e-4) == "0.00012345678"


def test_grid_sweep_runs_summarizes_and_rerun_continues_the_study(tiny_bert, tmp_path, capsys, monkeypatch):
    import optuna

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "grid"
    args = [
        *fixed_overrides(tiny_bert, "model.intermediate_size"),
        "optimizer.lr=1e-3,3e-3",
        "model.intermediate_size=64,128",
        "--name",
        "grid",
        "--out",
        str(out),
        "--parallel",
        "2",
    ]
    rc, stdout, stderr = sweep(capsys, *args)
    assert rc == 0, stdout + stderr
    assert "(grid, pruning none)" in stdout

    study = optuna.load_study(study_name="grid", storage=open_storage(default_storage(out)))
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    points = {(t.params["optimizer.lr"], t.params["model.intermediate_size"]) for t in trials}
    assert points == {("1e-3", "64"), ("1e-3", "128"), ("3e-3", "64"), ("3e-3", "128")}  # each once
    for t in trials:
        tid = f"t{t.number:03d}"
        folder = out / tid
        recipe = yaml.safe_load((folder / "recipe.yaml").read_text())  # resolved recipe of the trial
        assert recipe["run_name"] == f"grid-{tid}" and recipe["save_folder"] == str(folder / "checkpoints")
        assert recipe["optimizer"]["lr"] == float(t.params["optimizer.lr"])
        assert recipe["model"]["intermediate_size"] == int(t.params["model.intermediate_size"])
        assert (folder / "checkpoints" / "latest-rank0.pt").exists() and loss_lines(folder) == 3
        command = json.loads((folder / "trial.json").read_text())["command"]
        assert command.startswith("llmfoundry-lite train ") and f"run_name=grid-{tid}" in command
        metric = [
            r["metrics/eval/LanguageCrossEntropy"]
            for r in read_metrics(folder / METRICS_FILE)
            if "metrics/eval/LanguageCrossEntropy" in r
        ]
        assert t.value == pytest.approx(min(metric))  # the study holds each trial's best eval loss

    rows = summary_rows(out)
    assert sorted(rows) == ["t000", "t001", "t002", "t003"]
    metric = "metrics/eval/LanguageCrossEntropy"
    for r in rows.values():
        assert r["state"] == "COMPLETE" and r["batches"] == "3" and float(r["tokens_per_s"]) > 0
        assert math.isfinite(float(r["final_train_loss"])) and float(r[metric]) > 0
        assert float(r["usd"]) > 0 and float(r["device_hours"]) > 0 and float(r["wall_s"]) > 0
    best = [r for r in rows.values() if r["best"] == "yes"]
    assert len(best) == 1 and float(best[0][metric]) == min(float(r[metric]) for r in rows.values())
    assert float(best[0][metric]) == pytest.approx(study.best_value)
    md = (out / "summary.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 5 and "batches" in table[0] and "tokens/s" in table[0] and "$" in table[0]
    assert md.count("★") >= 2 and "4 complete, 0 pruned, 0 failed" in md
    assert "best: " + best[0]["trial"] in stdout and "final train loss" in stdout  # console table
    import matplotlib.image

    assert "drawn in the background" in stdout
    wait_for_plots(out)
    image = matplotlib.image.imread(out / "summary.png")
    assert image.shape[0] >= 300 and image.shape[1] >= 900  # loss curves + one panel per swept key
    for png in ("history.png", "importance.png", "parallel.png"):  # Optuna's plots (2 params: importances)
        assert matplotlib.image.imread(out / png).shape[0] >= 300, png
        assert f"`{png}`" in md

    # Rerun: the study is complete, nothing trains again.
    rc, stdout, _ = sweep(capsys, *args)
    assert rc == 0 and "started" not in stdout and "4 of 4 trials already finished" in stdout
    assert len(study.get_trials()) == 4 and all(loss_lines(out / t) == 3 for t in rows)
    wait_for_plots(out)


def test_validation_errors_stop_the_sweep_before_anything_starts(tiny_bert, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fixed = fixed_overrides(tiny_bert, "model.n_layers")
    out = tmp_path / "bad"
    rc, stdout, stderr = sweep(capsys, *fixed, "optimizer.lrr=1e-3,1e-2", "--out", str(out))
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "optimizer.lrr" in lines[0] and "did you mean 'lr'" in lines[0]
    assert "Traceback" not in stderr and not out.exists()
    # One bad value among good ones: the message names it.
    rc, _, stderr = sweep(capsys, *fixed, "model.n_layers=1,two", "--out", str(out))
    assert rc == 2 and "model.n_layers" in stderr and "model.n_layers=two" in stderr and not out.exists()
    # A range is checked at both bounds.
    rc, _, stderr = sweep(capsys, *fixed, "model.n_layers=int(0,2)", "--trials", "2", "--out", str(out))
    assert rc == 2 and "model.n_layers=0" in stderr and not out.exists()
    rc, _, stderr = sweep(capsys, *fixed, "--out", str(out))
    assert rc == 2 and "nothing to sweep" in stderr
    rc, _, stderr = sweep(capsys, *fixed, "optimizer.lr=loguniform(1e-5,1e-3)", "--out", str(out))
    assert rc == 2 and "--trials" in stderr and not out.exists()
    rc, _, stderr = sweep(capsys, *fixed, "optimizer.lr=loguniform(0,1e-3)", "--trials", "2", "--dry-run")
    assert rc == 2 and "positive" in stderr
    rc, _, stderr = sweep(
        capsys, *fixed, "optimizer.lr=uniform(1e-4,1e-3)", "--sampler", "grid", "--out", str(out)
    )
    assert rc == 2 and "--sampler grid needs listed values" in stderr and not out.exists()
    for flag, value in (("--sampler", "bayes"), ("--prune", "sometimes"), ("--direction", "up")):
        rc, _, stderr = sweep(capsys, *fixed, "optimizer.lr=1e-3,1e-2", flag, value, "--out", str(out))
        assert rc == 2 and flag in stderr and len(stderr.strip().splitlines()) == 1
    rc, _, stderr = sweep(capsys, *fixed, "optimizer.lr=1e-3,1e-2", "--storage", "study.txt", "--dry-run")
    assert rc == 2 and ".journal" in stderr
    # Trials are validated for the number of processes each will run on (--nproc).
    rc, _, stderr = sweep(capsys, *fixed, "optimizer.lr=1e-3,1e-2", "--nproc", "3", "--out", str(out))
    assert rc == 2 and "global_train_batch_size" in stderr and "divisible" in stderr and not out.exists()


def test_folder_of_another_sweep_is_refused(tiny_bert, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fixed = fixed_overrides(tiny_bert)
    rc, _, _ = sweep(capsys, *fixed, "optimizer.lr=1e-3,3e-3", "--name", "same", "--dry-run")
    assert rc == 0 and (tmp_path / "sweeps" / "same" / "sweep.json").exists()  # default --out
    rc, _, stderr = sweep(capsys, *fixed, "optimizer.lr=1e-2,3e-2", "--name", "same", "--dry-run")
    assert rc == 2 and "different sweep" in stderr


def test_wandb_trials_are_grouped_under_the_sweep_name(tiny_bert, tmp_path):
    from llmfoundry_lite.recipe import load_recipe

    fixed = fixed_overrides(tiny_bert)
    plan = plan_sweep(
        QUICKSTART, [*fixed, "loggers.wandb.project=p", "optimizer.lr=1e-3,3e-3"], name="grp", out=tmp_path
    )
    overrides = plan.trial_overrides("t000", {"optimizer.lr": "1e-3"})
    assert "loggers.wandb.group=grp" in overrides
    assert load_recipe(QUICKSTART, overrides)["loggers"]["wandb"]["group"] == "grp"
    plain = plan_sweep(QUICKSTART, [*fixed, "optimizer.lr=1e-3,3e-3"], name="grp", out=tmp_path)
    assert not any(
        o.startswith("loggers.wandb") for o in plain.trial_overrides("t000", {"optimizer.lr": "1e-3"})
    )


@pytest.mark.parametrize(
    "arg",
    ["optimizer.lr=1e-3,,1e-2", "optimizer.lr=uniform(1)", "model.n_layers=int(1,x)", "model.n_layers=1,1"],
)
def test_malformed_sweep_values_are_one_line_errors(tmp_path, capsys, monkeypatch, arg):
    monkeypatch.chdir(tmp_path)
    rc, _, stderr = sweep(capsys, arg, "--dry-run")
    assert rc == 2 and arg.partition("=")[0] in stderr and len(stderr.strip().splitlines()) == 1


def test_dry_run_slurm_tasks_are_workers_of_one_study_and_never_run_a_trial_twice(
    tiny_bert, tmp_path, capsys, monkeypatch
):
    """Two array tasks started together share a journal storage: the 4 grid points run once each."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "slurm"
    journal = tmp_path / "shared" / "study.journal"
    args = [
        *fixed_overrides(tiny_bert, max_duration="2ba", eval_interval="2ba", save_interval="2ba"),
        "optimizer.lr=1e-3,3e-3",
        "optimizer.betas=[0.9,0.98],[0.9,0.95]",  # bracketed list values are not split
        "--name",
        "arr",
        "--out",
        str(out),
        "--storage",
        str(journal),
        "--parallel",
        "2",
        "--dry-run",
    ]
    rc, stdout, stderr = sweep(capsys, *args)
    assert rc == 0, stderr
    argv = shlex.split(stdout.strip())
    assert argv[:3] == ["llmfoundry-lite", "sweep", QUICKSTART] and argv[-1] == "--worker"
    assert "optimizer.betas=[0.9,0.98],[0.9,0.95]" in argv and str(journal) in argv
    script = out / "sweep.sbatch"
    assert "sweep.sbatch" in stderr and script.exists() and not journal.exists()  # nothing ran
    text = script.read_text()
    assert "#SBATCH --array=0-1" in text and stdout.strip() in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    bin_dir = Path(sys.executable).parent
    if not (
        bin_dir / "llmfoundry-lite"
    ).exists():  # the package is on PYTHONPATH, not installed (GPU-image rehearsal)
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "llmfoundry-lite"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m llmfoundry_lite.cli "$@"\n')
        shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    tasks = [
        subprocess.Popen(
            ["bash", str(script)],
            env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [t.communicate(timeout=600)[0] for t in tasks]
    assert all(t.returncode == 0 for t in tasks), logs
    started = [ln for log in logs for ln in log.splitlines() if "] started" in ln]
    assert len(started) == 4 and all("summary:" not in log for log in logs)  # workers leave the summary

    study = optuna.load_study(study_name="arr", storage=JournalStorage(JournalFileBackend(str(journal))))
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    points = [(t.params["optimizer.lr"], t.params["optimizer.betas"]) for t in trials]
    assert len(set(points)) == 4  # every grid point once
    assert {t.user_attrs["sweep_folder"] for t in trials} == {"t000", "t001", "t002", "t003"}
    assert len({t.user_attrs["sweep_owner"] for t in trials}) == 2  # both workers ran trials

    rc, stdout, _ = sweep(capsys, *[a for a in args if a != "--dry-run"], "--summary-only")
    assert rc == 0 and "started" not in stdout
    rows = summary_rows(out)
    assert sorted(rows) == ["t000", "t001", "t002", "t003"] and {r["state"] for r in rows.values()} == {
        "COMPLETE"
    }
    assert {r["optimizer.betas"] for r in rows.values()} == {"[0.9,0.98]", "[0.9,0.95]"}
    recipe = yaml.safe_load((out / "t000" / "recipe.yaml").read_text())
    assert recipe["optimizer"]["betas"] in ([0.9, 0.98], [0.9, 0.95])
