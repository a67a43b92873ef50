"""The sweep's command-line grammar: fixed overrides, grid axes and distributions, as Optuna distributions.

- ``key=a,b,c`` is a grid axis (brackets, braces, parentheses and quotes are not split: ``key=[1,2],[3,4]``);
- ``key=loguniform(a,b)``, ``uniform(a,b)``, ``int(a,b)``, ``choice(a,b,c)`` are distributions;
- any other ``key=value`` is a fixed override for every trial.

Listed values (grid, choice) stay the text the user wrote, so ``[0.9,0.98]`` or ``1e-3`` reach the recipe
exactly as on the command line; Optuna sees them as categorical choices.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from llmfoundry_lite.errors import RecipeError

OVERRIDE_ORIGIN = "command-line override"
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
_DIST_RE = re.compile(r"^(loguniform|uniform|int|choice)\((.*)\)$", re.S)
# An int(...) axis becomes a list of values under the grid sampler; beyond this it is not a grid.
MAX_INT_GRID = 100


@dataclasses.dataclass
class Axis:
    """One swept key: a grid (``values``) or a distribution (``kind`` with ``low``/``high`` or ``values``)."""

    key: str
    kind: str  # "grid" or one of DISTRIBUTIONS
    values: list[str] = dataclasses.field(default_factory=list)
    low: float = 0.0
    high: float = 0.0

    @property
    def listed(self) -> bool:
        """Whether the axis is a list of values (grid or choice), not a range."""
        return self.kind in ("grid", "choice")

    def grid_values(self) -> list[str]:
        """The values a grid search walks (RecipeError for a continuous range)."""
        if self.listed:
            return list(self.values)
        if self.kind == "int" and self.high - self.low < MAX_INT_GRID:
            return [str(i) for i in range(int(self.low), int(self.high) + 1)]
        raise RecipeError(
            f"{self.describe().partition('=')[2]} is a range: --sampler grid needs listed values "
            "(key=a,b,c or choice(...)); use --sampler tpe or random",
            file=OVERRIDE_ORIGIN,
            key=self.key,
        )

    def distribution(self, grid: bool = False) -> Any:
        """The Optuna distribution of the axis (``grid``: categorical over :meth:`grid_values`)."""
        from optuna import distributions as d

        if grid or self.listed:
            return d.CategoricalDistribution(self.grid_values())
        if self.kind == "int":
            return d.IntDistribution(int(self.low), int(self.high))
        return d.FloatDistribution(self.low, self.high, log=self.kind == "loguniform")

    def text(self, value: Any) -> str:
        """A sampled value as override text (floats exact: the recipe trains what the study records)."""
        if isinstance(value, float):
            return repr(value)
        return str(value)

    def checked_values(self) -> list[str]:
        """Values that validate the axis before any trial starts: every listed value, or both bounds."""
        if self.listed:
            return list(self.values)
        if self.kind == "int":
            return [str(int(self.low)), str(int(self.high))]
        return [repr(self.low), repr(self.high)]

    def describe(self) -> str:
        """The axis as the user wrote it."""
        if self.kind == "grid":
            return f"{self.key}={','.join(self.values)}"
        if self.kind == "choice":
            return f"{self.key}=choice({','.join(self.values)})"
        lo, hi = (int(self.low), int(self.high)) if self.kind == "int" else (self.low, self.high)
        return f"{self.key}={self.kind}({lo},{hi})"


def split_values(text: str) -> list[str]:
    """Split on commas that are not inside brackets, braces, parentheses or quotes."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    quote: str | None = None
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def _number(text: str, key: str, kind: str, integer: bool = False) -> float:
    try:
        return int(text) if integer else float(text)
    except ValueError:
        what = "an integer" if integer else "a number"
        raise RecipeError(
            f"{kind}(...) bounds must be {'integers' if integer else 'numbers'}: {text!r} is not {what}",
            file=OVERRIDE_ORIGIN,
            key=key,
        ) from None


def _parse_distribution(key: str, kind: str, inner: str) -> Axis:
    args = split_values(inner)
    if kind == "choice":
        if any(a == "" for a in args):
            raise RecipeError(
                "choice(...) needs comma-separated values, e.g. choice(2,4,8)", file=OVERRIDE_ORIGIN, key=key
            )
        if len(set(args)) != len(args):
            raise RecipeError(f"choice({inner}) lists a value twice", file=OVERRIDE_ORIGIN, key=key)
        return Axis(key, kind, values=args)
    if len(args) != 2 or any(a == "" for a in args):
        raise RecipeError(
            f"{kind}(...) takes two bounds, e.g. {key}={kind}({'1,8' if kind == 'int' else '1e-5,1e-3'})",
            file=OVERRIDE_ORIGIN,
            key=key,
        )
    low, high = (_number(a, key, kind, integer=kind == "int") for a in args)
    if low > high or (low == high and kind != "int"):
        raise RecipeError(
            f"{kind}({args[0]},{args[1]}): the low bound must be below the high bound",
            file=OVERRIDE_ORIGIN,
            key=key,
        )
    if kind == "loguniform" and low <= 0:
        raise RecipeError(f"loguniform bounds must be positive, got {args[0]}", file=OVERRIDE_ORIGIN, key=key)
    return Axis(key, kind, low=float(low), high=float(high))


def parse_arguments(args: Sequence[str]) -> tuple[list[str], list[Axis]]:
    """Split ``key=...`` arguments into fixed overrides (kept verbatim) and swept axes, in order."""
    fixed: list[str] = []
    axes: list[Axis] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(
                f"malformed argument {arg!r}; use key=value, key=v1,v2,... or key=loguniform(a,b)",
                file=OVERRIDE_ORIGIN,
            )
        m = _DIST_RE.match(value.strip())
        if m:
            axes.append(_parse_distribution(key, m.group(1), m.group(2)))
            continue
        values = split_values(value)
        if len(values) == 1:
            fixed.append(arg)
            continue
        if any(v == "" for v in values):
            raise RecipeError(
                f"empty value in {value!r}; separate values with single commas", file=OVERRIDE_ORIGIN, key=key
            )
        if len(set(values)) != len(values):
            raise RecipeError(f"{value!r} lists a value twice", file=OVERRIDE_ORIGIN, key=key)
        axes.append(Axis(key, "grid", values=values))
    seen: dict[str, str] = {}
    for a in axes:
        if a.key.lstrip("+") in seen:
            raise RecipeError("swept twice; give each key once", file=OVERRIDE_ORIGIN, key=a.key)
        seen[a.key.lstrip("+")] = a.key
    for f in fixed:
        k = f.partition("=")[0].strip().lstrip("+")
        if k in seen:
            raise RecipeError("both swept and fixed; give it once", file=OVERRIDE_ORIGIN, key=k)
    return fixed, axes


def grid_size(axes: Sequence[Axis]) -> int:
    """How many points the grid over ``axes`` has."""
    n = 1
    for a in axes:
        n *= len(a.grid_values())
    return n
