"""LLaMA decoding with a KV cache: the same logits and tokens as recomputing the whole prefix every step."""

from __future__ import annotations

import pytest
import torch

from llmfoundry_lite.models.attention import KVCache, causal_attention
from llmfoundry_lite.models.llama import ComposerLlama, LlamaConfig


def _model(**kw) -> ComposerLlama:
    torch.manual_seed(0)
    cfg = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24)
    return ComposerLlama(LlamaConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True, "n_kv_heads": None}])
def test_cached_chunks_give_the_full_forward_logits(kw):
    """Prefill, a 3-token chunk (queries bottom-right of the keys), then single tokens: logits match."""
    model = _model(**kw)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.model(ids)
        cache = KVCache(model.cfg.n_layers, model.cfg.max_seq_len)
        parts = [model.model(ids[:, a:b], cache=cache) for a, b in ((0, 5), (5, 8), (8, 9), (9, 12))]
    assert cache.pos == 12
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_bottom_right_causal_mask_for_queries_behind_longer_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 7, 2, 8, generator=g) for _ in range(3))
    full = causal_attention(q, k, v, "sdpa")
    assert torch.allclose(causal_attention(q[:, 4:], k, v, "sdpa"), full[:, 4:], atol=1e-6)
    assert torch.allclose(causal_attention(q[:, 6:], k, v, "sdpa"), full[:, 6:], atol=1e-6)


@pytest.mark.parametrize("n_new", [6, 30])  # 30: past max_seq_len=24, where the context slides
def test_greedy_tokens_are_identical_with_and_without_the_cache(n_new):
    model = _model()
    prompt = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(2))
    plain = model.generate(prompt, max_new_tokens=n_new, temperature=0.0, use_cache=False)
    seen = []
    cached = model.generate(prompt, max_new_tokens=n_new, temperature=0.0, on_token=seen.append)
    assert cached.shape == (2, 5 + n_new)
    assert torch.equal(plain, cached)
    assert len(seen) == n_new and torch.equal(torch.stack(seen, 1), cached[:, 5:])  # streamed as decoded


def test_sampling_with_the_cache_matches_sampling_without_it_and_top_p():
    model = _model()
    prompt = torch.randint(0, 96, (1, 4), generator=torch.Generator().manual_seed(3))

    def run(**kw):
        gen = torch.Generator().manual_seed(7)
        return model.generate(prompt, max_new_tokens=8, temperature=1.0, top_k=20, generator=gen, **kw)

    assert torch.equal(run(use_cache=False), run())
    greedy = model.generate(prompt, max_new_tokens=8, temperature=0.0)
    assert torch.equal(run(top_p=1e-6), greedy)  # a tiny nucleus keeps only the most likely token
    assert not torch.equal(run(top_p=0.999), greedy)


def test_a_cache_refuses_positions_past_its_length_and_masks():
    model = _model()
    cache = KVCache(model.cfg.n_layers, 8)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        model.model(ids, cache=cache)
        with pytest.raises(ValueError, match="KV cache holds 8"):
            model.model(ids, cache=cache)
        with pytest.raises(ValueError, match="no masks"):
            model.model(ids, attention_mask=torch.ones_like(ids), cache=KVCache(2, 24))
