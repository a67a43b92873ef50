"""Converting units of a source to MDS, in worker processes side by side (``python -m llmfoundry_lite.data.units``).

A conversion's work folder holds the job (``job.json``), the tokenizer, and one folder per finished unit
(``units/00007/``: an MDS folder per split, the leftover tokens of concat mode, ``stats.json``). A unit is
written to a temporary folder and renamed when complete, so a finished unit is never redone: a conversion
killed halfway continues, with the same command, from the units it finished. Workers take the next unit nobody
has claimed in this run (a file created exclusively), so the work spreads over the processes, and every unit's
output depends only on the unit: the result is the same for any number of workers.

With a subset budget (``--max-docs`` / ``--max-tokens``) one worker converts the units in order, each getting
what the units before it left of the budget.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, Optional

from llmfoundry_lite.data.holdout import Router, unit_seed
from llmfoundry_lite.data.readers import Position, Unit, read_rows, text_of
from llmfoundry_lite.data.sources import split_long
from llmfoundry_lite.data.writers import UnitWriters
from llmfoundry_lite.errors import RecipeError

CHUNK_DOCS = 64  # documents tokenized together: amortizes the call, keeps memory flat
CHUNK_CHARS = 1 << 18
REPORT_S = 0.5


@dataclasses.dataclass
class Job:
    """Everything a worker needs to convert any unit (JSON in the work folder)."""

    mode: str  # raw | concat | finetune
    units: list[dict]
    wanted: list[str]
    hold_out: bool
    val_fraction: float
    seed: int
    text_field: str = "text"
    max_chars: Optional[int] = None
    compression: Optional[str] = None
    size_limit: Any = "64mb"
    tokenizer: Optional[dict] = None  # FastTokenizer fields
    concat_tokens: Optional[int] = None
    bos: Optional[list[int]] = None
    eos: Optional[list[int]] = None
    max_docs: Optional[dict[str, int]] = None
    max_tokens: Optional[dict[str, int]] = None
    max_seq_len: Optional[int] = None
    pack: bool = False
    chat_template: Optional[str] = None

    def columns(self) -> dict[str, str]:
        """The MDS columns of this mode."""
        if self.mode == "concat":
            return {"tokens": f"ndarray:int32:{self.concat_tokens}"}
        if self.mode == "finetune":
            cols = {"input_ids": "ndarray:int32", "labels": "ndarray:int32"}
            return {**cols, "sequence_id": "ndarray:int32"} if self.pack else cols
        return {"text": "str"}


def unit_dir(work: pathlib.Path, i: int) -> pathlib.Path:
    """The folder of the ``i``-th unit once it is finished."""
    return work / "units" / f"{i:05d}"


def unit_stats(work: pathlib.Path, i: int) -> Optional[dict[str, Any]]:
    """The per-split counts of a finished unit, or None while it is not finished."""
    try:
        with open(unit_dir(work, i) / "stats.json") as f:
            return json.load(f)
    except OSError:
        return None


class Progress:
    """What one worker has done in this run: documents, tokens and source bytes."""

    def __init__(self, sink: Optional[Callable[[Progress], None]] = None):
        self.docs = self.tokens = 0
        self.bytes_before = 0  # bytes of the units this worker finished
        self.position = Position()
        self.sink, self.last = sink, 0.0

    @property
    def bytes(self) -> int:
        """Source bytes read, including the unit in progress."""
        return self.bytes_before + self.position.done

    def add(self, docs: int, tokens: int, force: bool = False) -> None:
        """Count documents and tokens; pass the figures on at most every ``REPORT_S``."""
        self.docs += docs
        self.tokens += tokens
        now = time.monotonic()
        if self.sink is not None and (force or now - self.last >= REPORT_S):
            self.last = now
            self.sink(self)


def _remaining(
    job: Job, work: pathlib.Path, i: int, key: str, budget: Optional[dict[str, int]]
) -> Optional[dict]:
    """What the units before ``i`` left of a per-split budget (units convert in order under a budget)."""
    if budget is None:
        return None
    left = dict(budget)
    for j in range(i):
        for split, st in (unit_stats(work, j) or {}).get("splits", {}).items():
            left[split] = left.get(split, 0) - int(st[key])
    return left


def convert_unit(job: Job, work: pathlib.Path, i: int, progress: Progress) -> dict[str, Any]:
    """Convert the ``i``-th unit into ``units/<i>`` (atomically); its per-split counts."""
    import numpy as np

    unit = Unit(**job.units[i])
    tmp = work / "units" / f".{i:05d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    router = Router(unit.split, job.wanted, job.hold_out, job.val_fraction, unit_seed(job.seed, i))
    docs_left = _remaining(job, work, i, "documents", job.max_docs)
    rows_left = None
    if job.max_tokens is not None:
        n = job.concat_tokens or 0
        # A budget of T tokens is ceil(T / n) rows of n tokens (raw text: T tokens, a document kept whole).
        budget = {k: -(-v // n) for k, v in job.max_tokens.items()} if n else job.max_tokens
        rows_left = _remaining(job, work, i, "samples" if n else "tokens", budget)
    writers = UnitWriters(tmp, job.columns(), job.compression, job.size_limit)
    progress.position = Position()
    tok = None
    if job.tokenizer is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(job.tokenizer["json"])
    sink = _Sink(job, writers, tok, docs_left, rows_left, progress)
    try:
        if router.splits and not sink.full(router.splits):
            columns = None if job.mode == "finetune" else [job.text_field]  # Parquet reads only those
            for where, row in read_rows(unit, progress.position, columns):
                if job.mode == "finetune":
                    split = router.route()
                    if split is not None:
                        sink.example(split, row, where)
                else:
                    doc = text_of(row, job.text_field, where)
                    if not doc or not doc.strip():
                        continue
                    split = router.route()
                    if split is None:
                        continue
                    for piece in split_long(doc, job.max_chars) if job.max_chars else (doc,):
                        sink.doc(split, piece)
                if sink.full(router.splits):
                    break  # the subset is complete: read no further
        sink.flush()
        writers.finish()
    except BaseException:
        writers.cancel()
        raise
    stats = {"splits": {k: dataclasses.asdict(v) for k, v in writers.stats.items()}, "bytes": unit.size}
    for split, tail in sink.tails.items():
        if len(tail):
            np.save(tmp / f"{split}.tail.npy", tail)
    with open(tmp / "stats.json", "w") as f:
        json.dump(stats, f, sort_keys=True)
    os.replace(tmp, unit_dir(work, i))
    progress.bytes_before += unit.size
    progress.position = Position()
    progress.add(0, 0, force=True)
    return stats


class _Sink:
    """Routes a unit's documents into its writers: raw text, packed token rows, or finetuning examples."""

    def __init__(
        self, job: Job, writers: UnitWriters, tok: Any, docs_left: Any, rows_left: Any, progress: Progress
    ):
        self.job, self.w, self.tok, self.progress = job, writers, tok, progress
        self.docs_left, self.rows_left = docs_left, rows_left
        self.pending: dict[str, list[str]] = {}
        self.chars: dict[str, int] = {}
        self.tails: dict[str, Any] = {}
        self.examples: dict[str, list] = {}
        self.encoder = None
        if job.mode == "finetune":
            from llmfoundry_lite.data.finetune import ExampleEncoder
            from llmfoundry_lite.data.tokenizers import FastTokenizer

            self.encoder = ExampleEncoder(FastTokenizer(**job.tokenizer), job.max_seq_len, job.chat_template)

    def full(self, splits: set[str]) -> bool:
        """Whether every split in ``splits`` has spent its budget."""
        return all(self._spent(s) for s in splits) if splits else True

    def _spent(self, split: str) -> bool:
        st = self.w.split_stats(split)
        if self.docs_left is not None and st.documents + len(
            self.pending.get(split, ())
        ) >= self.docs_left.get(split, 0):
            return True
        if self.rows_left is not None:
            have = st.samples if self.job.concat_tokens else st.tokens
            return have >= self.rows_left.get(split, 0)
        return False

    def doc(self, split: str, doc: str) -> None:
        """One document of ``split``."""
        if self._spent(split):
            return
        lst = self.pending.setdefault(split, [])
        lst.append(doc)
        self.chars[split] = self.chars.get(split, 0) + len(doc)
        if len(lst) >= CHUNK_DOCS or self.chars[split] >= CHUNK_CHARS:
            self._flush_split(split)

    def flush(self) -> None:
        """Write what is pending."""
        for split in list(self.pending):
            self._flush_split(split)
        for split in list(self.examples):
            self._flush_examples(split)

    def _flush_split(self, split: str) -> None:
        import numpy as np

        docs, self.pending[split], self.chars[split] = self.pending.get(split, []), [], 0
        if not docs:
            return
        st = self.w.split_stats(split)
        if self.job.mode == "concat":
            from llmfoundry_lite.data.tokenizers import encode_wrapped

            bos, eos = self.job.bos, self.job.eos
            flat = encode_wrapped(self.tok, docs, tuple(bos) if bos else None, tuple(eos) if eos else None)
            n = self.job.concat_tokens
            buf = np.concatenate([self.tails[split], flat]) if split in self.tails else flat
            rows = len(buf) // n
            if self.rows_left is not None:
                rows = max(0, min(rows, self.rows_left.get(split, 0) - st.samples))
            for r in range(rows):
                self.w.write(split, {"tokens": buf[r * n : (r + 1) * n]})
            self.tails[split] = buf[rows * n :]
            st.documents, st.tokens, st.samples = (
                st.documents + len(docs),
                st.tokens + len(flat),
                st.samples + rows,
            )
            self.progress.add(len(docs), len(flat))
            return
        lens = [0] * len(docs)
        if self.tok is not None:  # raw text with a tokenizer: only to count tokens
            lens = [len(e.ids) for e in self.tok.encode_batch(docs, add_special_tokens=False)]
        for doc, n_tok in zip(docs, lens):
            if self.rows_left is not None and st.tokens >= self.rows_left.get(split, 0):
                break  # the token budget is spent (a document is kept whole: the last one may cross it)
            self.w.write(split, {"text": doc})
            st.documents, st.samples, st.tokens = st.documents + 1, st.samples + 1, st.tokens + n_tok
        self.progress.add(len(docs), sum(lens))

    def example(self, split: str, row: Any, where: str) -> None:
        """One finetuning row of ``split``."""
        st = self.w.split_stats(split)
        if self.docs_left is not None and st.documents + st.dropped >= self.docs_left.get(split, 0):
            return
        ex = self.encoder.encode(row, where)
        if ex is None:
            st.dropped += 1
            return
        st.documents += 1
        st.tokens += len(ex[0])
        self.examples.setdefault(split, []).append(ex)
        self.progress.add(1, len(ex[0]))
        if len(self.examples[split]) >= CHUNK_DOCS * 16:
            self._flush_examples(split, keep_last_row=True)

    def _flush_examples(self, split: str, keep_last_row: bool = False) -> None:
        import numpy as np

        from llmfoundry_lite.data.finetune import pack

        examples, self.examples[split] = self.examples[split], []
        st = self.w.split_stats(split)
        if not self.job.pack:
            for ids, labels in examples:
                self.w.write(
                    split, {"input_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32)}
                )
                st.samples += 1
            return
        rows = list(pack(iter(examples), self.job.max_seq_len))
        if keep_last_row and rows:  # its examples go on with the next ones, as if packed in one pass
            last = rows.pop()
            starts = [k for k in range(len(last[2])) if k == 0 or last[2][k] != last[2][k - 1]]
            ends = starts[1:] + [len(last[2])]
            self.examples[split] = [(last[0][a:b], last[1][a:b]) for a, b in zip(starts, ends)]
        for ids, labels, seq in rows:
            self.w.write(
                split,
                {
                    "input_ids": np.asarray(ids, np.int32),
                    "labels": np.asarray(labels, np.int32),
                    "sequence_id": np.asarray(seq, np.int32),
                },
            )
            st.samples += 1


def load_job(work: pathlib.Path) -> Job:
    """The job of a work folder."""
    with open(work / "job.json") as f:
        return Job(**json.load(f))


def work_loop(work: pathlib.Path, claims: Optional[pathlib.Path], progress: Progress) -> None:
    """Convert every unfinished unit this worker can claim (all of them in order when ``claims`` is None).

    The worker that finishes the last unit also packs the units' leftover tokens (concat mode), so the parent
    never imports the writer (and the torch that streaming imports with it).
    """
    job = load_job(work)
    for i in range(len(job.units)):
        if unit_stats(work, i) is not None:
            continue
        if claims is not None and not _claim(claims, str(i)):
            continue  # another worker has it
        convert_unit(job, work, i, progress)
    if job.mode == "concat" and all(unit_stats(work, i) is not None for i in range(len(job.units))):
        if not (work / TAIL).is_dir() and (claims is None or _claim(claims, TAIL)):
            write_tail(job, work)


def _claim(claims: pathlib.Path, name: str) -> bool:
    try:
        os.close(os.open(claims / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


TAIL = "tail"  # the rows packed from every unit's leftover tokens, in the work folder


def write_tail(job: Job, work: pathlib.Path) -> None:
    """Pack the units' leftover tokens of each split, in unit order, into rows of their own (``work/tail``)."""
    import numpy as np

    n, counts = job.concat_tokens, {}
    tmp = work / f".{TAIL}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writers = UnitWriters(tmp, job.columns(), job.compression, job.size_limit)
    stats = [unit_stats(work, i) or {} for i in range(len(job.units))]
    for split in job.wanted:
        files = [unit_dir(work, i) / f"{split}.tail.npy" for i in range(len(job.units))]
        pieces = [np.load(f) for f in files if f.is_file()]
        flat = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
        rows = len(flat) // n
        if job.max_tokens is not None:  # a budget of T tokens is ceil(T / n) rows
            done = sum(int(s.get("splits", {}).get(split, {}).get("samples", 0)) for s in stats)
            rows = max(0, min(rows, -(-job.max_tokens[split] // n) - done))
        for r in range(rows):
            writers.write(split, {"tokens": flat[r * n : (r + 1) * n]})
        counts[split] = rows
    writers.finish()
    with open(tmp / "stats.json", "w") as f:
        json.dump(counts, f, sort_keys=True)
    os.replace(tmp, work / TAIL)


def tail_rows(work: pathlib.Path) -> dict[str, int]:
    """Rows per split that ``write_tail`` packed ({} before it ran, or outside concat mode)."""
    try:
        with open(work / TAIL / "stats.json") as f:
            return json.load(f)
    except OSError:
        return {}


def main(argv: list[str]) -> int:
    """Worker process: ``WORK CLAIMS PROGRESS_FILE ERROR_FILE``; exit 2 with the error in ERROR_FILE."""
    import signal

    # Workers run in their own session: a SIGINT comes only from the parent passing on a Ctrl-C. End at once, as
    # SIGTERM does, without a KeyboardInterrupt traceback; the unit in progress is redone by the next run.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the processes fill the cores
    work, claims, progress_file, error_file = (pathlib.Path(a) for a in argv)

    def sink(p: Progress) -> None:
        tmp = progress_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"docs": p.docs, "tokens": p.tokens, "bytes": p.bytes}))
        os.replace(tmp, progress_file)

    try:
        work_loop(work, claims, Progress(sink))
    except RecipeError as e:
        error_file.write_text(json.dumps({"message": e.detail, "key": e.key}))
        return 2
    return 0


if __name__ == "__main__":
    from llmfoundry_lite.startup import exit_fast

    exit_fast(main(sys.argv[1:]))  # the parent merges once every worker has exited: skip torch's teardown
