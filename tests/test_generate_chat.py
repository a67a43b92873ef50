"""`generate --chat`: a prompt as a user turn under the chat template finetuning used, the reply ended at the
template's end of turn (a stop id, several stop ids, or a stop text when the tokenizer lacks that token)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from llmfoundry_lite import registry
from llmfoundry_lite.apps.chat import ChatPrompt, StopText, chat_prompt
from llmfoundry_lite.apps.generate import complete, load_generator
from llmfoundry_lite.data.finetune import CHAT_TEMPLATES
from llmfoundry_lite.errors import RecipeError

TINY = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=96, max_seq_len=128)
# Gemma-style: the template refuses a system turn, as several real ones do.
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, llama_tokenizer_dir):
    """(checkpoint, tokenizer folder with ChatML special tokens and template) of a tiny llama."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATES["chatml"]
    tok_dir = tmp_path_factory.mktemp("chat-tok")
    tok.save_pretrained(tok_dir)
    torch.manual_seed(0)
    model = registry.build("models", {"name": "llama", **TINY}, "model", tokenizer=tok)
    with torch.no_grad():  # clear argmax winners: varied greedy text
        for p in model.parameters():
            p.mul_(4.0)
    ckpt = tmp_path_factory.mktemp("chat-run") / "llama.pt"
    torch.save({"state": {"model": model.state_dict()}}, ckpt)
    return ckpt, tok_dir


def test_the_prompt_is_the_templates_generation_prompt_and_the_turn_ends_at_its_token(chat_run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_run[1])
    turn = chat_prompt(tok, "Hi there", system="Be brief.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert turn.ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(turn.ids).endswith("<|im_start|>assistant\n")
    assert turn.stop_ids == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    assert turn.stop_text is None


def test_named_templates_on_a_tokenizer_without_their_tokens(llama_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)  # a BPE with <s> </s> only, no template
    assert chat_prompt(tok, "Hi", template="chatml").stop_text == "<|im_end|>"  # several tokens: a stop text
    assert chat_prompt(tok, "Hi", template="llama3").stop_text == "<|eot_id|>"
    llama2 = chat_prompt(tok, "Hi", template="llama2")  # the reply ends with EOS itself
    assert (llama2.stop_ids, llama2.stop_text) == ([tok.eos_token_id], None)
    assert tok.decode(llama2.ids) == "<s>[INST] Hi [/INST]"
    with pytest.raises(RecipeError) as e:
        chat_prompt(tok, "Hi")
    assert e.value.key == "--chat-template" and "chatml|llama3|llama2|zephyr" in str(e.value)
    tok.chat_template = NO_SYSTEM
    assert chat_prompt(tok, "Hi").stop_text == "<end_of_turn>"
    with pytest.raises(RecipeError) as e:
        chat_prompt(tok, "Hi", system="Be brief.")
    assert "System role not supported" in str(e.value) and "leave out --system" in str(e.value)


def test_stop_text_holds_back_what_could_begin_it():
    out: list[str] = []
    stop = StopText("<|im_end|>", out.append)
    assert [stop(p) for p in ("Hel", "lo <|im", "_en")] == [False, False, False]
    assert "".join(out) == "Hello "  # "<|im" and "_en" held back
    assert stop("d|> more") is True and "".join(out) == "Hello "
    stop.flush()
    assert "".join(out) == "Hello "
    out.clear()
    other = StopText("<|im_end|>", out.append)
    other("a <|i")
    other.flush()  # generation ended without the stop text: what was held back is written
    assert "".join(out) == "a <|i"


def test_generation_stops_at_any_stop_id_or_the_stop_text(chat_run):
    ckpt, tok_dir = chat_run
    gen = load_generator(str(ckpt), tokenizer=str(tok_dir))
    prompt = [gen.tokenizer("Once upon a time")["input_ids"]]
    ref = complete(gen, "Once upon a time", 24, temperature=0.0, chat=ChatPrompt(prompt[0], [], None))
    assert len(ref) == 24
    i = next(i for i in range(3, 24) if ref[i] not in ref[:i])
    ids = torch.tensor(prompt)
    out = gen.model.generate(ids, 24, temperature=0.0, eos_token_id=[10**6, ref[i]])[0, ids.shape[1] :]
    assert out.tolist() == ref[: i + 1]  # the second of two stop ids ended it

    text = gen.tokenizer.decode(ref, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    written: list[str] = []
    got = complete(gen, "", 24, temperature=0.0, write=written.append, chat=ChatPrompt(prompt[0], [], stop))
    assert "".join(written) == text[: text.index(stop)] and len(got) < 24


def test_generate_chat_verb(chat_run, llama_tokenizer_dir):
    ckpt, tok_dir = chat_run
    gen = load_generator(str(ckpt), tokenizer=str(tok_dir))
    turn = chat_prompt(gen.tokenizer, "Hi")
    ids = torch.tensor([turn.ids])
    new = gen.model.generate(ids, 12, temperature=0.0, eos_token_id=turn.stop_ids)[0, ids.shape[1] :]
    reply = gen.tokenizer.decode(new.tolist(), skip_special_tokens=True)
    cli = [sys.executable, "-m", "llmfoundry_lite.cli", "generate", str(ckpt), "--prompt", "Hi"]
    run = subprocess.run([*cli, "--tokenizer", str(tok_dir), "--chat", "--temperature", "0", "--max-new-tokens",
                          "12"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"Hi\n{reply}\n"
    for extra, key in (
        (["--tokenizer", str(tok_dir), "--system", "Be brief."], "--chat"),
        (["--tokenizer", str(llama_tokenizer_dir), "--chat"], "--chat-template"),
        (["--tokenizer", str(tok_dir), "--chat", "--chat-template", "vicuna"], "--chat-template"),
    ):
        bad = subprocess.run([*cli, *extra], capture_output=True, text=True, timeout=120)
        lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
        assert bad.returncode == 2 and len(lines) == 1 and key in lines[0], bad.stderr
