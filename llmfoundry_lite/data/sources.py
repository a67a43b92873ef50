"""What a ``--source`` names, as units of work: ``embedded``, files, globs and folders of shards, ``hf:NAME[:CONFIG]``.

Files are taken as the big corpora ship them (C4 and Dolma: ``.json.gz`` JSON Lines; RedPajama: ``.jsonl.zst``;
FineWeb: ``.parquet``), each file one unit; an uncompressed JSON Lines or text file larger than ``RANGE_BYTES``
is cut into byte ranges (of the rows or documents beginning in each), so one big file converts in parallel too. Splits come from the shard names, as
``datasets`` does: ``c4-train.00000-of-01024.json.gz`` is train, ``c4-validation.*``, ``*-val*``, ``dev`` are
val (a folder named ``train/`` or ``validation/`` counts too); ``test`` files are skipped; files named no split
beside named ones are train (Dolma, RedPajama-1T, mC4). Reading is ``readers.py``'s.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Iterable, Iterator
from typing import Optional

from llmfoundry_lite.data.readers import (
    BOM,
    Unit,
    compression_of,
    has_end_of_text,
    is_archive,
    kind_of,
    read_rows,
    text_of,
)
from llmfoundry_lite.errors import RecipeError, first_line

# Words in a shard's path that name its split (the words `datasets` recognises), and our split for each.
SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "validation": "val",
    "valid": "val",
    "val": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
    "eval": "test",
}
# Split names a Hugging Face dataset may use for held-out data, in order of preference.
SOURCE_VAL_NAMES = ("validation", "val", "valid", "dev")
RANGE_BYTES = 64 << 20  # uncompressed JSON Lines and text files above this convert as several byte ranges
GROUP_BYTES = 16 << 20  # one-document files are converted together up to this size
# Files `datasets` (save_to_disk, the hub's parquet export) writes beside the shards: not documents.
HF_METADATA = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
CARDS = ("README", "LICENSE", "LICENCE", "COPYING")  # beside a folder of .txt documents: not one of them


@dataclasses.dataclass
class SourcePlan:
    """The units of a source, in conversion order, and what was left out of it."""

    units: list[Unit]
    skipped: list[str] = dataclasses.field(default_factory=list)

    @property
    def own_splits(self) -> set[Optional[str]]:
        """The splits the source itself provides (None: it has none)."""
        return {u.split for u in self.units}

    @property
    def bytes(self) -> int:
        """Bytes to read from disk (the base of the ETA; 0 when unknown, e.g. hub datasets)."""
        return sum(u.size for u in self.units)


def split_of_name(path: str) -> Optional[str]:
    """'train', 'val', 'test' or None from the words of a shard's path (``c4-validation.00003-of-00008``)."""
    found = None
    for word in re.split(r"[^a-z]+", path.lower()):  # digits separate words too (`train0`), as in `datasets`
        if word in SPLIT_WORDS:
            found = SPLIT_WORDS[word]  # the last one wins: the file name over its folders
    return found


def plan_source(source: str, range_bytes: int = RANGE_BYTES) -> SourcePlan:
    """The units of ``source``, each with its own split when the shard names give one."""
    if source == "embedded":
        from pydoc_data import topics

        return SourcePlan([Unit("embedded", size=os.path.getsize(topics.__file__))])
    if source.startswith("hf:"):
        return _plan_hf(source)
    path = os.path.expanduser(source)
    if glob.has_magic(path) and not os.path.exists(path):  # a real name may hold `[` or `*`
        files = sorted(f for f in glob.glob(path, recursive=True) if not os.path.isdir(f))
        if not files:
            raise RecipeError(f"no file matches {source!r}", key="--source")
        root, one_doc_per_file = os.path.dirname(path.split("*")[0]), True
    elif os.path.isdir(path):
        files = _walk(path)
        if not files:
            raise RecipeError(f"source folder {source!r} contains no files", key="--source")
        root, one_doc_per_file = path, True
    elif os.path.exists(path):
        files, root, one_doc_per_file = [path], os.path.dirname(path), False
    else:
        raise RecipeError(
            f"source {source!r} does not exist; use a file (.jsonl, .json.gz, .jsonl.zst, .parquet, .txt), a "
            "folder or glob of them ('c4/en/c4-train.*.json.gz'), 'embedded' or 'hf:NAME[:CONFIG]'",
            key="--source",
        )
    for f in files:
        if not os.path.exists(f):  # e.g. a `--local-dir` download whose cache was cleared
            raise RecipeError(
                f"{f!r} is a broken symbolic link (to {os.readlink(f)!r}); download the file again",
                key="--source",
            )
    if all(os.path.getsize(f) == 0 for f in files):
        raise RecipeError(f"source {source!r} is empty", key="--source")
    archives = [f for f in files if is_archive(f)]
    if len(archives) == len(files):
        archives = []  # nothing else to read: refused below, with a hint
    files = [f for f in files if f not in archives]  # TinyStories ships a .tar.gz of its .txt files too
    kinds = {f: kind_of(f) for f in files}
    data_files = [f for f in files if kinds[f] != "text"]
    if data_files and len(data_files) < len(files):
        files = data_files  # a dataset folder's README.md / LICENSE are not documents
    if len(files) > 1:  # nor is the metadata `datasets` writes next to its shards, nor a card at the top
        files = [
            f
            for f in files
            if os.path.basename(f) not in HF_METADATA
            and not (
                os.path.normpath(os.path.dirname(f)) == os.path.normpath(root or ".")
                and os.path.basename(f).upper().startswith(CARDS)
            )
        ] or files
    plan = SourcePlan([], skipped=archives)
    named = {f: split_of_name(os.path.relpath(f, root) if root else f) for f in files}
    found = set(named.values()) - {None}
    use_names = len(files) > 1 and bool(found)
    unnamed = [f for f in files if named[f] is None]
    if use_names and unnamed and "train" in found and found & {"val", "test"}:
        raise RecipeError(
            f"{unnamed[0]!r} has no split in its name while other files of {source!r} name train and "
            f"{' and '.join(sorted(found - {'train'}))}; give one split's files at a time, e.g. --source "
            "'DIR/*-train.*'",
            key="--source",
        )
    for f in files:
        # Unnamed files beside named ones are the training data: Dolma and RedPajama name only some shards
        # `*-train-*`, mC4 only its `*-validation.*` ones.
        split = (named[f] or "train") if use_names else None
        if split == "test":
            plan.skipped.append(f)
            continue
        plan.units.extend(_file_units(f, kinds[f], split, one_doc_per_file, range_bytes))
    if not plan.units:
        raise RecipeError(f"source {source!r} holds only test files; nothing to convert", key="--source")
    order = {None: 0, "train": 0, "val": 1}
    plan.units.sort(key=lambda u: (order[u.split], u.path, u.start))
    plan.units = _grouped(plan.units)
    return plan


def _grouped(units: list[Unit]) -> list[Unit]:
    """Runs of small one-document files (same split and compression) as units of up to ``GROUP_BYTES``."""
    out: list[Unit] = []
    for u in units:
        last = out[-1] if out else None
        if (
            u.kind == "textfile"
            and last is not None
            and (last.kind, last.split, last.compression) == (u.kind, u.split, u.compression)
            and last.size + u.size <= GROUP_BYTES
        ):
            out[-1] = dataclasses.replace(last, size=last.size + u.size, more=[*last.more, u.path])
        else:
            out.append(u)
    return out


def _file_units(
    path: str, kind: str, split: Optional[str], one_doc_per_file: bool, range_bytes: int
) -> list[Unit]:
    _, compression = compression_of(path)
    size = os.path.getsize(path)
    if kind == "text" and has_end_of_text(path, compression):
        kind = "eot"  # TinyStories: <|endoftext|> lines separate the documents, blank lines are inside them
    elif kind == "text" and one_doc_per_file:
        kind = "textfile"
    if (
        kind not in ("json", "text", "eot")
        or compression is not None
        or size <= range_bytes
        or (kind == "json" and _is_json_array(path))
    ):
        return [Unit(kind, path, split, compression, size=size)]
    bounds = list(range(0, size, range_bytes)) + [size]
    return [Unit(kind, path, split, None, a, b, size=b - a) for a, b in zip(bounds, bounds[1:])]


def _is_json_array(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).removeprefix(BOM).lstrip().startswith(b"[")


def _is_mds(index: str) -> bool:
    try:
        with open(index, "rb") as f:
            return b'"shards"' in f.read(1 << 16)
    except OSError:
        return False


def _walk(folder: str) -> list[str]:
    """The files under ``folder``, following linked folders (each real folder once), hidden ones left out."""

    def unreadable(e: OSError) -> None:  # os.walk would leave the folder out silently
        raise RecipeError(f"cannot read folder {e.filename!r}: {e.strerror or e}", key="--source")

    files, seen = {}, set()
    for d, dirs, names in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:  # a link back into the tree
            dirs[:] = []
            continue
        seen.add(real)
        if "index.json" in names and _is_mds(os.path.join(d, "index.json")):
            dirs[:] = []  # converted output kept beside the source (`--out data/mds`): not a source file
            continue
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))  # .cache/huggingface, .git
        for f in sorted(n for n in names if not n.startswith(".")):
            # A file linked twice under its name (two snapshots of a hub cache share a blob) is read once.
            files.setdefault((os.path.realpath(os.path.join(d, f)), f), os.path.join(d, f))
    return sorted(files.values())


def _plan_hf(source: str) -> SourcePlan:
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 2:
        raise RecipeError(
            f"malformed source {source!r}; use hf:NAME or hf:NAME:CONFIG (e.g. hf:allenai/c4:en)",
            key="--source",
        )
    name, config = parts[0], (parts[1] if len(parts) == 2 else None)
    data_dir = None
    local = os.path.expanduser(name)
    if os.path.isdir(local) and config is not None:
        # A local copy of a hub dataset (`hf download allenai/c4 --local-dir c4`): its configs are sub-folders.
        if not os.path.isdir(os.path.join(local, config)):
            subs = sorted(
                d for d in os.listdir(local) if os.path.isdir(os.path.join(local, d)) and d[0] != "."
            )
            raise RecipeError(
                f"local dataset folder {local!r} has no sub-folder {config!r} for config {config!r} (sub-folders: "
                f"{', '.join(subs) or 'none'}); use --source {os.path.join(local, subs[0] if subs else config)!r} "
                "(its shards are read directly, faster) or hf:FOLDER without a config",
                key="--source",
            )
        data_dir, config = config, None
    import datasets

    from llmfoundry_lite.data.checks import hub_access

    datasets.logging.set_verbosity_error()
    try:
        with hub_access():  # offline or unreachable: the cache only, one error at once
            names = list(
                datasets.load_dataset(
                    local if os.path.isdir(local) else name, config, data_dir=data_dir, streaming=True
                )
            )
    except Exception as e:
        msg = first_line(e)
        raise RecipeError(
            f"cannot open Hugging Face dataset {source!r} ({msg}); hub datasets need internet - offline, use a "
            "local copy: a folder or glob of its shards (--source c4/en), or 'embedded'",
            key="--source",
        ) from None
    path = local if os.path.isdir(local) else name
    units = []
    if "train" in names:
        units.append(Unit("hf", path, "train", hf_config=config, hf_split="train", hf_data_dir=data_dir))
    val = next((v for v in SOURCE_VAL_NAMES if v in names), None)
    if val is not None:
        units.append(Unit("hf", path, "val", hf_config=config, hf_split=val, hf_data_dir=data_dir))
    if not units:
        units.append(Unit("hf", path, None, hf_config=config, hf_split=names[0], hf_data_dir=data_dir))
    elif "train" not in names:
        raise RecipeError(f"{source!r} has no 'train' split (splits: {', '.join(names)})", key="--source")
    return SourcePlan(units, [f"split {n!r}" for n in names if n not in ("train", val)])


def open_source(source: str, text_field: str = "text") -> dict[Optional[str], Iterable[str]]:
    """Documents of ``source`` by its own split: ``{None: docs}``, or ``{"train": ..., "val": ...}``."""
    plan = plan_source(source)
    out: dict[Optional[str], Iterable[str]] = {}
    for split in sorted(plan.own_splits, key=lambda s: s or ""):
        out[split] = _docs([u for u in plan.units if u.split == split], text_field)
    return out


def _docs(units: list[Unit], text_field: str) -> Iterator[str]:
    for unit in units:
        for where, row in read_rows(unit, columns=[text_field]):
            doc = text_of(row, text_field, where)
            if doc is not None:
                yield doc


def split_long(doc: str, max_chars: int) -> list[str]:
    """Cut a document into pieces of at most ``max_chars``, at paragraph, then line, then space boundaries."""
    if len(doc) <= max_chars:
        return [doc]
    pieces: list[str] = []
    cur = ""
    for para in doc.split("\n\n"):
        while len(para) > max_chars:
            cut = max(para.rfind("\n", 0, max_chars), para.rfind(" ", 0, max_chars))
            cut = cut if cut > 0 else max_chars
            if cur:
                pieces.append(cur)
                cur = ""
            pieces.append(para[:cut])
            para = para[cut:].lstrip()
        if cur and len(cur) + 2 + len(para) > max_chars:
            pieces.append(cur)
            cur = para
        else:
            cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        pieces.append(cur)
    return [p for p in (p.strip() for p in pieces) if p]
