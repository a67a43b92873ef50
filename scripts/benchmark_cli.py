"""End-to-end CLI benchmark: issue 17's tiny decoder trained through `llmfoundry-lite train`, as a user runs it.

d=256, L=4, 4 heads, seq 128, batch 16, fp32, on the embedded corpus, with a real vocabulary size (``--vocab``,
default 30,522, BERT's: the model's vocabulary is set with ``model.vocab_size`` over a small BPE tokenizer --
the head, the loss and the optimizer state scale with the model's vocabulary, not the tokenizer's). Two runs:

- ``3-batch``: no eval loader, no callbacks: seconds from command start to exit, and the peak resident memory
  of the training process (the issue's smoke run);
- ``steady``: ``--batches`` batches: tokens/s over the batches after the 10th (from the progress lines' times).

``--compare DIR`` runs the same commands with another checkout of llmfoundry_lite first on ``PYTHONPATH``
(e.g. ``git archive v0 | tar -x -C /tmp/old``), interleaved, and prints both columns and their ratio.
``--compare llmfoundry:VENV`` runs llm-foundry instead, from its own virtualenv (it pins other Composer and
transformers versions, so it cannot share ours; never a dependency of this package):

    python3 -m venv /work/llmf-venv && /work/llmf-venv/bin/pip install llm-foundry==0.22.0
    python scripts/benchmark_cli.py --compare llmfoundry:/work/llmf-venv

It trains llm-foundry's ``mpt_causal_lm`` at the same shape (d_model 256, 4 layers, 4 heads, FFN 4 d, tied
embeddings, vocab_size as ``--vocab``) with ``VENV/bin/llmfoundry train`` on the same MDS rows and tokenizer, the
same optimizer, scheduler, clipping, batch, fp32 and no eval loader (:func:`llmfoundry_yaml`). Its own defaults
stay (train metrics on, ``loss_fn: torch_crossentropy`` as flash-attn's fused loss is absent on CPU).
Tokenizer and MDS rows are built under ``--workdir`` first (not timed).

    python scripts/benchmark_cli.py [--vocab 30522] [--batches 60] [--repeats 1] [--compare /tmp/old]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^\[batch[ =](\d+)/\d+\]"
)  # ours: "[batch 3/60]"; Composer's console logger: "[batch=3/60]:"


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


def llmfoundry_yaml(workdir: Path, tok: Path, data: Path, vocab: int) -> Path:
    """llm-foundry 0.22's train YAML for the benchmark's run (MPT at our shape, no eval loader)."""
    text = f"""\
max_seq_len: 128
seed: 17
run_name: lf-bench
model:
  name: mpt_causal_lm
  init_device: cpu
  d_model: 256
  n_layers: 4
  n_heads: 4
  expansion_ratio: 4
  max_seq_len: 128
  vocab_size: {vocab}
  loss_fn: torch_crossentropy  # its default (flash-attn's fused loss) needs CUDA
  attn_config:
    attn_impl: torch
tokenizer:
  name: {tok}
  kwargs:
    model_max_length: 128
train_loader:
  name: text
  dataset:
    local: {data}
    split: train
    shuffle: true
    max_seq_len: 128
  drop_last: true
  num_workers: 0  # as our text loader's default
  prefetch_factor: null
  persistent_workers: false
optimizer:
  name: decoupled_adamw
  lr: 3.0e-3
  betas: [0.9, 0.95]
  eps: 1.0e-8
  weight_decay: 3.0e-4
scheduler:
  name: cosine_with_warmup
  t_warmup: 0.1dur
  alpha_f: 0.1
algorithms:
  gradient_clipping:
    clipping_type: norm
    clipping_threshold: 1.0
max_duration: 3ba
eval_interval: 1
global_train_batch_size: 16
device_train_microbatch_size: 16
device_eval_batch_size: 16
precision: fp32
progress_bar: false
log_to_console: true
console_log_interval: 1ba
python_log_level: null
"""
    path = workdir / f"llmfoundry-{vocab}.yaml"
    path.write_text(text)
    return path


def run(workdir: Path, batches: int, vocab: int, side: str | None = None) -> dict[str, float]:
    """Train through the CLI; wall time to exit, peak RSS (this child only) and steady tokens/s after batch 10.

    ``side``: None (this checkout), another checkout's directory, or ``llmfoundry:VENV``.
    """
    tok, data = prepare(workdir)
    if side and side.startswith("llmfoundry:"):
        venv = Path(side.split(":", 1)[1])
        yaml = llmfoundry_yaml(workdir, tok, data, vocab)
        cmd = [str(venv / "bin/llmfoundry"), "train", str(yaml), f"max_duration={batches}ba"]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        return _timed(cmd, env, workdir)
    cmd = [
        sys.executable, "-m", "llmfoundry_lite.cli", "train", str(ROOT / "recipes/quickstart/llama-tiny.yaml"),
        f"variables.tokenizer_path={tok}", f"variables.data_local={data}", "model.d_model=256",
        "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=4", f"model.vocab_size={vocab}",
        "global_train_batch_size=16", "device_train_microbatch_size=16", f"max_duration={batches}ba",
        "eval_loader=null", "callbacks=null", "save_folder=null", "console_log_interval=1ba",
        f"run_name=bench-{os.getpid()}-{time.time_ns()}",
    ]  # fmt: skip
    env = dict(os.environ)
    if side:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (side, env.get("PYTHONPATH")) if p)
    return _timed(cmd, env, workdir)


def _timed(cmd: list[str], env: dict[str, str], workdir: Path) -> dict[str, float]:
    """Run one training command; wall time, peak RSS and progress-line timestamps."""
    env = {**env, "PYTHONUNBUFFERED": "1"}  # progress lines timed as printed, not as a pipe buffer fills
    t0 = time.perf_counter()
    # stderr merged: Composer's console logger (llm-foundry's progress lines) writes there.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir, env=env
    )
    stamps: dict[int, float] = {}
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-15:]
        m = LINE.match(line)
        if m:
            stamps[int(m.group(1))] = time.perf_counter() - t0
    _, status, usage = os.wait4(
        proc.pid, 0
    )  # this child's own rusage (RUSAGE_CHILDREN would be the max of all)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"training failed (exit {proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    out = {
        "wall_s": wall,
        "first_batch_s": stamps[1],
        "peak_rss_gb": usage.ru_maxrss / 1024**2,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # this child's CPU: less sensitive to other jobs than wall
        "batches": float(max(stamps)),
    }
    first, last = min(10, max(stamps) - 1), max(stamps)
    if last > first:
        out["steady_tok_s"] = (last - first) * 16 * 128 / (stamps[last] - stamps[first])
    return out


def main() -> None:
    """Run the 3-batch and steady cases (optionally against ``--compare``) and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=60, help="length of the steady-throughput run")
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each case; the best is reported")
    ap.add_argument(
        "--compare", default=None, help="another llmfoundry_lite checkout, or llmfoundry:VENV, side by side"
    )
    ap.add_argument("--workdir", default="/tmp/lfl-bench-cli")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sides = {"this": None, **({"compare": args.compare} if args.compare else {})}
    best: dict[tuple[str, str], dict[str, float]] = {}
    for _ in range(args.repeats):
        for case, n in (("3-batch", 3), ("steady", args.batches)):
            for side, path in sides.items():  # interleaved: a busy machine slows both sides alike
                r = run(workdir, n, args.vocab, path)
                prev = best.get((case, side))
                best[(case, side)] = r if prev is None or r["wall_s"] < prev["wall_s"] else prev
    for side in sides:  # CPU per batch past the third: the steady run's CPU minus the 3-batch run's
        s, t = best[("steady", side)], best[("3-batch", side)]
        if s["batches"] > t["batches"]:
            s["tok_per_cpu_s"] = (s["batches"] - t["batches"]) * 16 * 128 / max(s["cpu_s"] - t["cpu_s"], 1e-9)
    rows = [
        ("3-batch run, command start to exit", "3-batch", "wall_s", "{:.1f} s"),
        ("3-batch run, CPU time (user + sys)", "3-batch", "cpu_s", "{:.1f} s"),
        ("3-batch run, first logged batch", "3-batch", "first_batch_s", "{:.1f} s"),
        ("3-batch run, peak resident memory", "3-batch", "peak_rss_gb", "{:.2f} GB"),
        (f"steady training ({args.batches} batches)", "steady", "steady_tok_s", "{:,.0f} tok/s"),
        ("steady training per CPU second (batches 4 on)", "steady", "tok_per_cpu_s", "{:,.0f} tok/CPU-s"),
    ]
    other_name = "llm-foundry 0.22 (MPT)" if (args.compare or "").startswith("llmfoundry:") else "compare"
    head = f"| vocab {args.vocab:,} | this checkout |"
    print(head + (f" {other_name} | ratio |" if args.compare else ""))
    print("|---|---|" + ("---|---|" if args.compare else ""))
    for label, case, key, fmt in rows:
        this = best[(case, "this")][key]
        line = f"| {label} | {fmt.format(this)} |"
        if args.compare:
            other = best[(case, "compare")][key]
            # Ratio as "how many times better": time and memory lower is better, throughput higher.
            ratio = this / other if key in ("steady_tok_s", "tok_per_cpu_s") else other / this
            line += f" {fmt.format(other)} | {ratio:.2f}x |"
        print(line)


if __name__ == "__main__":
    main()
