"""Convert a corpus to MDS shards (streaming's MDSWriter), one folder per split, with every core.

Sources (``sources.py``): ``embedded`` (Python's own English prose, offline), files as the big corpora ship them
(``.json.gz``, ``.jsonl.zst``, ``.parquet``, ``.jsonl``, ``.txt``), globs and folders of shards (splits from the
shard names), and ``hf:NAME[:CONFIG]`` through the ``datasets`` library.

Modes:
* raw (default): a ``text`` column (``str``); MLM collators tokenize on the fly.
* concatenated (``tokenizer`` + ``concat_tokens=N``): documents wrapped in BOS/EOS (or ``bos_text`` /
  ``eos_text``, e.g. ``[CLS]`` / ``[SEP]`` for a tokenizer without them, as llm-foundry's
  ``ConcatTokensDataset``), concatenated and cut into rows of exactly N ids (``tokens``, ``ndarray:int32:N``).
  Each unit's leftover tokens are packed, in unit order, into rows of their own at the end; the final partial
  row is dropped.
* finetuning (``finetune=True``, ``finetune.py``): ``input_ids`` and ``labels`` per example (or per packed row,
  with ``sequence_id``).

Parallelism and resumption are ``units.py``'s: each unit (a shard, or a byte range of a big JSON Lines file) is
converted by one of ``num_workers`` processes (``procs.Processes``) into its own folder; each split is then one
index over the units' shards, in unit order, so the output is byte-identical for any number of workers and for
a conversion that was killed and run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

from llmfoundry_lite.data import units as U
from llmfoundry_lite.data.holdout import parse_splits, split_budgets
from llmfoundry_lite.data.provenance import write_tokenizer_record
from llmfoundry_lite.data.sources import plan_source
from llmfoundry_lite.data.writers import SplitStats, folder_bytes, merge_split, publish
from llmfoundry_lite.errors import RecipeError

WORK_PREFIX = ".convert-"


@dataclasses.dataclass
class ConvertSummary:
    """Result of a conversion: per-split stats, wall time, and where the splits are."""

    out: str
    mode: str
    splits: dict[str, SplitStats]
    seconds: float
    units: int = 1
    resumed: int = 0  # units finished by an earlier, interrupted run of the same command
    workers: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)

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
        how = f"{self.units} unit(s), {self.workers or 'no'} worker process(es)"
        if self.resumed:
            how += f", {self.resumed} unit(s) kept from an interrupted run"
        lines = [f"converted to {self.out} ({self.mode}) in {self.seconds:.1f} s ({how})"]
        for name, s in self.splits.items():
            tok = f", {s.tokens:,} tokens" if s.tokens else ""
            drop = f", {s.dropped:,} dropped (longer than --max-seq-len)" if s.dropped else ""
            lines.append(
                f"  {name}: {s.documents:,} documents{tok}, {s.samples:,} samples, {s.shards} shard(s), "
                f"{s.bytes / 1e6:.2f} MB{drop}"
            )
        rate = f", {self.tokens / self.seconds:,.0f} tok/s" if self.tokens and self.seconds > 0 else ""
        lines.append(f"  total: {self.documents:,} documents{rate}")
        if self.skipped:
            lines.append(
                f"  not converted: {', '.join(self.skipped[:3])}{' ...' if len(self.skipped) > 3 else ''}"
            )
        return "\n".join(lines)


def progress_line(docs: int, tokens: int, done: int, total: int, elapsed: float) -> str:
    """One progress line: documents/s, MB/s, tokens/s and the ETA from the source bytes left."""
    dt = max(elapsed, 1e-9)
    mbs = done / dt / 1e6
    line = f"{docs:,} docs, {docs / dt:,.0f} docs/s, {mbs:,.1f} MB/s"
    if tokens:
        line += f", {tokens / dt:,.0f} tok/s"
    if total > 0:
        pct = min(100.0, 100.0 * done / total)
        eta = (total - done) / (done / dt) if done > 0 else float("nan")
        eta_s = "?" if eta != eta else f"{int(eta) // 60}:{int(eta) % 60:02d}"
        line += f", {pct:.0f}% of {total / 1e6:,.1f} MB, ETA {eta_s}"
    return line


class _Bar:
    """Progress on stderr: on a terminal one line redrawn in place twice a second; in a log file (a batch job's
    stderr) a plain line every ``LOG_EVERY_S``, so an hours-long conversion leaves a readable log, not a megabyte
    of carriage returns."""

    LOG_EVERY_S = 30.0

    def __init__(self, enabled: bool, total: int, stream: Any = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.total, self.t0, self.last = enabled, total, time.perf_counter(), 0.0
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.every = 0.5 if self.tty else self.LOG_EVERY_S
        if not self.tty:
            self.last = self.t0  # the first log line after LOG_EVERY_S, not at the start

    def show(self, docs: int, tokens: int, done: int, final: bool = False) -> None:
        now = time.perf_counter()
        if self.enabled and (final or now - self.last >= self.every):
            self.last = now
            line = progress_line(docs, tokens, done, self.total, now - self.t0)
            self.stream.write("\r" + line + "\033[K" if self.tty else line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")


def default_workers() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


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
    finetune: bool = False,
    max_seq_len: Optional[int] = None,
    pack: bool = False,
    chat_template: Optional[str] = None,
    range_bytes: Optional[int] = None,
) -> ConvertSummary:
    """Convert ``source`` into MDS splits under ``out`` (raw text, token rows of ``concat_tokens``, or finetuning).

    ``max_docs`` / ``max_tokens`` convert a subset: that many documents / tokens in all, divided between train
    and val as ``val_fraction`` says (tokens need a ``tokenizer`` to be counted); the source is read no further.
    ``num_workers`` processes convert units side by side (default: the cores; 0: in this process).
    """
    t0 = time.perf_counter()
    names = parse_splits(splits)
    job, fast = _job(
        names, val_fraction, seed, compression, tokenizer, concat_tokens, bos, eos, text_field, max_chars,
        size_limit, max_docs, max_tokens, bos_text, eos_text, finetune, max_seq_len, pack, chat_template,
    )  # fmt: skip
    out = pathlib.Path(os.path.expanduser(str(out)))
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {str(out)!r} is a file; give a folder", key="--out")
    plan = plan_source(source, **({"range_bytes": range_bytes} if range_bytes else {}))
    own = plan.own_splits
    job.hold_out = "val" in names and "val" not in own
    # Units that feed no wanted split (a source's val shards with --splits train) are left out.
    units = [
        u
        for u in plan.units
        if (u.split or "train") in names or (job.hold_out and u.split in (None, "train"))
    ]
    if not units:
        raise RecipeError(f"source {source!r} has no {' or '.join(names)} shards", key="--source")
    job.units = [dataclasses.asdict(u) for u in units]
    if num_workers is not None and num_workers < 0:
        raise RecipeError(f"--num-workers must be >= 0, got {num_workers}", key="--num-workers")
    workers = default_workers() if num_workers is None else num_workers
    if job.max_docs is not None or job.max_tokens is not None or len(units) == 1:
        workers = 0  # a subset converts its units in order; a single unit needs no other process
    workers = min(workers, len(units))

    out.mkdir(parents=True, exist_ok=True)
    work = out / (WORK_PREFIX + _fingerprint(job, units))
    with _locked(work, out):
        (work / "job.json").write_text(json.dumps(dataclasses.asdict(job), sort_keys=True))
        resumed = sum(U.unit_stats(work, i) is not None for i in range(len(units)))
        try:
            _run_units(work, workers, progress, plan.bytes)
            stats = _publish_splits(job, work, out, names, len(units), source)
            if fast is not None:  # token rows mean something only with this tokenizer: say which
                extra = {"max_seq_len": job.max_seq_len} if job.mode == "finetune" else None
                write_tokenizer_record([out / n for n in names], tokenizer, fast.json, extra)
        except RecipeError:
            shutil.rmtree(work, ignore_errors=True)  # a mistake in the input: nothing to resume
            raise
    shutil.rmtree(work, ignore_errors=True)
    mode = {"raw": "raw text", "concat": f"concat {concat_tokens} tokens"}.get(job.mode)
    mode = mode or f"finetuning, {'packed ' if pack else ''}rows of up to {max_seq_len} tokens"
    return ConvertSummary(
        str(out), mode, stats, time.perf_counter() - t0, len(units), resumed, workers, plan.skipped
    )


def _job(
    names, val_fraction, seed, compression, tokenizer, concat_tokens, bos, eos, text_field, max_chars,
    size_limit, max_docs, max_tokens, bos_text, eos_text, finetune, max_seq_len, pack, chat_template,
) -> tuple[U.Job, Any]:  # fmt: skip
    """Check the options and describe the work (before any source file is opened)."""
    from llmfoundry_lite.data.tokenizers import load_fast_tokenizer, separator_ids

    if "val" in names and not 0.0 < val_fraction < 1.0:
        raise RecipeError(f"--val-fraction must be in (0, 1), got {val_fraction}", key="--val-fraction")
    if concat_tokens is not None and concat_tokens <= 0:
        raise RecipeError(f"--concat-tokens must be positive, got {concat_tokens}", key="--concat-tokens")
    if finetune:
        _check_finetune(tokenizer, concat_tokens, max_seq_len, chat_template)
    elif max_seq_len is not None or pack or chat_template is not None:
        flag = "--max-seq-len" if max_seq_len is not None else ("--pack" if pack else "--chat-template")
        raise RecipeError("is for finetuning data: add --finetune (or leave it out)", key=flag)
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
    if max_tokens is not None and (tokenizer is None or finetune):
        raise RecipeError(
            "needs --tokenizer to count tokens; add one, or use --max-docs for a subset of raw text"
            if not finetune
            else "is not for finetuning data; use --max-docs (examples)",
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
    fast = load_fast_tokenizer(tokenizer) if tokenizer else None
    bos_ids = eos_ids = None
    if fast is not None and concat_tokens is not None:
        bos_ids = separator_ids(fast, "bos", bos, bos_text)
        eos_ids = separator_ids(fast, "eos", eos, eos_text)
        if bos_ids is None and eos_ids is None and bos is None and eos is None:
            raise RecipeError(
                f"tokenizer {tokenizer!r} has no eos (or bos) token to separate packed documents; give the "
                "separator as text (--eos-text '[SEP]', e.g. for a BERT WordPiece tokenizer), use a tokenizer "
                "with one (e.g. `data tokenizer --train --kind bpe`) or pass --no-eos to pack without separators",
                key="--tokenizer",
            )
    mode = "finetune" if finetune else ("concat" if concat_tokens is not None else "raw")
    job = U.Job(
        mode, [], list(names), False, val_fraction, seed, text_field, max_chars, compression, size_limit,
        dataclasses.asdict(fast) if fast is not None else None, concat_tokens,
        list(bos_ids) if bos_ids else None, list(eos_ids) if eos_ids else None, doc_budget, token_budget,
        max_seq_len, pack, chat_template,
    )  # fmt: skip
    return job, fast


def _check_finetune(tokenizer, concat_tokens, max_seq_len, chat_template) -> None:
    from llmfoundry_lite.data.finetune import check_chat_template

    if tokenizer is None:
        raise RecipeError("finetuning data is tokenized at conversion: add --tokenizer", key="--tokenizer")
    if concat_tokens is not None:
        raise RecipeError(
            "packs pretraining documents; finetuning examples take --max-seq-len N (and --pack)",
            key="--concat-tokens",
        )
    if max_seq_len is None or max_seq_len < 2:
        raise RecipeError(
            "finetuning needs --max-seq-len N (N >= 2, the model's context)", key="--max-seq-len"
        )
    check_chat_template(chat_template)


def _fingerprint(job: U.Job, units: list) -> str:
    """Names the work folder: the same command over the same files resumes; anything else starts afresh."""
    files = []
    for path in (p for u in units for p in (u.path, *u.more)):
        if path and os.path.isfile(path):
            st = os.stat(path)
            files.append((path, st.st_size, st.st_mtime_ns, st.st_ctime_ns))  # ctime: `cp -p` keeps mtime
    text = json.dumps([dataclasses.asdict(job), files], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _locked:
    """Holds ``work``'s lock for one conversion; removes other (stale) work folders of ``out``."""

    def __init__(self, work: pathlib.Path, out: pathlib.Path):
        self.work, self.out, self.f = work, out, None

    def __enter__(self) -> _locked:
        import fcntl

        self.work.mkdir(exist_ok=True)
        self.f = open(self.work / "lock", "w")  # noqa: SIM115 (closed in __exit__)
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            raise RecipeError(
                f"another `data convert` is writing {str(self.out)!r} right now; wait for it or use another --out",
                key="--out",
            ) from None
        for old in self.out.glob(WORK_PREFIX + "*"):
            if old != self.work:
                shutil.rmtree(old, ignore_errors=True)
        for tmp in [*(self.work / "units").glob(".*.tmp-*"), *self.work.glob(".*.tmp-*")]:
            shutil.rmtree(tmp, ignore_errors=True)  # units (or the tail) a killed run was writing
        for d in ("claims", "progress", "errors", "logs"):
            shutil.rmtree(self.work / d, ignore_errors=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


def _run_units(work: pathlib.Path, workers: int, show: bool, total_bytes: int) -> None:
    """Convert every unfinished unit: in this process, or in ``workers`` processes side by side."""
    bar = _Bar(show, total_bytes)
    try:
        if workers == 0:
            done = U.Progress(lambda p: bar.show(p.docs, p.tokens, p.bytes))
            U.work_loop(work, None, done)
            bar.show(done.docs, done.tokens, done.bytes, final=True)
        else:
            _run_workers(work, workers, bar)
    finally:
        bar.close()


def _run_workers(work: pathlib.Path, n: int, bar: _Bar) -> None:
    from llmfoundry_lite.procs import Processes

    for d in ("claims", "progress", "errors", "logs"):
        (work / d).mkdir(parents=True, exist_ok=True)
    pkg_root = str(pathlib.Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p),
    }
    files = [(work / "progress" / f"{w}.json", work / "errors" / f"{w}.json") for w in range(n)]
    with Processes(grace_s=5.0, poll_s=0.1) as procs:
        for w, (prog, err) in enumerate(files):
            cmd = [
                sys.executable,
                "-m",
                "llmfoundry_lite.data.units",
                str(work),
                str(work / "claims"),
                str(prog),
                str(err),
            ]
            procs.start(cmd, work / "logs" / f"{w}.log", env=env, tag=w)
        while procs.running:
            for child in procs.wait_any(timeout=0.5):
                _check_worker(child, files[child.tag][1])
            bar.show(*_progress_sum(files))
    bar.show(*_progress_sum(files), final=True)


def _check_worker(child: Any, error_file: pathlib.Path) -> None:
    if child.returncode == 0:
        return
    if child.returncode == 2 and error_file.exists():
        err = json.loads(error_file.read_text())
        raise RecipeError(err["message"], key=err.get("key"))
    raise RuntimeError(f"conversion worker {child.tag} failed (exit {child.returncode}):\n{child.log_tail()}")


def _progress_sum(files: list[tuple[pathlib.Path, pathlib.Path]]) -> tuple[int, int, int]:
    docs = tokens = done = 0
    for prog, _ in files:
        try:
            p = json.loads(prog.read_text())
        except (OSError, ValueError):
            continue
        docs, tokens, done = docs + p["docs"], tokens + p["tokens"], done + p["bytes"]
    return docs, tokens, done


def _publish_splits(
    job: U.Job, work: pathlib.Path, out: pathlib.Path, names: list[str], n_units: int, source: str
) -> dict[str, SplitStats]:
    """Merge the units' folders (and the packed leftovers) into one index per split; rename the splits in place."""
    per_unit = [U.unit_stats(work, i) for i in range(n_units)]
    if any(s is None for s in per_unit):
        raise RuntimeError("a unit is missing after every worker finished")
    stats = {n: SplitStats() for n in names}
    for s in per_unit:
        for split, st in s["splits"].items():
            stats[split].add(st)
    tails: dict[str, pathlib.Path] = {}
    for n, rows in U.tail_rows(work).items():
        stats[n].samples += rows
        if job.max_tokens is not None:  # report what the rows hold, not the tokens left out
            stats[n].tokens = stats[n].samples * job.concat_tokens
        if rows:
            tails[n] = work / U.TAIL / n
    if job.mode == "concat" and not (work / U.TAIL).is_dir():
        raise RuntimeError("the leftover tokens were not packed after every unit finished")
    empty = [n for n in names if stats[n].samples == 0]
    if empty and job.mode == "finetune" and stats[empty[0]].dropped:
        raise RecipeError(
            f"source {source!r} gave split {empty[0]!r} no examples: all {stats[empty[0]].dropped:,} were longer "
            f"than --max-seq-len {job.max_seq_len} even with the prompt cut; raise --max-seq-len",
            key="--max-seq-len",
        )
    if empty:
        detail = f"fewer than {job.concat_tokens} tokens" if job.concat_tokens else "no documents"
        raise RecipeError(
            f"source {source!r} gave split {empty[0]!r} {detail}; "
            + (
                "use a larger source, a smaller --concat-tokens or a larger --val-fraction"
                if job.concat_tokens
                else "check the source and --text-field, or use --splits train"
            ),
            key="--source",
        )
    for n in names:
        parts = [(f"{i:05d}", U.unit_dir(work, i) / n) for i in range(n_units)]
        parts = [(name, d) for name, d in parts if (d / "index.json").is_file()]
        tmp = out / f".{n}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            stats[n].shards = merge_split(parts, tmp, tails.get(n))
            stats[n].bytes = folder_bytes(tmp)
            publish(tmp, out / n)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return stats
