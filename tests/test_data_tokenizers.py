"""Tokenizer training, loading through the `hf` registry entry, and special-token checks."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerFast

from llmfoundry_lite import registry
from llmfoundry_lite.data.corpus import embedded_documents
from llmfoundry_lite.data.tokenizers import check_mlm_tokenizer, prepare_causal_tokenizer, train_tokenizer
from llmfoundry_lite.errors import RecipeError


def test_embedded_documents_deterministic_prose():
    docs = embedded_documents()
    assert docs == embedded_documents()
    assert len(docs) > 50 and all(d.strip() for d in docs)
    assert sum(len(d) for d in docs) > 300_000
    assert any("assert" in d for d in docs[:5])


def test_wordpiece_is_bert_style(bert_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(bert_tokenizer_dir)
    assert isinstance(tok, BertTokenizerFast)
    assert len(tok) == 2000
    assert (tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token) == (
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    )
    ids = tok("The Assert statement")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "the assert statement"  # lowercased


def test_bpe_is_llama_style_byte_level(llama_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    text = "Hello  wörld ✓ — def f(x): return x"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in ids  # byte-level: any text encodes
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_train_tokenizer_rejects_bad_kind(tmp_path):
    with pytest.raises(RecipeError, match="wordpiece"):
        train_tokenizer("sentencepiece", ["a b c"], vocab_size=100, out_dir=tmp_path)  # type: ignore[arg-type]


def test_hf_registry_entry_loads_local_folder(bert_tokenizer_dir):
    tok = registry.build(
        "tokenizers", {"name": "hf", "path": bert_tokenizer_dir, "model_max_length": 64}, "tokenizer"
    )
    assert tok.model_max_length == 64 and tok.mask_token == "[MASK]"


def test_hf_missing_local_path_names_path_and_fix(tmp_path):
    missing = str(tmp_path / "no-such-tokenizer")
    with pytest.raises(RecipeError) as e:
        registry.build("tokenizers", {"name": "hf", "path": missing}, "tokenizer")
    assert missing in str(e.value) and "data tokenizer --train" in str(e.value)


def test_hf_unreachable_hub_name_is_recipe_error():
    # HF_HUB_OFFLINE=1 (conftest): a hub name that is not cached fails fast with a clear message.
    with pytest.raises(RecipeError, match="no-such-org-xyz/tok"):
        registry.build("tokenizers", {"name": "hf", "path": "no-such-org-xyz/tok"}, "tokenizer")


def test_special_token_checks(bert_tokenizer_dir, llama_tokenizer_dir):
    bpe = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    with pytest.raises(RecipeError, match="mask_token"):
        check_mlm_tokenizer(bpe)
    check_mlm_tokenizer(AutoTokenizer.from_pretrained(bert_tokenizer_dir))
    # Documented fix-up: no pad token -> eos is used for padding.
    bpe.pad_token = None
    assert prepare_causal_tokenizer(bpe).pad_token == "</s>"
    bert = AutoTokenizer.from_pretrained(bert_tokenizer_dir)
    with pytest.raises(RecipeError, match="eos"):
        prepare_causal_tokenizer(bert)
