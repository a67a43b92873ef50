"""The sweep's summary, through the real CLI: it waits for trials still running in another worker of the same
study (and ``--summary-only`` names them), its legends are readable (3 significant digits) and a one-key study
gets no parallel-coordinates plot. Trials are real tiny CPU runs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

from llmfoundry_lite.sweep.plan import plan_sweep
from llmfoundry_lite.sweep.plots import short_value, summary_figure
from llmfoundry_lite.sweep.storage import A_BEAT, A_FOLDER, A_OWNER, me
from llmfoundry_lite.sweep.summary import collect

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")


def fixed_overrides(tiny_bert) -> list[str]:
    """The tiny CPU recipe at 2 batches, one eval at the end; the sweep owns save_folder."""
    overrides = tiny_bert(max_duration="2ba", eval_interval="2ba", save_interval="2ba")
    return [o for o in overrides if not o.startswith("save_folder=")]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmfoundry_lite.cli", *args]


def wait_for_plots(out: Path, timeout: float = 120.0) -> str:
    """The background plot process's log once it is done."""
    from llmfoundry_lite.sweep.plots import DONE_LINE, LOG_FILE

    deadline = time.time() + timeout
    log = ""
    while time.time() < deadline:
        log = (out / LOG_FILE).read_text() if (out / LOG_FILE).exists() else ""
        if DONE_LINE in log:
            return log
        time.sleep(0.2)
    raise AssertionError(f"plots not drawn in {timeout:.0f} s: {log}")


def test_short_value_keeps_three_significant_digits_of_numbers_only():
    assert short_value("0.00031622776601683794") == "0.000316"
    assert short_value("3e-3") == "0.003" and short_value("128") == "128"
    assert short_value("[0.9,0.98]") == "[0.9,0.98]" and short_value("adamw") == "adamw"


def test_one_key_study_has_readable_legends_and_no_parallel_plot(tiny_bert, tmp_path):
    out = tmp_path / "one"
    args = [*fixed_overrides(tiny_bert), "optimizer.lr=loguniform(1e-4,1e-2)"]
    opts = ["--trials", "2", "--sampler", "random", "--name", "one", "--out", str(out)]
    run = subprocess.run(cli("sweep", QUICKSTART, *args, *opts), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "parallel.png" not in run.stdout and "drawn in the background" in run.stdout
    wait_for_plots(out)
    assert (out / "summary.png").exists() and (out / "history.png").exists()
    assert not (out / "parallel.png").exists() and "parallel" not in (out / "summary.md").read_text()

    plan = plan_sweep(QUICKSTART, args, name="one", out=out, trials=2, sampler="random")
    rows, metric = collect(plan, plan.open_study(create=False))
    lrs = [r.params["optimizer.lr"] for r in rows]
    assert all(len(lr) > 10 for lr in lrs)  # sampled: Optuna's full float text
    legend = [t.get_text() for t in summary_figure(plan, rows, metric).axes[0].get_legend().get_texts()]
    want = [f"{r.tid} lr={float(r.params['optimizer.lr']):.3g}" + (" ★ best" if r.best else "") for r in rows]
    assert legend == want


def test_summary_waits_for_a_trial_running_in_another_worker(tiny_bert, tmp_path):
    """This test process plays the other worker: it holds trial t000 of the study while the sweep runs t001."""
    out = tmp_path / "two"
    journal = str(tmp_path / "shared" / "study.journal")
    args = [*fixed_overrides(tiny_bert), "optimizer.lr=1e-3,3e-3"]
    opts = ["--name", "two", "--out", str(out), "--storage", journal]
    plan = plan_sweep(QUICKSTART, args, name="two", out=out, storage=journal)
    study = plan.open_study()
    held = study.ask(plan.distributions())
    for key, value in {A_FOLDER: "t000", A_OWNER: me(), A_BEAT: time.time()}.items():
        held.set_user_attr(key, value)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sweep = subprocess.Popen(
        cli("sweep", QUICKSTART, *args, *opts),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines = []
    try:
        for line in sweep.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("waiting for"):
                break
        output = "".join(lines)
        assert f"waiting for 1 trial(s) still running in other workers: t000 ({me()})" in output, output
        assert "[t001] COMPLETE" in output and not (out / "summary.csv").exists()

        only = subprocess.run(
            cli("sweep", QUICKSTART, *args, *opts, "--summary-only"), capture_output=True, text=True
        )
        assert only.returncode == 0, only.stdout + only.stderr
        assert f"1 trial(s) still running in other workers: t000 ({me()})" in only.stdout

        study.tell(held, 5.0)  # the other worker's trial ends
        rest, _ = sweep.communicate(timeout=120)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, "".join(lines) + rest
    with open(out / "summary.csv", newline="") as f:
        rows = {r["trial"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["t000", "t001"] and {r["state"] for r in rows.values()} == {"COMPLETE"}
    assert "still running" not in rest
    wait_for_plots(out)
