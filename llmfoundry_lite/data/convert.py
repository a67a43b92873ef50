"""Convert a text corpus to MDS shards (streaming's MDSWriter), one folder per split.

Sources: ``embedded`` (Python's own English prose, offline), a text file (one document per blank-line separated
paragraph), a folder of text files (one document per file), JSON Lines / Parquet files (``--text-field``), and
``hf:NAME[:CONFIG]`` Hugging Face datasets streamed with the ``datasets`` library (``hf:LOCAL_FOLDER`` takes
that same code path offline). Plain local files are read directly, without importing ``datasets``.

Modes:
* raw (default): a ``text`` column (``str``); MLM collators tokenize on the fly.
* concatenated (``tokenizer`` + ``concat_tokens=N``): documents are tokenized in batches by worker processes,
  wrapped in BOS/EOS, concatenated, and cut into rows of exactly N ids (``tokens``, ``ndarray:int32:N``); the
  final partial row is dropped. A tokenizer without BOS/EOS (BERT's WordPiece) packs with ``bos_text`` /
  ``eos_text`` instead (e.g. ``[CLS]`` / ``[SEP]``): those texts, tokenized without special tokens, go around
  each document, as llm-foundry's ``ConcatTokensDataset`` does.

Each split is written to a hidden temporary folder and renamed into place only after it is complete, so an
interrupted or failed conversion never leaves a folder with an ``index.json`` that looks finished.
Held-out splits are chosen by stratified sampling (one seeded-random document in each block of ~1/fraction):
deterministic, exact to the fraction, and streaming-friendly (no need to know the corpus size in advance).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import random
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional

from llmfoundry_lite.compat import import_mds_writer
from llmfoundry_lite.data.provenance import write_tokenizer_record
from llmfoundry_lite.data.sources import open_source, split_long
from llmfoundry_lite.errors import RecipeError

CHUNK_DOCS = (
    64  # documents per tokenization task: big enough to amortize IPC, small enough to balance workers
)
CHUNK_CHARS = 1 << 18


# ---------------------------------------------------------------------------------------------------------
# Tokenization (worker processes)
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FastTokenizer:
    """A ``tokenizers.Tokenizer`` (as JSON, picklable) and its BOS/EOS ids; loading needs no transformers."""

    name: str
    json: str
    bos_id: Optional[int]
    eos_id: Optional[int]


def _special_content(v: Any) -> Optional[str]:
    return v.get("content") if isinstance(v, dict) else v


def load_fast_tokenizer(name_or_path: str) -> FastTokenizer:
    """Load a tokenizer for batched encoding: a local HF folder (tokenizer.json) directly, else through HF."""
    from tokenizers import Tokenizer

    path = pathlib.Path(os.path.expanduser(name_or_path))
    if (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        specials: dict[str, Any] = {}
        for fname in ("tokenizer_config.json", "special_tokens_map.json"):
            f = path / fname
            if f.is_file():
                with open(f) as fh:
                    specials.update(
                        {k: v for k, v in json.load(fh).items() if k in ("bos_token", "eos_token")}
                    )
        bos = _special_content(specials.get("bos_token"))
        eos = _special_content(specials.get("eos_token"))
        bos_id = tok.token_to_id(bos) if bos else None
        eos_id = tok.token_to_id(eos) if eos else None
    else:
        from llmfoundry_lite.data.tokenizers import hf_tokenizer

        try:
            hf = hf_tokenizer(name_or_path)
        except RecipeError as e:
            raise RecipeError(e.detail, key="--tokenizer") from None
        if not getattr(hf, "is_fast", False):
            raise RecipeError(
                f"tokenizer {name_or_path!r} has no fast (Rust) version; batched conversion needs one"
            )
        tok, bos_id, eos_id = hf.backend_tokenizer, hf.bos_token_id, hf.eos_token_id
    tok.no_truncation()
    tok.no_padding()
    return FastTokenizer(name_or_path, tok.to_str(), bos_id, eos_id)


_worker_tok: Any = None


def _pool_context() -> Any:
    """The multiprocessing context of the tokenization workers: forkserver where available, else spawn.

    Not fork: a forked worker copies the caller's locks mid-state (threads of torch, tokenizers or a test runner)
    and its Python signal handlers, so it can block forever at start-up and ignore SIGTERM, and the parent then
    waits on it forever (the old ``Pool.terminate()`` -> ``join()`` hang). Forkserver workers fork from a clean
    single-threaded server that has already imported this module and ``tokenizers``.
    """
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, "tokenizers"])  # only used when this starts the server
        return ctx
    return mp.get_context("spawn")


class _TokenizerPool:
    """Worker processes that tokenize chunks in order, with at most ``4 x workers`` chunks in flight.

    ``concurrent.futures`` rather than ``multiprocessing.Pool``: a worker that dies (killed, out of memory, or a
    script without a ``__main__`` guard re-running itself) breaks the executor with an error, where ``Pool``
    silently starts a replacement forever. The bounded window keeps memory flat on any corpus size.
    """

    def __init__(self, workers: int, tok_json: str, tasks: Iterator[Any]):
        from concurrent.futures import ProcessPoolExecutor

        self._executor = ProcessPoolExecutor(
            workers, mp_context=_pool_context(), initializer=_worker_init, initargs=(tok_json,)
        )
        self._tasks = tasks
        self._ahead = 4 * workers
        self._pending: collections.deque = collections.deque()
        self._fill()  # start now, so tokenization overlaps the caller's next imports

    def _fill(self) -> None:
        while len(self._pending) < self._ahead:
            task = next(self._tasks, None)
            if task is None:
                return
            self._pending.append(self._executor.submit(_encode_chunk, task))

    def __iter__(self) -> Iterator[tuple[str, int, Any]]:
        from concurrent.futures.process import BrokenProcessPool

        try:
            while self._pending:
                future = self._pending.popleft()
                self._fill()
                yield future.result()
        except BrokenProcessPool as e:
            raise RecipeError(
                f"a tokenization worker process died ({e}); when calling convert() from a script, call it under "
                '`if __name__ == "__main__":` (workers start a fresh interpreter that imports the script), or '
                "use --num-workers 0",
                key="--num-workers",
            ) from None

    def close(self) -> None:
        """All results consumed: let the workers exit and wait for them."""
        self._executor.shutdown(wait=True)

    def cancel(self) -> None:
        """Stop early (an error or Ctrl-C): drop queued chunks; workers exit after the chunk they hold."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _worker_init(tok_json: str) -> None:
    global _worker_tok
    # Ctrl-C reaches the whole process group: the parent stops the pool; workers must not print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One thread per worker process: the processes already fill the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _worker_tok = Tokenizer.from_str(tok_json)


Ids = Optional[tuple[int, ...]]  # a document separator: None, or the ids put before/after each document


def _encode_chunk(task: tuple[str, list[str], Ids, Ids]) -> tuple[str, int, Any]:
    """Tokenize one chunk of documents; return (split, n_docs, flat int32 ids with BOS/EOS around each doc)."""
    import numpy as np

    split, texts, bos, eos = task
    # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets, which packing does not need.
    encode = getattr(_worker_tok, "encode_batch_fast", _worker_tok.encode_batch)
    encs = encode(texts, add_special_tokens=False)
    pieces = []
    pre = np.array(bos, dtype=np.int32) if bos else None
    post = np.array(eos, dtype=np.int32) if eos else None
    for e in encs:
        if pre is not None:
            pieces.append(pre)
        pieces.append(np.asarray(e.ids, dtype=np.int32))
        if post is not None:
            pieces.append(post)
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return split, len(texts), flat


# ---------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SplitStats:
    """What one split folder received."""

    documents: int = 0
    tokens: int = 0
    samples: int = 0
    shards: int = 0
    bytes: int = 0


@dataclasses.dataclass
class ConvertSummary:
    """Result of a conversion: per-split stats, wall time, and where the splits are."""

    out: str
    mode: str
    splits: dict[str, SplitStats]
    seconds: float

    @property
    def documents(self) -> int:
        """Documents over all splits."""
        return sum(s.documents for s in self.splits.values())

    @property
    def tokens(self) -> int:
        """Tokens over all splits (0 in raw mode without a tokenizer)."""
        return sum(s.tokens for s in self.splits.values())

    def format(self) -> str:
        """A human-readable closing summary."""
        lines = [f"converted to {self.out} ({self.mode}) in {self.seconds:.1f} s"]
        for name, s in self.splits.items():
            tok = f", {s.tokens:,} tokens" if s.tokens else ""
            lines.append(
                f"  {name}: {s.documents:,} documents{tok}, {s.samples:,} samples, {s.shards} shard(s), "
                f"{s.bytes / 1e6:.2f} MB"
            )
        rate = f", {self.tokens / self.seconds:,.0f} tok/s" if self.tokens and self.seconds > 0 else ""
        lines.append(f"  total: {self.documents:,} documents{rate}")
        return "\n".join(lines)


class _HoldOut:
    """Stratified held-out selection: documents come in blocks of ~1/f; one seeded-random document per block.

    Deterministic for a seed, exact to the fraction, spread evenly over the stream, and it needs no corpus size.
    """

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


def _routed_docs(
    sources: dict[Optional[str], Iterable[str]],
    splits: Sequence[str],
    val_fraction: float,
    seed: int,
    max_chars: Optional[int],
    max_docs: Optional[dict[str, int]] = None,
) -> Iterator[tuple[str, str]]:
    """(split, document) pairs in a deterministic order; at most ``max_docs[split]`` per split when given."""
    # Hold out val documents from the training stream when val is wanted and the source has no val split.
    hold_out = "val" in splits and "val" not in sources
    given = dict.fromkeys(splits, 0)

    def full(split: str) -> bool:
        return max_docs is not None and given[split] >= max_docs[split]

    for src_split, docs in sources.items():
        if src_split is not None and src_split not in splits and not (src_split == "train" and hold_out):
            continue
        hold = _HoldOut(val_fraction, seed) if (hold_out and src_split in (None, "train")) else None
        for doc in docs:
            if all(full(n) for n in splits):
                return  # the subset is complete: read no further (a C4-sized source is never read to its end)
            if hold is None and full(src_split or "train"):
                break  # this source feeds one split, and it is full
            if not doc or not doc.strip():
                continue
            if hold is not None:
                split = "val" if hold.is_val() else "train"
            else:
                split = src_split or "train"
            if split not in splits:
                continue
            for piece in split_long(doc, max_chars) if max_chars else (doc,):
                if full(split):
                    break
                given[split] += 1
                yield split, piece


def _chunks(pairs: Iterator[tuple[str, str]], bos: Ids, eos: Ids):
    """Group routed documents into per-split tokenization tasks (independent of the number of workers)."""
    pending: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for split, doc in pairs:
        lst = pending.setdefault(split, [])
        lst.append(doc)
        sizes[split] = sizes.get(split, 0) + len(doc)
        if len(lst) >= CHUNK_DOCS or sizes[split] >= CHUNK_CHARS:
            yield split, lst, bos, eos
            pending[split], sizes[split] = [], 0
    for split, lst in pending.items():
        if lst:
            yield split, lst, bos, eos


class _Progress:
    def __init__(self, enabled: bool):
        self.t0 = time.perf_counter()
        self.docs = 0
        self.tokens = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(unit=" docs", dynamic_ncols=True, file=sys.stderr, mininterval=0.5, leave=False)

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(docs)
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(
                f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tok/s", refresh=False
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _parse_splits(splits: Sequence[str] | str) -> list[str]:
    names = [s.strip() for s in (splits.split(",") if isinstance(splits, str) else splits) if s.strip()]
    if not names or len(set(names)) != len(names):
        raise RecipeError(f"--splits must list distinct split names, got {splits!r}", key="--splits")
    bad = [n for n in names if n not in ("train", "val")]
    if bad:
        raise RecipeError(f"unknown split {bad[0]!r}; --splits takes train and/or val", key="--splits")
    return names


def convert(
    source: str,
    out: str | os.PathLike,
    *,
    splits: Sequence[str] | str = ("train", "val"),
    val_fraction: float = 0.05,
    seed: int = 17,
    compression: Optional[str] = None,
    tokenizer: Optional[str] = None,
    concat_tokens: Optional[int] = None,
    bos: Optional[bool] = None,
    eos: Optional[bool] = None,
    text_field: str = "text",
    num_workers: Optional[int] = None,
    max_chars: Optional[int] = None,
    size_limit: str | int = "64mb",
    progress: bool = False,
    max_docs: Optional[int] = None,
    max_tokens: Optional[int] = None,
    bos_text: Optional[str] = None,
    eos_text: Optional[str] = None,
) -> ConvertSummary:
    """Convert ``source`` into MDS splits under ``out`` (raw text, or concatenated token rows of ``concat_tokens``).

    ``max_docs`` / ``max_tokens`` convert a subset: that many documents / tokens in all, divided between train
    and val as ``val_fraction`` says (tokens need a ``tokenizer`` to be counted); the source is read no further.
    ``bos_text`` / ``eos_text`` (packing only) replace the tokenizer's BOS / EOS token around each document.
    """
    t0 = time.perf_counter()
    names = _parse_splits(splits)
    if "val" in names and not 0.0 < val_fraction < 1.0:
        raise RecipeError(f"--val-fraction must be in (0, 1), got {val_fraction}", key="--val-fraction")
    if concat_tokens is not None and concat_tokens <= 0:
        raise RecipeError(f"--concat-tokens must be positive, got {concat_tokens}", key="--concat-tokens")
    if concat_tokens is not None and tokenizer is None:
        raise RecipeError(
            "--concat-tokens needs --tokenizer (a local folder or a hub name)", key="--tokenizer"
        )
    for flag, text, wanted in (("bos", bos_text, bos), ("eos", eos_text, eos)):
        if text is None:
            continue
        if concat_tokens is None:
            raise RecipeError(
                "separates packed documents: it needs --concat-tokens (and --tokenizer)", key=f"--{flag}-text"
            )
        if not text:
            raise RecipeError(
                "is empty; give the text to put between documents, e.g. '[SEP]'", key=f"--{flag}-text"
            )
        if wanted is False:
            raise RecipeError(
                f"--{flag}-text and --no-{flag} contradict each other; drop one", key=f"--{flag}-text"
            )
    if max_chars is not None and max_chars < 16:
        raise RecipeError(f"--max-chars must be at least 16, got {max_chars}", key="--max-chars")
    if max_tokens is not None and tokenizer is None:
        raise RecipeError(
            "needs --tokenizer to count tokens; add one, or use --max-docs for a subset of raw text",
            key="--max-tokens",
        )
    doc_budget = split_budgets(max_docs, names, val_fraction, "docs") if max_docs is not None else None
    token_budget = (
        split_budgets(max_tokens, names, val_fraction, "tokens") if max_tokens is not None else None
    )
    if compression not in (None, "zstd", "gz", "bz2", "snappy", "br") and not str(compression).startswith(
        ("zstd:", "gz:", "bz2:", "br:")
    ):
        raise RecipeError(
            f"unknown compression {compression!r}; use zstd (or gz, bz2, br, snappy)", key="--compression"
        )
    out = pathlib.Path(os.path.expanduser(str(out)))
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {str(out)!r} is a file; give a folder", key="--out")

    fast = load_fast_tokenizer(tokenizer) if tokenizer else None
    bos_ids: Ids = None
    eos_ids: Ids = None
    if fast is not None and concat_tokens is not None:
        bos_ids = _separator(fast, "bos", bos, bos_text)
        eos_ids = _separator(fast, "eos", eos, eos_text)
        if bos_ids is None and eos_ids is None and bos is None and eos is None:
            raise RecipeError(
                f"tokenizer {tokenizer!r} has no eos (or bos) token to separate packed documents; give the "
                "separator as text (--eos-text '[SEP]', e.g. for a BERT WordPiece tokenizer), use a tokenizer "
                "with one (e.g. `data tokenizer --train --kind bpe`) or pass --no-eos to pack without separators",
                key="--tokenizer",
            )
    sources = open_source(source, text_field)
    pairs = _routed_docs(sources, names, val_fraction, seed, max_chars, doc_budget)

    # Worker processes start before streaming (and torch) are imported, so tokenization overlaps the import.
    workers = _num_workers(num_workers) if concat_tokens is not None else 0
    pool: Optional[_TokenizerPool] = None
    results: Iterator[Any]
    if concat_tokens is not None:
        tasks = _chunks(pairs, bos_ids, eos_ids)
        if workers > 0:
            pool = _TokenizerPool(workers, fast.json, tasks)
            results = iter(pool)
        else:
            _worker_init_inproc(fast.json)
            results = map(_encode_chunk, tasks)
    else:
        results = iter(pairs)

    out.mkdir(parents=True, exist_ok=True)
    tmp_dirs = {n: out / f".{n}.partial-{os.getpid()}" for n in names}
    for d in tmp_dirs.values():
        shutil.rmtree(d, ignore_errors=True)
    stats = {n: SplitStats() for n in names}
    bar = _Progress(progress)
    writers: dict[str, Any] = {}
    try:
        MDSWriter = import_mds_writer()
        if concat_tokens is not None:
            columns = {"tokens": f"ndarray:int32:{concat_tokens}"}
        else:
            columns = {"text": "str"}
        for n in names:
            writers[n] = MDSWriter(
                out=str(tmp_dirs[n]), columns=columns, compression=compression, size_limit=size_limit
            )
        if concat_tokens is not None:
            stopped = _write_concat(results, writers, stats, concat_tokens, bar, token_budget)
            if pool is not None:
                if stopped:  # the token budget is spent: drop the chunks still queued
                    pool.cancel()
                else:
                    pool.close()  # every chunk is done: the workers exit on their own
                pool = None
        else:
            _write_raw(results, writers, stats, bar, fast, token_budget)
        empty = [n for n in names if stats[n].samples == 0]
        if empty:
            detail = f"fewer than {concat_tokens} tokens" if concat_tokens else "no documents"
            raise RecipeError(
                f"source {source!r} gave split {empty[0]!r} {detail}; "
                + (
                    "use a larger source, a smaller --concat-tokens or a larger --val-fraction"
                    if concat_tokens
                    else "check the source and --text-field, or use --splits train"
                ),
                key="--source",
            )
        for n in names:
            writers[n].finish()
        writers.clear()
        for n in names:
            _publish(tmp_dirs[n], out / n, stats[n])
        if concat_tokens is not None:  # token rows mean something only with this tokenizer: say which
            write_tokenizer_record([out / n for n in names], tokenizer, fast.json)
    finally:
        bar.close()
        if pool is not None:  # failed or interrupted part-way: drop the queued chunks
            pool.cancel()
        for w in writers.values():  # failed: stop writers without writing an index.json
            try:
                w.cancel_future_jobs()
            except Exception:
                pass
        for d in tmp_dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    mode = f"concat {concat_tokens} tokens" if concat_tokens else "raw text"
    return ConvertSummary(str(out), mode, stats, time.perf_counter() - t0)


def _worker_init_inproc(tok_json: str) -> None:
    from tokenizers import Tokenizer

    global _worker_tok
    _worker_tok = Tokenizer.from_str(tok_json)


def _num_workers(requested: Optional[int]) -> int:
    if requested is not None:
        if requested < 0:
            raise RecipeError(f"--num-workers must be >= 0, got {requested}", key="--num-workers")
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _separator(fast: FastTokenizer, which: str, wanted: Optional[bool], text: Optional[str]) -> Ids:
    """The ids put before (bos) or after (eos) each packed document: ``text`` tokenized, else the special token."""
    if text is not None:
        from tokenizers import Tokenizer

        # No special tokens added around it (llm-foundry's add_special_tokens=False); a special token written in
        # the text ('[SEP]') is still recognised as that one token.
        ids = tuple(Tokenizer.from_str(fast.json).encode(text, add_special_tokens=False).ids)
        if not ids:
            raise RecipeError(
                f"{text!r} gives no tokens with tokenizer {fast.name!r}; give a text it encodes, e.g. '[SEP]'",
                key=f"--{which}-text",
            )
        return ids
    tid = fast.bos_id if which == "bos" else fast.eos_id
    if wanted is None:  # default: use it when the tokenizer defines it
        return None if tid is None else (tid,)
    if not wanted:
        return None
    if tid is None:
        raise RecipeError(
            f"tokenizer {fast.name!r} has no {which} token but --{which} was requested; use --no-{which}, "
            f"--{which}-text TEXT (e.g. '[SEP]'), or a tokenizer that defines it",
            key="--tokenizer",
        )
    return (tid,)


def _write_raw(
    pairs: Iterator[tuple[str, str]],
    writers: dict[str, Any],
    stats: dict[str, SplitStats],
    bar: _Progress,
    fast: Optional[FastTokenizer],
    max_tokens: Optional[dict[str, int]] = None,
) -> None:
    tok = None
    if fast is not None:  # only to report token counts
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(fast.json)
    batch: list[tuple[str, str]] = []

    def flush() -> None:
        lens = (
            [len(e.ids) for e in tok.encode_batch([d for _, d in batch], add_special_tokens=False)]
            if tok
            else ([0] * len(batch))
        )
        for (split, doc), n_tok in zip(batch, lens):
            st = stats[split]
            if max_tokens is not None and st.tokens >= max_tokens[split]:
                continue  # this split's budget is spent (a document is kept whole: the last one may cross it)
            writers[split].write({"text": doc})
            st.documents += 1
            st.samples += 1
            st.tokens += n_tok
        bar.update(len(batch), sum(lens))
        batch.clear()

    for pair in pairs:
        batch.append(pair)
        if len(batch) >= CHUNK_DOCS:
            flush()
            if max_tokens is not None and all(stats[n].tokens >= max_tokens[n] for n in max_tokens):
                return
    if batch:
        flush()


def _write_concat(
    results: Iterator[Any],
    writers: dict[str, Any],
    stats: dict[str, SplitStats],
    n: int,
    bar: _Progress,
    max_tokens: Optional[dict[str, int]] = None,
) -> bool:
    """Cut the token stream of each split into rows of ``n``; True when it stopped at the token budget."""
    import numpy as np

    # A budget of T tokens is ceil(T / n) rows: the rows hold at least T tokens.
    max_rows = {k: -(-v // n) for k, v in max_tokens.items()} if max_tokens is not None else None
    carry: dict[str, Any] = {}
    for split, n_docs, flat in results:
        st = stats[split]
        if max_rows is not None and st.samples >= max_rows[split]:
            continue
        buf = np.concatenate([carry[split], flat]) if split in carry else flat
        rows = len(buf) // n
        if max_rows is not None:
            rows = min(rows, max_rows[split] - st.samples)
        w = writers[split]
        for r in range(rows):
            w.write({"tokens": buf[r * n : (r + 1) * n]})
        carry[split] = buf[rows * n :]
        st.documents += n_docs
        st.tokens += len(flat)
        st.samples += rows
        bar.update(n_docs, len(flat))
        if max_rows is not None and all(stats[k].samples >= v for k, v in max_rows.items()):
            for k in max_rows:  # report what the rows hold, not the tokenized tail that was left out
                stats[k].tokens = stats[k].samples * n
            return True
    return False


def _publish(tmp: pathlib.Path, final: pathlib.Path, stats: SplitStats) -> None:
    """Rename a finished split into place (replacing an older one) and record its shard count and size."""
    with open(tmp / "index.json") as f:
        stats.shards = len(json.load(f)["shards"])
    stats.bytes = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------------------------
