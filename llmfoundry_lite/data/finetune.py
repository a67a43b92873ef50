"""Instruction and chat finetuning examples: rows -> (input_ids, labels) with the loss on the response only.

Rows are ``{"prompt": ..., "response": ...}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}``.

* prompt/response: ``[BOS] prompt response [EOS]``; labels are the response and EOS, -100 elsewhere.
* chat: the conversation rendered by the tokenizer's chat template (or a named one, ``--chat-template``);
  every assistant turn (its content and the template's end-of-turn text) is labelled, the rest is -100.

The first token of every example is -100 too: nothing inside the example predicts it, so once examples are
packed side by side no label is ever predicted across an example boundary (``sequence_id`` keeps attention
within each example).

Truncation, to ``max_seq_len`` tokens: the prompt (for chat: everything before the last assistant turn) is
cut from the left, so the last response is kept whole; an example whose last response cannot fit even with no
context is dropped and counted (``dropped`` in the conversion summary).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Optional

from llmfoundry_lite.batch import IGNORE_INDEX
from llmfoundry_lite.data.tokenizers import FastTokenizer
from llmfoundry_lite.errors import RecipeError

CHAT_ROLES = ("system", "user", "assistant", "tool")

# Named templates for tokenizers that ship none (the templates transformers documents for these formats).
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}


@functools.lru_cache(maxsize=4)
def _compiled(template: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The environment transformers' apply_chat_template renders with, so a tokenizer's template reads the same.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


class ExampleEncoder:
    """Turns finetuning rows into (input_ids, labels) of at most ``max_seq_len`` tokens; None = dropped."""

    def __init__(self, fast: FastTokenizer, max_seq_len: int, chat_template: Optional[str] = None):
        from tokenizers import Tokenizer

        self.fast, self.max_seq_len = fast, max_seq_len
        self.tok = Tokenizer.from_str(fast.json)
        self.template_name = chat_template
        self.template = CHAT_TEMPLATES[chat_template] if chat_template else fast.chat_template

    def encode(self, row: Any, where: str) -> Optional[tuple[list[int], list[int]]]:
        """The example of ``row`` (``where`` names it in errors), or None when it cannot fit ``max_seq_len``."""
        if not isinstance(row, dict):
            raise RecipeError(f"{where}: a finetuning row must be a JSON object", key="--source")
        if "messages" in row:
            return self._chat(row["messages"], where)
        if "prompt" in row and "response" in row:
            return self._pair(row["prompt"], row["response"], where)
        raise RecipeError(
            f"{where}: neither {{prompt, response}} nor {{messages: [{{role, content}}, ...]}} (fields: "
            f"{', '.join(map(str, row)) or 'none'}); rename the fields, e.g. instruction -> prompt, output -> response",
            key="--source",
        )

    def _ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _pair(self, prompt: Any, response: Any, where: str) -> Optional[tuple[list[int], list[int]]]:
        for field, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str):
                raise RecipeError(
                    f"{where} field {field!r} is {type(value).__name__}, not text", key="--source"
                )
        if not response.strip():
            raise RecipeError(
                f"{where} field 'response' is empty; remove the row or fill it in", key="--source"
            )
        bos = [self.fast.bos_id] if self.fast.bos_id is not None else []
        eos = [self.fast.eos_id] if self.fast.eos_id is not None else []
        p, r = self._ids(prompt), self._ids(response) + eos
        room = self.max_seq_len - len(bos) - len(r)
        if room < 0 or (room == 0 and not bos):  # the response alone does not fit (with one token before it)
            return None
        p = p[max(0, len(p) - room) :]  # left-truncate the prompt
        ids = bos + p + r
        labels = [IGNORE_INDEX] * (len(bos) + len(p)) + r
        labels[0] = IGNORE_INDEX
        return ids, labels

    def _chat(self, messages: Any, where: str) -> Optional[tuple[list[int], list[int]]]:
        if not isinstance(messages, list) or not messages:
            raise RecipeError(
                f"{where} field 'messages' must be a non-empty list of {{role, content}}", key="--source"
            )
        for k, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("content"), str)
                or m.get("role") not in CHAT_ROLES
            ):
                raise RecipeError(
                    f"{where} field 'messages[{k}]' must be {{role: {'|'.join(CHAT_ROLES)}, content: text}}",
                    key="--source",
                )
            if m["role"] == "assistant" and not m["content"].strip():
                raise RecipeError(
                    f"{where} field 'messages[{k}].content' is an empty assistant turn", key="--source"
                )
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise RecipeError(
                f"{where} field 'messages' has no assistant turn: nothing to learn from; add the reply or drop the row",
                key="--source",
            )
        if self.template is None:
            raise RecipeError(
                f"{where} field 'messages': tokenizer {self.fast.name!r} has no chat template; name one with "
                f"--chat-template {'|'.join(CHAT_TEMPLATES)}",
                key="--chat-template",
            )
        full = self._render(messages, False, where)
        spans = []
        for k in turns:
            # The turn's text lies between the conversation up to the reply prompt and the conversation with it.
            start = len(self._render(messages[:k], True, where))
            upto = self._render(messages[: k + 1], False, where)
            end = len(upto)
            if not full.startswith(upto) or start > end:
                raise RecipeError(
                    f"{where}: the chat template does not render a conversation turn by turn, so the assistant "
                    f"turns cannot be located; use --chat-template {'|'.join(CHAT_TEMPLATES)}",
                    key="--chat-template",
                )
            spans.append((start, end))
        enc = self.tok.encode(full, add_special_tokens=False)
        ids = list(enc.ids)
        labels = [IGNORE_INDEX] * len(ids)
        for t, (a, _) in enumerate(enc.offsets):
            if any(s <= a < e for s, e in spans):
                labels[t] = ids[t]
        if (
            len(ids) > self.max_seq_len
        ):  # left-truncate; the last assistant turn must fit whole, after 1 token
            last = next(t for t, (a, _) in enumerate(enc.offsets) if a >= spans[-1][0])
            if len(ids) - last + 1 > self.max_seq_len:
                return None
            ids, labels = ids[-self.max_seq_len :], labels[-self.max_seq_len :]
        labels[0] = IGNORE_INDEX
        if all(label == IGNORE_INDEX for label in labels):
            return None
        return ids, labels

    def _render(self, messages: list, add_generation_prompt: bool, where: str) -> str:
        from jinja2 import TemplateError

        try:
            return _compiled(self.template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.fast.bos_token or "",
                eos_token=self.fast.eos_token or "",
            )
        except TemplateError as e:
            name = (
                f"--chat-template {self.template_name}"
                if self.template_name
                else "the tokenizer's chat template"
            )
            raise RecipeError(
                f"{where} field 'messages': {name} refused it ({e})", key="--chat-template"
            ) from None


def pack(
    examples: Iterator[tuple[list[int], list[int]]], max_seq_len: int
) -> Iterator[tuple[list[int], list[int], list[int]]]:
    """Examples side by side in rows of at most ``max_seq_len`` tokens, in order: (ids, labels, sequence_id)."""
    ids: list[int] = []
    labels: list[int] = []
    seq: list[int] = []
    n = 0
    for ex_ids, ex_labels in examples:
        if ids and len(ids) + len(ex_ids) > max_seq_len:
            yield ids, labels, seq
            ids, labels, seq, n = [], [], [], 0
        ids += ex_ids
        labels += ex_labels
        seq += [n] * len(ex_ids)
        n += 1
    if ids:
        yield ids, labels, seq


def check_chat_template(name: Optional[str]) -> None:
    """RecipeError for an unknown ``--chat-template`` name."""
    if name is not None and name not in CHAT_TEMPLATES:
        raise RecipeError(
            f"unknown chat template {name!r}; choose {', '.join(CHAT_TEMPLATES)} (or leave it out to use the "
            "tokenizer's own)",
            key="--chat-template",
        )
