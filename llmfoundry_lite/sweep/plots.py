"""A sweep's plots: ``summary.png`` (loss curves, metric against each swept key) and Optuna's matplotlib plots
(optimisation history, parameter importances, parallel coordinates), drawn off the sweep's critical path.
"""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from llmfoundry_lite.errors import first_line
from llmfoundry_lite.sweep.grammar import Axis
from llmfoundry_lite.sweep.metrics import TRAIN_LOSS, metric_label
from llmfoundry_lite.sweep.plan import SweepPlan

PLOTS = {
    "history.png": "optimisation history",
    "importance.png": "parameter importances",
    "parallel.png": "parallel coordinates",
}
SUMMARY_PLOT = {"summary.png": "training loss of every trial, and the metric against each swept key"}
LOG_FILE = "plots.log"
DONE_LINE = "plots: done"


def _as_number(text: str) -> Optional[float]:
    try:
        x = float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def short_value(text: str) -> str:
    """A swept value for a legend: numbers to 3 significant digits (a sampled lr has 18), other text as written."""
    x = _as_number(text)
    if x is None or text.strip().lstrip("+-").isdigit():
        return text
    return format(x, ".3g")


def _plot_metric_vs_key(
    ax: Any, plan: SweepPlan, rows: Sequence[Any], axis: Axis, colors: dict, short: dict
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
            label = " ".join(f"{short[k]}={short_value(str(v))}" for k, v in zip(others, g))
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


def summary_figure(plan: SweepPlan, rows: Sequence[Any], metric: str) -> Any:
    """The figure of ``summary.png``: every trial's loss curve, and the ranking metric against each swept key."""
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
        label = f"{r.tid} " + " ".join(f"{short.get(k, k)}={short_value(v)}" for k, v in r.params.items())
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
    return fig


def plot_summary(plan: SweepPlan, rows: Sequence[Any], metric: str) -> Path:
    """Write ``summary.png``."""
    import matplotlib.pyplot as plt

    fig = summary_figure(plan, rows, metric)
    path = plan.out / "summary.png"
    _save(fig, path)
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


def planned(n_params: int, n_complete: int) -> tuple[dict[str, str], list[str]]:
    """Optuna's plots this study gets ({file: what}) and notes on the ones it does not."""
    plots = {"history.png": PLOTS["history.png"]}
    notes = []
    if n_params >= 2 and n_complete >= 2:
        plots["importance.png"] = PLOTS["importance.png"]
    else:
        notes.append("parameter importances need 2 swept keys and 2 complete trials")
    if n_params >= 2 and n_complete >= 1:  # one key: a single vertical line, nothing to read
        plots["parallel.png"] = PLOTS["parallel.png"]
    return plots, notes


def plot_optuna(plan: SweepPlan, study: Any, names: Sequence[str]) -> list[str]:
    """Optuna's matplotlib plots ``names`` as PNGs; notes on the ones that could not be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    makers: dict[str, Any] = {
        "history.png": lambda: vis.plot_optimization_history(study),
        "importance.png": lambda: vis.plot_param_importances(study, evaluator=_importance_evaluator()),
        "parallel.png": lambda: vis.plot_parallel_coordinate(study),
    }
    notes = []
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                ax = makers[name]()
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
                fig.tight_layout()
                _save(fig, plan.out / name)
                plt.close(fig)
            except Exception as e:  # a plot Optuna cannot draw for this study (too few trials, ...)
                notes.append(f"{PLOTS[name]} not drawn: {first_line(e)}")
                plt.close("all")
    return notes


def _save(fig: Any, path: Path) -> None:
    """Write the PNG whole or not at all: a reader never sees half a file."""
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def draw(plan: SweepPlan, study: Any, rows: Sequence[Any], metric: str, names: Sequence[str]) -> list[str]:
    """``summary.png`` and Optuna's plots ``names``; notes on any that could not be drawn."""
    plot_summary(plan, rows, metric)
    return plot_optuna(plan, study, names)


def draw_in_background(plan: SweepPlan, rows: Sequence[Any], metric: str, names: Sequence[str]) -> int:
    """Draw the plots in a detached process (matplotlib and Optuna's plots take seconds); its pid.

    The process outlives the sweep command and writes :data:`LOG_FILE` in the sweep folder, ending with
    :data:`DONE_LINE`; the summary table, CSV and Markdown are already written, so nothing waits on it.
    """
    job = plan.out / ".plots.pkl"
    job.write_bytes(pickle.dumps((plan, list(rows), metric, list(names))))
    with open(plan.out / LOG_FILE, "w", encoding="utf-8") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "llmfoundry_lite.sweep.plots", str(job)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal after the sweep ends does not stop it
        )
    return child.pid


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The background process: draw the plots a sweep left in ``.plots.pkl``."""
    job = Path((argv or sys.argv[1:])[0])
    plan, rows, metric, names = pickle.loads(job.read_bytes())
    job.unlink(missing_ok=True)
    study = plan.open_study(create=False)
    for note in draw(plan, study, rows, metric, names):
        print(f"note: {note}", flush=True)
    print(DONE_LINE, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
