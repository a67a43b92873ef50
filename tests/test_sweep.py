"""`llmfoundry-lite sweep`: grid and random search, validation up front, resumable runs, failure isolation,
dry-run commands and Slurm script, summaries (console, CSV, Markdown, PNG). Trials are real tiny CPU runs."""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmfoundry_lite.sweep import (
    METRICS_FILE,
    TRAIN_LOSS,
    parse_arguments,
    plan_sweep,
    read_metrics,
    split_values,
)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")
TRIALS = ("t000", "t001", "t002", "t003")


def fixed_overrides(tiny_bert, *swept: str) -> list[str]:
    """The tiny CPU recipe (3 batches, one eval at the end) minus the keys the sweep owns or sweeps."""
    overrides = tiny_bert(max_duration="3ba", eval_interval="3ba", save_interval="3ba")
    return [o for o in overrides if o.partition("=")[0] not in {"save_folder", *swept}]


def sweep(capsys, *args: str) -> tuple[int, str, str]:
    """Run `llmfoundry-lite sweep QUICKSTART ...` through the CLI entry point; (exit code, stdout, stderr)."""
    from llmfoundry_lite.cli import main

    rc = main(["sweep", QUICKSTART, *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def status(folder: Path) -> dict:
    return json.loads((folder / "status.json").read_text())


def loss_lines(folder: Path) -> int:
    return sum(1 for r in read_metrics(folder / METRICS_FILE) if TRAIN_LOSS in r)


def test_split_values_keeps_lists_quotes_and_interpolations_whole():
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
        ]
    )
    assert fixed == ["max_duration=50ba", "optimizer.betas=[0.9,0.98]"]
    assert [(a.key, a.kind) for a in axes] == [("optimizer.lr", "grid"), ("model.n_layers", "int")]


def test_grid_sweep_runs_summarizes_and_rerun_skips_then_resumes(tiny_bert, tmp_path, capsys, monkeypatch):
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
    expected = {
        "t000": ("1e-3", 64),
        "t001": ("1e-3", 128),
        "t002": ("3e-3", 64),
        "t003": ("3e-3", 128),
    }
    for tid, (lr, ffn) in expected.items():
        folder = out / tid
        assert status(folder)["status"] == "done"
        recipe = yaml.safe_load((folder / "recipe.yaml").read_text())  # resolved recipe of the trial
        assert recipe["run_name"] == f"grid-{tid}"
        assert recipe["optimizer"]["lr"] == float(lr) and recipe["model"]["intermediate_size"] == ffn
        assert recipe["save_folder"] == str(folder / "checkpoints")
        assert (folder / "checkpoints" / "latest-rank0.pt").exists()
        assert loss_lines(folder) == 3
        trial = json.loads((folder / "trial.json").read_text())
        assert (
            trial["command"].startswith("llmfoundry-lite train ")
            and f"run_name=grid-{tid}" in trial["command"]
        )

    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == list(TRIALS)
    assert [r["status"] for r in rows] == ["done"] * 4
    assert [r["optimizer.lr"] for r in rows] == ["1e-3", "1e-3", "3e-3", "3e-3"]
    for r in rows:
        assert math.isfinite(float(r["final_train_loss"])) and float(r["tokens_per_s"]) > 0
        assert float(r["best_metrics/eval/LanguageCrossEntropy"]) > 0 and float(r["wall_s"]) > 0
    best = [r for r in rows if r["best"] == "yes"]
    assert len(best) == 1
    assert float(best[0]["best_metrics/eval/LanguageCrossEntropy"]) == min(
        float(r["best_metrics/eval/LanguageCrossEntropy"]) for r in rows
    )
    md = (out / "summary.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 5 and "final train loss" in table[0] and "tokens/s" in table[0]  # header + 4 trials
    assert md.count("★") >= 2  # explained once, marked once
    assert "best: " + best[0]["trial"] in stdout and "final train loss" in stdout  # console table
    import matplotlib.image

    image = matplotlib.image.imread(out / "summary.png")
    assert image.shape[0] >= 300 and image.shape[1] >= 900  # loss curves + one panel per swept key

    # Rerun: nothing trains again.
    rc, stdout, _ = sweep(capsys, *args)
    assert rc == 0
    assert stdout.count("already done, skipped") == 4 and "started" not in stdout
    assert all(status(out / t)["attempts"] == 1 for t in TRIALS)

    # A trial interrupted after its last checkpoint (no status written) reruns, resumes and trains nothing new.
    (out / "t001" / "status.json").unlink()
    rc, stdout, stderr = sweep(capsys, *args)
    assert rc == 0, stdout + stderr
    assert stdout.count("already done, skipped") == 3 and "[t001] started" in stdout
    assert status(out / "t001")["status"] == "done"
    assert loss_lines(out / "t001") == 3


def test_failing_trial_is_recorded_and_others_finish(tiny_bert, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "diverge"
    rc, stdout, stderr = sweep(
        capsys, *fixed_overrides(tiny_bert), "optimizer.lr=1e-3,1e30", "--out", str(out), "--parallel", "2"
    )
    assert rc == 1, stdout + stderr
    assert status(out / "t000")["status"] == "done"
    failed = status(out / "t001")
    assert failed["status"] == "failed" and failed["returncode"] != 0
    assert "nan" in failed["error"].lower() and failed["error_tail"]
    assert "[t001] FAILED" in stdout and "1 of 2 trials failed" in stdout
    with open(out / "summary.csv", newline="") as f:
        rows = {r["trial"]: r for r in csv.DictReader(f)}
    assert rows["t000"]["status"] == "done" and rows["t000"]["best"] == "yes"
    assert rows["t001"]["status"] == "failed" and "nan" in rows["t001"]["error"].lower()
    assert "## Failed trials" in (out / "summary.md").read_text()
    assert (out / "summary.png").exists()


def test_dry_run_prints_runnable_commands_and_slurm_script(tiny_bert, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "dry"
    args = [
        *fixed_overrides(tiny_bert),
        "optimizer.lr=1e-3,3e-3",
        "optimizer.betas=[0.9,0.98],[0.9,0.95]",  # bracketed list values are not split
        "--name",
        "dry",
        "--out",
        str(out),
        "--dry-run",
    ]
    rc, stdout, stderr = sweep(capsys, *args)
    assert rc == 0, stderr
    commands = stdout.strip().splitlines()
    assert len(commands) == 4
    for tid, cmd in zip(TRIALS, commands):
        argv = shlex.split(cmd)
        assert argv[:3] == ["llmfoundry-lite", "train", QUICKSTART] and f"run_name=dry-{tid}" in argv
    assert "optimizer.betas=[0.9,0.95]" in shlex.split(commands[1])
    assert not any((out / t / "status.json").exists() for t in TRIALS)  # nothing ran
    script = out / "sweep.sbatch"
    assert "sweep.sbatch" in stderr and script.exists()
    text = script.read_text()
    assert "#SBATCH --array=0-3" in text and all(f"  {i}) " in text for i in range(4))
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for i, cmd in enumerate(commands):  # the script runs exactly the printed commands
        assert f"  {i}) dir={out / TRIALS[i]}; cmd=({cmd}) ;;" in text

    # Run one trial as a cluster would: the array task executes the printed command line verbatim (a bash
    # array parses it exactly as a shell parses the pasted line) and records the trial's status.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    task = subprocess.run(
        ["bash", str(script)],
        env={**env, "SLURM_ARRAY_TASK_ID": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert task.returncode == 0, task.stdout[-3000:]
    assert "[batch 3/3]" in task.stdout
    assert status(out / "t001")["status"] == "done"
    assert (out / "t001" / "checkpoints" / "latest-rank0.pt").exists() and loss_lines(out / "t001") == 3
    # Resubmitting the array skips the finished trial.
    again = subprocess.run(
        ["bash", str(script)],
        env={**env, "SLURM_ARRAY_TASK_ID": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and "already done" in again.stdout

    rc, stdout, _ = sweep(capsys, *[a for a in args if a != "--dry-run"], "--summary-only")
    assert rc == 0
    with open(out / "summary.csv", newline="") as f:
        rows = {r["trial"]: r for r in csv.DictReader(f)}
    assert rows["t001"]["status"] == "done" and math.isfinite(float(rows["t001"]["final_train_loss"]))
    assert rows["t002"]["status"] == "pending"
    assert rows["t001"]["optimizer.betas"] == "[0.9,0.95]"


def test_random_search_is_seeded_and_within_bounds(tiny_bert, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fixed = fixed_overrides(tiny_bert, "model.n_layers", "model.intermediate_size")
    swept = [
        "optimizer.lr=loguniform(1e-5,1e-2)",
        "optimizer.weight_decay=uniform(0.0,0.1)",
        "model.n_layers=int(1,3)",
        "model.intermediate_size=choice(64,96,128)",
        "optimizer.eps=1e-8,1e-6",  # a grid axis in a random search is a choice
    ]

    def draw(seed: int):
        plan = plan_sweep(QUICKSTART, [*fixed, *swept], samples=12, seed=seed, out=tmp_path / f"r{seed}")
        return plan, [t.params for t in plan.trials]

    plan, first = draw(7)
    assert draw(7)[1] == first  # reproducible
    assert draw(8)[1] != first
    assert len(first) == 12
    for p in first:
        assert 1e-5 <= float(p["optimizer.lr"]) <= 1e-2
        assert 0.0 <= float(p["optimizer.weight_decay"]) <= 0.1
        assert p["model.n_layers"] in {"1", "2", "3"}
        assert p["model.intermediate_size"] in {"64", "96", "128"}
        assert p["optimizer.eps"] in {"1e-8", "1e-6"}
    lrs = sorted(float(p["optimizer.lr"]) for p in first)
    assert lrs[0] < 1e-4 and lrs[-1] > 1e-3  # log-uniform spreads over the decades
    recipe = yaml.safe_load(plan.trials[0].resolved_yaml)  # values reach the validated recipe as numbers
    assert recipe["optimizer"]["lr"] == float(first[0]["optimizer.lr"])
    assert recipe["model"]["n_layers"] == int(first[0]["model.n_layers"])

    rc, stdout, _ = sweep(capsys, *fixed, *swept, "--samples", "3", "--seed", "7", "--out", "rs", "--dry-run")
    assert rc == 0 and len(stdout.strip().splitlines()) == 3
    assert f"optimizer.lr={first[0]['optimizer.lr']}" in shlex.split(stdout.splitlines()[0])

    rc, _, stderr = sweep(capsys, *fixed, "optimizer.lr=loguniform(1e-5,1e-3)", "--dry-run")
    assert rc == 2 and "--samples" in stderr
    rc, _, stderr = sweep(capsys, *fixed, "optimizer.lr=loguniform(0,1e-3)", "--samples", "2", "--dry-run")
    assert rc == 2 and "positive" in stderr


def test_bad_key_or_value_stops_the_sweep_before_anything_starts(tiny_bert, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fixed = fixed_overrides(tiny_bert, "model.n_layers")
    out = tmp_path / "bad"
    rc, stdout, stderr = sweep(capsys, *fixed, "optimizer.lrr=1e-3,1e-2", "--out", str(out))
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "optimizer.lrr" in lines[0] and "did you mean 'lr'" in lines[0]
    assert "Traceback" not in stderr and not out.exists()
    # One bad value among good ones: the message names the trial.
    rc, _, stderr = sweep(capsys, *fixed, "model.n_layers=1,two", "--out", str(out))
    assert rc == 2 and "model.n_layers" in stderr and "t001" in stderr and not out.exists()
    rc, _, stderr = sweep(capsys, *fixed, "--out", str(out))
    assert rc == 2 and "nothing to sweep" in stderr
    # Trials are validated for the number of processes each will run on (--nproc).
    rc, _, stderr = sweep(capsys, *fixed, "optimizer.lr=1e-3,1e-2", "--nproc", "3", "--out", str(out))
    assert rc == 2 and "global_train_batch_size" in stderr and "divisible" in stderr and not out.exists()
    per_device = [
        *fixed_overrides(tiny_bert, "device_train_microbatch_size"),
        "device_train_microbatch_size=2",
    ]
    rc, stdout, _ = sweep(
        capsys, *per_device, "optimizer.lr=1e-3,1e-2", "--nproc", "2", "--out", "np", "--dry-run"
    )
    assert rc == 0 and all(shlex.split(c)[-2:] == ["--nproc", "2"] for c in stdout.strip().splitlines())


def test_folder_of_another_sweep_is_refused(tiny_bert, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fixed = fixed_overrides(tiny_bert)
    rc, _, _ = sweep(capsys, *fixed, "optimizer.lr=1e-3,3e-3", "--name", "same", "--dry-run")
    assert rc == 0 and (tmp_path / "sweeps" / "same" / "t001" / "trial.json").exists()  # default --out
    rc, _, stderr = sweep(capsys, *fixed, "optimizer.lr=1e-2,3e-2", "--name", "same", "--dry-run")
    assert rc == 2 and "different trial" in stderr


def test_wandb_trials_are_grouped_under_the_sweep_name(tiny_bert, tmp_path):
    fixed = fixed_overrides(tiny_bert)
    plan = plan_sweep(
        QUICKSTART, [*fixed, "loggers.wandb.project=p", "optimizer.lr=1e-3,3e-3"], name="grp", out=tmp_path
    )
    for t in plan.trials:
        assert "loggers.wandb.group=grp" in t.overrides
        assert yaml.safe_load(t.resolved_yaml)["loggers"]["wandb"]["group"] == "grp"
    plain = plan_sweep(QUICKSTART, [*fixed, "optimizer.lr=1e-3,3e-3"], name="grp", out=tmp_path)
    assert not any(o.startswith("loggers.wandb") for o in plain.trials[0].overrides)


@pytest.mark.parametrize(
    "arg", ["optimizer.lr=1e-3,,1e-2", "optimizer.lr=uniform(1)", "model.n_layers=int(1,x)"]
)
def test_malformed_sweep_values_are_one_line_errors(tmp_path, capsys, monkeypatch, arg):
    monkeypatch.chdir(tmp_path)
    rc, _, stderr = sweep(capsys, arg, "--dry-run")
    assert rc == 2 and arg.partition("=")[0] in stderr and len(stderr.strip().splitlines()) == 1
