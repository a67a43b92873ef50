"""``decoupled_adamw`` update cost: Composer's DecoupledAdamW (a Python loop over parameters) vs ours (torch's
fused kernel, train/optim.py), interleaved in one process, on the parameters of a real model.

The default model is issue 17's tiny decoder (d=256, L=4, vocab 30,522, tied embeddings: ~11M parameters);
``--vocab``/``--d-model``/``--layers`` change it. Prints ms per ``step()`` (gradients already in place, the
update only) and the largest parameter difference after the same steps.

    python scripts/benchmark_optim.py [--vocab 30522] [--d-model 256] [--layers 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import time

import torch
from composer.optim import DecoupledAdamW as ComposerAdamW

from llmfoundry_lite import registry
from llmfoundry_lite.train.optim import DecoupledAdamW


def main() -> None:
    """Build the model, time both optimizers' steps in interleaved rounds and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per optimizer per round")
    args = ap.parse_args()
    import llmfoundry_lite.models.llama  # noqa: F401  (registers the model)

    cfg = {
        "name": "llama", "vocab_size": args.vocab, "d_model": args.d_model, "n_layers": args.layers,
        "n_heads": 4, "max_seq_len": 128, "tie_embeddings": True,
    }  # fmt: skip
    models = {
        name: registry.build("models", cfg, "model") for name in ("composer", "ours")
    }  # same seed-free init is fine: only the update's cost and agreement matter
    models["ours"].load_state_dict(models["composer"].state_dict())
    n_params = sum(p.numel() for p in models["ours"].parameters())
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) for p in models["ours"].parameters()]
    opts = {}
    for name, cls in (("composer", ComposerAdamW), ("ours", DecoupledAdamW)):
        for p, gr in zip(models[name].parameters(), grads):
            p.grad = gr.clone()
        opts[name] = cls(models[name].parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=3e-4)
        opts[name].step()  # state allocation outside the timing
    times: dict[str, list[float]] = {"composer": [], "ours": []}
    for r in range(args.rounds):
        for name in ("composer", "ours") if r % 2 == 0 else ("ours", "composer"):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opts[name].step()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(models["ours"].parameters(), models["composer"].parameters())
    )
    best = {k: min(v) for k, v in times.items()}
    print(f"| {n_params / 1e6:.1f}M parameters, {torch.get_num_threads()} threads | ms per step |")
    print("|---|---|")
    print(f"| Composer's DecoupledAdamW | {best['composer']:.1f} |")
    print(f"| ours (torch's fused kernel) | {best['ours']:.1f} ({best['composer'] / best['ours']:.1f}x) |")
    print(f"\nlargest parameter difference after {1 + args.rounds * args.steps} steps: {diff:.2e}")


if __name__ == "__main__":
    main()
