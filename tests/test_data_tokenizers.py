"""Tokenizer training, loading through the `hf` registry entry, and special-token checks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerFast

from llmfoundry_lite import registry
from llmfoundry_lite.data.checks import (
    locate_tokenizer,
    looks_local,
    tokenizer_has_mask,
    tokenizer_vocab_size,
)
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


@pytest.mark.parametrize(
    "name, local",
    [
        ("bert-base-uncased", False),
        ("google-bert/bert-base-uncased", False),
        ("huggyllama/llama-7b", False),
        ("data/tok", True),  # `data/` exists in the working directory (made below)
        ("./tok", True),
        ("/abs/tok", True),
        ("~/tok", True),
        ("a/b/c", True),
        ("C:\\tok", True),
        ("my tok", True),  # not a valid hub id
    ],
)
def test_local_paths_and_hub_ids_are_told_apart(tmp_path, name, local):
    (tmp_path / "data").mkdir()
    assert looks_local(name) is local


def test_tokenizer_files_give_vocab_size_and_mask(
    bert_tokenizer_dir, llama_tokenizer_dir, bert_tok, llama_tok
):
    # Read from tokenizer.json/tokenizer_config.json without loading the tokenizer; same as len(tokenizer).
    assert tokenizer_vocab_size(bert_tokenizer_dir) == len(bert_tok) == 2000
    assert tokenizer_vocab_size(llama_tokenizer_dir) == len(llama_tok)
    assert tokenizer_has_mask(bert_tokenizer_dir) is True
    assert tokenizer_has_mask(llama_tokenizer_dir) is False


def test_hf_entry_on_an_mds_folder_is_one_short_line(mlm_mds_dir):
    with pytest.raises(RecipeError) as e:
        registry.build("tokenizers", {"name": "hf", "path": mlm_mds_dir}, "tokenizer")
    assert (
        "MDS dataset folder" in str(e.value) and e.value.key == "tokenizer.path" and len(str(e.value)) < 400
    )


def test_hub_name_without_network_fails_within_seconds(tmp_path):
    """HF_HUB_OFFLINE unset and a hub that never answers: one probe bounded at ~2 s, not ~50 s of retries."""
    code = (
        "import os, socket, time\n"
        "silent = socket.socket(); silent.bind(('127.0.0.1', 0)); silent.listen(1)  # accepts, never answers\n"
        "os.environ['HF_ENDPOINT'] = f'http://127.0.0.1:{silent.getsockname()[1]}'\n"
        "from llmfoundry_lite import registry\n"
        "from llmfoundry_lite.errors import RecipeError\n"
        "registry.load_builtins()  # imports (torch, Composer) are not what is measured\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    registry.build('tokenizers', {'name': 'hf', 'path': 'some-org/some-tokenizer'}, 'tokenizer')\n"
        "except RecipeError as e:\n"
        "    print(f'{time.perf_counter() - t:.2f}', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    seconds, _, message = out.stdout.strip().partition(" ")
    assert "some-org/some-tokenizer" in message and "cannot be reached" in message, (
        out.stdout + out.stderr[-2000:]
    )
    assert float(seconds) < 10  # the probe gives up after 2 s


def test_locate_tokenizer_finds_local_folders(bert_tokenizer_dir):
    files = locate_tokenizer(bert_tokenizer_dir)
    assert files.local and files.folder == bert_tokenizer_dir
