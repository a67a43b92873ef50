"""A sweep's results: one row per trial (parameters, state, metric, batches, tok/s, GPU-hours, $), what pruning
saved, ``summary.csv`` and ``summary.md``; the plots are :mod:`.plots`'."""

from __future__ import annotations

import csv
import dataclasses
import shutil
from pathlib import Path
from typing import Any, Optional

from llmfoundry_lite.sweep import plots
from llmfoundry_lite.sweep.metrics import (
    METRICS_FILE,
    best_value,
    choose_metric,
    eval_metric_names,
    final_train_loss,
    fmt_seconds,
    loss_curve,
    metric_label,
    read_metrics,
)
from llmfoundry_lite.sweep.plan import SweepPlan
from llmfoundry_lite.sweep.storage import A_BATCHES, A_ERROR, A_FOLDER, A_WALL, own_trials
from llmfoundry_lite.sweep.worker import LOG_FILE


@dataclasses.dataclass
class Row:
    """One trial of the summary."""

    tid: str
    number: int
    params: dict[str, str]
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    value: Optional[float]  # best value of the ranking metric over the run
    final_loss: Optional[float]
    batches: int
    tokens_per_s: Optional[float]
    seconds: float  # training seconds (fit time, all attempts)
    gpu_hours: Optional[float]
    usd: Optional[float]
    wall_s: Optional[float]
    error: str
    curve: list[tuple[int, float]]
    best: bool = False


@dataclasses.dataclass
class Savings:
    """What pruning saved, against running every pruned trial to the end."""

    batches: int
    total: int  # batches the trials would have trained without pruning
    gpu_hours: Optional[float]
    usd: Optional[float]

    def line(self) -> str:
        """One sentence for the console and summary.md."""
        pct = 100.0 * self.batches / self.total if self.total else 0.0
        text = f"pruning saved {self.batches} of {self.total} batches ({pct:.0f}%)"
        if self.gpu_hours is not None:
            text += f", about {self.gpu_hours:.3g} device-hours"
        if self.usd is not None:
            text += f" (${self.usd:.3g})"
        return text


def _price(plan: SweepPlan, rows: list[Row]) -> Optional[float]:
    """Dollars per device-hour: from the trials' cost_monitor metrics, else the recipe's cost block."""
    from llmfoundry_lite import hardware

    logged = [(r.usd, r.gpu_hours) for r in rows if r.usd is not None and r.gpu_hours]
    if logged:
        return sum(u for u, _ in logged) / sum(h for _, h in logged)  # type: ignore[misc]
    try:
        cost = hardware.parse_cost(plan.base.get("cost"))
    except Exception:
        return None
    if cost.usd_per_gpu_hour is not None:
        return float(cost.usd_per_gpu_hour)
    if cost.gpu:
        entry = hardware.table(cost.hardware).get(hardware.normalize(cost.gpu))
        return entry.usd_per_gpu_hour if entry else None
    device = str(plan.base.get("device") or "")
    if device == "cpu" or (not device and shutil.which("nvidia-smi") is None):
        return hardware.CPU_USD_PER_HOUR
    return None


def collect(plan: SweepPlan, study: Any) -> tuple[list[Row], str]:
    """One row per trial folder (the latest Optuna trial for it) and the name of the ranking metric."""
    by_folder: dict[str, Any] = {}
    for t in own_trials(study):
        tid = t.user_attrs.get(A_FOLDER) or f"t{t.number:03d}"
        by_folder[tid] = t  # a retry comes after the trial it resumes
    records = {tid: read_metrics(plan.out / tid / METRICS_FILE) for tid in by_folder}
    names = {n for recs in records.values() for n in eval_metric_names(recs)}
    metric = choose_metric(names, plan.metric)
    maximize = plan.direction == "maximize"
    rows = []
    for tid in sorted(by_folder):
        t = by_folder[tid]
        recs = records[tid]
        axes = {a.key: a for a in plan.axes}
        params = {k: axes[k].text(v) if k in axes else str(v) for k, v in t.params.items()}
        ends = [r for r in recs if r.get("event") == "fit_end"]
        tokens = sum(r.get("tokens", 0) for r in ends)
        seconds = sum(r.get("seconds", 0.0) for r in ends)
        gpu_hours = next((r["cost/gpu_hours"] for r in reversed(recs) if "cost/gpu_hours" in r), None)
        usd = next((r["cost/usd"] for r in reversed(recs) if "cost/usd" in r), None)
        if gpu_hours is None and seconds:
            gpu_hours = seconds * plan.nproc / 3600.0
        curve = loss_curve(recs)
        value = t.value if t.state.name == "COMPLETE" else best_value(recs, metric, maximize)
        rows.append(
            Row(
                tid=tid,
                number=t.number,
                params=params,
                state=t.state.name,
                value=value,
                final_loss=final_train_loss(recs),
                batches=int(t.user_attrs.get(A_BATCHES) or (curve[-1][0] if curve else 0)),
                tokens_per_s=tokens / seconds if tokens and seconds > 0 else None,
                seconds=seconds,
                gpu_hours=gpu_hours,
                usd=usd,
                wall_s=t.user_attrs.get(A_WALL),
                error=str(t.user_attrs.get(A_ERROR, "")),
                curve=curve,
            )
        )
    price = _price(plan, rows)
    for r in rows:
        if r.usd is None and r.gpu_hours is not None and price is not None:
            r.usd = r.gpu_hours * price
    ranked = [r for r in rows if r.state == "COMPLETE" and r.value is not None]
    if ranked:
        best = (max if maximize else min)(ranked, key=lambda r: r.value)  # type: ignore[arg-type,return-value]
        best.best = True
    return rows, metric


def savings(plan: SweepPlan, rows: list[Row]) -> Optional[Savings]:
    """Batches (and device-hours, dollars) pruned trials did not train; None when nothing was pruned."""
    pruned = [r for r in rows if r.state == "PRUNED"]
    if not pruned:
        return None
    full = plan.max_batches or max((r.batches for r in rows if r.state == "COMPLETE"), default=0)
    saved = sum(max(0, full - r.batches) for r in pruned)
    trained = [r for r in rows if r.seconds > 0 and r.batches > 0]
    hours = usd = None
    if trained:
        per_batch = sum(r.seconds for r in trained) / sum(r.batches for r in trained)
        hours = saved * per_batch * plan.nproc / 3600.0
        price = _price(plan, rows)
        usd = hours * price if price is not None else None
    total = sum(max(full, r.batches) if r.state == "PRUNED" else r.batches for r in rows)
    return Savings(saved, total, hours, usd)


def _fmt(x: Optional[float], spec: str) -> str:
    return "" if x is None else format(x, spec)


def _table(plan: SweepPlan, rows: list[Row], metric: str) -> tuple[list[str], list[list[str]]]:
    header = ["best", "trial", *(a.key for a in plan.axes), "state", metric_label(metric), "batches"]
    header += ["final train loss", "tokens/s", "device-hours", "$", "wall time"]
    body = []
    for r in rows:
        cells = ["*" if r.best else "", r.tid, *(r.params.get(a.key, "") for a in plan.axes)]
        cells += [r.state, _fmt(r.value, ".4g"), str(r.batches), _fmt(r.final_loss, ".4f")]
        cells += [_fmt(r.tokens_per_s, ",.0f"), _fmt(r.gpu_hours, ".3g"), _fmt(r.usd, ".3g")]
        cells.append(fmt_seconds(r.wall_s))
        body.append(cells)
    return header, body


def format_table(plan: SweepPlan, rows: list[Row], metric: str) -> str:
    """The summary as an aligned plain-text table."""
    header, body = _table(plan, rows, metric)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in body]
    return "\n".join(lines)


def write_csv(plan: SweepPlan, rows: list[Row], metric: str) -> Path:
    """``summary.csv``: one row per trial."""
    path = plan.out / "summary.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            ["trial", "optuna_trial", *(a.key for a in plan.axes), "params", "state", metric, "batches"]
            + ["final_train_loss", "tokens_per_s", "device_hours", "usd", "wall_s", "best", "error"]
        )
        for r in rows:
            w.writerow(
                [r.tid, r.number, *(r.params.get(a.key, "") for a in plan.axes)]
                + [" ".join(f"{k}={v}" for k, v in r.params.items()), r.state]
                + ["" if r.value is None else r.value, r.batches]
                + ["" if r.final_loss is None else r.final_loss]
                + ["" if r.tokens_per_s is None else round(r.tokens_per_s, 1)]
                + ["" if r.gpu_hours is None else r.gpu_hours, "" if r.usd is None else r.usd]
                + ["" if r.wall_s is None else round(r.wall_s, 2), "yes" if r.best else "", r.error]
            )
    return path


def write_markdown(
    plan: SweepPlan, rows: list[Row], metric: str, saved: Optional[Savings], plots: dict[str, str]
) -> Path:
    """``summary.md``: settings, the table, what pruning saved, failed trials and the plots."""
    header, body = _table(plan, rows, metric)
    direction = "higher is better" if plan.direction == "maximize" else "lower is better"
    states = {s: sum(1 for r in rows if r.state == s) for s in ("COMPLETE", "PRUNED", "FAIL")}
    md = [
        f"# Sweep `{plan.name}`",
        "",
        f"Recipe `{plan.recipe}`, {len(rows)} of {plan.n_trials} trials ({plan.sampler} sampler, seed {plan.seed}, "
        f"pruning: {plan.prune}): {states['COMPLETE']} complete, {states['PRUNED']} pruned, {states['FAIL']} failed. "
        f"Ranked by the best {metric_label(metric)} of each run ({direction}); the best trial is marked ★.",
        "",
        "Swept: "
        + ", ".join(f"`{a.describe()}`" for a in plan.axes)
        + (". Fixed: " + ", ".join(f"`{f}`" for f in plan.fixed) if plan.fixed else "")
        + f". Study `{plan.name}` in `{plan.storage}`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for cells in body:
        cells = ["★" if c == "*" and i == 0 else c for i, c in enumerate(cells)]
        md.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if saved is not None:
        md += ["", saved.line()[0].upper() + saved.line()[1:] + "."]
    failed = [r for r in rows if r.state == "FAIL"]
    if failed:
        md += ["", "## Failed trials", ""]
        md += [f"- {r.tid}: {r.error} (log: `{plan.out / r.tid / LOG_FILE}`)" for r in failed]
    md += ["", "## Plots", ""]
    md += [f"- `{name}`: {what}" for name, what in plots.items()]
    path = plan.out / "summary.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path


def summarize(plan: SweepPlan, study: Any, echo: Any = print, background_plots: bool = False) -> list[Row]:
    """Collect results, print the table and write summary.csv, summary.md and the PNGs.

    ``background_plots``: the PNGs are drawn by a detached process, so the command ends with the table.
    """
    rows, metric = collect(plan, study)
    if plan.metric and metric.rsplit("/", 1)[-1] != plan.metric and metric != plan.metric:
        if plan.metric != "train_loss":
            echo(
                f"warning: no trial logged a metric called {plan.metric!r}; ranking by {metric_label(metric)}"
            )
    echo("")
    echo(format_table(plan, rows, metric))
    best = next((r for r in rows if r.best), None)
    if best:
        swept = " ".join(f"{k}={v}" for k, v in best.params.items())
        echo(f"best: {best.tid} ({swept}) {metric_label(metric)} {best.value:.4g}")
    saved = savings(plan, rows)
    if saved is not None:
        echo(saved.line())
    n_complete = sum(1 for r in rows if r.state == "COMPLETE")
    optuna_plots, notes = plots.planned(len(plan.axes), n_complete)
    planned = {**plots.SUMMARY_PLOT, **optuna_plots}
    for note in notes:
        echo(f"note: {note}")
    csv_path = write_csv(plan, rows, metric)
    md_path = write_markdown(plan, rows, metric, saved, planned)
    echo(f"summary: {md_path}  {csv_path}")
    pngs = "  ".join(str(plan.out / p) for p in planned)
    if background_plots:
        pid = plots.draw_in_background(plan, rows, metric, list(optuna_plots))
        echo(f"plots (drawn in the background, pid {pid}, log {plan.out / plots.LOG_FILE}): {pngs}")
    else:
        for note in plots.draw(plan, study, rows, metric, list(optuna_plots)):
            echo(f"note: {note}")
        echo(f"plots: {pngs}")
    return rows
