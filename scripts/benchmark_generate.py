"""Decode speed at batch 1 (CPU, fp32, greedy): our LLaMA with a KV cache, without one, and transformers' `generate`.

All three run in the same process on the same weights (ours exported to a Hugging Face folder for transformers),
generate the same number of new tokens (EOS disabled) and must produce the same tokens. Tokens/s counts new tokens
over the whole call (prefill included). When this build's ``ComposerLlama.generate`` has no ``use_cache`` switch,
the KV-cache row says so and the other two still run.

    python scripts/benchmark_generate.py                      # d_model 512, 8 layers, 256 new tokens
    python scripts/benchmark_generate.py --new-tokens 64 --d-model 128 --layers 2   # quick
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _time(fn, repeats: int) -> tuple[float, list[int]]:
    """Best wall time of ``repeats`` calls (after one warm-up) and the tokens the call returned."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    """Build a model, export it, time the three decoders, print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt", default="The history of the city begins with a small settlement by the river")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer, LlamaForCausalLM

    from llmfoundry_lite import registry
    from llmfoundry_lite.apps.export import export_checkpoint
    from llmfoundry_lite.data.corpus import embedded_documents
    from llmfoundry_lite.data.tokenizers import train_tokenizer
    from llmfoundry_lite.models.llama import ComposerLlama

    work = tempfile.mkdtemp(prefix="bench-generate-")
    tok_dir = str(train_tokenizer("bpe", embedded_documents(), vocab_size=args.vocab, out_dir=f"{work}/tok"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    block = {"name": "llama", "d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads,
             "max_seq_len": 1024}  # fmt: skip
    torch.manual_seed(0)
    model = registry.build("models", block, "model", tokenizer=tok).eval()
    torch.save({"state": {"model": model.state_dict()}}, f"{work}/ck.pt")
    hf = LlamaForCausalLM.from_pretrained(export_checkpoint(f"{work}/ck.pt", f"{work}/hf")).eval()
    hf.generation_config.eos_token_id = None  # exactly --new-tokens tokens, as ours with eos_token_id=None
    ids = torch.tensor([tok(args.prompt)["input_ids"]])
    n, new = ids.shape[1], args.new_tokens
    has_cache = "use_cache" in inspect.signature(ComposerLlama.generate).parameters
    no_cache_kw = {"use_cache": False} if has_cache else {}

    def ours(**kw):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=new, temperature=0.0, **kw)[0, n:].tolist()

    def theirs():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)[
                0, n:
            ].tolist()

    rows = []
    if has_cache:
        rows.append(("ours, KV cache", *_time(lambda: ours(use_cache=True), args.repeats)))
    rows.append(("transformers generate", *_time(theirs, args.repeats)))
    rows.append(("ours, no cache", *_time(lambda: ours(**no_cache_kw), args.repeats)))
    ref_tokens = rows[-1][2]
    params = sum(p.numel() for p in model.parameters())
    print(f"# decode at batch 1: {params / 1e6:.1f}M params (d_model {args.d_model}, {args.layers} layers), "
          f"prompt {n} tokens, {new} new tokens, CPU fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")  # fmt: skip
    print(f"{'decoder':<24} {'seconds':>8} {'tokens/s':>9} {'vs no cache':>12} {'same tokens':>12}")
    base = new / rows[-1][1]
    for name, secs, tokens in rows:
        rate = new / secs
        print(f"{name:<24} {secs:8.2f} {rate:9.1f} {rate / base:11.2f}x {str(tokens == ref_tokens):>12}")
    if not has_cache:
        print("ours, KV cache: not in this build (ComposerLlama.generate has no use_cache argument)")


if __name__ == "__main__":
    main()
