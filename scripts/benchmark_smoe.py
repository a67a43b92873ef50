"""SMoE-Dropout on CPU, seeded: (a) FFN speed vs the dense FFN; (b) a small-scale reproduction of the paper's claims.

(a) forward+backward of one FFN (d=512, N=16 experts, 4,096 tokens, fp32) at k = 1..N vs the dense FFN of the
    same total width, for LLaMA's SwiGLU (hidden 1536) and MosaicBERT's GeGLU (hidden 2048).
(b) LLaMA-tiny (the quickstart shape, SwiGLU 384 wide) on the embedded corpus, equal steps, three seeds: dense vs
    learned-router MoE (Switch-style, with its balance loss) vs SMoE-Dropout (frozen random router), both N = 16
    with k 8 -> 16 linear; held-out loss at k in {1, 2, 4, 8, 16}; training step time at k <= 9 vs dense.

    python scripts/benchmark_smoe.py            # both parts (a few minutes on 2 cores)
    python scripts/benchmark_smoe.py --ffn-only # part (a)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F

from llmfoundry_lite.models.bert.layers import GeGLU
from llmfoundry_lite.models.ffn import FFNConfig, SMoEDropoutFFN, set_active_experts
from llmfoundry_lite.models.llama import SwiGLU


def ffn_speed(reps: int = 3, tokens: int = 4096, d: int = 512, n: int = 16) -> None:
    """Part (a): forward+backward, SMoE at each k vs the dense FFN it was split from.

    Interleaved (dense, then every k, per repetition) and compared per repetition, so a busy shared machine
    slows both sides of each ratio alike; the table shows medians.
    """
    torch.manual_seed(0)
    x = torch.randn(tokens, d)
    cfg = FFNConfig(name="smoe_dropout", n_experts=n)
    ks = (1, 4, 8, 16)
    print(
        f"\n(a) FFN forward+backward, d={d}, N={n}, {tokens} tokens, fp32, {torch.get_num_threads()} threads"
    )
    print(
        "| FFN | variant | ms (median) | speed-up vs dense (median of per-rep ratios) |\n|---|---|---:|---:|"
    )
    for family, hidden, dense, act, names, bias in (
        ("LLaMA SwiGLU h=1536", 1536, SwiGLU(d, 1536), F.silu, ("w13", "w2"), False),
        ("MosaicBERT GeGLU h=2048", 2048, GeGLU(d, 2048), F.gelu, ("up", "down"), True),
    ):
        smoe = SMoEDropoutFFN(d, hidden, cfg, act, names, down_bias=bias)
        smoe.load_state_dict(dense.state_dict(), strict=False)

        def step(m, k=None):
            if k is not None:
                m.k = k
            xi = x.detach().requires_grad_()
            t0 = time.perf_counter()
            m(xi).sum().backward()
            return time.perf_counter() - t0

        step(dense), [step(smoe, k) for k in ks]  # warm-up
        base, per_k = [], {k: [] for k in ks}
        for _ in range(reps):
            base.append(step(dense))
            for k in ks:
                per_k[k].append(step(smoe, k))
        print(f"| {family} | dense | {statistics.median(base) * 1e3:.1f} | 1.00x |")
        for k in ks:
            ratio = statistics.median(b / t for b, t in zip(base, per_k[k]))
            print(
                f"| {family} | k={k} | {statistics.median(per_k[k]) * 1e3:.1f} | {ratio:.2f}x |", flush=True
            )


# ---------------------------------------------------------------------------------------------------------
# (b) the small-scale reproduction
# ---------------------------------------------------------------------------------------------------------

SMOE = {"name": "smoe_dropout", "n_experts": 16, "k_min": 8, "k_max": 16, "schedule": "linear"}
LEARNED = {**SMOE, "router": "learned"}  # the same schedule: only the router differs
VARIANTS = {"dense": None, "learned-router MoE": LEARNED, "SMoE-Dropout": SMOE}
EVAL_K = (1, 2, 4, 8, 16)
# The quickstart's LLaMA-tiny (d 128, 4 layers, 4 heads, 2 kv heads, tied), SwiGLU 352 -> 384 (16 x 24).
SHAPE = dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden_size=384, tie_embeddings=True)


def _corpus(seq: int, vocab: int = 2048) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The embedded corpus as token rows of ``seq``: (train rows, held-out rows (last 10% of documents), vocab)."""
    import tempfile

    from transformers import AutoTokenizer

    from llmfoundry_lite.data.corpus import embedded_documents
    from llmfoundry_lite.data.tokenizers import train_tokenizer

    docs = list(embedded_documents())
    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(str(train_tokenizer("bpe", docs, vocab_size=vocab, out_dir=tmp)))
    cut = int(len(docs) * 0.9)

    def rows(part: list[str]) -> torch.Tensor:
        ids = [i for d in part for i in tok(d)["input_ids"] + [tok.eos_token_id or 0]]
        n = len(ids) // seq
        return torch.tensor(ids[: n * seq]).view(n, seq)

    return rows(docs[:cut]), rows(docs[cut:]), len(tok)


def _train(variant: str, ffn, seed: int, data, steps: int, batch: int) -> dict:
    from llmfoundry_lite import registry
    from llmfoundry_lite.models.ffn import balance_loss, k_at

    train, val, vocab = data
    torch.manual_seed(seed)
    block = {"name": "llama", "vocab_size": vocab, "max_seq_len": train.shape[1], **SHAPE}
    if ffn is not None:
        block["ffn"] = ffn
    model = registry.build("models", block, "model")
    cfg = FFNConfig(**ffn) if ffn is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    g = torch.Generator().manual_seed(seed)
    times: list[tuple[float, Optional[int]]] = []
    model.train()
    for step in range(steps):
        k = None
        if cfg is not None:
            k = k_at(cfg, step / steps)
            set_active_experts(model, k)
        rows = train[torch.randint(0, train.shape[0], (batch,), generator=g)]
        t0 = time.perf_counter()
        b = {"input_ids": rows, "labels": rows}
        loss = model.loss(model(b), b)
        aux = balance_loss(model)
        if aux is not None:
            loss = loss + cfg.balance_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        times.append((time.perf_counter() - t0, k))
    model.eval()
    losses = {}
    for k in EVAL_K if cfg is not None else (0,):
        if k:
            set_active_experts(model, k)
        total = count = 0.0
        with torch.no_grad():
            for i in range(0, val.shape[0], 16):
                rows = val[i : i + 16]
                out = model({"input_ids": rows, "labels": rows})
                total += float(out.stats.loss_sum)  # summed over labelled positions
                count += float(out.stats.count)
        losses[k] = total / count
    step_s = [t for t, k in times[3:] if k is None or k <= 9]  # dense, or MoE steps near k = N/2
    return {"loss": losses, "step_s": statistics.median(step_s)}


def reproduce(seeds: tuple[int, ...], steps: int, batch: int, seq: int) -> None:
    """Part (b): train each variant for ``steps`` batches per seed; held-out loss at each k; step times."""
    data = _corpus(seq)
    print(f"\n(b) corpus: {data[0].shape[0]} train rows, {data[1].shape[0]} held-out rows of {seq} tokens")
    results: dict[str, dict[int, dict]] = {v: {} for v in VARIANTS}
    for seed in seeds:
        for variant, ffn in VARIANTS.items():
            r = results[variant][seed] = _train(variant, ffn, seed, data, steps, batch)
            shown = {k: round(v, 4) for k, v in r["loss"].items()}
            print(f"  seed {seed} {variant}: {shown} step {r['step_s'] * 1e3:.0f} ms", flush=True)
    _table(results, seeds, steps)


def _table(results: dict, seeds: tuple[int, ...], steps: int) -> None:
    print(f"\n(b) held-out cross-entropy after {steps} steps (LLaMA-tiny, N=16), seeds {list(seeds)}")
    print("| variant | k | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
    print("|---|---:|" + "---:|" * (len(seeds) + 1))
    for variant, per_seed in results.items():
        for k in sorted(next(iter(per_seed.values()))["loss"]):
            vals = [per_seed[s]["loss"][k] for s in seeds]
            cells = " | ".join(f"{v:.4f}" for v in vals)
            print(f"| {variant} | {'all (dense)' if k == 0 else k} | {cells} | {statistics.mean(vals):.4f} |")
    print("\nmedian training step time (ms; MoE variants: steps at k <= 9 of 16)")
    print("| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |\n|---|" + "---:|" * len(seeds))
    for variant, per_seed in results.items():
        print(f"| {variant} | " + " | ".join(f"{per_seed[s]['step_s'] * 1e3:.0f}" for s in seeds) + " |")


def main() -> None:
    """Parse arguments and run the parts asked for."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ffn-only", action="store_true")
    p.add_argument("--repro-only", action="store_true")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.repro_only:
        ffn_speed()
    if not args.ffn_only:
        reproduce(tuple(int(s) for s in args.seeds.split(",")), args.steps, args.batch, args.seq)


if __name__ == "__main__":
    main()
