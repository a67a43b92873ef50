"""A sweep's results: one row per trial (parameters, state, metric, batches, tok/s, GPU-hours, $), what pruning
saved, ``summary.csv``, ``summary.md``, ``summary.png`` (loss curves, metric against each swept key) and Optuna's
matplotlib plots (optimisation history, parameter importances, parallel coordinates)."""

from __future__ import annotations

import csv
import dataclasses
import math
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

from llmfoundry_lite.sweep.grammar import Axis
from llmfoundry_lite.sweep.metrics import (
    METRICS_FILE,
    TRAIN_LOSS,
    choose_metric,
    eval_metric_names,
    final_train_loss,
    loss_curve,
    metric_label,
    read_metrics,
)
from llmfoundry_lite.sweep.study import (
    A_BATCHES,
    A_ERROR,
    A_FOLDER,
    A_WALL,
    LOG_FILE,
    SweepPlan,
    best_value,
    own_trials,
)

PLOTS = {
    "history.png": "optimisation history",
    "importance.png": "parameter importances",
    "parallel.png": "parallel coordinates",
}


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


def _fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return ""
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


def _table(plan: SweepPlan, rows: list[Row], metric: str) -> tuple[list[str], list[list[str]]]:
    header = ["best", "trial", *(a.key for a in plan.axes), "state", metric_label(metric), "batches"]
    header += ["final train loss", "tokens/s", "device-hours", "$", "wall time"]
    body = []
    for r in rows:
        cells = ["*" if r.best else "", r.tid, *(r.params.get(a.key, "") for a in plan.axes)]
        cells += [r.state, _fmt(r.value, ".4g"), str(r.batches), _fmt(r.final_loss, ".4f")]
        cells += [_fmt(r.tokens_per_s, ",.0f"), _fmt(r.gpu_hours, ".3g"), _fmt(r.usd, ".3g")]
        cells.append(_fmt_seconds(r.wall_s))
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


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------


def _as_number(text: str) -> Optional[float]:
    try:
        x = float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _plot_metric_vs_key(
    ax: Any, plan: SweepPlan, rows: list[Row], axis: Axis, colors: dict, short: dict
) -> None:
    """Scatter the ranking metric of trials that have one against one swept key's value."""
    pts = [
        (r, r.params.get(axis.key, ""))
        for r in rows
        if r.value is not None and r.state in ("COMPLETE", "PRUNED")
    ]
    if not pts:
        ax.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=ax.transAxes)
        return
    numeric = all(_as_number(v) is not None for _, v in pts)
    if numeric:
        xs = [float(_as_number(v)) for _, v in pts]  # type: ignore[arg-type]
        if min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        distinct = sorted({(x, v) for x, (_, v) in zip(xs, pts)})
        if axis.kind in ("grid", "choice", "int") and len(distinct) <= 8:
            # Discrete values: tick exactly those, written as on the command line.
            ax.set_xticks([x for x, _ in distinct], [v for _, v in distinct])
            ax.minorticks_off()
    else:
        cats = [v for v in (axis.values or []) if any(v == pv for _, pv in pts)]
        xs = [float(cats.index(v)) for _, v in pts]
        ax.set_xticks(range(len(cats)), cats, rotation=20 if max(len(c) for c in cats) > 6 else 0)
        ax.set_xlim(-0.5, len(cats) - 0.5)
    # Grid: trials that differ only in this key are joined by a line, one per setting of the others.
    others = [a.key for a in plan.axes if a.key != axis.key]
    groups: dict[tuple, list[tuple[float, float]]] = {}
    for (r, _), x in zip(pts, xs):
        if r.state == "COMPLETE":
            groups.setdefault(tuple(r.params.get(k) for k in others), []).append((x, r.value))  # type: ignore[arg-type]
    lines = {g: sorted(p) for g, p in groups.items() if len(p) > 1} if plan.sampler == "grid" else {}
    if lines and len(lines) <= 8:
        for g, p in lines.items():
            label = " ".join(f"{short[k]}={v}" for k, v in zip(others, g))
            ax.plot([a for a, _ in p], [b for _, b in p], color="0.55", linewidth=1, zorder=1)
            ax.annotate(label, p[-1], textcoords="offset points", xytext=(6, -10), fontsize=7, color="0.35")
    ax.margins(x=0.15)
    for (r, _), x in zip(pts, xs):
        ax.scatter(
            [x],
            [r.value],
            s=160 if r.best else 50,
            color=colors[r.tid],
            marker="*" if r.best else ("o" if r.state == "COMPLETE" else "x"),
            edgecolors="black" if r.state == "COMPLETE" else None,
            linewidths=0.6 if r.state == "COMPLETE" else 1.5,
            zorder=3,
        )
        ax.annotate(r.tid, (x, r.value), textcoords="offset points", xytext=(5, 4), fontsize=7)


def plot_summary(plan: SweepPlan, rows: list[Row], metric: str) -> Path:
    """``summary.png``: every trial's loss curve, and the ranking metric against each swept key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n_panels = 1 + len(plan.axes)
    cols = min(3, n_panels)
    nrows = math.ceil(n_panels / cols)
    fig, axs = plt.subplots(nrows, cols, figsize=(6.0 * cols, 4.4 * nrows), squeeze=False)
    flat = list(axs.flat)
    cmap = plt.get_cmap("tab10" if len(rows) <= 10 else "viridis")
    colors = {r.tid: cmap(i if len(rows) <= 10 else i / max(1, len(rows) - 1)) for i, r in enumerate(rows)}
    short = {a.key: a.key.rsplit(".", 1)[-1] for a in plan.axes}

    ax = flat[0]
    for r in rows:
        pts = [(s, v) for s, v in r.curve if math.isfinite(v)]
        if not pts:
            continue
        label = f"{r.tid} " + " ".join(f"{short.get(k, k)}={v}" for k, v in r.params.items())
        if r.state != "COMPLETE":
            label += f" ({r.state.lower()})"
        if r.best:
            label += " ★ best"
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o" if len(pts) < 30 else None,
            markersize=3,
            linewidth=2.6 if r.best else 1.4,
            linestyle="-" if r.state == "COMPLETE" else "--",
            color=colors[r.tid],
            label=label,
        )
    ax.set_title("Training loss (dashed: pruned or failed)", fontsize=10)
    ax.set_xlabel("batch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.lines and len(rows) <= 16:
        ax.legend(fontsize=8, loc="best")
    elif not ax.lines:
        ax.text(0.5, 0.5, "no training loss logged", ha="center", va="center", transform=ax.transAxes)

    ylabel = "best " + metric_label(metric) if metric != TRAIN_LOSS else metric_label(metric)
    direction = "higher is better" if plan.direction == "maximize" else "lower is better"
    n_failed = sum(1 for r in rows if r.state == "FAIL")
    for i, axis in enumerate(plan.axes, start=1):
        _plot_metric_vs_key(flat[i], plan, rows, axis, colors, short)
        ax = flat[i]
        title = f"{ylabel} vs {axis.key} (x: pruned)"
        ax.set_title(title + (f"\n({n_failed} failed trial(s) not shown)" if n_failed else ""), fontsize=10)
        ax.set_xlabel(axis.key)
        ax.set_ylabel(f"{ylabel}\n({direction})")
        ax.grid(alpha=0.3)
    for ax in flat[n_panels:]:
        ax.axis("off")
    fig.suptitle(f"Sweep {plan.name}: {len(rows)} trials of {Path(plan.recipe).name}", fontsize=12)
    fig.tight_layout()
    path = plan.out / "summary.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _importance_evaluator() -> Any:
    """fANOVA (Optuna's default) needs scikit-learn; without it, PED-ANOVA (numpy only)."""
    from optuna import importance

    try:
        import sklearn  # noqa: F401

        return importance.FanovaImportanceEvaluator(seed=0)
    except ImportError:
        return importance.PedAnovaImportanceEvaluator()


def plot_optuna(plan: SweepPlan, study: Any, n_params: int) -> tuple[dict[str, str], list[str]]:
    """Optuna's matplotlib plots as PNGs; returns {file: what} written and notes on the ones skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    complete = [t for t in own_trials(study) if t.state.name == "COMPLETE"]
    makers: dict[str, Any] = {"history.png": lambda: vis.plot_optimization_history(study)}
    notes = []
    if n_params >= 2 and len(complete) >= 2:
        makers["importance.png"] = lambda: vis.plot_param_importances(
            study, evaluator=_importance_evaluator()
        )
    else:
        notes.append("parameter importances need 2 swept keys and 2 complete trials")
    if len(complete) >= 1:
        makers["parallel.png"] = lambda: vis.plot_parallel_coordinate(study)
    written = {}
    for name, make in makers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                ax = make()
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
                fig.tight_layout()
                fig.savefig(plan.out / name, dpi=110)
                plt.close(fig)
                written[name] = PLOTS[name]
            except Exception as e:  # a plot Optuna cannot draw for this study (too few trials, ...)
                notes.append(
                    f"{PLOTS[name]} not drawn: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                )
                plt.close("all")
    return written, notes


def summarize(plan: SweepPlan, study: Any, echo: Any = print) -> list[Row]:
    """Collect results, print the table and write summary.csv, summary.md and the PNGs."""
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
    plots = {"summary.png": "training loss of every trial, and the metric against each swept key"}
    plot_summary(plan, rows, metric)
    extra, notes = plot_optuna(plan, study, len(plan.axes))
    plots.update(extra)
    for note in notes:
        echo(f"note: {note}")
    csv_path = write_csv(plan, rows, metric)
    md_path = write_markdown(plan, rows, metric, saved, plots)
    echo(f"summary: {md_path}  {csv_path}  " + "  ".join(str(plan.out / p) for p in plots))
    return rows
