"""Profile a few training batches of a tiny recipe through the real Trainer path (issue 17's measurements).

Builds the trainer exactly as ``llmfoundry-lite train`` does (``load_recipe`` + ``train.build_trainer``), runs
``--batches`` batches under ``torch.profiler`` and prints the ops with the most self CPU time and how often each
ran. The profiler's ``Optimizer.step#...`` row is not the update's cost: Composer calls ``optimizer.step(closure)``
with forward and backward inside the closure (the AdamW update itself: ~37 ms per step for these 11M parameters). Tokenizer and MDS rows are prepared under ``--workdir`` first (not
profiled); ``--vocab`` sets ``model.vocab_size`` so a small tokenizer stands in for a real vocabulary (the cost of
the head, the loss and the metrics depends on the model's vocabulary, not on the tokenizer's).

    python scripts/profile_tiny.py llama  [--vocab 30522] [--batches 3] [key=value ...]
    python scripts/profile_tiny.py bert   [--vocab 30522]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

# d=256, L=4, 4 heads, seq 128, batch 16 (issue 17's tiny decoder); MosaicBERT: the quickstart shape.
SHAPES = {
    "llama": (
        "recipes/quickstart/llama-tiny.yaml",
        [
            "model.d_model=256", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=4",
            "global_train_batch_size=16", "device_train_microbatch_size=16",
        ],
    ),
    "bert": ("recipes/quickstart/mosaicbert-tiny.yaml", []),
}  # fmt: skip


def prepare(kind: str, workdir: Path) -> list[str]:
    """Tokenizer and 128-token MDS rows for ``kind`` under ``workdir``; the recipe overrides that point at them."""
    from llmfoundry_lite.data.convert import convert
    from llmfoundry_lite.data.corpus import embedded_documents
    from llmfoundry_lite.data.tokenizers import train_tokenizer

    tok_kind, concat = ("bpe", 128) if kind == "llama" else ("wordpiece", None)
    tok, data = workdir / tok_kind, workdir / f"mds-{tok_kind}"
    if not (tok / "tokenizer.json").exists():
        train_tokenizer(tok_kind, embedded_documents(), vocab_size=8192, out_dir=tok)
    if not (data / "train" / "index.json").exists():
        convert("embedded", data, splits=("train", "val"), tokenizer=str(tok), concat_tokens=concat)
    return [f"variables.tokenizer_path={tok}", f"variables.data_local={data}"]


def main() -> None:
    """Parse arguments, build the trainer, profile ``--batches`` batches and print the top ops."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=sorted(SHAPES))
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides (key=value)")
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--workdir", default="/tmp/lfl-profile")
    ap.add_argument("--shapes", action="store_true", help="also list the top ops by input shape")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    recipe, shape = SHAPES[args.kind]
    overrides = [
        *prepare(args.kind, workdir), *shape, f"model.vocab_size={args.vocab}", f"max_duration={args.batches}ba",
        "eval_loader=null", "callbacks=null", "save_folder=null", "console_log_interval=1ba",
        f"run_name=profile-{args.kind}-{os.getpid()}", *args.overrides,
    ]  # fmt: skip
    os.chdir(workdir)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from llmfoundry_lite import load_recipe
    from llmfoundry_lite.train import build_trainer

    cfg = load_recipe(str(ROOT / recipe), overrides)
    trainer = build_trainer(cfg)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        trainer.fit()
    wall = time.perf_counter() - t0
    trainer.close()
    print(f"\n{args.kind} vocab {args.vocab}: {args.batches} batches in {wall:.2f} s (profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    if args.shapes:
        by_shape = prof.key_averages(group_by_input_shape=True)
        print(by_shape.table(sort_by="self_cpu_time_total", row_limit=args.top, max_shapes_column_width=70))
    step = [e for e in prof.key_averages() if e.key.startswith("Optimizer.step#")]
    for e in step:  # forward + backward + update: Composer runs the first two inside step(closure)
        print(f"{e.key} (incl. forward/backward): {e.cpu_time_total / 1e6 / max(e.count, 1):.3f} s per step")
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
