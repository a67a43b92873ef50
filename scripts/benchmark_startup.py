"""Wall time of the everyday commands (``--help``, ``list``, ``show``, ``validate`` of both quickstart recipes), each
a fresh process as a user types it: median of ``--repeats`` runs, commands interleaved so machine noise hits all.

    python scripts/benchmark_startup.py                     # this checkout
    python scripts/benchmark_startup.py --compare /tmp/old  # and another checkout, side by side, interleaved

``--compare DIR`` puts DIR first on ``PYTHONPATH`` for its two columns (e.g. ``git worktree add /tmp/old HEAD~5``).
Each checkout is timed twice: with the model-check answers of train/memo.py remembered (a first, untimed run
fills them, as any earlier command with the same model block does) and with remembering off
(``LLMFOUNDRY_LITE_CACHE=off``: nothing is remembered; the built-in families need no model build either way). The
quickstarts' tokenizers and MDS shards are built under ``--workdir`` first (not timed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart"


def prepare(workdir: Path) -> dict[str, list[str]]:
    """Both quickstarts' tokenizers and shards under ``workdir``; recipe -> the overrides that point it at them."""
    from llmfoundry_lite.data.convert import convert
    from llmfoundry_lite.data.corpus import embedded_documents
    from llmfoundry_lite.data.tokenizers import train_tokenizer

    tok, data = workdir / "tokenizer", workdir / "mds"
    bpe, rows = workdir / "bpe-tokenizer", workdir / "llama-mds"
    if not (tok / "tokenizer.json").exists():
        train_tokenizer("wordpiece", embedded_documents(), vocab_size=4096, out_dir=tok)
    if not (data / "train" / "index.json").exists():
        convert("embedded", data, splits=("train", "val"))
    if not (bpe / "tokenizer.json").exists():
        train_tokenizer("bpe", embedded_documents(), vocab_size=4096, out_dir=bpe)
    if not (rows / "train" / "index.json").exists():
        convert("embedded", rows, splits=("train", "val"), tokenizer=str(bpe), concat_tokens=128)
    return {
        "mosaicbert-tiny": [f"variables.tokenizer_path={tok}", f"variables.data_local={data}"],
        "llama-tiny": [f"variables.tokenizer_path={bpe}", f"variables.data_local={rows}"],
    }


def commands(overrides: dict[str, list[str]]) -> dict[str, list[str]]:
    """Label -> argv after ``python -m llmfoundry_lite.cli``."""
    cmds = {"--help": ["--help"], "list": ["list"]}
    for recipe, extra in overrides.items():
        for verb in ("show", "validate"):
            cmds[f"{verb} {recipe}"] = [verb, str(QUICKSTART / f"{recipe}.yaml"), *extra]
    return cmds


def run_once(argv: list[str], env: dict[str, str]) -> float:
    """Seconds from start to exit of one command (it must succeed)."""
    t = time.perf_counter()
    # From another folder: `python -m` puts the current one first on sys.path, which would shadow PYTHONPATH.
    cwd = tempfile.gettempdir()
    out = subprocess.run(
        [sys.executable, "-m", "llmfoundry_lite.cli", *argv], env=env, capture_output=True, cwd=cwd
    )
    dt = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.decode()[-500:]}")
    return dt


def main() -> None:
    """Time the commands in each configuration and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--compare", default=None, help="another checkout of llmfoundry_lite (the 'before' column)"
    )
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lfl-startup-bench"))
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cmds = commands(prepare(workdir))
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cache = str(workdir / "memo")
    configs = {}
    if args.compare:
        configs["before, model checks remembered"] = {
            **base,
            "PYTHONPATH": args.compare,
            "LLMFOUNDRY_LITE_CACHE": cache,
        }
        configs["before, remembering off"] = {
            **base,
            "PYTHONPATH": args.compare,
            "LLMFOUNDRY_LITE_CACHE": "off",
        }
    configs["after, model checks remembered"] = {
        **base,
        "PYTHONPATH": str(ROOT),
        "LLMFOUNDRY_LITE_CACHE": cache,
    }
    configs["after, remembering off"] = {**base, "PYTHONPATH": str(ROOT), "LLMFOUNDRY_LITE_CACHE": "off"}
    for env in configs.values():  # warm the OS file cache and fill the remembered answers (untimed)
        for argv in cmds.values():
            run_once(argv, env)
    times: dict[tuple[str, str], list[float]] = {(c, k): [] for c in configs for k in cmds}
    names = list(configs)
    for r in range(args.repeats):
        for label, argv in cmds.items():
            for c in names if r % 2 == 0 else names[::-1]:
                times[(c, label)].append(run_once(argv, configs[c]))
    load = os.getloadavg()[0]
    print(
        f"\n{args.repeats} runs each, interleaved, median seconds (load average {load:.1f}, {os.cpu_count()} CPUs)\n"
    )
    print("| command | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label in cmds:
        cells = [f"{statistics.median(times[(c, label)]):.2f}" for c in names]
        print(f"| `{label}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
