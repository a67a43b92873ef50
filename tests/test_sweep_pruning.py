"""Early stopping across the process boundary (a trial reports its evals to the study and stops when pruned), a
diverging trial failing while the others go on, and a sweep killed mid-trial resuming it from its checkpoint.
Trials are real tiny CPU runs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna

from llmfoundry_lite.sweep import METRICS_FILE, TRAIN_LOSS, read_metrics
from llmfoundry_lite.sweep.storage import A_FOLDER, A_REQUEUED, A_RETRY_OF, default_storage, open_storage
from llmfoundry_lite.sweep.worker import PRUNED_FILE

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")


def six_batches(tiny_bert) -> list[str]:
    """The tiny CPU recipe for 6 batches, evaluating and saving every 2."""
    overrides = tiny_bert(max_duration="6ba", eval_interval="2ba", save_interval="2ba")
    return [o for o in overrides if not o.startswith("save_folder=")]


def summary_rows(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as f:
        return {r["trial"]: r for r in csv.DictReader(f)}


def test_median_pruning_stops_a_hopeless_trial_and_a_diverging_one_fails(
    tiny_bert, tmp_path, capsys, monkeypatch
):
    from llmfoundry_lite.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "prune"
    args = [*six_batches(tiny_bert), "optimizer.lr=3e-3,1e30,1e-9", "--name", "pr", "--out", str(out)]
    # Seed 0 orders the grid 3e-3, 1e-9, 1e30: the good trial sets the median the hopeless one is pruned by.
    args += ["--seed", "0", "--prune", "median", "--prune-startup", "1", "--prune-warmup", "0"]
    rc = main(["sweep", QUICKSTART, *args])
    stdout = capsys.readouterr().out
    assert rc == 1, stdout
    study = optuna.load_study(study_name="pr", storage=open_storage(default_storage(out)))
    trials = {t.params["optimizer.lr"]: t for t in study.get_trials()}
    assert [t.params["optimizer.lr"] for t in study.get_trials()] == ["3e-3", "1e-9", "1e30"]
    good, diverged, hopeless = trials["3e-3"], trials["1e30"], trials["1e-9"]
    assert good.state.name == "COMPLETE"
    assert sorted(good.intermediate_values) == [2, 4, 6]  # reported by the trial process at each eval
    assert diverged.state.name == "FAIL" and "nan" in diverged.user_attrs["sweep_error"]
    assert hopeless.state.name == "PRUNED" and list(hopeless.intermediate_values) == [2]
    assert hopeless.intermediate_values[2] > good.intermediate_values[2]
    folder = out / hopeless.user_attrs[A_FOLDER]
    marker = json.loads((folder / PRUNED_FILE).read_text())
    assert marker["batch"] == 2 and marker["metric"] == "metrics/eval/LanguageCrossEntropy"
    # It stopped cleanly at batch 2: two losses logged, the run's last line says where.
    assert sum(1 for r in read_metrics(folder / METRICS_FILE) if TRAIN_LOSS in r) == 2
    log = (folder / "train.log").read_text()
    assert (
        "sweep: trial pruned at batch 2 (metrics/eval/LanguageCrossEntropy" in log and "at batch 2/2" in log
    )
    assert "PRUNED at batch 2" in stdout and "FAILED" in stdout and "1 of 3 trials failed" in stdout

    rows = summary_rows(out)
    by_state = {r["state"]: r for r in rows.values()}
    assert set(by_state) == {"COMPLETE", "FAIL", "PRUNED"} and by_state["COMPLETE"]["best"] == "yes"
    assert by_state["PRUNED"]["batches"] == "2" and by_state["COMPLETE"]["batches"] == "6"
    assert "nan" in by_state["FAIL"]["error"]
    md = (out / "summary.md").read_text()
    assert "Pruning saved 4 of 14 batches" in md and "device-hours" in md and "## Failed trials" in md
    assert "pruning saved 4 of 14 batches" in stdout


def _trial_processes(marker: str) -> list[int]:
    """Ids of the processes whose command line holds ``marker`` (the trial's run name)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_a_killed_sweep_resumes_its_trial_from_the_checkpoint(tiny_bert, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "llmfoundry_lite.cli", "sweep", QUICKSTART, *six_batches(tiny_bert)]
    cmd += ["optimizer.lr=1e-3,3e-3", "--trials", "1", "--name", "kill", "--out", str(out)]
    sweep = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = out / "t000" / "checkpoints" / "latest-rank0.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), sweep.communicate()[0]
    os.kill(sweep.pid, signal.SIGKILL)  # no chance to clean up: the study keeps a RUNNING trial
    sweep.wait()
    deadline = time.time() + 60  # the trial gets SIGTERM when its parent dies and checkpoints on the way out
    while _trial_processes("run_name=kill-t000") and time.time() < deadline:
        time.sleep(0.2)
    storage = open_storage(default_storage(out))
    assert [t.state.name for t in optuna.load_study(study_name="kill", storage=storage).trials] == ["RUNNING"]

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[t000] its worker stopped: queued to resume" in again.stdout
    assert "[t000] started (resuming)" in again.stdout
    log = (out / "t000" / "train.log").read_text()
    assert "resuming run kill-t000 from batch" in log and "at batch 6/6" in log
    trials = optuna.load_study(study_name="kill", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"] and trials[0].user_attrs[A_REQUEUED]
    assert trials[1].user_attrs[A_RETRY_OF] == 0 and trials[1].user_attrs[A_FOLDER] == "t000"
    assert trials[1].params == trials[0].params
    rows = summary_rows(out)
    assert list(rows) == ["t000"] and rows["t000"]["state"] == "COMPLETE" and rows["t000"]["batches"] == "6"
