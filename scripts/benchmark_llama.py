"""Side-by-side CPU benchmark: our LLaMA decoder vs transformers' LlamaForCausalLM (same shape, same weights).

Measures full training steps (forward, loss, backward, AdamW step), interleaving the two models round by round so
machine noise hits both alike, and reports tokens/s, the ratio, and CPU MFU against a 2048x2048 fp32 matmul peak
measured in the same process (MFU definition of shared/BENCHMARKS.md: P = transformer-block parameters only).

    python scripts/benchmark_llama.py                     # BENCHMARKS shape: d=512, L=8, 8 heads, FFN 1376, seq 512, batch 4
    python scripts/benchmark_llama.py --rounds 3 --steps 2  # quicker
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best observed FLOP/s of an n x n fp32 matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--n-layers", type=int, default=8)
    ap.add_argument("--n-heads", type=int, default=8)
    ap.add_argument("--n-kv-heads", type=int, default=None)
    ap.add_argument("--ffn", type=int, default=1376)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (MFU of ours only)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from llmfoundry_lite.models.accounting import TransformerFlops, count_params
    from llmfoundry_lite.models.llama import LlamaDecoder, config_from_hf, state_dict_from_hf

    torch.manual_seed(0)
    hf_cfg = HFConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=args.ffn,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads or args.n_heads,
        max_position_embeddings=max(2048, args.seq),
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        use_cache=False,
    )
    hf = LlamaForCausalLM(hf_cfg).train()
    cfg = config_from_hf(hf_cfg, attn_impl="sdpa")
    ours = LlamaDecoder(cfg).train()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg))

    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels = ids.clone()
    mask = torch.ones_like(ids)

    def step_ours(opt):
        out = ours(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    def step_hf(opt):
        out = hf(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    runs = {"ours": (step_ours, torch.optim.AdamW(ours.parameters(), lr=1e-4))}
    if not args.no_hf:
        runs["transformers"] = (step_hf, torch.optim.AdamW(hf.parameters(), lr=1e-4))
    # Same weights, same batch: the first losses must agree (a correctness guard on the comparison).
    with torch.no_grad():
        l_ours = ours(ids, labels=labels).loss.item()
        l_hf = hf(input_ids=ids, labels=labels).loss.item() if not args.no_hf else l_ours
    assert abs(l_ours - l_hf) < 1e-3, (l_ours, l_hf)

    for fn, opt in runs.values():  # warm-up (allocator, kernels)
        fn(opt)
    times: dict[str, list[float]] = {k: [] for k in runs}
    peaks = []
    tokens = args.batch * args.seq
    for _ in range(args.rounds):
        peaks.append(matmul_peak())
        for name, (fn, opt) in runs.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                fn(opt)
            times[name].append((time.perf_counter() - t) / args.steps)
    peak = max(peaks)
    # P = the transformer blocks only, as BENCHMARKS.md defines it for MFU
    flops_per_token = TransformerFlops(count_params(ours.blocks), cfg.n_layers, cfg.d_model).per_token(
        args.seq
    )

    print(
        f"\nLLaMA training step, CPU fp32, {torch.get_num_threads()} threads: d={cfg.d_model} L={cfg.n_layers} "
        f"heads={cfg.n_heads}/{cfg.kv_heads} FFN={cfg.ffn_dim} seq={args.seq} batch={args.batch} vocab={args.vocab}; "
        f"{args.rounds} interleaved rounds x {args.steps} steps; best matmul peak {peak / 1e9:.0f} GFLOP/s\n"
    )
    print("| model | step time (median) | tokens/s | CPU MFU (median of rounds) | vs transformers |")
    print("|---|---|---|---|---|")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in runs:
        tps = tokens / med[name]
        # Each round's MFU uses the peak measured right before it: robust to load drifting during the run.
        mfu = statistics.median(tokens / t * flops_per_token / p for t, p in zip(times[name], peaks))
        ratio = "-"
        if "transformers" in times:
            ratio = f"{statistics.median(h / o for h, o in zip(times['transformers'], times[name])):.2f}x"
        print(f"| {name} | {med[name] * 1000:.0f} ms | {tps:,.0f} | {mfu:.1%} | {ratio} |")
    if "transformers" in times:
        per_round = [h / o for h, o in zip(times["transformers"], times["ours"])]
        print(f"\nper-round speed-up (transformers time / ours): {', '.join(f'{r:.2f}' for r in per_round)}")
        print(f"per-round matmul peak (GFLOP/s): {', '.join(f'{p / 1e9:.0f}' for p in peaks)}")


if __name__ == "__main__":
    main()
