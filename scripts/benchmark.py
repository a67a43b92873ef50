"""Benchmark suite: training-step throughput and CPU MFU of our models vs the Hugging Face references, one run.

    python scripts/benchmark.py            # ~5 interleaved rounds per pair (a few minutes on 2 cores)
    python scripts/benchmark.py --quick    # 2 rounds, for a smoke check

Pairs (same shapes, same batches, same process, interleaved rounds with alternating order so machine noise
hits both alike):
  * MosaicBERT vs transformers' BertForMaskedLM: L=4, d=256, 4 heads, FFN 1024, seq 128, batch 32, vocabulary
    30522, real English text (the embedded corpus) with natural padding, 30% masking; tokens/s = real tokens.
  * our LLaMA vs transformers' LlamaForCausalLM (SDPA): d=512, L=8, 8 heads, FFN 1376, seq 512, batch 4,
    vocabulary 32,000 (LLaMA's; ``--llama-vocab 8192,32000`` adds the small-vocabulary row of earlier reports).

MFU (shared/BENCHMARKS.md): tokens/s x (6 P + 12 L d seq) / peak, P = transformer-block parameters of that
model (no embeddings, no heads), peak = best 2048x2048 fp32 matmul measured in this process between rounds.
"MFU incl. head" also counts the LM head's matmuls where they are useful work: every position for the decoder
(P + vocab x d), masked positions only for MLM (the model's ``flops_per_batch``), the same count for both models.
Prints a markdown table with the machine description and library versions. The end-to-end CLI run (3 batches,
peak memory, steady tokens/s, optionally against llm-foundry in its own virtualenv): scripts/benchmark_cli.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch

from llmfoundry_lite import bench
from llmfoundry_lite.bench import Pair
from llmfoundry_lite.models.accounting import TransformerFlops, count_params

HERE = Path(__file__).resolve().parent


# The CPU shapes of BENCHMARKS.md; scripts/gpu_check.py passes GPU shapes (MosaicBERT-Base, LLaMA-1B).
BERT_SHAPE = {"L": 4, "d": 256, "heads": 4, "ffn": 1024, "seq": 128, "batch": 32, "vocab": 30522}
LLAMA_SHAPE = {
    "d": 512,
    "L": 8,
    "heads": 8,
    "kv_heads": 8,
    "ffn": 1376,
    "seq": 512,
    "batch": 4,
    "vocab": 32000,
}


def _load_script(name: str) -> Any:
    """Import a sibling script as a module (its helpers are reused, not copied)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def bert_batches(shape: dict, n_batches: int, seed: int = 17) -> tuple[list[dict], int]:
    """Batches of real text (the embedded corpus) with natural padding and 30% masking, and the pad id.

    Helpers of benchmark_bert.py: paragraphs grouped to random lengths (~40% padding at seq 128). At most one
    pass over the corpus: callers cycle through the batches.
    """
    from tokenizers import BertWordPieceTokenizer

    from llmfoundry_lite.data.corpus import embedded_documents

    bb = _load_script("benchmark_bert")
    seq, bs = shape["seq"], shape["batch"]
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    docs = embedded_documents()
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(docs, vocab_size=shape["vocab"], show_progress=False)
    samples = bb.make_samples(tok, docs, seq, rng)
    rng.shuffle(samples)
    n = max(1, min(n_batches, len(samples) // bs))
    batches = [bb.make_batch(samples[i * bs : (i + 1) * bs], tok, seq, 0.3, g) for i in range(n)]
    return batches, tok.token_to_id("[PAD]")


def bert_pair(
    shape: dict,
    batches: list[dict],
    pad_id: int,
    device: str = "cpu",
    autocast: Optional[torch.dtype] = None,
    attn_impl: Optional[str] = None,
    hf_attn: str = "sdpa",
) -> tuple[Pair, dict[str, int], dict[str, Any]]:
    """MosaicBERT vs BertForMaskedLM at one shape on the same batches (helpers of benchmark_bert.py).

    ``attn_impl``, when given, goes to the mosaic_bert builder; ``hf_attn`` is transformers' attn_implementation.
    """
    from transformers import AutoModelForMaskedLM, BertConfig

    from llmfoundry_lite.models.bert import build_mosaic_bert

    bb = _load_script("benchmark_bert")
    L, d, heads, ffn, seq, vocab = (shape[k] for k in ("L", "d", "heads", "ffn", "seq", "vocab"))
    torch.manual_seed(0)
    hf_cfg = BertConfig(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=L, num_attention_heads=heads, intermediate_size=ffn,
        pad_token_id=pad_id,
    )  # fmt: skip
    hf = AutoModelForMaskedLM.from_config(hf_cfg, attn_implementation=hf_attn).to(device)
    extra = {"attn_impl": attn_impl} if attn_impl is not None else {}
    ours = build_mosaic_bert(
        None, vocab_size=vocab, d_model=d, n_layers=L, n_heads=heads, intermediate_size=ffn, **extra
    ).to(device)
    names = {
        "ours": "MosaicBERT (llmfoundry_lite)",
        "hf": f"transformers BertForMaskedLM ({_label(hf_attn)})",
    }
    steps = {
        names["ours"]: bench.train_step_fn(ours, bb.mosaic_loss, autocast),
        names["hf"]: bench.train_step_fn(hf, bb.hf_loss, autocast),
    }
    pair = Pair(steps, [_to(b, device) for b in batches], device)
    p = {names["ours"]: count_params(ours.encoder.layers), names["hf"]: count_params(hf.bert.encoder.layer)}
    pad = 1 - statistics.mean(float(b["attention_mask"].float().mean()) for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    flops = sum(ours.flops_per_batch(b) for b in batches) / real  # trunk on real tokens, head on masked ones
    text = (
        f"L={L}, d={d}, {heads} heads, FFN {ffn}, seq {seq}, batch {shape['batch']}, vocab {vocab}, "
        f"padding {pad:.0%}, mask 30%"
    )
    info = {"shape": text, "seq": seq, "L": L, "d": d, "padding": pad, "flops_per_token": flops, **names}
    info.update(model=ours, loss_fn=bb.mosaic_loss)
    return pair, p, info


def llama_pair(
    shape: dict,
    n_batches: int = 3,
    device: str = "cpu",
    autocast: Optional[torch.dtype] = None,
    attn_impl: str = "sdpa",
    hf_attn: str = "sdpa",
) -> tuple[Pair, dict[str, int], dict[str, Any]]:
    """Our LLaMA (the Composer model a recipe trains) vs LlamaForCausalLM with the same weights and batches.

    ``info["flops_per_token"]`` is our model's training FLOPs per token (``flops_per_batch``: blocks, LM head
    and attention); the shapes are identical, so it holds for both.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmfoundry_lite.models.llama import ComposerLlama, config_from_hf, state_dict_from_hf

    d, L, heads, kv, ffn, seq, bs, vocab = (
        shape[k] for k in ("d", "L", "heads", "kv_heads", "ffn", "seq", "batch", "vocab")
    )
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=L, num_attention_heads=heads,
        num_key_value_heads=kv, max_position_embeddings=max(2048, seq), tie_word_embeddings=False,
        attn_implementation=hf_attn, use_cache=False,
    )  # fmt: skip
    with torch.device(device):  # built in place: initialising a 1B model on the CPU first takes a minute
        hf = LlamaForCausalLM(hf_cfg)
        cfg = config_from_hf(hf_cfg, attn_impl=attn_impl)
        ours = ComposerLlama(cfg)
    ours.model.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg))
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (bs, seq), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        batches.append(_to(batch, device))

    def ours_loss(model: torch.nn.Module, b: dict) -> torch.Tensor:
        return model.loss(model(b), b)

    def hf_loss(model: torch.nn.Module, b: dict) -> torch.Tensor:
        return model(**b).loss

    names = {"ours": "LLaMA (llmfoundry_lite)", "hf": f"transformers LlamaForCausalLM ({_label(hf_attn)})"}
    steps = {
        names["ours"]: bench.train_step_fn(ours, ours_loss, autocast),
        names["hf"]: bench.train_step_fn(hf, hf_loss, autocast),
    }
    pair = Pair(steps, batches, device)
    p = {names["ours"]: count_params(ours.model.blocks), names["hf"]: count_params(hf.model.layers)}
    flops = ours.flops_per_batch({"input_ids": batches[0]["input_ids"][:1]}) / seq
    text = f"d={d}, L={L}, {heads} heads ({kv} KV), FFN {ffn}, seq {seq}, batch {bs}, vocab {vocab}"
    info = {"shape": text, "seq": seq, "L": L, "d": d, "flops_per_token": flops, **names}
    return pair, p, {**info, "model": ours, "loss_fn": ours_loss}


# Op groups of the per-op table (--profile): aten names -> what they are.
OP_GROUPS = {
    "matmul": ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm"),
    "attention (SDPA)": ("scaled_dot_product",),
    "softmax / cross-entropy": (
        "softmax",
        "log_softmax",
        "nll_loss",
        "cross_entropy",
        "exp",
        "amax",
        "logsumexp",
    ),
    "optimizer (AdamW)": ("fused_adamw", "foreach", "addcdiv", "lerp"),
    "copies / layout": (
        "copy_",
        "clone",
        "contiguous",
        "cat",
        "to",
        "_to_copy",
        "index",
        "gather",
        "scatter",
    ),
}


def profile_pair(pair: Pair, steps: int = 3) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Self CPU seconds per aten op per training step of each model: ``steps`` steps each, interleaved
    (the order alternates, so machine noise hits both alike), after one warm-up step each."""
    from torch.profiler import ProfilerActivity, profile

    names = list(pair.steps)
    per_op: dict[str, dict[str, float]] = {n: {} for n in names}
    wall = {n: 0.0 for n in names}
    for name in names:
        pair.steps[name](pair.batches[0])  # warm-up (optimizer state, allocator)
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                pair.steps[name](pair.batches[i % len(pair.batches)])
                wall[name] += (time.perf_counter() - t) / steps
            for e in prof.key_averages():
                per_op[name][e.key] = per_op[name].get(e.key, 0.0) + e.self_cpu_time_total / 1e6 / steps
    return per_op, wall


def print_profile(per_op: dict[str, dict[str, float]], wall: dict[str, float], top: int = 14) -> None:
    """Markdown: op groups, then the slowest aten ops, seconds per step side by side."""
    names = list(per_op)

    def group(op: str) -> str:
        bare = op.removeprefix("aten::").lstrip("_")
        for g, keys in OP_GROUPS.items():
            if any(bare == k or bare.startswith(k) for k in keys):
                return g
        return "other (elementwise, norms, autograd)"

    print("\n| op group (self CPU s / step) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    groups = list(OP_GROUPS) + ["other (elementwise, norms, autograd)"]
    totals = {n: {g: 0.0 for g in groups} for n in names}
    for n in names:
        for op, s in per_op[n].items():
            totals[n][group(op)] += s
    for g in groups:
        print(f"| {g} | " + " | ".join(f"{totals[n][g]:.3f}" for n in names) + " |")
    print("| **profiled step, wall** | " + " | ".join(f"**{wall[n]:.3f}**" for n in names) + " |")
    ops = sorted(
        {op for n in names for op in per_op[n]}, key=lambda op: -max(per_op[n].get(op, 0) for n in names)
    )
    print("\n| aten op (self CPU s / step) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for op in ops[:top]:
        print(f"| {op} | " + " | ".join(f"{per_op[n].get(op, 0.0):.3f}" for n in names) + " |")


def compile_rows(args: argparse.Namespace) -> None:
    """``--compile``: our model compiled per block (the recipe's ``compile:``) vs the same model eager, per family.

    Same weights, same batches, interleaved rounds. Compile time is what the compiler reports (forward and backward
    graphs), spent in the warm-up step and excluded from tokens/s. MosaicBERT then runs through 50 distinct
    batches (a different unpadded token count each) and the recompiles are counted.
    """
    import copy

    from llmfoundry_lite.recipe import CompileConfig
    from llmfoundry_lite.train.compile import CompileMonitor, apply_compile

    n_check = 50
    rows = []
    for which in ("bert", "llama"):
        if args.only and args.only != which:
            continue
        if which == "bert":
            batches, pad_id = bert_batches(BERT_SHAPE, n_check)
            pair, _, info = bert_pair(BERT_SHAPE, batches, pad_id)
        else:
            pair, _, info = llama_pair(LLAMA_SHAPE)
        eager_step = pair.steps[info["ours"]]
        compiled_model = copy.deepcopy(info["model"])
        apply_compile(
            compiled_model, CompileConfig(dynamic=args.dynamic)
        )  # resets dynamo's process-wide counters
        monitor = CompileMonitor()
        monitor.start()  # after the reset, as train's monitor starts at fit_start
        compiled_step = bench.train_step_fn(compiled_model, info["loss_fn"])
        steps = {"eager": eager_step, f"compiled ({args.dynamic})": compiled_step}
        timed = Pair(steps, pair.batches, pair.device)
        timed.run(args.rounds, args.steps)
        seen = 1 + args.rounds * args.steps
        for i in range(seen, n_check if which == "bert" else seen):
            steps[f"compiled ({args.dynamic})"](pair.batches[i % len(pair.batches)])
        stats = monitor.stats()
        rows.append((which, info, timed, stats, max(seen, n_check if which == "bert" else seen)))
    m = bench.machine_description()
    print(
        f"\n### Compiled (per block, inductor) vs eager, training tokens/s ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n"
    )
    print(
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, load average "
        f"{m['load_average']:.1f}; torch {m['torch']}. fp32. {args.rounds} interleaved rounds x {args.steps} "
        "step(s) per model after one warm-up step each (the compile); medians.\n"
    )
    print(
        "| model | shape | eager tok/s | compiled tok/s | ratio | per-round ratios | compile s | graphs | recompiles (batches) | graph breaks |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for _which, info, timed, stats, seen in rows:
        names = list(timed.steps)
        ratios = timed.per_round_ratio(names[1], names[0])
        print(
            f"| {info['ours']} | {info['shape']} | {timed.tokens_per_s(names[0]):,.0f} | "
            f"{timed.tokens_per_s(names[1]):,.0f} | **{statistics.median(ratios):.3f}x** | "
            f"{', '.join(f'{r:.3f}' for r in ratios)} | {stats['seconds']:.0f} | {stats['graphs']:.0f} | "
            f"{stats['recompiles']:.0f} ({seen}) | {stats['graph_breaks']:.0f} |"
        )


def _label(hf_attn: str) -> str:
    return {"sdpa": "SDPA", "flash_attention_2": "flash-attn 2"}.get(hf_attn, hf_attn)


def main() -> None:
    """Run both pairs and print the markdown report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds x 1 step (smoke check)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--llama-vocab", default=str(LLAMA_SHAPE["vocab"]), help="LLaMA vocabulary size(s), comma-separated"
    )
    ap.add_argument("--only", choices=("bert", "llama"), default=None)
    ap.add_argument(
        "--profile",
        action="store_true",
        help="per-op table (torch.profiler, one step each) instead of timing",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="our models compiled per block vs eager (instead of the HF pairs)",
    )
    ap.add_argument("--dynamic", default="auto", help="compile.dynamic for --compile: auto, true or false")
    args = ap.parse_args()
    args.dynamic = {"true": True, "false": False}.get(args.dynamic, args.dynamic)
    if args.quick:
        args.rounds, args.steps = 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.compile:
        compile_rows(args)
        return
    peaks: list[float] = []
    results = []

    def bert() -> tuple:
        batches, pad_id = bert_batches(BERT_SHAPE, args.rounds * args.steps + 1)
        return bert_pair(BERT_SHAPE, batches, pad_id)

    cases = [("bert", bert)]
    for vocab in (int(v) for v in args.llama_vocab.split(",")):
        cases.append(("llama", lambda vocab=vocab: llama_pair({**LLAMA_SHAPE, "vocab": vocab})))
    for which, build in cases:
        if args.only and args.only != which:
            continue
        pair, p, info = build()
        if args.profile:
            print(f"\n### Per-op profile, {info['shape']} (3 interleaved training steps each, fp32)")
            print_profile(*profile_pair(pair))
            continue
        pair.run(args.rounds, args.steps, peaks)
        results.append((pair, p, info))
    if args.profile:
        return
    peak = max(peaks)

    m = bench.machine_description()
    print(
        f"\n### Training-step throughput and CPU MFU ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n"
    )
    print(
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, load average "
        f"{m['load_average']:.1f}; python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"composer {m['composer']}. fp32. Peak: best 2048x2048 fp32 matmul in this process "
        f"{peak / 1e9:.0f} GFLOP/s (per round: {', '.join(f'{x / 1e9:.0f}' for x in peaks)}). "
        f"{args.rounds} interleaved rounds x {args.steps} step(s) per model; medians.\n"
    )
    print(
        "| pair | shape | model | tokens/s | CPU MFU | MFU incl. head | ratio (ours / HF) | per-round ratios |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for pair, p, info in results:
        ours, hf = info["ours"], info["hf"]
        ratios = pair.per_round_ratio(ours, hf)
        for name in (ours, hf):
            tps = pair.tokens_per_s(name)
            mfu = tps * TransformerFlops(p[name], info["L"], info["d"]).per_token(info["seq"]) / peak
            mfu_head = tps * info["flops_per_token"] / peak
            ratio = f"**{statistics.median(ratios):.2f}x**" if name == ours else ""
            per_round = ", ".join(f"{r:.2f}" for r in ratios) if name == ours else ""
            label = "MLM" if "BERT" in ours else "causal LM"
            print(
                f"| {label} | {info['shape']} | {name} | {tps:,.0f} | {mfu:.1%} | {mfu_head:.1%} | {ratio} "
                f"| {per_round} |"
            )
    print(
        "\nMFU = tokens/s x (6 x block parameters + 12 x layers x d x seq) / peak (shared/BENCHMARKS.md); for the"
        " BERT pair tokens are real (non-padding) tokens and each model's own block parameters are used (GeGLU"
        " blocks are larger)."
    )


if __name__ == "__main__":
    main()
