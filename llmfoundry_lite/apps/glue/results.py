"""GLUE scores: per-task means over seeds, the GLUE average, and the results as markdown.

Scoring convention (the one of the MosaicBERT reference ``glue.py``): the score of one run is the mean of its
task metrics in percent, measured at the end of training; a task's score is the mean over its seeds; the GLUE
average is the unweighted mean of the task scores (WNLI excluded).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from llmfoundry_lite.apps.glue.config import TASK_ORDER


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-task means over seeds and the GLUE average (unweighted mean of the task scores)."""
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        by_task.setdefault(r["task"], []).append(r)
    tasks: dict[str, Any] = {}
    for task in sorted(by_task, key=TASK_ORDER.index):
        rs = by_task[task]
        metric_names = list(rs[0]["metrics"])
        metrics = {}
        for m in metric_names:
            vals = [r["metrics"][m] for r in rs]
            metrics[m] = {"mean": statistics.fmean(vals), "std": _std(vals), "values": vals}
        scores = [r["score"] for r in rs]
        tasks[task] = {
            "score": statistics.fmean(scores),
            "score_std": _std(scores),
            "seeds": [r["seed"] for r in rs],
            "metrics": metrics,
        }
    avg = statistics.fmean([t["score"] for t in tasks.values()]) if tasks else None
    return {
        "glue_average": avg,
        "average_label": average_label(list(tasks)),
        "tasks": tasks,
        "convention": (
            "run score = mean of the task's metrics in percent (MNLI: acc matched+mismatched; QQP, "
            "MRPC: accuracy and F1; CoLA: Matthews; STS-B: Spearman; others: accuracy), at the end of "
            "training; task score = mean over seeds; GLUE average = unweighted mean of task scores"
        ),
    }


def average_label(tasks: Sequence[str]) -> str:
    """'GLUE average' when all eight tasks ran; else 'average of N tasks (A, B)': a subset is not GLUE's score."""
    if set(tasks) >= set(TASK_ORDER):
        return "GLUE average"
    names = ", ".join(t.upper() for t in tasks)
    return f"average of {len(tasks)} task{'s' if len(tasks) != 1 else ''} ({names}; not the GLUE average)"


def _std(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0  # sample std (n - 1), over seeds


def results_markdown(summary: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> str:
    """The results as markdown: per-task table with the GLUE average, then every run."""
    lines = ["# GLUE results", "", "| Task | Metrics | Seeds | Score (mean ± std) |", "|---|---|---|---|"]
    for task, t in summary["tasks"].items():
        metrics = ", ".join(f"{m} {v['mean']:.2f}" for m, v in t["metrics"].items())
        lines.append(
            f"| {task.upper()} | {metrics} | {len(t['seeds'])} | {t['score']:.2f} ± {t['score_std']:.2f} |"
        )
    if summary["glue_average"] is not None:
        label = summary.get("average_label") or average_label(list(summary["tasks"]))
        lines.append(f"| **{label}** | | | **{summary['glue_average']:.2f}** |")
    lines += [
        "",
        summary["convention"] + ".",
        "",
        "## Runs",
        "",
        "| Task | Seed | Metrics | Started from | Time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        metrics = ", ".join(f"{m} {v:.2f}" for m, v in r["metrics"].items())
        lines.append(f"| {r['task']} | {r['seed']} | {metrics} | {r['started_from']} | {r['seconds']} |")
    return "\n".join(lines) + "\n"
