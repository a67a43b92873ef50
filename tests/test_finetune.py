"""Instruction/chat finetuning: labels token by token (padded and packed), truncation, chat templates, the
mistakes users make, the loss against a hand computation, and a HF Llama finetuned by the recipe that generates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_finetune_real import _runs  # tests/ is on sys.path (rootdir-relative imports)

from llmfoundry_lite import registry
from llmfoundry_lite.data.convert import convert
from llmfoundry_lite.data.corpus import embedded_documents
from llmfoundry_lite.errors import RecipeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 96


def _pairs(n: int = 40) -> list[dict[str, str]]:
    docs = [d for d in embedded_documents() if len(d) > 300][:n]
    return [{"prompt": f"Summarise: {d[:60]}", "response": d[60:150]} for d in docs]


def _chats(n: int = 12) -> list[dict]:
    docs = [d for d in embedded_documents() if len(d) > 300][:n]
    return [
        {
            "messages": [
                {"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": d[:40]},
                {"role": "assistant", "content": d[40:90]},
                {"role": "user", "content": "And then?"},
                {"role": "assistant", "content": d[90:130]},
            ]
        }
        for d in docs
    ]


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _loader(tok, local, bs=4, max_seq_len=SEQ, **kw):
    block = {"name": "finetune", "local": str(local), "split": "train", "max_seq_len": max_seq_len, **kw}
    return registry.build("dataloaders", block, "train_loader", tokenizer=tok, device_batch_size=bs)


def _expected(tok, row) -> tuple[list[int], list[int]]:
    """The documented layout, from the transformers tokenizer: [BOS] prompt response [EOS], labels on the response."""
    p = tok(row["prompt"], add_special_tokens=False)["input_ids"]
    r = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return [tok.bos_token_id, *p, *r], [-100] * (1 + len(p)) + r


@pytest.mark.parametrize("packed", [False, True])
def test_prompt_and_padding_are_ignored_and_every_response_token_is_a_label(
    tmp_path, llama_tokenizer_dir, llama_tok, packed
):
    rows = _pairs()
    src = _jsonl(tmp_path / "pairs.jsonl", rows)
    s = convert(src, tmp_path / "ft", splits="train", tokenizer=llama_tokenizer_dir, finetune=True,
                max_seq_len=SEQ, pack=packed, num_workers=0)  # fmt: skip
    assert s.splits["train"].documents == len(rows) and s.splits["train"].dropped == 0
    batches = list(_loader(llama_tok, tmp_path / "ft", drop_last=False).dataloader)
    expected = [_expected(llama_tok, r) for r in rows]
    k = 0  # the next expected example
    for batch in batches:
        assert batch["input_ids"].shape[1] == SEQ and ("sequence_id" in batch) == packed
        for b in range(len(batch["input_ids"])):
            ids, labels = batch["input_ids"][b].tolist(), batch["labels"][b].tolist()
            attn = batch["attention_mask"][b].tolist()
            seq = batch["sequence_id"][b].tolist() if packed else None
            t = 0
            for j in range(len(rows) if packed else 1):  # the examples side by side in this row
                if k >= len(expected) or t + len(expected[k][0]) > SEQ or (packed and seq[t] != j):
                    break
                e_ids, e_labels = expected[k]
                for pos, (e_id, e_label) in enumerate(zip(e_ids, e_labels)):
                    assert ids[t + pos] == e_id and attn[t + pos] == 1
                    assert (
                        labels[t + pos] == e_label
                    )  # -100 on BOS and prompt, the token itself on the response
                    if packed:
                        assert seq[t + pos] == j
                t, k = t + len(e_ids), k + 1
            assert t > 0
            assert all(x == -100 for x in labels[t:]) and all(a == 0 for a in attn[t:])  # padding
            assert all(x == llama_tok.pad_token_id for x in ids[t:])
            if packed:
                assert all(x == -100 for x in seq[t:]) or all(x == -1 for x in seq[t:])
    assert k == len(expected)  # every example, in order
    if packed:
        assert len(batches[0]["input_ids"]) * len(batches) < len(rows)  # several examples share rows


def test_truncation_keeps_the_response_and_counts_what_cannot_fit(tmp_path, llama_tokenizer_dir, llama_tok):
    long_prompt = " ".join(embedded_documents()[:3])
    rows = [
        {"prompt": long_prompt, "response": "The short answer."},
        {"prompt": "Tell me everything.", "response": long_prompt},  # the response alone is longer than SEQ
    ]
    s = convert(_jsonl(tmp_path / "t.jsonl", rows), tmp_path / "ft", splits="train",
                tokenizer=llama_tokenizer_dir, finetune=True, max_seq_len=SEQ, num_workers=0)  # fmt: skip
    assert (s.splits["train"].documents, s.splits["train"].dropped) == (1, 1)
    assert "1 dropped (longer than --max-seq-len)" in s.format()
    batch = next(iter(_loader(llama_tok, tmp_path / "ft", bs=1).dataloader))
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    e_ids, e_labels = _expected(llama_tok, rows[0])
    assert len(ids) == SEQ and ids[0] == llama_tok.bos_token_id  # BOS, then the prompt's last tokens
    n_resp = sum(x != -100 for x in e_labels)
    assert ids[-n_resp:] == e_ids[-n_resp:] and labels[-n_resp:] == e_labels[-n_resp:]
    assert ids[1:-n_resp] == e_ids[-(SEQ - 1) : -n_resp]  # the prompt is cut from the left


@pytest.fixture(scope="module")
def chat_tok_dir(tmp_path_factory, llama_tokenizer_dir):
    """The test BPE tokenizer with a ChatML chat template of its own, saved by transformers."""
    from transformers import AutoTokenizer

    from llmfoundry_lite.data.finetune import CHAT_TEMPLATES

    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    tok.chat_template = CHAT_TEMPLATES["chatml"]
    out = tmp_path_factory.mktemp("tok-chat")
    tok.save_pretrained(str(out))
    return str(out)


@pytest.mark.parametrize("packed", [False, True])
def test_chat_labels_every_assistant_turn_and_nothing_else(tmp_path, chat_tok_dir, packed):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_tok_dir)
    rows = _chats()
    convert(_jsonl(tmp_path / "chat.jsonl", rows), tmp_path / "ft", splits="train", tokenizer=chat_tok_dir,
            finetune=True, max_seq_len=256, pack=packed, num_workers=0)  # fmt: skip
    batches = list(_loader(tok, tmp_path / "ft", max_seq_len=256, drop_last=False).dataloader)
    examples = []
    for batch in batches:
        for b in range(len(batch["input_ids"])):
            n = int(batch["attention_mask"][b].sum())
            ids, labels = batch["input_ids"][b][:n].tolist(), batch["labels"][b][:n].tolist()
            bounds = [0, n]
            if packed:
                seq = batch["sequence_id"][b][:n].tolist()
                bounds = [0] + [t for t in range(1, n) if seq[t] != seq[t - 1]] + [n]
            examples += [(ids[a:z], labels[a:z]) for a, z in zip(bounds, bounds[1:])]
    assert len(examples) == len(rows)
    for (ids, labels), row in zip(examples, rows):
        # The conversation is the tokenizer's own template, as transformers renders it.
        assert tok.decode(ids) == tok.apply_chat_template(row["messages"], tokenize=False)
        runs = _runs(ids, labels)  # labelled runs, token by token
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert [tok.decode(r) for r in runs] == [f"{c}<|im_end|>\n" for c in replies]


def test_named_template_for_a_tokenizer_without_one(tmp_path, llama_tokenizer_dir, llama_tok):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]}
    ]
    src = _jsonl(tmp_path / "c.jsonl", rows)
    convert(src, tmp_path / "ft", splits="train", tokenizer=llama_tokenizer_dir, finetune=True, max_seq_len=64,
            chat_template="llama2", num_workers=0)  # fmt: skip
    batch = next(iter(_loader(llama_tok, tmp_path / "ft", bs=1, max_seq_len=64).dataloader))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert llama_tok.decode(ids[batch["attention_mask"][0] == 1]) == "<s>[INST] Hi [/INST] Hello there. </s>"
    assert llama_tok.decode(ids[labels != -100]) == " Hello there. </s>"


MISTAKES = [
    (
        {"question": "x", "answer": "y"},
        {},
        r"'?BAD' line 2: no finetuning fields \(has: question, answer\); give \{prompt, response\}",
    ),
    ({"prompt": "x", "response": "  "}, {}, r"'?BAD' line 2 field 'response' is empty"),
    (
        {"messages": [{"role": "user", "content": "hi"}]},
        {"chat_template": "chatml"},
        r"'?BAD' line 2 field 'messages' has no assistant turn",
    ),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {},
        r"'?BAD' line 2 field 'messages': tokenizer .* has no chat template; name one with --chat-template chatml",
    ),
]


@pytest.mark.parametrize("row, kw, match", MISTAKES)
def test_finetuning_mistakes_name_file_row_and_field(tmp_path, llama_tokenizer_dir, row, kw, match):
    src = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "response": "row"}, row])
    with pytest.raises(RecipeError, match=match.replace("BAD", src)):
        convert(src, tmp_path / "o", tokenizer=llama_tokenizer_dir, finetune=True, max_seq_len=32, **kw)
    assert not os.path.exists(tmp_path / "o" / "train") and not os.listdir(tmp_path / "o")


def test_cli_mistake_exits_2_with_one_line(tmp_path, llama_tokenizer_dir):
    src = _jsonl(tmp_path / "bad.jsonl", [{"text": "not a finetuning row"}])
    r = subprocess.run(
        [sys.executable, "-m", "llmfoundry_lite.data.cli", "convert", "--finetune", "--source", src, "--out",
         str(tmp_path / "o"), "--tokenizer", llama_tokenizer_dir, "--max-seq-len", "32", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip().count("\n") == 0
        and "bad.jsonl' line 1: no finetuning fields (has: text)" in r.stderr
    )


def test_packing_needs_a_model_that_takes_sequence_id(tmp_path, llama_tokenizer_dir):
    from llmfoundry_lite.data.checks import check_recipe_data

    src = _jsonl(tmp_path / "p.jsonl", _pairs(8))
    convert(src, tmp_path / "packed", splits="train", tokenizer=llama_tokenizer_dir, finetune=True,
            max_seq_len=SEQ, pack=True, num_workers=0)  # fmt: skip
    recipe = {
        "model": {"name": "mosaic_bert"},
        "train_loader": {
            "name": "finetune",
            "local": str(tmp_path / "packed"),
            "split": "train",
            "max_seq_len": SEQ,
        },
    }
    with pytest.raises(RecipeError, match="does not take sequence_id.*reconvert without --pack") as e:
        check_recipe_data(recipe)
    assert e.value.key == "train_loader.local"
    check_recipe_data({**recipe, "model": {"name": "llama"}})  # LLaMA masks attention by sequence_id
    with pytest.raises(RecipeError, match="holds no finetuning examples"):
        check_recipe_data({**recipe, "train_loader": {**recipe["train_loader"], "local": _raw(tmp_path)}})


def _raw(tmp_path) -> str:
    convert("embedded", tmp_path / "raw", splits="train", max_docs=20)
    return str(tmp_path / "raw")


def _tiny_llama(tok):
    return registry.build(
        "models",
        {"name": "llama", "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": SEQ},
        "model",
        tokenizer=tok,
    )


def test_loss_is_the_mean_over_response_tokens_only(tmp_path, llama_tokenizer_dir, llama_tok):
    convert(_jsonl(tmp_path / "p.jsonl", _pairs(16)), tmp_path / "ft", splits="train",
            tokenizer=llama_tokenizer_dir, finetune=True, max_seq_len=SEQ, pack=True, num_workers=0)  # fmt: skip
    batch = next(iter(_loader(llama_tok, tmp_path / "ft").dataloader))
    torch.manual_seed(0)
    model = _tiny_llama(llama_tok)
    loss = model.loss(model(batch), batch)  # what a Composer training step computes
    logits = model.model(batch["input_ids"], batch["attention_mask"], batch["sequence_id"]).double()
    logp = torch.log_softmax(logits, dim=-1)
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            target = int(batch["labels"][b, t + 1])
            if target != -100:  # a response token, predicted from the position before it
                total -= float(logp[b, t, target])
                count += 1
    assert count == int((batch["labels"] != -100).sum()) > 0
    assert abs(float(loss) - total / count) < 1e-6
    # Not the loss over every real token (prompts included): the test tells the two apart.
    every = [
        -float(logp[b, t, int(batch["input_ids"][b, t + 1])])
        for b in range(logits.shape[0])
        for t in range(logits.shape[1] - 1)
        if batch["attention_mask"][b, t + 1] and batch["sequence_id"][b, t + 1] == batch["sequence_id"][b, t]
    ]
    assert abs(sum(every) / len(every) - total / count) > 1e-3


def _hf_llama(tok, out, positions: int = SEQ) -> str:
    """A small Hugging Face Llama folder (config, safetensors, tokenizer), as `llmfoundry-lite export` writes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


def test_recipe_finetunes_a_hf_llama_which_then_generates(tmp_path, llama_tok):
    from llmfoundry_lite import load_recipe
    from llmfoundry_lite.train.run import train

    hf = _hf_llama(llama_tok, tmp_path / "hf-llama")
    data = tmp_path / "data" / "instruct"
    convert(_jsonl(tmp_path / "p.jsonl", _pairs(40)), data, tokenizer=hf, finetune=True, max_seq_len=SEQ,
            pack=True, val_fraction=0.2, num_workers=0)  # fmt: skip
    overrides = {
        "variables.hf_model": hf,
        "variables.data_local": str(data),
        "max_seq_len": SEQ,
        "global_train_batch_size": 2,
        "device_train_microbatch_size": 2,
        "device_eval_batch_size": 2,
        "max_duration": "4ba",
        "eval_interval": "4ba",
        "eval_subset_num_batches": 1,
        "precision": "fp32",
        "optimizer.lr": 1e-2,
        "train_loader.num_workers": 0,
        "eval_loader.num_workers": 0,
        "save_interval": "4ba",
        "save_folder": str(tmp_path / "runs" / "{run_name}"),
        "callbacks": "{}",
    }
    cfg = load_recipe(os.path.join(ROOT, "recipes", "llama", "finetune-instruct.yaml"),
                      [f"{k}={v}" for k, v in overrides.items()])  # fmt: skip
    from transformers import LlamaForCausalLM

    before = LlamaForCausalLM.from_pretrained(hf).model.embed_tokens.weight.detach().clone()
    trainer = train(cfg)
    model = trainer.state.model
    assert int(trainer.state.timestamp.batch) == 4
    assert not torch.equal(model.model.embed.weight.detach().cpu(), before)  # the HF weights were finetuned
    prompt = llama_tok("Summarise: the", return_tensors="pt")["input_ids"]
    out = model.eval().generate(prompt, max_new_tokens=8, temperature=0, eos_token_id=llama_tok.eos_token_id)
    assert out.shape[1] > prompt.shape[1] and torch.equal(out[:, : prompt.shape[1]], prompt)
    assert isinstance(llama_tok.decode(out[0, prompt.shape[1] :]), str)
    trainer.close()
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
