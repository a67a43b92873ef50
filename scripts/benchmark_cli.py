"""End-to-end CLI benchmark (the BENCHMARKS.md row): a tiny decoder trained through `llmfoundry-lite train`.

Measures, for d=256, L=4, seq 128, batch 16 on the embedded corpus: seconds from command start to the first
logged batch, steady training throughput (tokens/s over the batches after the first 10), and the peak resident
memory of the training process. Builds its tokenizer and MDS rows in a scratch folder first (not timed).

    python scripts/benchmark_cli.py [--batches 60] [--workdir /tmp/lfl-bench]
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\[batch (\d+)/\d+\]")


def prepare(workdir: Path) -> tuple[Path, Path]:
    """A BPE tokenizer and 128-token MDS rows of the embedded corpus under ``workdir``."""
    from llmfoundry_lite.data.convert import convert
    from llmfoundry_lite.data.corpus import embedded_documents
    from llmfoundry_lite.data.tokenizers import train_tokenizer

    tok = workdir / "bpe"
    data = workdir / "mds-128"
    if not (tok / "tokenizer.json").exists():
        train_tokenizer("bpe", embedded_documents(), vocab_size=8192, out_dir=tok)
    if not (data / "train" / "index.json").exists():
        convert("embedded", data, splits=("train", "val"), tokenizer=str(tok), concat_tokens=128)
    return tok, data


def run(workdir: Path, batches: int) -> dict[str, float]:
    """Train through the CLI; time stamps of the progress lines give start-up and steady throughput."""
    tok, data = prepare(workdir)
    cmd = [
        sys.executable, "-m", "llmfoundry_lite.cli", "train", str(ROOT / "recipes/quickstart/llama-tiny.yaml"),
        f"variables.tokenizer_path={tok}", f"variables.data_local={data}", "model.d_model=256",
        "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=4", "global_train_batch_size=16",
        "device_train_microbatch_size=16", f"max_duration={batches}ba", "eval_loader=null", "callbacks=null",
        "save_folder=null", "console_log_interval=1ba", f"run_name=bench-{int(time.time())}",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=workdir)
    stamps: dict[int, float] = {}
    for line in proc.stdout:
        m = LINE.match(line)
        if m:
            stamps[int(m.group(1))] = time.perf_counter() - t0
    if proc.wait() != 0:
        raise SystemExit(f"training failed (exit {proc.returncode}): {' '.join(cmd)}")
    peak_rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    first, last = 10, max(stamps)
    steady = (last - first) * 16 * 128 / (stamps[last] - stamps[first])
    return {"first_batch_s": stamps[1], "steady_tok_s": steady, "peak_rss_gb": peak_rss_gb}


def main() -> None:
    """Print the measurements as a markdown table next to the BENCHMARKS.md targets."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--workdir", default="/tmp/lfl-bench-cli")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    r = run(workdir, args.batches)
    print("| what | llmfoundry_lite | target | llm-foundry (BENCHMARKS.md) |")
    print("|---|---|---|---|")
    print(f"| command start → first logged batch | {r['first_batch_s']:.1f} s | ≤ 8 s | 12.4 s |")
    print(f"| steady training throughput | {r['steady_tok_s']:,.0f} tok/s | ≥ 1,300 tok/s | 1,187 tok/s |")
    print(f"| peak resident memory | {r['peak_rss_gb']:.2f} GB | ≤ 2.0 GB | 2.49 GB |")


if __name__ == "__main__":
    main()
