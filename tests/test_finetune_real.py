"""Finetuning data as users have it: chat templates in the styles real models ship, the row shapes of public
datasets, truncation, packing that a LLaMA really keeps apart, and the loss over padded, packed, multi-turn rows.

Tokenizers are the BPE test tokenizer with the special tokens and chat template of each style added (nothing is
downloaded); labels are read back from the MDS through the real loader and collator, token by token.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest
import torch

from llmfoundry_lite import registry
from llmfoundry_lite.data.convert import convert
from llmfoundry_lite.errors import RecipeError

# Templates as the models ship them (abridged to the parts that render text-only conversations).
LLAMA3 = (  # with Llama 3.2's test for a tool call: a key that is there, even null
    "{{ bos_token }}{% for message in messages %}{% if not (message.role == 'tool' or 'tool_calls' in message) %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' }}{% elif 'tool_calls' in message %}{% if not message.tool_calls|length == 1 %}"
    "{{ raise_exception('This model only supports single tool-calls at once!') }}{% endif %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' + message.tool_calls[0] | tojson + '<|eot_id|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
QWEN = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == 'user') or (message.role == "
    "'system' and not loop.first) or (message.role == 'assistant') %}{{- '<|im_start|>' + message.role + '\n' + "
    "message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
    "are supported!') }}{% endif %}{% endfor %}"
)
# A generation prompt ending in a space: the reply's first word would merge with it if tokenized together.
RESPONSE_COLON = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '### Response: ' + m['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Response: ' }}{% endif %}"
)

# style: (template, added special tokens, bos, eos, pad, end of turn, template trims content, takes system)
STYLES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", None, "<|eot_id|>", True, True),
    "qwen": (QWEN, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>", "<|endoftext|>",
             "<|im_end|>", False, True),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>",
              "<end_of_turn>", True, False),
    "mistral": (MISTRAL, ["[INST]", "[/INST]"], "<s>", "</s>", None, "</s>", False, False),
    "response-colon": (RESPONSE_COLON, [], "<s>", "</s>", "</s>", "</s>", False, True),  # eos == pad
    "gpt2": (QWEN, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", "<|endoftext|>", None,
             "<|im_end|>", False, True),  # bos == eos, no pad, offsets trimmed by its ByteLevel post-processor
}  # fmt: skip


@pytest.fixture(scope="module")
def style_tok(tmp_path_factory, llama_tokenizer_dir):
    """A function: style name -> a saved tokenizer folder in that style."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    made: dict[str, str] = {}

    def make(style: str) -> str:
        if style not in made:
            template, specials, bos, eos, pad = STYLES[style][:5]
            if style == "gpt2":
                with open(os.path.join(llama_tokenizer_dir, "tokenizer.json")) as f:
                    raw = Tokenizer.from_str(f.read())
                raw.post_processor = processors.ByteLevel(trim_offsets=True)
                tok = PreTrainedTokenizerFast(tokenizer_object=raw)
            else:
                tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
            tok.add_special_tokens({"additional_special_tokens": specials})
            tok.bos_token, tok.eos_token, tok.pad_token = bos, eos, pad
            tok.chat_template = template
            out = tmp_path_factory.mktemp(f"tok-{style}")
            tok.save_pretrained(str(out))
            made[style] = str(out)
        return made[style]

    return make


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _examples(tok, local, max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of every example, read back through the finetune loader and collator (packed rows split)."""
    block = {
        "name": "finetune",
        "local": str(local),
        "split": "train",
        "max_seq_len": max_seq_len,
        "drop_last": False,
    }
    loader = registry.build(
        "dataloaders", block, "train_loader", tokenizer=tok, device_batch_size=4
    ).dataloader
    out = []
    for batch in loader:
        for b in range(len(batch["input_ids"])):
            n = int(batch["attention_mask"][b].sum())
            assert (batch["labels"][b, n:] == -100).all()  # padding
            ids, labels = batch["input_ids"][b][:n].tolist(), batch["labels"][b][:n].tolist()
            bounds = [0, n]
            if "sequence_id" in batch:
                seq = batch["sequence_id"][b][:n].tolist()
                bounds = [0] + [t for t in range(1, n) if seq[t] != seq[t - 1]] + [n]
            out += [(ids[a:z], labels[a:z]) for a, z in zip(bounds, bounds[1:])]
    return out


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The labelled runs of an example; every label is the token at its position or -100."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        assert lab in (-100, i)
        if lab != -100:
            cur.append(i)
        elif cur:
            runs, cur = [*runs, cur], []
    return runs + ([cur] if cur else [])


def _conversation(system: bool) -> list[dict]:
    turns = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "  Paris is the capital.\n"},  # leading spaces, as scraped data has
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."},
        {"role": "user", "content": "Italy?"},
        {"role": "assistant", "content": "Rome, of course."},
    ]
    return ([{"role": "system", "content": "Be brief."}] if system else []) + turns


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("style", list(STYLES))
def test_chat_templates_label_exactly_each_reply_and_its_end_of_turn(tmp_path, style_tok, style, packed):
    from transformers import AutoTokenizer

    *_, eot, trims, system = STYLES[style]
    folder = style_tok(style)
    tok = AutoTokenizer.from_pretrained(folder)
    rows = [{"messages": _conversation(system), "id": i, "source": "web"} for i in range(3)]  # extra keys
    convert(_jsonl(tmp_path / "chat.jsonl", rows), tmp_path / "ft", splits="train", tokenizer=folder,
            finetune=True, max_seq_len=256, pack=packed, num_workers=0)  # fmt: skip
    examples = _examples(tok, tmp_path / "ft", 256)
    assert len(examples) == len(rows)
    messages = rows[0]["messages"]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    for ids, labels in examples:
        assert labels[0] == -100
        assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
        # Labels: exactly the reply's tokens and the end-of-turn token, not the newline a template writes after it.
        expected = [
            tok((r.strip() if trims else r) + eot, add_special_tokens=False)["input_ids"] for r in replies
        ]
        assert _runs(ids, labels) == expected
        # Before the first reply: the tokens of the generation prompt, as `generate` would be given them.
        first = next(t for t, lab in enumerate(labels) if lab != -100)
        k = next(k for k, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        assert ids[:first] == tok(prompt, add_special_tokens=False)["input_ids"]


def test_a_template_that_refuses_a_row_is_one_line_naming_file_row_and_field(tmp_path, style_tok):
    rows = [{"messages": _conversation(False)}, {"messages": _conversation(True)}]  # Mistral: no system role
    src = _jsonl(tmp_path / "sys.jsonl", rows)
    r = subprocess.run(
        [sys.executable, "-m", "llmfoundry_lite.data.cli", "convert", "--finetune", "--source", src, "--out",
         str(tmp_path / "o"), "--tokenizer", style_tok("mistral"), "--max-seq-len", "64", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert (
        "sys.jsonl' line 2 field 'messages': the tokenizer's chat template refused it (Conversation roles"
        in r.stderr
    )
    assert "--chat-template chatml|llama3|llama2|zephyr" in r.stderr


def _one(tmp_path, folder, row, max_seq_len=256, name="x", **kw) -> tuple[list[int], list[int]]:
    from transformers import AutoTokenizer

    out = tmp_path / f"ft-{name}"
    convert(_jsonl(tmp_path / f"{name}.jsonl", [row]), out, splits="train", tokenizer=folder, finetune=True,
            max_seq_len=max_seq_len, num_workers=0, **kw)  # fmt: skip
    [example] = _examples(AutoTokenizer.from_pretrained(folder), out, max_seq_len)
    return example


def test_sharegpt_alpaca_and_content_parts_read_as_their_openai_and_prompt_equivalents(tmp_path, style_tok):
    folder = style_tok("qwen")
    messages = _conversation(True)
    share = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                "value": m["content"]} for m in messages]}  # fmt: skip
    parts = {"messages": [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]}
    plain = _one(tmp_path, folder, {"messages": messages}, name="plain")
    assert _one(tmp_path, folder, share, name="share") == plain
    assert _one(tmp_path, folder, parts, name="parts") == plain
    lmsys = {
        "conversation": messages
    }  # LMSYS-Chat and WildChat: OpenAI's turns under ShareGPT's (singular) name
    assert _one(tmp_path, folder, lmsys, name="lmsys") == plain
    alpaca = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    pair = {"prompt": "Add the numbers.\n\n2 and 3", "response": "5"}
    assert _one(tmp_path, folder, alpaca, name="alpaca") == _one(tmp_path, folder, pair, name="pair")
    no_input = {"instruction": "Say hi.", "input": "", "output": "Hi"}
    assert _one(tmp_path, folder, no_input, name="a2") == _one(tmp_path, folder, {"prompt": "Say hi.", "response": "Hi"}, name="p2")  # fmt: skip


def test_an_opening_assistant_greeting_is_context_not_a_label(tmp_path, style_tok):
    from transformers import AutoTokenizer

    folder = style_tok("qwen")
    tok = AutoTokenizer.from_pretrained(folder)
    msgs = [{"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "Say yes."},
            {"role": "assistant", "content": "Yes."}]  # fmt: skip
    ids, labels = _one(tmp_path, folder, {"messages": msgs})
    assert [tok.decode(r) for r in _runs(ids, labels)] == ["Yes.<|im_end|>"]


REFUSED = [
    ({"question": "q", "answer": "a"}, r"line 1: no finetuning fields \(has: question, answer\); give \{prompt"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "A cat."}]},
     r"line 1 field 'messages\[0\].content\[0\]' is a 'image_url' part; only text parts"),
    ({"messages": [{"role": "user", "content": "w?"},
                   {"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}]},
     r"line 1 field 'messages\[1\]' is a tool call without content; tool calls are not supported"),
    ({"messages": [{"role": "user", "content": "w?"}, {"role": "function", "content": "sunny"}]},
     r"line 1 field 'messages\[1\].role' is 'function'; use one of system, user, assistant, tool"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]},
     r"line 1 field 'conversations\[1\].from' is 'bot'; use one of system, human, user, gpt, assistant, tool"),
    ({"conversations": [{"from": "human", "value": "Hi"}]},
     r"line 1 field 'conversations' has no assistant turn after a user turn"),
    ({"instruction": "Do it", "input": "", "output": " "}, r"line 1 field 'output' is empty"),
]  # fmt: skip


@pytest.mark.parametrize("row, match", REFUSED)
def test_shapes_we_cannot_train_on_are_refused_naming_file_row_and_field(tmp_path, style_tok, row, match):
    src = _jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(RecipeError, match=f"'{src}' {match}") as e:
        convert(
            src, tmp_path / "o", splits="train", tokenizer=style_tok("qwen"), finetune=True, max_seq_len=64
        )
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "o" / "train")


def test_compressed_parquet_and_hf_folder_sources_give_the_same_examples(tmp_path, style_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    folder = style_tok("llama3")
    tok = AutoTokenizer.from_pretrained(folder)
    rows = [{"messages": _conversation(True), "id": i} for i in range(4)]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    (tmp_path / "hf" / "data").mkdir(parents=True)
    _jsonl(tmp_path / "hf" / "data" / "train.jsonl", rows)
    got = []
    for i, src in enumerate(
        [str(tmp_path / "c.jsonl.gz"), str(tmp_path / "c.parquet"), f"hf:{tmp_path / 'hf'}"]
    ):
        convert(src, tmp_path / f"o{i}", splits="train", tokenizer=folder, finetune=True, max_seq_len=256,
                num_workers=0)  # fmt: skip
        got.append(_examples(tok, tmp_path / f"o{i}", 256))
    assert len(got[0]) == 4 and got[0] == got[1] == got[2]


def test_truncation_keeps_bos_and_the_last_reply_whole_and_counts_what_cannot_fit(tmp_path, style_tok):
    from transformers import AutoTokenizer

    folder = style_tok("llama3")
    tok = AutoTokenizer.from_pretrained(folder)
    messages = _conversation(True)
    full_ids, full_labels = _one(tmp_path, folder, {"messages": messages}, max_seq_len=512, name="full")
    runs = _runs(full_ids, full_labels)
    starts = [t for t in range(1, len(full_ids)) if full_labels[t] != -100 and full_labels[t - 1] == -100]
    # Cut inside the middle reply (what is left of it keeps its labels), and cut down to BOS + the last reply.
    for n, kept in ((len(full_ids) - starts[1], [runs[1][1:], runs[2]]), (len(runs[2]) + 1, [runs[2]])):
        ids, labels = _one(tmp_path, folder, {"messages": messages}, max_seq_len=n, name=f"cut{n}")
        assert len(ids) == n and ids[0] == tok.bos_token_id  # BOS kept, the conversation cut after it
        assert ids[1:] == full_ids[-(n - 1) :] and labels[1:] == full_labels[-(n - 1) :]
        assert _runs(ids, labels) == kept
    long = {
        "messages": [
            {"role": "user", "content": "Tell me all."},
            {"role": "assistant", "content": "la " * 40},
        ]
    }
    src = _jsonl(tmp_path / "long.jsonl", [long, {"messages": messages}])
    s = convert(
        src, tmp_path / "o", splits="train", tokenizer=folder, finetune=True, max_seq_len=40, num_workers=0
    )
    assert (s.splits["train"].documents, s.splits["train"].dropped) == (1, 1)
    with pytest.raises(
        RecipeError, match=r"gave split 'train' no examples: all 2 were longer than --max-seq-len 4"
    ) as e:
        convert(
            src,
            tmp_path / "o4",
            splits="train",
            tokenizer=folder,
            finetune=True,
            max_seq_len=4,
            num_workers=0,
        )
    assert e.value.key == "--max-seq-len"


def _chats(n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"It is {2 * i}."},
                      {"role": "user", "content": "Twice that?"},
                      {"role": "assistant", "content": f"{4 * i}, of course."}]}
        for i in range(n)
    ]  # fmt: skip


def _tiny_llama(tok, max_seq_len: int):
    torch.manual_seed(0)
    return registry.build(
        "models",
        {"name": "llama", "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": max_seq_len},
        "model",
        tokenizer=tok,
    )


def test_packed_rows_are_exactly_full_and_a_trained_llama_keeps_their_examples_apart(tmp_path, style_tok):
    from transformers import AutoTokenizer

    folder = style_tok("llama3")
    tok = AutoTokenizer.from_pretrained(folder)
    rows = _chats(6)
    src = _jsonl(tmp_path / "c.jsonl", rows)
    convert(
        src, tmp_path / "one", splits="train", tokenizer=folder, finetune=True, max_seq_len=256, num_workers=0
    )
    alone = _examples(tok, tmp_path / "one", 256)
    width = len(alone[0][0]) + len(alone[1][0])  # the first two examples fill a row exactly
    convert(src, tmp_path / "packed", splits="train", tokenizer=folder, finetune=True, max_seq_len=width,
            pack=True, num_workers=0)  # fmt: skip
    block = {"name": "finetune", "local": str(tmp_path / "packed"), "split": "train", "max_seq_len": width}
    loader = registry.build("dataloaders", {**block, "drop_last": False}, "train_loader", tokenizer=tok,
                            device_batch_size=2).dataloader  # fmt: skip
    batches = list(loader)
    first = batches[0]
    assert bool(first["attention_mask"][0].all())  # exactly full: no padding
    assert first["sequence_id"][0].tolist() == [0] * len(alone[0][0]) + [1] * len(alone[1][0])
    assert first["input_ids"][0].tolist() == alone[0][0] + alone[1][0]
    assert first["labels"][0].tolist() == alone[0][1] + alone[1][1]
    assert first["labels"][0, len(alone[0][0])] == -100  # an example's first token is never a label
    assert _examples(tok, tmp_path / "packed", width) == alone  # every example, in order, packed or not

    model = _tiny_llama(tok, width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for batch in batches * 2:  # a few steps, so the weights are not those of initialisation
        model.loss(model(batch), batch).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        for batch in batches:
            packed = model.model(batch["input_ids"], batch["attention_mask"], batch["sequence_id"])
            for b in range(len(batch["input_ids"])):
                seq = batch["sequence_id"][b]
                for j in range(int(seq.max()) + 1):
                    at = (seq == j).nonzero().flatten()
                    by_itself = model.model(batch["input_ids"][b : b + 1, at])[0]
                    assert (packed[b, at] - by_itself).abs().max() < 1e-5


@pytest.mark.parametrize("packed", [False, True])
def test_step_loss_is_a_hand_cross_entropy_over_reply_tokens_of_multi_turn_rows(tmp_path, style_tok, packed):
    from transformers import AutoTokenizer

    folder = style_tok("qwen")  # no BOS, pad != eos
    tok = AutoTokenizer.from_pretrained(folder)
    convert(_jsonl(tmp_path / "c.jsonl", _chats(8)), tmp_path / "ft", splits="train", tokenizer=folder,
            finetune=True, max_seq_len=160, pack=packed, num_workers=0)  # fmt: skip
    block = {"name": "finetune", "local": str(tmp_path / "ft"), "split": "train", "max_seq_len": 160}
    batch = next(
        iter(
            registry.build(
                "dataloaders", block, "train_loader", tokenizer=tok, device_batch_size=3
            ).dataloader
        )
    )
    assert not bool(batch["attention_mask"].all())  # padded rows in the batch
    model = _tiny_llama(tok, 160)
    loss = model.loss(model(batch), batch)  # what a Composer training step computes
    logits = model.model(batch["input_ids"], batch["attention_mask"], batch.get("sequence_id")).double()
    logp = torch.log_softmax(logits, dim=-1)
    terms = [
        -float(logp[b, t, int(batch["labels"][b, t + 1])])
        for b in range(logits.shape[0])
        for t in range(logits.shape[1] - 1)
        if batch["labels"][b, t + 1] != -100  # a reply token, predicted from the position before it
    ]
    examples = (
        len(batch["input_ids"]) if not packed else int((batch["sequence_id"].max(dim=1).values + 1).sum())
    )
    runs = sum(len(_runs(i.tolist(), lab.tolist())) for i, lab in zip(batch["input_ids"], batch["labels"]))
    assert runs == 2 * examples  # both replies of every example carry labels
    assert len(terms) == int((batch["labels"] != -100).sum())
    assert abs(float(loss) - sum(terms) / len(terms)) < 1e-6


def test_keys_that_are_null_read_as_absent(tmp_path, style_tok):
    """OpenAI exports write "tool_calls": null; Arrow (Parquet, hf:) fills a key missing from one row with null."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = style_tok("llama3")
    plain = {"messages": _conversation(True)}
    nulls = {"messages": [{**m, "tool_calls": None, "refusal": None} for m in plain["messages"]]}
    assert _one(tmp_path, folder, nulls, name="nulls") == _one(tmp_path, folder, plain, name="plain")
    named = {"messages": [{**plain["messages"][0], "name": "rules"}, *plain["messages"][1:]]}
    pq.write_table(pa.Table.from_pylist([named, plain]), tmp_path / "c.parquet")
    convert(str(tmp_path / "c.parquet"), tmp_path / "pq", splits="train", tokenizer=folder, finetune=True,
            max_seq_len=256, num_workers=0)  # fmt: skip
    from transformers import AutoTokenizer

    got = _examples(AutoTokenizer.from_pretrained(folder), tmp_path / "pq", 256)
    assert got == [_one(tmp_path, folder, plain, name="plain2")] * 2


@pytest.mark.parametrize(
    "style", ["qwen", "gpt2", "response-colon"]
)  # no BOS; BOS == EOS, no pad; EOS == pad
def test_prompt_response_rows_with_unusual_special_tokens(tmp_path, style_tok, style):
    from transformers import AutoTokenizer

    folder = style_tok(style)
    tok = AutoTokenizer.from_pretrained(folder)
    rows = [
        {"prompt": "Translate to French: cheese", "response": "fromage"},
        {"prompt": "Q:", "response": "Answer"},
    ]
    convert(_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "ft", splits="train", tokenizer=folder, finetune=True,
            max_seq_len=32, num_workers=0)  # fmt: skip
    block = {"name": "finetune", "local": str(tmp_path / "ft"), "split": "train", "max_seq_len": 32}
    batch = next(
        iter(
            registry.build(
                "dataloaders", block, "train_loader", tokenizer=tok, device_batch_size=2
            ).dataloader
        )
    )
    for b, row in enumerate(rows):
        bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
        p = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        r = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(bos) + len(p) + len(r)
        assert (
            batch["input_ids"][b, :n].tolist() == bos + p + r and int(batch["attention_mask"][b].sum()) == n
        )
        assert batch["labels"][b].tolist() == [-100] * (n - len(r)) + r + [-100] * (
            32 - n
        )  # padding, even == EOS


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory) -> str:
    """A SentencePiece-style BPE in Llama 2's tokenizer.json layout (a normalizer prepends and writes '▁'), with
    Mistral's template: every piece of text encoded on its own gets a '▁' in front."""
    from tokenizers import SentencePieceBPETokenizer, decoders, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    from llmfoundry_lite.data.corpus import embedded_documents

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(embedded_documents()[:300], vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
                           show_progress=False)  # fmt: skip
    raw = sp._tokenizer
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.pre_tokenizer = None
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]"]})
    tok.chat_template = MISTRAL
    out = tmp_path_factory.mktemp("tok-spm")
    tok.save_pretrained(str(out))
    return str(out)


def test_sentencepiece_tokenizer_chat_and_pairs(tmp_path, sentencepiece_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sentencepiece_dir)
    messages = _conversation(False)
    ids, labels = _one(tmp_path, sentencepiece_dir, {"messages": messages}, name="chat")
    assert ids == tok.apply_chat_template(messages, tokenize=True)  # no '▁' added where the text was not cut
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert _runs(ids, labels) == [
        tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in replies
    ]
    ids, labels = _one(tmp_path, sentencepiece_dir, {"prompt": "Q:", "response": "Paris"}, name="pair")
    r = tok("Paris", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]  # '▁Paris', as generate samples
    assert ids == tok("Q:")["input_ids"] + r and labels == [-100] * (len(ids) - len(r)) + r


def test_data_inspect_shows_what_the_loss_is_on(tmp_path, style_tok):
    from typer.testing import CliRunner

    from llmfoundry_lite.data.cli import data_app

    folder = style_tok("llama3")
    rows = _chats(2)
    convert(_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "ft", splits="train", tokenizer=folder, finetune=True,
            max_seq_len=128, pack=True, num_workers=0)  # fmt: skip
    r = CliRunner().invoke(
        data_app, ["inspect", str(tmp_path / "ft"), "--tokenizer", folder, "--chars", "2000"]
    )
    assert r.exit_code == 0, r.output
    row = r.output.splitlines()[1]
    assert row.count(" || ") == 1 and row.count("[[") == 4  # two examples packed, two replies each
    assert "<|end_header_id|>\\n\\n[[It is 0.<|eot_id|>]]<|start_header_id|>user" in row
    r = CliRunner().invoke(data_app, ["inspect", str(tmp_path / "ft")])
    assert r.exit_code == 0 and " labelled (--tokenizer shows them)" in r.output


def test_validate_refuses_finetuning_rows_made_by_another_tokenizer(tmp_path, style_tok, sentencepiece_dir):
    from llmfoundry_lite.data.checks import check_recipe_data

    folder = style_tok("llama3")
    convert(_jsonl(tmp_path / "c.jsonl", _chats(4)), tmp_path / "ft", splits="train", tokenizer=folder,
            finetune=True, max_seq_len=128, num_workers=0)  # fmt: skip
    block = {"name": "finetune", "local": str(tmp_path / "ft"), "split": "train", "max_seq_len": 128}
    recipe = {"model": {"name": "llama"}, "train_loader": block, "global_train_batch_size": 1}
    check_recipe_data({**recipe, "tokenizer": {"name": "hf", "path": folder}})
    with pytest.raises(RecipeError, match="were made with tokenizer") as e:
        check_recipe_data({**recipe, "tokenizer": {"name": "hf", "path": sentencepiece_dir}})
    assert "\n" not in str(e.value)


def test_validate_refuses_a_loader_max_seq_len_shorter_than_the_converted_rows(tmp_path, style_tok):
    from llmfoundry_lite.data.checks import check_recipe_data

    folder = style_tok("llama3")
    convert(_jsonl(tmp_path / "c.jsonl", _chats(4)), tmp_path / "ft", splits="train", tokenizer=folder,
            finetune=True, max_seq_len=128, pack=True, num_workers=0)  # fmt: skip
    block = {"name": "finetune", "local": str(tmp_path / "ft"), "split": "train", "max_seq_len": 128}
    recipe = {
        "model": {"name": "llama"},
        "tokenizer": {"name": "hf", "path": folder},
        "global_train_batch_size": 1,
    }
    check_recipe_data({**recipe, "train_loader": block})
    with pytest.raises(RecipeError, match="rows of up to 128 tokens .* longer than train_loader.max_seq_len 64; "
                       "reconvert with --max-seq-len 64 or raise max_seq_len") as e:  # fmt: skip
        check_recipe_data({**recipe, "train_loader": {**block, "max_seq_len": 64}})
    assert e.value.key == "train_loader.max_seq_len"


def test_named_llama3_template_is_the_one_llama_3_instruct_ships(tmp_path, style_tok, llama_tokenizer_dir):
    """A base Llama 3 tokenizer ships no template: --chat-template llama3 gives what the Instruct model's renders."""
    from transformers import AutoTokenizer

    instruct = style_tok("llama3")
    tok = AutoTokenizer.from_pretrained(instruct)
    base = tmp_path / "base"
    tok.chat_template = None
    tok.save_pretrained(str(base))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    messages = _conversation(True)
    got = _one(tmp_path, str(base), {"messages": messages}, name="named", chat_template="llama3")
    assert got == _one(tmp_path, instruct, {"messages": messages}, name="own")


def test_a_template_with_transformers_generation_tags_renders(tmp_path, style_tok):
    """{% generation %} marks the assistant's text for transformers' own masks (TRL's assistant_only_loss)."""
    from transformers import AutoTokenizer

    plain = style_tok("qwen")
    tok = AutoTokenizer.from_pretrained(plain)
    tok.chat_template = QWEN.replace(
        "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}",
        "{{- '<|im_start|>' + message.role + '\n' }}{% generation %}{{ message.content + '<|im_end|>' }}"
        "{% endgeneration %}{{ '\n' }}",
    )
    assert "{% generation %}" in tok.chat_template
    tok.save_pretrained(str(tmp_path / "tagged"))
    row = {"messages": _conversation(True)}
    assert _one(tmp_path, str(tmp_path / "tagged"), row, name="tagged") == _one(
        tmp_path, plain, row, name="plain"
    )


def test_a_template_that_does_not_compile_is_named_not_the_row(tmp_path, style_tok):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(style_tok("qwen"))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor"
    tok.save_pretrained(str(tmp_path / "broken"))
    src = _jsonl(tmp_path / "c.jsonl", [{"messages": _conversation(True)}])
    with pytest.raises(
        RecipeError, match=r"broken'?: its chat template does not compile \(.*template line 1\); fix it"
    ):
        convert(
            src,
            tmp_path / "o",
            splits="train",
            tokenizer=str(tmp_path / "broken"),
            finetune=True,
            max_seq_len=64,
        )
