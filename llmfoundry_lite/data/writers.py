"""Writing MDS: one writer per split of a unit, the merge of units into one index, the atomic publish.

Each unit of a source is written to its own MDS folder; a split is then those folders side by side, in unit
order (a split from one unit keeps its flat layout), under one ``index.json`` that lists every unit's shards (the layout of streaming's ``merge_index``,
written here directly because the shards are local and that helper imports all of streaming). Shards are
hard-linked, not copied, into a hidden folder that is renamed into place only when complete, so an interrupted
or failed conversion never leaves a folder with an ``index.json`` that looks finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from llmfoundry_lite.compat import import_mds_writer

TAIL_DIR = "tail"  # the rows packed from every unit's leftover tokens (concat mode)


@dataclasses.dataclass
class SplitStats:
    """What one split folder received."""

    documents: int = 0
    tokens: int = 0
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    dropped: int = 0  # finetuning examples that could not fit max_seq_len

    def add(self, other: Mapping[str, int]) -> None:
        """Add another unit's counts."""
        for k in ("documents", "tokens", "samples", "dropped"):
            setattr(self, k, getattr(self, k) + int(other.get(k, 0)))


class UnitWriters:
    """An MDSWriter per split, each in ``folder/<split>``, opened on the first sample of that split."""

    def __init__(
        self, folder: pathlib.Path, columns: dict[str, str], compression: Optional[str], size_limit: Any
    ):
        self.folder, self.columns = folder, columns
        self.compression, self.size_limit = compression, size_limit
        self.writers: dict[str, Any] = {}
        self.stats: dict[str, SplitStats] = {}

    def write(self, split: str, sample: dict[str, Any]) -> None:
        """Write one sample to ``split``."""
        w = self.writers.get(split)
        if w is None:
            MDSWriter = import_mds_writer()
            w = self.writers[split] = MDSWriter(
                out=str(self.folder / split),
                columns=self.columns,
                compression=self.compression,
                size_limit=self.size_limit,
            )
        w.write(sample)

    def split_stats(self, split: str) -> SplitStats:
        """The (mutable) counts of ``split``."""
        return self.stats.setdefault(split, SplitStats())

    def finish(self) -> None:
        """Close every writer (writes each split's index.json)."""
        for w in self.writers.values():
            w.finish()
        self.writers.clear()

    def cancel(self) -> None:
        """Stop the writers without writing an index.json."""
        for w in self.writers.values():
            try:
                w.cancel_future_jobs()
            except Exception:
                pass
        self.writers.clear()


def merge_split(
    parts: Sequence[tuple[str, pathlib.Path]], tmp: pathlib.Path, tail: Optional[pathlib.Path] = None
) -> int:
    """Hard-link the MDS folders ``parts`` ((name, folder), in order) into ``tmp`` under one index; shard count.

    A split made of one folder keeps that folder's flat layout (``shard.00000.mds`` next to ``index.json``).
    """
    tmp.mkdir(parents=True)
    folders = [*parts, *([(TAIL_DIR, tail)] if tail is not None else [])]
    flat = len(folders) == 1
    shards: list[dict[str, Any]] = []
    for name, folder in folders:
        with open(folder / "index.json") as f:
            index = json.load(f)
        if not flat:
            (tmp / name).mkdir()
        for shard in index["shards"]:
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    base = shard[key]["basename"]
                    dest = base if flat else f"{name}/{base}"
                    _link(folder / base, tmp / dest)
                    shard[key]["basename"] = dest
            shards.append(shard)
    if flat:
        _link(folders[0][1] / "index.json", tmp / "index.json")
        return len(shards)
    with open(tmp / "index.json", "w") as f:
        json.dump({"version": 2, "shards": shards}, f, sort_keys=True)
    return len(shards)


def _link(src: pathlib.Path, dst: pathlib.Path) -> None:
    if not src.exists():  # a compressed shard keeps only its zip file
        return
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def folder_bytes(folder: pathlib.Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def publish(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Rename a finished split into place, replacing an older one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
