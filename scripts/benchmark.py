"""Benchmark suite: training-step throughput and CPU MFU of our models vs the Hugging Face references, one run.

    python scripts/benchmark.py            # ~5 interleaved rounds per pair (a few minutes on 2 cores)
    python scripts/benchmark.py --quick    # 2 rounds, for a smoke check

Pairs (same shapes, same batches, same process, interleaved rounds with alternating order so machine noise
hits both alike):
  * MosaicBERT vs transformers' BertForMaskedLM: L=4, d=256, 4 heads, FFN 1024, seq 128, batch 32, vocabulary
    30522, real English text (the embedded corpus) with natural padding, 30% masking; tokens/s = real tokens.
  * our LLaMA vs transformers' LlamaForCausalLM (SDPA): d=512, L=8, 8 heads, FFN 1376, seq 512, batch 4.

MFU (shared/BENCHMARKS.md): tokens/s x (6 P + 12 L d seq) / peak, P = transformer-block parameters of that
model (no embeddings, no heads), peak = best 2048x2048 fp32 matmul measured in this process between rounds.
Prints a markdown table with the machine description and library versions.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from llmfoundry_lite import bench

HERE = Path(__file__).resolve().parent


def _load_script(name: str) -> Any:
    """Import a sibling script as a module (its helpers are reused, not copied)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def block_params(blocks: torch.nn.Module) -> int:
    """Parameters of the transformer blocks (P of the MFU definition)."""
    return sum(p.numel() for p in blocks.parameters())


class Pair:
    """Two training-step functions over the same batches, timed in interleaved rounds."""

    def __init__(self, steps: dict[str, Callable[[dict], Any]], batches: list[dict]):
        self.steps = steps
        self.batches = batches
        self.seconds: dict[str, list[float]] = {n: [] for n in steps}
        self.tokens: dict[str, list[int]] = {n: [] for n in steps}
        self._pos = {n: 0 for n in steps}

    def _run(self, name: str, n: int) -> tuple[float, int]:
        tokens, elapsed = 0, 0.0
        for _ in range(n):
            batch = self.batches[self._pos[name] % len(self.batches)]
            self._pos[name] += 1
            t = time.perf_counter()
            self.steps[name](batch)
            elapsed += time.perf_counter() - t
            mask = batch.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return elapsed, tokens

    def run(self, rounds: int, steps_per_round: int, peaks: list[float]) -> None:
        """Warm up once, then ``rounds`` rounds in alternating order; a matmul peak before each round."""
        for name in self.steps:
            self._run(name, 1)
        names = list(self.steps)
        for r in range(rounds):
            peaks.append(bench.matmul_peak())
            for name in names if r % 2 == 0 else names[::-1]:
                dt, tok = self._run(name, steps_per_round)
                self.seconds[name].append(dt)
                self.tokens[name].append(tok)

    def tokens_per_s(self, name: str) -> float:
        """Median over rounds of tokens/s."""
        return statistics.median(t / s for t, s in zip(self.tokens[name], self.seconds[name]))

    def per_round_ratio(self, a: str, b: str) -> list[float]:
        """tokens/s of ``a`` over ``b``, round by round."""
        return [
            (ta / sa) / (tb / sb)
            for ta, sa, tb, sb in zip(self.tokens[a], self.seconds[a], self.tokens[b], self.seconds[b])
        ]


def _adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-5)


def _step_fn(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor]) -> Callable:
    opt = _adamw(model)
    model.train()

    def step(batch: dict) -> None:
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bert_pair(args: argparse.Namespace) -> tuple[Pair, dict[str, int], dict[str, str]]:
    """MosaicBERT vs BertForMaskedLM on real text with natural padding (helpers of benchmark_bert.py)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForMaskedLM

    from llmfoundry_lite.data.corpus import embedded_documents
    from llmfoundry_lite.models.bert import build_mosaic_bert

    bb = _load_script("benchmark_bert")
    L, d, heads, ffn, seq, bs, vocab = 4, 256, 4, 1024, 128, 32, 30522
    rng, g = random.Random(17), torch.Generator().manual_seed(17)
    docs = embedded_documents()
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(docs, vocab_size=vocab)
    samples = bb.make_samples(tok, docs, seq, rng)
    rng.shuffle(samples)
    n_batches = args.rounds * args.steps + 1
    batches = [bb.make_batch(samples[i * bs : (i + 1) * bs], tok, seq, 0.3, g) for i in range(n_batches)]
    torch.manual_seed(0)
    hf_cfg = BertConfig(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=L, num_attention_heads=heads, intermediate_size=ffn,
        pad_token_id=tok.token_to_id("[PAD]"),
    )  # fmt: skip
    hf = BertForMaskedLM._from_config(hf_cfg, attn_implementation="sdpa")
    ours = build_mosaic_bert(
        None, vocab_size=vocab, d_model=d, n_layers=L, n_heads=heads, intermediate_size=ffn
    )
    names = {"ours": "MosaicBERT (llmfoundry_lite)", "hf": "transformers BertForMaskedLM (SDPA)"}
    pair = Pair(
        {names["ours"]: _step_fn(ours, bb.mosaic_loss), names["hf"]: _step_fn(hf, bb.hf_loss)}, batches
    )
    p = {names["ours"]: block_params(ours.encoder.layers), names["hf"]: block_params(hf.bert.encoder.layer)}
    pad = 1 - statistics.mean(float(b["attention_mask"].float().mean()) for b in batches)
    shape = f"L={L}, d={d}, {heads} heads, FFN {ffn}, seq {seq}, batch {bs}, vocab {vocab}, padding {pad:.0%}, mask 30%"
    return pair, p, {"shape": shape, "seq": seq, "L": L, "d": d, **names}


def llama_pair(args: argparse.Namespace) -> tuple[Pair, dict[str, int], dict[str, Any]]:
    """Our LLaMA decoder vs LlamaForCausalLM with the same weights and batches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmfoundry_lite.models.llama import LlamaDecoder, config_from_hf, state_dict_from_hf

    d, L, heads, ffn, seq, bs, vocab = 512, 8, 8, 1376, 512, 4, args.llama_vocab
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=L, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=2048, tie_word_embeddings=False,
        attn_implementation="sdpa", use_cache=False,
    )  # fmt: skip
    hf = LlamaForCausalLM(hf_cfg)
    cfg = config_from_hf(hf_cfg, attn_impl="sdpa")
    ours = LlamaDecoder(cfg)
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg))
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, vocab, (bs, seq), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})

    def ours_loss(model: torch.nn.Module, b: dict) -> torch.Tensor:
        return model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    def hf_loss(model: torch.nn.Module, b: dict) -> torch.Tensor:
        return model(**b).loss

    names = {"ours": "LLaMA (llmfoundry_lite)", "hf": "transformers LlamaForCausalLM (SDPA)"}
    pair = Pair({names["ours"]: _step_fn(ours, ours_loss), names["hf"]: _step_fn(hf, hf_loss)}, batches)
    p = {names["ours"]: block_params(ours.blocks), names["hf"]: block_params(hf.model.layers)}
    shape = f"d={d}, L={L}, {heads} heads, FFN {ffn}, seq {seq}, batch {bs}, vocab {vocab}"
    return pair, p, {"shape": shape, "seq": seq, "L": L, "d": d, **names}


def main() -> None:
    """Run both pairs and print the markdown report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds x 1 step (smoke check)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--llama-vocab", type=int, default=8192)
    ap.add_argument("--only", choices=("bert", "llama"), default=None)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    peaks: list[float] = []
    results = []
    for which, build in (("bert", bert_pair), ("llama", llama_pair)):
        if args.only and args.only != which:
            continue
        pair, p, info = build(args)
        pair.run(args.rounds, args.steps, peaks)
        results.append((pair, p, info))
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
    print("| pair | shape | model | tokens/s | CPU MFU | ratio (ours / HF) | per-round ratios |")
    print("|---|---|---|---|---|---|---|")
    for pair, p, info in results:
        ours, hf = info["ours"], info["hf"]
        ratios = pair.per_round_ratio(ours, hf)
        for name in (ours, hf):
            tps = pair.tokens_per_s(name)
            mfu = tps * (6 * p[name] + 12 * info["L"] * info["d"] * info["seq"]) / peak
            ratio = f"**{statistics.median(ratios):.2f}x**" if name == ours else ""
            per_round = ", ".join(f"{r:.2f}" for r in ratios) if name == ours else ""
            label = "MLM" if "BERT" in ours else "causal LM"
            print(f"| {label} | {info['shape']} | {name} | {tps:,.0f} | {mfu:.1%} | {ratio} | {per_round} |")
    print(
        "\nMFU = tokens/s x (6 x block parameters + 12 x layers x d x seq) / peak (shared/BENCHMARKS.md); for the"
        " BERT pair tokens are real (non-padding) tokens and each model's own block parameters are used (GeGLU"
        " blocks are larger)."
    )


if __name__ == "__main__":
    main()
