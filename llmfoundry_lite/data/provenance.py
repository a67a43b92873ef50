"""Which tokenizer made a dataset's token rows: recorded by ``data convert --tokenizer``, checked before a run.

Token rows are ids: trained with another tokenizer they are silently wrong text. ``convert`` writes
``provenance.json`` into every split folder of packed token rows, naming the tokenizer (as given), its vocabulary
size and a fingerprint of its vocabulary (token -> id); ``data/checks.py`` compares it with the recipe's tokenizer.
Folders without the file (converted before it existed, or by other tools) are not checked. Standard library only,
and no tokenizer is loaded: the fingerprint is read from the tokenizer's files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

PROVENANCE_FILENAME = "provenance.json"


def _vocab_from_tokenizer_json(data: Mapping[str, Any]) -> tuple[dict[str, int], list[int]]:
    """The model's token -> id mapping and the added tokens' ids of a ``tokenizer.json`` document."""
    vocab = (data.get("model") or {}).get("vocab")
    mapping: dict[str, int] = {}
    if isinstance(vocab, dict):
        mapping = {str(k): int(v) for k, v in vocab.items() if isinstance(v, int)}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
        mapping = {str(p[0]): i for i, p in enumerate(vocab) if isinstance(p, (list, tuple)) and p}
    added = [t["id"] for t in data.get("added_tokens") or [] if isinstance(t.get("id"), int)]
    return mapping, added


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _vocab_from_folder(folder: str) -> tuple[dict[str, int], list[int]] | None:
    """The token -> id mapping of a tokenizer folder (tokenizer.json, else vocab.txt or vocab.json)."""
    data = _read_json(os.path.join(folder, "tokenizer.json"))
    if isinstance(data, dict):
        return _vocab_from_tokenizer_json(data)
    added_json = _read_json(os.path.join(folder, "added_tokens.json"))
    added = [v for v in added_json.values() if isinstance(v, int)] if isinstance(added_json, dict) else []
    vocab_txt = os.path.join(folder, "vocab.txt")
    if os.path.isfile(vocab_txt):
        with open(vocab_txt, encoding="utf-8") as f:
            return {line.rstrip("\n"): i for i, line in enumerate(f)}, added
    vocab_json = _read_json(os.path.join(folder, "vocab.json"))
    if isinstance(vocab_json, dict):
        return {str(k): int(v) for k, v in vocab_json.items() if isinstance(v, int)}, added
    return None


def _record(name: str, mapping: dict[str, int], added: Iterable[int]) -> dict[str, Any]:
    digest = hashlib.sha256()
    for token, i in sorted(mapping.items(), key=lambda kv: kv[1]):
        digest.update(f"{i}\t{token}\n".encode())
    ids = [*mapping.values(), *added]
    return {"name": name, "vocab_size": max(ids) + 1 if ids else 0, "vocab_sha256": digest.hexdigest()}


def tokenizer_record(
    name: str, tokenizer_json: Optional[str] = None, folder: Optional[str] = None
) -> dict | None:
    """``{name, vocab_size, vocab_sha256}`` of a tokenizer, from its serialized JSON or its folder; None if unknown.

    The fingerprint covers the model's vocabulary (token -> id), which decides what the ids mean; added special
    tokens count toward ``vocab_size`` only.
    """
    if tokenizer_json is not None:
        found = _vocab_from_tokenizer_json(json.loads(tokenizer_json))
    elif folder is not None:
        found = _vocab_from_folder(folder)
    else:
        return None
    if not found or not found[0]:
        return None
    return _record(name, *found)


def write_tokenizer_record(
    split_dirs: Iterable[str | os.PathLike], name: str, tokenizer_json: str, extra: Optional[dict] = None
) -> None:
    """Write ``provenance.json`` naming the tokenizer (``name`` as given to convert) into each split folder, with
    ``extra`` beside it (finetuning rows: the ``max_seq_len`` they were cut to)."""
    record = tokenizer_record(name, tokenizer_json=tokenizer_json)
    if record is None:
        return
    text = json.dumps({"tokenizer": record, **(extra or {})}, indent=2) + "\n"
    for d in split_dirs:
        (Path(d) / PROVENANCE_FILENAME).write_text(text)


def read_tokenizer_record(split_dir: str | os.PathLike) -> dict | None:
    """The tokenizer record of a split folder, or None (no provenance.json: older data or another tool)."""
    data = _read_json(os.path.join(str(split_dir), PROVENANCE_FILENAME))
    record = data.get("tokenizer") if isinstance(data, dict) else None
    return record if isinstance(record, dict) and record.get("vocab_sha256") else None


def read_max_seq_len(split_dir: str | os.PathLike) -> int | None:
    """The ``--max-seq-len`` a split's finetuning rows were converted with, or None when not recorded."""
    data = _read_json(os.path.join(str(split_dir), PROVENANCE_FILENAME))
    n = data.get("max_seq_len") if isinstance(data, dict) else None
    return n if isinstance(n, int) else None
