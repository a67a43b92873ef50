"""Corpora as streams of documents: ``embedded``, text files and folders, JSON Lines, Parquet, ``hf:NAME[:CONFIG]``.

Plain local files are read directly, without importing ``datasets`` (conversion start-up is most of its wall time
on small corpora); ``hf:`` sources (and ``hf:LOCAL_FOLDER``) go through ``datasets``.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional

from llmfoundry_lite.errors import RecipeError

JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
# Split names a source may use for held-out data, in order of preference.
SOURCE_VAL_NAMES = ("validation", "val", "valid", "dev")


def _hf_rows_to_text(rows: Iterable[dict[str, Any]], field: str, where: str) -> Iterator[str]:
    for i, row in enumerate(rows):
        if field not in row:
            raise RecipeError(
                f"{where}: row {i} has no field {field!r} (fields: {', '.join(map(str, row))}); "
                f"set --text-field"
            )
        value = row[field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise RecipeError(f"{where}: field {field!r} of row {i} is {type(value).__name__}, not text")
        yield value


def _local_kind(files: Sequence[pathlib.Path], where: str) -> str:
    """'json', 'parquet' or 'text' (any other suffix is read as text) for a set of local files."""
    suffixes = {f.suffix.lower() for f in files}
    if suffixes <= JSON_SUFFIXES:
        return "json"
    if suffixes <= PARQUET_SUFFIXES:
        return "parquet"
    if not (suffixes & (JSON_SUFFIXES | PARQUET_SUFFIXES)):
        return "text"
    raise RecipeError(f"{where} mixes file kinds ({', '.join(sorted(suffixes))}); convert one kind at a time")


def open_source(source: str, text_field: str = "text") -> dict[Optional[str], Iterable[str]]:
    """Documents of ``source``: ``{None: docs}``, or ``{"train": ..., "val": ...}`` when it has its own splits."""
    if source == "embedded":
        from llmfoundry_lite.data.corpus import embedded_documents

        return {None: embedded_documents()}
    if source.startswith("hf:"):
        return _open_hf(source, text_field)
    path = pathlib.Path(os.path.expanduser(source))
    if not path.exists():
        raise RecipeError(
            f"source {source!r} does not exist; use a text/JSONL/Parquet file, a folder of them, "
            "'embedded' or 'hf:NAME[:CONFIG]'",
            key="--source",
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise RecipeError(f"source folder {source!r} contains no files", key="--source")
    else:
        files = [path]
    if all(f.stat().st_size == 0 for f in files):
        raise RecipeError(f"source {source!r} is empty", key="--source")
    builder = _local_kind(files, repr(source))
    # Local files are read directly (no `datasets`/torch import: conversion start-up is most of its wall time
    # on small corpora); `hf:PATH` reads the same files through the `datasets` streaming path instead.
    if builder == "json" and all(f.suffix.lower() in (".jsonl", ".ndjson") for f in files):
        docs: Iterator[str] = _read_jsonl(files, text_field)
    elif builder == "parquet":
        docs = _read_parquet(files, text_field)
    elif builder == "text":
        docs = _read_text(files, one_doc_per_file=path.is_dir())
    else:
        import datasets

        datasets.logging.set_verbosity_error()
        try:
            ds = datasets.load_dataset(
                builder, data_files=[str(f) for f in files], split="train", streaming=True
            )
        except Exception as e:  # datasets raises many types for unreadable files
            raise RecipeError(
                f"cannot read source {source!r}: {type(e).__name__}: {e}", key="--source"
            ) from None
        docs = _hf_rows_to_text(ds, text_field, repr(source))
    return {None: _guard_read(docs, source)}


def _read_text(files: Sequence[pathlib.Path], one_doc_per_file: bool) -> Iterator[str]:
    """Text files: one document per file (folders) or per blank-line separated paragraph (a single file)."""
    import re

    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(
                f"cannot read source file {str(f)!r}: not UTF-8 text ({e.reason})", key="--source"
            ) from None
        if one_doc_per_file:
            if text.strip():
                yield text.strip()
        else:
            for para in re.split(r"\n[ \t]*\n", text):
                if para.strip():
                    yield para.strip()


def _read_jsonl(files: Sequence[pathlib.Path], field: str) -> Iterator[str]:
    """JSON Lines files: the ``field`` of each row (rows where it is null are skipped)."""
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{str(f)!r} line {lineno}"
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise RecipeError(
                        f"cannot read source {where}: invalid JSON ({e})", key="--source"
                    ) from None
                if not isinstance(row, dict):
                    raise RecipeError(
                        f"cannot read source {where}: expected a JSON object per line", key="--source"
                    )
                yield from _hf_rows_to_text([row], field, where)


def _read_parquet(files: Sequence[pathlib.Path], field: str) -> Iterator[str]:
    """Parquet files: the ``field`` column, streamed in record batches."""
    import pyarrow.parquet as pq

    for f in files:
        pf = pq.ParquetFile(f)
        if field not in pf.schema_arrow.names:
            raise RecipeError(
                f"{str(f)!r} has no column {field!r} (columns: {', '.join(pf.schema_arrow.names)}); set --text-field",
                key="--text-field",
            )
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise RecipeError(
                        f"column {field!r} of {str(f)!r} holds {type(value).__name__}, not text"
                    )
                yield value


def _guard_read(docs: Iterator[str], source: str) -> Iterator[str]:
    # Parse errors surface lazily while streaming; turn them into one clear message naming the source.
    try:
        yield from docs
    except RecipeError:
        raise
    except Exception as e:
        raise RecipeError(f"cannot read source {source!r}: {type(e).__name__}: {e}", key="--source") from None


def _open_hf(source: str, text_field: str) -> dict[Optional[str], Iterable[str]]:
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 2:
        raise RecipeError(
            f"malformed source {source!r}; use hf:NAME or hf:NAME:CONFIG (e.g. hf:allenai/c4:en)"
        )
    name, config = parts[0], (parts[1] if len(parts) == 2 else None)
    import datasets

    from llmfoundry_lite.data.checks import hub_access

    datasets.logging.set_verbosity_error()
    try:
        with hub_access():  # offline or unreachable: the cache only, one error at once
            dsd = datasets.load_dataset(name, config, streaming=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(
            f"cannot open Hugging Face dataset {source!r} ({msg}); hub datasets need internet - offline, "
            "use a local file or 'embedded'",
            key="--source",
        ) from None
    out: dict[Optional[str], Iterable[str]] = {}
    if "train" in dsd:
        out["train"] = _guard_read(_hf_rows_to_text(dsd["train"], text_field, source), source)
    for v in SOURCE_VAL_NAMES:
        if v in dsd:
            out["val"] = _guard_read(_hf_rows_to_text(dsd[v], text_field, source), source)
            break
    if not out:
        only = next(iter(dsd))
        out[None] = _guard_read(_hf_rows_to_text(dsd[only], text_field, source), source)
    elif "train" not in out:
        raise RecipeError(f"{source!r} has no 'train' split (splits: {', '.join(dsd)})", key="--source")
    return out


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
