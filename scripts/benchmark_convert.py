"""Benchmark MDS conversion: `data convert` (concat mode) against a straightforward single-process loop.

Both convert the same corpus (the embedded corpus repeated to ~1.7M tokens, as JSON Lines) into rows of 128
tokens with the same tokenizer, in one run, each in a fresh process timed end to end (interpreter start,
imports, reading, tokenizing, writing), and the script prints a Markdown table. CPU seconds are printed too:
on a busy machine they are steadier than wall time.

    python scripts/benchmark_convert.py [--tokens 1700000] [--concat 128] [--vocab 8192] [--workdir DIR]

The loop tokenizes one document at a time with the transformers tokenizer and writes each row with MDSWriter.

Worker scaling (``--sweep 1,2``): the same corpus as C4-shaped shards (``--shards`` ``.json.gz`` files of JSON Lines
with text/timestamp/url), converted by ``data convert --num-workers W`` for each W, alternating the worker counts
over ``--repeats`` rounds so a busy machine slows them alike; prints every run and the median docs/s per W:

    python scripts/benchmark_convert.py --sweep 1,2 --shards 8 --tokens 4000000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time


def naive_loop(source: str, tokenizer: str, out: str, concat: int) -> int:
    """The baseline: one document at a time, tokenized and packed in Python, written with MDSWriter."""
    import numpy as np
    from streaming import MDSWriter
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    buf: list[int] = []
    n_tokens = 0
    with MDSWriter(out=out, columns={"tokens": f"ndarray:int32:{concat}"}) as w, open(source) as f:
        for line in f:
            ids = [tok.bos_token_id] + tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            ids.append(tok.eos_token_id)
            n_tokens += len(ids)
            buf.extend(ids)
            while len(buf) >= concat:
                w.write({"tokens": np.asarray(buf[:concat], dtype=np.int32)})
                del buf[:concat]
    return n_tokens


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the process and its workers) of one command."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dt, cpu


def _rows(split_dir: str) -> int:
    with open(os.path.join(split_dir, "index.json")) as f:
        return sum(s["samples"] for s in json.load(f)["shards"])


def _cli_row(source: str, tok_dir: str, work: str, args: argparse.Namespace) -> list:
    """The same conversion through the installed `llmfoundry-lite` command (includes the main CLI's start-up)."""
    exe = shutil.which("llmfoundry-lite")
    if exe is None:
        return []
    out = os.path.join(work, "cli")
    cmd = [
        exe,
        "data",
        "convert",
        "--source",
        source,
        "--out",
        out,
        "--splits",
        "train",
        "--tokenizer",
        tok_dir,
        "--concat-tokens",
        str(args.concat),
        "--no-progress",
    ]
    return [("`llmfoundry-lite data convert` (same, via the main CLI)", cmd, os.path.join(out, "train"))]


def sweep(
    args: argparse.Namespace, docs: list[str], repeats: int, tok_dir: str, work: str, env: dict
) -> None:
    """Convert the same .json.gz shards with each worker count, alternating; print every run and the medians."""
    import gzip
    import statistics

    counts = [int(w) for w in args.sweep.split(",")]
    src = os.path.join(work, "shards")
    os.makedirs(src, exist_ok=True)
    all_docs = [d for _ in range(repeats) for d in docs]
    per = -(-len(all_docs) // args.shards)
    for k in range(args.shards):
        with gzip.open(os.path.join(src, f"c4-train.{k:05d}-of-{args.shards:05d}.json.gz"), "wt") as f:
            for i, d in enumerate(all_docs[k * per : (k + 1) * per]):
                f.write(
                    json.dumps({"text": d, "timestamp": "2019-04-25T12:00:00Z", "url": f"https://x/{i}"})
                    + "\n"
                )
    mb = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src)) / 1e6
    runs: dict[int, list[tuple[float, float]]] = {w: [] for w in counts}
    print("| round | workers | wall s | docs/s | CPU s |\n|---:|---:|---:|---:|---:|")
    for r in range(args.repeats):
        for w in counts if r % 2 == 0 else counts[::-1]:
            out = os.path.join(work, f"sweep-{w}")
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "llmfoundry_lite.data.cli", "convert", "--source", src, "--out", out,
                   "--splits", "train", "--tokenizer", tok_dir, "--concat-tokens", str(args.concat),
                   "--num-workers", str(w), "--no-progress"]  # fmt: skip
            dt, cpu = _timed(cmd, env)
            runs[w].append((dt, cpu))
            print(f"| {r + 1} | {w} | {dt:.1f} | {len(all_docs) / dt:,.0f} | {cpu:.1f} |", flush=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"\nCorpus: {len(all_docs):,} documents in {args.shards} .json.gz shards ({mb:.1f} MB), rows of "
        f"{args.concat} tokens; {cores} CPU cores; load average before: {os.getloadavg()[0]:.1f}; median of "
        f"{args.repeats} runs, end to end (fresh process each)\n"
    )
    base = statistics.median(len(all_docs) / dt for dt, _ in runs[counts[0]])
    print(
        "| --num-workers | docs/s (median) | per worker | speed-up | CPU s (median) |\n|---:|---:|---:|---:|---:|"
    )
    for w in counts:
        rate = statistics.median(len(all_docs) / dt for dt, _ in runs[w])
        cpu = statistics.median(c for _, c in runs[w])
        print(f"| {w} | {rate:,.0f} | {rate / w:,.0f} | {rate / base:.2f}x | {cpu:.1f} |")


def main() -> None:
    """Build the corpus and tokenizer, run both converters (or the worker sweep), print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_700_000, help="approximate corpus size in tokens")
    ap.add_argument("--concat", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument(
        "--workers", type=int, default=None, help="--num-workers for data convert (default: cores)"
    )
    ap.add_argument("--workdir", default=None)
    ap.add_argument(
        "--sweep", default=None, help="worker counts to compare, e.g. 1,2 (converts .json.gz shards)"
    )
    ap.add_argument("--shards", type=int, default=8, help="--sweep: number of .json.gz shards")
    ap.add_argument("--repeats", type=int, default=3, help="--sweep: rounds (worker counts alternate)")
    ap.add_argument(
        "--naive-worker", nargs=4, metavar=("SOURCE", "TOKENIZER", "OUT", "CONCAT"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.naive_worker:
        source, tokenizer, out, concat = args.naive_worker
        print(naive_loop(source, tokenizer, out, int(concat)))
        return

    from llmfoundry_lite.data.corpus import embedded_documents
    from llmfoundry_lite.data.tokenizers import train_tokenizer

    work = args.workdir or tempfile.mkdtemp(prefix="bench-convert-")
    os.makedirs(work, exist_ok=True)
    docs = embedded_documents()
    tok_dir = str(train_tokenizer("bpe", docs, vocab_size=args.vocab, out_dir=os.path.join(work, "tok")))
    from tokenizers import Tokenizer

    per_pass = sum(
        len(e.ids) + 2
        for e in Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")).encode_batch(
            docs, add_special_tokens=False
        )
    )
    repeats = max(1, math.ceil(args.tokens / per_pass))
    source = os.path.join(work, "corpus.jsonl")
    with open(source, "w") as f:
        for _ in range(repeats):
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("TOKENIZERS_PARALLELISM", None)
    if args.sweep:
        sweep(args, docs, repeats, tok_dir, work, env)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        return
    results = []
    for name, cmd, out in [
        (
            "naive loop (1 doc at a time, transformers + MDSWriter)",
            [
                sys.executable,
                __file__,
                "--naive-worker",
                source,
                tok_dir,
                os.path.join(work, "naive"),
                str(args.concat),
            ],
            os.path.join(work, "naive"),
        ),
        (
            "`data convert` (batched, worker processes)",
            [
                sys.executable,
                "-m",
                "llmfoundry_lite.data.cli",
                "convert",
                "--source",
                source,
                "--out",
                os.path.join(work, "fast"),
                "--splits",
                "train",
                "--tokenizer",
                tok_dir,
                "--concat-tokens",
                str(args.concat),
                "--no-progress",
            ]
            + (["--num-workers", str(args.workers)] if args.workers is not None else []),
            os.path.join(work, "fast", "train"),
        ),
    ] + _cli_row(source, tok_dir, work, args):
        shutil.rmtree(out, ignore_errors=True)
        dt, cpu = _timed(cmd, env)
        results.append((name, dt, _rows(out) * args.concat, cpu))

    n_dt, n_tok = results[0][1], results[0][2]
    assert all(r[2] == n_tok for r in results), f"the conversions disagree: {[r[2] for r in results]} tokens"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"\nCorpus: embedded corpus x{repeats} = {len(docs) * repeats:,} documents, {n_tok:,} tokens in rows of "
        f"{args.concat} (BPE vocab {args.vocab}); {cores} CPU cores; wall time end to end, fresh process each.\n"
    )
    print("| converter | wall s | tokens/s | speed-up | CPU s (all processes) |")
    print("|---|---:|---:|---:|---:|")
    for name, dt, tok, cpu in results:
        print(f"| {name} | {dt:.1f} | {tok / dt:,.0f} | {n_dt / dt:.2f}x | {cpu:.1f} |")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
