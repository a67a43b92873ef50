"""Which split each document goes to: the source's own split, or a seeded held-out sample of it.

Held-out splits are chosen by stratified sampling (one seeded-random document in each block of ~1/fraction):
deterministic, exact to the fraction, and streaming-friendly (no need to know the corpus size in advance). Each
unit of a source (a shard) samples on its own, seeded by the unit's position, so the held-out documents do not
depend on how many processes convert the source.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Optional

from llmfoundry_lite.errors import RecipeError


class HoldOut:
    """Stratified held-out selection: documents come in blocks of ~1/f; one seeded-random document per block."""

    def __init__(self, fraction: float, seed: int):
        self.f = fraction
        self.rng = random.Random(seed)
        self.i = 0
        self.block = -1
        self.end = 0
        self._next_block()

    def _bound(self, k: int) -> int:
        return math.ceil(round(k / self.f, 6))

    def _next_block(self) -> None:
        self.block += 1
        start, self.end = self._bound(self.block), self._bound(self.block + 1)
        self.pick = self.rng.randrange(start, self.end)

    def is_val(self) -> bool:
        """Whether the next document goes to the held-out split."""
        i, self.i = self.i, self.i + 1
        if i >= self.end:
            self._next_block()
        return i == self.pick


def unit_seed(seed: int, index: int) -> int:
    """The held-out seed of a source's ``index``-th unit (the first keeps ``seed`` itself)."""
    return seed + 1_000_003 * index


class Router:
    """The split of each document of one unit, or None when it goes to a split that is not wanted."""

    def __init__(
        self, unit_split: Optional[str], wanted: Sequence[str], hold_out: bool, fraction: float, seed: int
    ):
        self.fixed: Optional[str] = None
        self.hold: Optional[HoldOut] = None
        if hold_out and unit_split in (None, "train"):
            self.hold = HoldOut(fraction, seed)
        else:
            split = unit_split or "train"
            self.fixed = split if split in wanted else None
        self.wanted = set(wanted)

    @property
    def splits(self) -> set[str]:
        """The splits this unit can feed."""
        return ({"train", "val"} & self.wanted) if self.hold is not None else ({self.fixed} - {None})

    def route(self) -> Optional[str]:
        """The split of the next document."""
        if self.hold is None:
            return self.fixed
        split = "val" if self.hold.is_val() else "train"
        return split if split in self.wanted else None


def parse_splits(splits: Sequence[str] | str) -> list[str]:
    """The split names of ``--splits`` (train and/or val), checked."""
    names = [s.strip() for s in (splits.split(",") if isinstance(splits, str) else splits) if s.strip()]
    if not names or len(set(names)) != len(names):
        raise RecipeError(f"--splits must list distinct split names, got {splits!r}", key="--splits")
    bad = [n for n in names if n not in ("train", "val")]
    if bad:
        raise RecipeError(f"unknown split {bad[0]!r}; --splits takes train and/or val", key="--splits")
    return names


def split_budgets(total: int, splits: Sequence[str], val_fraction: float, what: str) -> dict[str, int]:
    """A subset's size per split: ``total`` divided as ``val_fraction`` says (all of it for a single split)."""
    if total < len(splits):
        raise RecipeError(
            f"must be at least {len(splits)} to give every split ({', '.join(splits)}) a share, got {total}",
            key=f"--max-{what}",
        )
    if len(splits) == 1:
        return {splits[0]: total}
    val = min(max(1, round(total * val_fraction)), total - 1)
    return {"train": total - val, "val": val}
