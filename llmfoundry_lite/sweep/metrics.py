"""What trials log and how a sweep ranks them: metrics.jsonl records, the ranking metric and its direction.

Light (no torch, no Optuna): the trial-side reporting callback and the sweep's summary both use it, so they
pick the same metric from the same names.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
TRAIN_LOSS = "loss/train/total"
# Keys whose name says "higher is better" (accuracy, F1, ...); every other metric is minimised.
_HIGHER_IS_BETTER = re.compile(r"acc|f1|mcc|corr|auc|bleu|rouge|score|spearman|pearson", re.I)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (a partial last line from a killed run is ignored)."""
    records = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return records
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def loss_curve(records: list[dict]) -> list[tuple[int, float]]:
    """(batch number from 1, train loss) pairs; a batch logged twice (a resumed run) keeps its last value."""
    by_step: dict[int, float] = {}
    for r in records:
        if TRAIN_LOSS in r and r.get("step") is not None:
            by_step[int(r["step"]) + 1] = r[TRAIN_LOSS]  # logged at step k = the loss of batch k + 1
    return sorted(by_step.items())


def final_train_loss(records: list[dict]) -> float | None:
    """The last logged training loss."""
    curve = loss_curve(records)
    return curve[-1][1] if curve else None


def best_value(records: list[dict], metric: str, maximize: bool) -> float | None:
    """The best finite value of ``metric`` over a trial's records (final train loss for the train loss)."""
    if metric == TRAIN_LOSS:
        loss = final_train_loss(records)
        return loss if loss is not None and math.isfinite(loss) else None
    values = [r[metric] for r in records if isinstance(r.get(metric), (int, float))]
    values = [v for v in values if math.isfinite(v)]
    return (max(values) if maximize else min(values)) if values else None


def eval_metric_names(records: list[dict]) -> list[str]:
    """Names of the evaluation metrics logged (``metrics/eval/LanguageCrossEntropy``, ...)."""
    names = {k for r in records for k in r if k.startswith("metrics/") and not k.startswith("metrics/train/")}
    return sorted(names)


def higher_is_better(metric: str) -> bool:
    """Whether larger values of ``metric`` are better (accuracy, F1, ...)."""
    return bool(_HIGHER_IS_BETTER.search(metric.rsplit("/", 1)[-1]))


def choose_metric(all_names: set[str], requested: str | None = None) -> str:
    """The metric that ranks trials: the requested one, else eval cross-entropy/perplexity/accuracy, else loss."""
    if requested:
        for n in sorted(all_names):
            if requested in (n, n.rsplit("/", 1)[-1]):
                return n
        if requested in ("train_loss", TRAIN_LOSS):
            return TRAIN_LOSS
    for preferred in ("LanguageCrossEntropy", "LanguagePerplexity", "CrossEntropy", "Accuracy"):
        for n in sorted(all_names):
            if preferred in n.rsplit("/", 1)[-1]:
                return n
    return sorted(all_names)[0] if all_names else TRAIN_LOSS


def metric_label(metric: str) -> str:
    """How tables and plots name ``metric``."""
    if metric == TRAIN_LOSS:
        return "final train loss"
    return metric.removeprefix("metrics/").replace("/", " ")


def error_line(text: str) -> str:
    """The most telling line of a failed run's output: the exception or ``error:`` line, else the last one."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pattern = re.compile(r"^(error:|[\w.]*(Error|Exception|Interrupt)\b)")
    for ln in reversed(lines):
        if pattern.match(ln):
            return ln[:300]
    return lines[-1][:300] if lines else "(no output)"


def fmt_seconds(s: float | None) -> str:
    """Seconds as ``12.3s`` or ``4m05s`` ('' for None)."""
    if s is None:
        return ""
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"
