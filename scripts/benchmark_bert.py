"""MosaicBERT vs Hugging Face BertForMaskedLM on CPU, side by side in one run.

Both models have the same trunk shape (default L=4, d=256, 4 heads, FFN 1024, seq 128, vocabulary of
bert-base-uncased's size) and see the same batches of real English text (the embedded corpus, paragraphs
grouped into samples of natural length, ~40% padding, 30% masking). Measured:

1. full training step (forward + backward + AdamW), real (non-padding) tokens per second, interleaved repeats;
2. MLM loss on held-out text (15% masking) after the same wall-clock training time for both.

Usage: ``python scripts/benchmark_bert.py [--threads 2] [--train-seconds 60] [--vocab-size 30522]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from tokenizers import BertWordPieceTokenizer
from transformers import AutoModelForMaskedLM
from transformers import BertConfig as HFBertConfig

from llmfoundry_lite.data.corpus import embedded_documents
from llmfoundry_lite.models.accounting import count_params
from llmfoundry_lite.models.bert import build_mosaic_bert


def make_samples(
    tok: BertWordPieceTokenizer, docs: list[str], seq_len: int, rng: random.Random
) -> list[list[int]]:
    """Consecutive paragraphs grouped up to a random target length: natural, variable-length samples."""
    samples = []
    hi = (
        seq_len * 13 // 16
    )  # targets U(8, 104) at seq 128 give ~40% padding, the operating point of the issue
    for doc in docs:
        paras = [p.strip() for p in doc.split("\n\n") if p.strip()]
        enc = [e.ids[1:-1] for e in tok.encode_batch(paras)]  # strip per-paragraph [CLS]/[SEP]
        cur: list[int] = []
        target = rng.randint(8, hi)
        for ids in enc:
            cur += ids
            if len(cur) + 2 >= target:
                samples.append(cur[: seq_len - 2])
                cur, target = [], rng.randint(8, hi)
        if cur:
            samples.append(cur[: seq_len - 2])
    return samples


def make_batch(
    samples: list[list[int]], tok: BertWordPieceTokenizer, seq_len: int, mlm_p: float, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """Pad to seq_len, mask mlm_p of the real non-special tokens (80% [MASK], 10% random, 10% kept)."""
    cls_id, sep_id, pad_id, mask_id = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]"))
    B = len(samples)
    ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    am = torch.zeros((B, seq_len), dtype=torch.long)
    for i, s in enumerate(samples):
        row = [cls_id, *s, sep_id]
        ids[i, : len(row)] = torch.tensor(row)
        am[i, : len(row)] = 1
    special = (ids == cls_id) | (ids == sep_id) | (am == 0)
    masked = (torch.rand(ids.shape, generator=g) < mlm_p) & ~special
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=g)
    inputs = ids.clone()
    inputs[masked & (r < 0.8)] = mask_id
    rand_pos = masked & (r >= 0.8) & (r < 0.9)
    inputs[rand_pos] = torch.randint(5, tok.get_vocab_size(), (int(rand_pos.sum()),), generator=g)
    return {
        "input_ids": inputs,
        "attention_mask": am,
        "token_type_ids": torch.zeros_like(ids),
        "labels": labels,
    }


class Runner:
    """One model + optimizer + a training-step function, timed."""

    def __init__(self, name: str, model: torch.nn.Module, step_loss, lr: float, warmup: int):
        self.name, self.model, self.step_loss = name, model, step_loss
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-5
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warmup))
        self.seconds = 0.0
        self.tokens = 0
        self.steps = 0

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One full training step; returns its wall time."""
        self.model.train()
        t0 = time.perf_counter()
        loss = self.step_loss(self.model, batch)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.tokens += int(batch["attention_mask"].sum())
        self.steps += 1
        return dt

    @torch.no_grad()
    def eval_loss(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """Mean masked-token CE over held-out batches (token-weighted)."""
        self.model.eval()
        tot, n = 0.0, 0
        for b in batches:
            k = int((b["labels"] != -100).sum())
            tot += float(self.step_loss(self.model, b)) * k
            n += k
        return tot / n


def hf_loss(model, batch):
    """HF BertForMaskedLM computes full-vocabulary logits at every position, then the masked CE."""
    return model(**batch).loss


def mosaic_loss(model, batch):
    """MosaicBERT Composer model: unpadded trunk, head only on masked positions."""
    return model.loss(model(batch), batch)


def main() -> None:
    """Run the benchmark and print markdown tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--vocab-size",
        type=int,
        default=30522,
        help="model vocabulary (bert-base-uncased's 30522 by default; 0 = the corpus tokenizer's)",
    )
    ap.add_argument("--mlm-probability", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--steps-per-repeat", type=int, default=3)
    ap.add_argument(
        "--train-seconds", type=float, default=60.0, help="wall-clock training per model (0 = skip)"
    )
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=17)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    docs = embedded_documents()
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(docs, vocab_size=30522)
    vocab = args.vocab_size or tok.get_vocab_size()
    assert vocab >= tok.get_vocab_size(), "--vocab-size smaller than the tokenizer"
    heldout_docs, train_docs = docs[::10], [d for i, d in enumerate(docs) if i % 10]
    train = make_samples(tok, train_docs, args.seq_len, rng)
    heldout = make_samples(tok, heldout_docs, args.seq_len, rng)
    rng.shuffle(train)

    def batches(samples, mlm_p, gen):
        i = 0
        while True:
            chunk = samples[i : i + args.batch_size]
            if len(chunk) < args.batch_size:
                rng.shuffle(samples)
                i = 0
                continue
            i += args.batch_size
            yield make_batch(chunk, tok, args.seq_len, mlm_p, gen)

    geval = torch.Generator().manual_seed(args.seed + 1)
    eval_batches = [
        make_batch(heldout[i : i + args.batch_size], tok, args.seq_len, 0.15, geval)
        for i in range(0, len(heldout), args.batch_size)
    ]

    hf_cfg = HFBertConfig(
        vocab_size=vocab, hidden_size=args.d_model, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=args.ffn, max_position_embeddings=512,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=tok.token_to_id("[PAD]"),
    )  # fmt: skip
    hf = AutoModelForMaskedLM.from_config(hf_cfg, attn_implementation="sdpa")
    mosaic = build_mosaic_bert(
        None, vocab_size=vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
        intermediate_size=args.ffn, attention_dropout=0.0, hidden_dropout=0.1,
    )  # fmt: skip
    nparams = {n: count_params(m) for n, m in (("hf", hf), ("mosaic", mosaic))}
    runners = [
        Runner("HF BertForMaskedLM", hf, hf_loss, args.lr, warmup=10),
        Runner("MosaicBERT (llmfoundry_lite)", mosaic, mosaic_loss, args.lr, warmup=10),
    ]

    # ---- 1. throughput: same batches, interleaved rounds, alternating order --------------------------------
    it = batches(train, args.mlm_probability, g)
    warm = next(it)
    for r in runners:
        r.step(warm)
    rates: dict[str, list[float]] = {r.name: [] for r in runners}
    pad_frac = []
    for rep in range(args.repeats):
        bs = [next(it) for _ in range(args.steps_per_repeat)]
        pad_frac += [1 - float(b["attention_mask"].float().mean()) for b in bs]
        spent = {r.name: 0.0 for r in runners}
        for i, b in enumerate(bs):  # alternate step by step, order flipping, so load changes hit both alike
            for r in runners if (rep + i) % 2 == 0 else runners[::-1]:
                spent[r.name] += r.step(b)
        for r in runners:
            rates[r.name].append(sum(int(b["attention_mask"].sum()) for b in bs) / spent[r.name])
    med = {n: statistics.median(v) for n, v in rates.items()}
    hf_name, mo_name = runners[0].name, runners[1].name
    print(
        f"\nShape: L={args.layers}, d={args.d_model}, heads={args.heads}, FFN={args.ffn}, seq={args.seq_len}, "
        f"batch={args.batch_size}, vocab={vocab} (tokenizer {tok.get_vocab_size()}), threads={args.threads}; "
        f"padding {100 * statistics.mean(pad_frac):.0f}%, masking {100 * args.mlm_probability:.0f}%"
    )
    print(
        f"Parameters: HF {nparams['hf'] / 1e6:.1f}M, MosaicBERT {nparams['mosaic'] / 1e6:.1f}M "
        "(GeGLU's fused up-projection is 2x FFN wide)\n"
    )
    print("| model | training step, real tokens/s (median of rounds) | all rounds |")
    print("|---|---|---|")
    for n in (hf_name, mo_name):
        print(f"| {n} | {med[n]:,.0f} | {', '.join(f'{x:,.0f}' for x in rates[n])} |")
    paired = [a / b for a, b in zip(rates[mo_name], rates[hf_name])]
    print(
        f"\nSpeed-up MosaicBERT / HF: **{statistics.median(paired):.2f}x** (median of paired per-round ratios "
        f"{', '.join(f'{x:.2f}' for x in paired)}; ratio of medians {med[mo_name] / med[hf_name]:.2f}x)"
    )

    # ---- 2. held-out MLM loss after equal wall-clock training --------------------------------------------
    if args.train_seconds <= 0:
        return
    before = {r.name: r.eval_loss(eval_batches) for r in runners}
    for r in runners:
        r.seconds, r.tokens, r.steps = 0.0, 0, 0
    streams = {r.name: batches(list(train), args.mlm_probability, torch.Generator().manual_seed(args.seed + 2))
               for r in runners}  # fmt: skip
    while any(r.seconds < args.train_seconds for r in runners):
        for r in runners:  # interleave chunks so machine noise hits both alike
            t_end = min(r.seconds + 5.0, args.train_seconds)
            while r.seconds < t_end:
                r.step(next(streams[r.name]))
    after = {r.name: r.eval_loss(eval_batches) for r in runners}
    print(
        f"\nEqual wall-clock training ({args.train_seconds:.0f} s each, lr {args.lr}, same data order), "
        f"held-out MLM loss at 15% masking on {len(eval_batches)} batches:\n"
    )
    print("| model | steps | real tokens | held-out MLM loss (start -> end) |")
    print("|---|---|---|---|")
    for r in runners:
        print(f"| {r.name} | {r.steps} | {r.tokens:,} | {before[r.name]:.3f} -> {after[r.name]:.3f} |")


if __name__ == "__main__":
    main()
