"""Sweep benchmark (issue 13's goals), seeded, on CPU with the quickstart recipe, through the CLI as a user runs it.

1. ``pruning``: a 12-trial TPE sweep over ``optimizer.lr=loguniform(1e-4,3e-2)`` with ``--prune median`` and
   the same sweep without pruning (same seed): batches trained by each (goal: pruned >= 30% fewer) and the
   best eval loss of each (goal: pruned within 2% of unpruned).
2. ``overhead``: a 4-trial grid sweep (``--parallel 1``) against the same 4 ``llmfoundry-lite train`` commands
   run one after the other by hand: wall seconds and CPU seconds (user + system of the whole process tree) of
   each (goal: the sweep costs <= 10% more). On a shared machine the CPU seconds are the steadier figure; the
   sweep's plots are drawn by a detached process after it ends, counted in neither.

The quickstart recipe is shrunk so that 24 + 8 runs fit a small CPU budget (``SHAPE``): max_seq_len 32, batch
8, 30 batches evaluated every 5 on 2 val batches of 32 (``eval_subset_num_batches``), so the median pruner has
5 chances per trial (batches 5 to 25; 3 trials run to the end first); tiny trials: 4 batches. The tokenizer and MDS shards (``make quickstart-data``'s) are built under ``--workdir`` first (not timed).

    python scripts/benchmark_sweep.py [--workdir /tmp/sweep-bench] [--only pruning|overhead] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")
SHAPE = {
    "max_seq_len": 32,
    "global_train_batch_size": 8,
    "device_train_microbatch_size": 8,
    "device_eval_batch_size": 32,
    "max_duration": "30ba",
    "eval_interval": "5ba",
    "eval_subset_num_batches": 2,
    "save_interval": "30ba",
    "console_log_interval": "10ba",
}
TINY = {**SHAPE, "max_duration": "4ba", "eval_interval": "4ba", "save_interval": "4ba"}
METRIC = "metrics/eval/LanguageCrossEntropy"


def prepare(workdir: Path) -> list[str]:
    """``make quickstart-data``'s tokenizer and shards under ``workdir``; the overrides that point at them."""
    from llmfoundry_lite.data.convert import convert
    from llmfoundry_lite.data.corpus import embedded_documents
    from llmfoundry_lite.data.tokenizers import train_tokenizer

    tok, data = workdir / "tokenizer", workdir / "mds"
    if not (tok / "tokenizer.json").exists():
        train_tokenizer("wordpiece", embedded_documents(), vocab_size=4096, out_dir=tok)
    if not (data / "train" / "index.json").exists():
        convert("embedded", data, splits=("train", "val"))
    return [f"variables.tokenizer_path={tok}", f"variables.data_local={data}"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmfoundry_lite.cli", *args]


def children_cpu() -> float:
    """CPU seconds of the finished child processes so far (their own waited-for children included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


CPU: list[float] = []  # CPU seconds of each run(), in order


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with its output into ``log``; wall seconds (raises on failure); its CPU seconds to ``CPU``."""
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        ).returncode
    wall = time.perf_counter() - t0
    CPU.append(children_cpu() - cpu0)
    if rc not in (0, 1):  # 1: some trial failed, the sweep itself ran
        raise SystemExit(f"{' '.join(cmd[:6])} ... exited {rc}; see {log}")
    return wall


def read_summary(out: Path) -> list[dict]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def pruning(workdir: Path, data: list[str], seed: int, trials: int, warmup: int | None) -> dict:
    """Batches and best eval loss of the same TPE sweep with and without median pruning."""
    fixed = [*data, *(f"{k}={v}" for k, v in SHAPE.items())]
    result = {}
    for prune in ("none", "median"):
        out = workdir / f"tpe-{prune}"
        shutil.rmtree(out, ignore_errors=True)
        args = ["sweep", RECIPE, *fixed, "optimizer.lr=loguniform(1e-4,3e-2)", "--trials", str(trials)]
        args += ["--seed", str(seed), "--prune", prune, "--name", f"tpe-{prune}", "--out", str(out)]
        if warmup is not None:
            args += ["--prune-warmup", str(warmup)]
        wall = run(cli(*args), workdir / f"tpe-{prune}.log")
        rows = read_summary(out)
        values = [float(r[METRIC]) for r in rows if r["state"] == "COMPLETE" and r[METRIC]]
        result[prune] = {
            "wall_s": round(wall, 1),
            "batches": sum(int(r["batches"]) for r in rows),
            "best": min(values),
            "states": {s: sum(1 for r in rows if r["state"] == s) for s in ("COMPLETE", "PRUNED", "FAIL")},
        }
        print(f"{prune:>6}: {result[prune]}", flush=True)
    base, pruned = result["none"], result["median"]
    result["fewer_batches"] = 1 - pruned["batches"] / base["batches"]
    result["best_gap"] = pruned["best"] / base["best"] - 1
    return result


def overhead(workdir: Path, data: list[str], repeats: int) -> dict:
    """Wall seconds of a 4-trial sweep and of its 4 train commands run by hand, one after the other.

    With ``repeats`` > 1 the two alternate (sweep first, then by hand first, ...) and each keeps its fastest
    repeat: on a shared machine, load that comes and goes should not decide which one looks slower.
    """
    fixed = [*data, *(f"{k}={v}" for k, v in TINY.items())]
    lrs = ["1e-3", "2e-3", "3e-3", "4e-3"]

    def sweep() -> float:
        out = workdir / "tiny-sweep"
        shutil.rmtree(out, ignore_errors=True)
        args = ["sweep", RECIPE, *fixed, f"optimizer.lr={','.join(lrs)}", "--name", "tiny", "--out", str(out)]
        wall = run(cli(*args), workdir / "tiny-sweep.log")
        cpus.append(CPU[-1])
        return wall

    def by_hand() -> float:
        shutil.rmtree(workdir / "by-hand", ignore_errors=True)
        total = 0.0
        cpu = len(CPU)
        for i, lr in enumerate(lrs):
            folder = workdir / "by-hand" / f"t{i:03d}"
            args = [
                *fixed,
                f"optimizer.lr={lr}",
                f"run_name=hand-t{i:03d}",
                f"save_folder={folder}/checkpoints",
            ]
            total += run(cli("train", RECIPE, *args), workdir / f"by-hand-{i}.log")
        hand_cpus.append(sum(CPU[cpu:]))
        return total

    sweeps, hands, cpus, hand_cpus = [], [], [], []
    for i in range(repeats):
        for which in (sweep, by_hand) if i % 2 == 0 else (by_hand, sweep):
            (sweeps if which is sweep else hands).append(which())
        print(
            f"overhead repeat {i + 1}: sweep {sweeps[-1]:.1f} s ({cpus[-1]:.1f} CPU s), "
            f"by hand {hands[-1]:.1f} s ({hand_cpus[-1]:.1f} CPU s)",
            flush=True,
        )
    sweep_s, hand_s = min(sweeps), min(hands)
    sweep_cpu, hand_cpu = min(cpus), min(hand_cpus)
    return {
        "sweep_s": round(sweep_s, 1),
        "by_hand_s": round(hand_s, 1),
        "overhead": sweep_s / hand_s - 1,
        "sweep_cpu_s": round(sweep_cpu, 1),
        "by_hand_cpu_s": round(hand_cpu, 1),
        "cpu_overhead": sweep_cpu / hand_cpu - 1,
    }


def main() -> None:
    """Run the benchmarks and print the numbers (and a JSON line)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/sweep-bench")
    ap.add_argument("--only", choices=("pruning", "overhead"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2, help="overhead: alternating repeats, fastest kept")
    ap.add_argument(
        "--prune-warmup", type=int, help="passed to the sweep (default 0: prune from the first evaluation)"
    )
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data = prepare(workdir)
    t0 = time.perf_counter()
    report: dict = {}
    if args.only in (None, "pruning"):
        p = pruning(workdir, data, args.seed, args.trials, args.prune_warmup)
        report["pruning"] = p
        print(
            f"pruning: {p['median']['batches']} vs {p['none']['batches']} batches ({100 * p['fewer_batches']:.0f}% fewer; "
            f"goal >= 30%); best eval loss {p['median']['best']:.4f} vs {p['none']['best']:.4f} "
            f"({100 * p['best_gap']:+.2f}%; goal within 2%)"
        )
    if args.only in (None, "overhead"):
        o = overhead(workdir, data, args.repeats)
        report["overhead"] = o
        print(
            f"overhead: 4-trial sweep {o['sweep_s']:.1f} s vs 4 trains by hand {o['by_hand_s']:.1f} s "
            f"({100 * o['overhead']:+.1f}%; goal <= 10%); CPU {o['sweep_cpu_s']:.1f} s vs {o['by_hand_cpu_s']:.1f} s "
            f"({100 * o['cpu_overhead']:+.1f}%)"
        )
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
