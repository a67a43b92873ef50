"""Answers of the checks that build a recipe's model on the meta device, remembered across commands.

Building the model (to check its shapes, to count its parameters) imports torch, Composer and the model code:
seconds for every ``validate``, ``show``, sweep trial and row of the mistakes table, although the answer depends
only on the model block (and the tokenizer files) and on the code. The answer is kept in a small JSON file named
by a hash of those, of every source file of the package (size and modification time) and of the installed torch,
transformers and Composer versions: any change recomputes. Only successes are kept, so an invalid block is
built, and reported, every time. ``LLMFOUNDRY_LITE_CACHE`` sets the folder; ``off`` turns remembering off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_ENV = "LLMFOUNDRY_LITE_CACHE"
PACKAGE = Path(__file__).resolve().parents[1]
_VERSIONED = ("torch", "transformers", "mosaicml", "tokenizers")


def cache_dir() -> Path | None:
    """The folder answers are kept in (None when turned off)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return None if configured.lower() in ("off", "0", "false", "no") else Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmfoundry_lite" / "checks"


@functools.cache
def code_fingerprint() -> str:
    """A hash of the package's source files (path, size, mtime) and of the versions of what builds models."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        st = path.stat()
        h.update(f"{path.relative_to(PACKAGE)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    for dist in _VERSIONED:
        try:
            h.update(f"{dist}=={version(dist)}\n".encode())
        except PackageNotFoundError:
            h.update(f"{dist} absent\n".encode())
    return h.hexdigest()


def folder_fingerprint(path: Any) -> list[Any] | None:
    """(name, size, mtime) of the files of a local folder, or None when ``path`` is not one."""
    try:
        folder = Path(str(path)).expanduser()
        if not folder.is_dir():
            return None
        return [
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()
        ]
    except OSError:
        return None


def remembered(kind: str, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()``, or its answer from an earlier command with the same ``kind``, ``key`` and code.

    ``key`` is plain data (JSON); the answer must be too. An answer of None is not kept.
    """
    folder = cache_dir()
    if folder is None:
        return compute()
    text = json.dumps([kind, key, code_fingerprint()], sort_keys=True, default=repr)
    path = folder / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["answer"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    answer = compute()
    if answer is None:
        return answer
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp", encoding="utf-8") as f:
            json.dump({"answer": answer}, f)
        os.replace(f.name, path)  # whole or absent: parallel sweep trials may write the same answer
    except OSError:  # a read-only home: answers are simply not kept
        pass
    return answer
