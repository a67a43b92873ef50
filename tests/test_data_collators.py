"""MLM and causal-LM collators: masking statistics, special tokens, labels, sequence ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmfoundry_lite import registry
from llmfoundry_lite.data.corpus import embedded_documents
from llmfoundry_lite.errors import RecipeError


def _mlm(tok, p, max_seq_len=64):
    return registry.build(
        "collators", {"name": "mlm", "mlm_probability": p}, "collator", tokenizer=tok, max_seq_len=max_seq_len
    )


def test_mlm_masking_rate_and_80_10_10(bert_tok):
    torch.manual_seed(0)
    docs = embedded_documents()[:256]
    p = 0.3
    collate = _mlm(bert_tok, p)
    ref = bert_tok(docs, truncation=True, max_length=64, padding="max_length", return_tensors="pt")
    batch = collate([{"text": d} for d in docs])
    assert batch["input_ids"].shape == (256, 64)
    orig, ids, labels, attn = ref["input_ids"], batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert torch.equal(attn, ref["attention_mask"])
    special = torch.isin(orig, torch.tensor(bert_tok.all_special_ids))
    masked = labels != -100
    # Labels carry the original id exactly at masked positions.
    assert torch.equal(labels[masked], orig[masked])
    # Special tokens ([CLS], [SEP]) and padding are never masked.
    assert not (masked & special).any() and not (masked & (attn == 0)).any()
    eligible = (~special & (attn == 1)).sum().item()
    rate = masked.sum().item() / eligible
    assert abs(rate - p) < 0.02, rate
    n = masked.sum().item()
    to_mask = (ids[masked] == bert_tok.mask_token_id).float().mean().item()
    kept = (ids[masked] == orig[masked]).float().mean().item()
    rand = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.03 and abs(rand - 0.1) < 0.03, (to_mask, kept, n)
    # Positions that are not masked keep their token; random replacements are never special tokens.
    assert torch.equal(ids[~masked], orig[~masked])
    assert not torch.isin(
        ids[masked & (ids != bert_tok.mask_token_id)],
        torch.tensor([t for t in bert_tok.all_special_ids if t != bert_tok.mask_token_id]),
    ).any()


def test_mlm_probability_is_configurable_per_loader(bert_tok):
    torch.manual_seed(1)
    docs = [{"text": d} for d in embedded_documents()[:128]]
    low = (_mlm(bert_tok, 0.15)(docs)["labels"] != -100).float().sum()
    high = (_mlm(bert_tok, 0.45)(docs)["labels"] != -100).float().sum()
    assert 2.4 < (high / low).item() < 3.6


def test_mlm_needs_mask_token(llama_tok):
    with pytest.raises(RecipeError, match="mask_token"):
        _mlm(llama_tok, 0.15)


def test_mlm_rejects_bad_probability(bert_tok):
    with pytest.raises(RecipeError, match="mlm_probability"):
        _mlm(bert_tok, 1.5)


def test_causal_lm_token_rows_and_sequence_id(llama_tok):
    bos, eos = llama_tok.bos_token_id, llama_tok.eos_token_id
    collate = registry.build(
        "collators",
        {"name": "causal_lm", "sequence_id": True},
        "collator",
        tokenizer=llama_tok,
        max_seq_len=8,
    )
    row1 = np.array([bos, 10, 11, eos, bos, 12, eos, bos, 13, 14], dtype=np.int32)
    row2 = np.array([15, 16, eos, bos, 17, 18, 19, 20, 21, 22], dtype=np.int32)
    batch = collate([{"tokens": row1}, {"tokens": row2}])
    assert batch["input_ids"].tolist() == [row1[:8].tolist(), row2[:8].tolist()]  # truncated to max_seq_len
    assert batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])  # unshifted; the model shifts
    assert batch["attention_mask"].eq(1).all()
    assert batch["sequence_id"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 1, 1, 1, 1]]


def test_causal_lm_on_wordpiece_rows_packed_with_eos_text(bert_tokenizer_dir):
    """Rows packed by `data convert --bos-text '[CLS]' --eos-text '[SEP]'` train causally once the tokenizer names
    the same separators (tokenizer.kwargs), and sequence_id splits documents there."""
    plain = registry.build("tokenizers", {"name": "hf", "path": bert_tokenizer_dir}, "tokenizer")
    with pytest.raises(RecipeError, match="eos_token='\\[SEP\\]'") as err:
        registry.build("collators", {"name": "causal_lm"}, "collator", tokenizer=plain, max_seq_len=8)
    assert err.value.key == "tokenizer.kwargs.eos_token"
    tok = registry.build(
        "tokenizers",
        {"name": "hf", "path": bert_tokenizer_dir, "kwargs": {"eos_token": "[SEP]", "bos_token": "[CLS]"}},
        "tokenizer",
    )
    cls, sep = tok.cls_token_id, tok.sep_token_id
    collate = registry.build(
        "collators", {"name": "causal_lm", "sequence_id": True}, "collator", tokenizer=tok, max_seq_len=8
    )
    row = np.array([cls, 10, 11, sep, cls, 12, sep, cls], dtype=np.int32)
    batch = collate([{"tokens": row}])
    assert batch["attention_mask"].eq(1).all()  # [PAD] is its own id: nothing here is padding
    assert batch["sequence_id"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 2]]


def test_causal_lm_text_padding_ignored(llama_tok):
    collate = registry.build(
        "collators",
        {"name": "causal_lm", "sequence_id": True},
        "collator",
        tokenizer=llama_tok,
        max_seq_len=32,
    )
    batch = collate([{"text": "short"}, {"text": "a somewhat longer document about the assert statement"}])
    attn, labels, ids = batch["attention_mask"], batch["labels"], batch["input_ids"]
    assert ids.shape == (2, 32)
    assert (labels[attn == 0] == -100).all() and torch.equal(labels[attn == 1], ids[attn == 1])
    assert ids[0, 0] == llama_tok.bos_token_id
    n0 = int(attn[0].sum())
    assert ids[0, n0 - 1] == llama_tok.eos_token_id  # a raw document ends with EOS
    assert (batch["sequence_id"][attn == 0] == -1).all() and (batch["sequence_id"][attn == 1] == 0).all()


def test_collator_unknown_key_is_caught_by_registry(bert_tok):
    with pytest.raises(RecipeError, match="mlm_probabilty.*did you mean"):
        registry.check_component("collators", {"name": "mlm", "mlm_probabilty": 0.2}, "train_loader.collator")
