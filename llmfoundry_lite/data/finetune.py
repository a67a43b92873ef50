"""Instruction and chat finetuning examples: rows -> (input_ids, labels) with the loss on the response only.

Rows are ``{"prompt": ..., "response": ...}`` (Alpaca's ``{instruction, input, output}`` read as one) or
``{"messages": [{"role": ..., "content": ...}, ...]}`` (ShareGPT's ``{"conversations": [{"from", "value"}]}``
read as one).

* prompt/response: ``[BOS] prompt response [EOS]``; labels are the response and EOS, -100 elsewhere.
* chat: the conversation rendered by the tokenizer's chat template (or a named one, ``--chat-template``);
  every assistant turn is labelled: the tokens the model must write after the generation prompt, through the
  end-of-turn token; the rest is -100.

The first token of every example is -100 too: nothing inside the example predicts it, so once examples are
packed side by side no label is ever predicted across an example boundary (``sequence_id`` keeps attention
within each example).

Truncation, to ``max_seq_len`` tokens: the prompt (for chat: everything before the last assistant turn) is
cut from the left, after a leading BOS, so the last response is kept whole; an example whose last response
cannot fit even with no context is dropped and counted (``dropped`` in the conversion summary).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Optional

from llmfoundry_lite.batch import IGNORE_INDEX
from llmfoundry_lite.data.tokenizers import FastTokenizer
from llmfoundry_lite.errors import RecipeError, first_line

# Where rows keep a conversation: OpenAI's `messages`; ShareGPT's `conversations` (LMSYS and WildChat: `conversation`),
# whose turns are {from, value} or, in some exports, {role, content}.
CHAT_FIELDS = ("messages", "conversations", "conversation")
# The roles a row may use, and what they are called in the template; ShareGPT's names map to OpenAI's.
ROLES = {r: r for r in ("system", "user", "assistant", "tool")}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool"}  # fmt: skip

# Named templates for tokenizers that ship none (the templates transformers documents for these formats).
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
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
    from jinja2 import TemplateError, nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` (marks the assistant's text for its own masks;
        the reply is located here by rendering turn by turn): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    # The environment transformers' apply_chat_template renders with, so a tokenizer's template reads the same.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, "jinja2.ext.loopcontrols"]
    )

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _text(value: Any, where: str, field: str) -> str:
    """The text of a field: a string, or OpenAI-style content parts [{type: text, text}] joined by newlines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts = []
        for i, part in enumerate(value):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RecipeError(
                    f"{where} field '{field}[{i}]' is a {kind!r} part; only text parts ({{type: text, text}}) can "
                    "be trained on: drop the part or the row",
                    key="--source",
                )
        return "\n".join(texts)  # several text parts: one per line (as vLLM joins them)
    raise RecipeError(
        f"{where} field {field!r} is {type(value).__name__}, not text (a string or [{{type: text, text}}, ...])",
        key="--source",
    )


def _turns(
    turns: Any, where: str, field: str, role_key: str, content_key: str, roles: dict[str, str]
) -> list[dict]:
    """A conversation as the template reads it, [{role, content, ...}], checked; ``field`` etc. name the row's."""
    if not isinstance(turns, list) or not turns:
        raise RecipeError(
            f"{where} field {field!r} must be a non-empty list of {{{role_key}, {content_key}}}",
            key="--source",
        )
    out = []
    for k, m in enumerate(turns):
        at = f"{field}[{k}]"
        if not isinstance(m, dict):
            raise RecipeError(f"{where} field {at!r} must be {{{role_key}, {content_key}}}", key="--source")
        role = roles.get(m.get(role_key)) if isinstance(m.get(role_key), str) else None
        if role is None:
            raise RecipeError(
                f"{where} field '{at}.{role_key}' is {m.get(role_key)!r}; use one of {', '.join(roles)}",
                key="--source",
            )
        if m.get(content_key) is None and m.get("tool_calls"):
            raise RecipeError(
                f"{where} field '{at}' is a tool call without {content_key}; tool calls are not supported: drop "
                "the row, or write the call as the turn's text",
                key="--source",
            )
        content = _text(m.get(content_key), where, f"{at}.{content_key}")
        if role == "assistant" and not content.strip():
            raise RecipeError(
                f"{where} field '{at}.{content_key}' is an empty assistant turn", key="--source"
            )
        # Other keys (a tool's name, ...) reach the template as they are, but a null one is left out: templates
        # test for a key ('tool_calls' in message), and OpenAI exports and Arrow (Parquet, hf:) write absent as null.
        msg = {key: v for key, v in m.items() if key not in (role_key, content_key) and v is not None}
        msg.update(role=role, content=content)
        out.append(msg)
    return out


class ExampleEncoder:
    """Turns finetuning rows into (input_ids, labels) of at most ``max_seq_len`` tokens; None = dropped."""

    def __init__(self, fast: FastTokenizer, max_seq_len: int, chat_template: Optional[str] = None):
        from tokenizers import Tokenizer

        self.fast, self.max_seq_len = fast, max_seq_len
        self.tok = Tokenizer.from_str(fast.json)
        # Special tokens are never added here (add_special_tokens=False), so the post-processor has nothing to do
        # but trim offsets (GPT-2's ByteLevel one does), which would hide a token straddling a reply's start.
        self.tok.post_processor = None
        self.specials = tuple(t.content for t in self.tok.get_added_tokens_decoder().values() if t.special)
        self.template_name = chat_template
        self.template = CHAT_TEMPLATES[chat_template] if chat_template else fast.chat_template

    def encode(self, row: Any, where: str) -> Optional[tuple[list[int], list[int]]]:
        """The example of ``row`` (``where`` names it in errors), or None when it cannot fit ``max_seq_len``."""
        if not isinstance(row, dict):
            raise RecipeError(f"{where}: a finetuning row must be a JSON object", key="--source")
        field = next((f for f in CHAT_FIELDS if f in row), None)
        if field is not None:
            turns = row[field]
            first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
            if "from" in first or ("value" in first and "content" not in first):  # ShareGPT's turns
                return self._chat(_turns(turns, where, field, "from", "value", SHAREGPT_ROLES), where, field)
            return self._chat(_turns(turns, where, field, "role", "content", ROLES), where, field)
        if "prompt" in row and "response" in row:
            return self._pair(
                _text(row["prompt"], where, "prompt"), _text(row["response"], where, "response"), where
            )
        if (
            "instruction" in row and "output" in row
        ):  # Alpaca: the input, when there is one, after a blank line
            prompt = _text(row["instruction"], where, "instruction")
            extra = _text(row["input"], where, "input") if row.get("input") is not None else ""
            if extra.strip():
                prompt += "\n\n" + extra
            return self._pair(prompt, _text(row["output"], where, "output"), where, "output")
        raise RecipeError(
            f"{where}: no finetuning fields (has: {', '.join(map(str, row)) or 'none'}); give {{prompt, response}}, "
            "{messages: [{role, content}, ...]}, ShareGPT {conversations: [{from, value}, ...]} or Alpaca "
            "{instruction, input, output}, e.g. jq -c '{prompt: .question, response: .answer}'",
            key="--source",
        )

    def _ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _pair(
        self, prompt: str, response: str, where: str, field: str = "response"
    ) -> Optional[tuple[list[int], list[int]]]:
        if not response.strip():
            raise RecipeError(
                f"{where} field {field!r} is empty; remove the row or fill it in", key="--source"
            )
        bos = [self.fast.bos_id] if self.fast.bos_id is not None else []
        eos = [self.fast.eos_id] if self.fast.eos_id is not None else []
        # Tokenized apart, as at generate time: the prompt alone, then the tokens the model is to produce.
        p, r = self._ids(prompt), self._ids(response) + eos
        room = self.max_seq_len - len(bos) - len(r)
        if room < 0 or (room == 0 and not bos):  # the response alone does not fit (with one token before it)
            return None
        p = p[max(0, len(p) - room) :]  # left-truncate the prompt
        ids = bos + p + r
        labels = [IGNORE_INDEX] * (len(bos) + len(p)) + r
        labels[0] = IGNORE_INDEX
        return ids, labels

    def _chat(self, messages: list[dict], where: str, field: str) -> Optional[tuple[list[int], list[int]]]:
        # A reply needs something before it to answer: an opening assistant greeting is context, not a label.
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant" and k > 0]
        if not turns:
            raise RecipeError(
                f"{where} field {field!r} has no assistant turn after a user turn: nothing to learn from; add the "
                "reply or drop the row",
                key="--source",
            )
        if self.template is None:
            raise RecipeError(
                f"{where} field {field!r}: tokenizer {self.fast.name!r} has no chat template; name one with "
                f"--chat-template {'|'.join(CHAT_TEMPLATES)}",
                key="--chat-template",
            )
        full = self._render(messages, False, where, field)
        spans: list[tuple[int, int]] = []
        for k in turns:
            # A reply is what the model must write after the generation prompt (transformers'
            # add_generation_prompt) of the conversation before it, up to the end of its turn.
            upto = self._render(messages[: k + 1], False, where, field)
            prompt = self._render(messages[:k], True, where, field)
            if not upto.startswith(prompt):  # a generation prompt unlike the turn's own header
                prompt = self._render(messages[:k], False, where, field)
            if (
                not full.startswith(upto)
                or not upto.startswith(prompt)
                or (spans and len(prompt) < spans[-1][1])
            ):
                raise RecipeError(
                    f"{where}: the chat template does not render a conversation turn by turn, so the assistant "
                    f"turns cannot be located; use --chat-template {'|'.join(CHAT_TEMPLATES)}",
                    key="--chat-template",
                )
            reply = upto[len(prompt) :]
            kept = reply.rstrip()
            # Generation stops at the end-of-turn token: the newline a template writes after it is not the reply's.
            end = len(prompt) + len(kept) if kept != reply and kept.endswith(self.specials) else len(upto)
            spans.append((len(prompt), end))
        ids, labels, last = self._tokenize(full, spans)
        if len(ids) > self.max_seq_len:  # left-truncate, keeping a leading BOS; the last reply must fit whole
            head = 1 if self.fast.bos_id is not None and ids[0] == self.fast.bos_id else 0
            keep = self.max_seq_len - head
            if len(ids) - keep > last - (0 if head else 1):  # not even the reply with one token before it
                return None
            ids, labels = ids[:head] + ids[len(ids) - keep :], labels[:head] + labels[len(labels) - keep :]
        labels[0] = IGNORE_INDEX
        return ids, labels

    def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int], int]:
        """Ids of ``text``, labels on the tokens of ``spans``, and the index of the last span's first token.

        The text is tokenized whole (as apply_chat_template(tokenize=True) does) unless a token would straddle a
        span's start or end (a generation prompt ending in a space, a reply starting with one after a newline);
        then it is tokenized in pieces cut there, so that the labels are exactly the reply's tokens and what
        precedes a reply is the prompt's tokens, as at generate time.
        """
        import bisect

        whole = self.tok.encode(text, add_special_tokens=False)
        offsets = whole.offsets
        starts = [a for a, _ in offsets]

        def straddled(c: int) -> bool:  # some token begins before c and ends after it
            t = bisect.bisect_left(starts, c) - 1
            return t >= 0 and offsets[t][1] > c

        split = sorted({c for span in spans for c in span if 0 < c < len(text) and straddled(c)})
        ids: list[int] = []
        labels: list[int] = []
        last = None
        k = 0  # the first span not yet behind the current token (tokens come in text order)
        pieces = [(0, whole)]
        if split:
            bounds = zip([0, *split], [*split, len(text)])
            pieces = [(lo, self.tok.encode(text[lo:hi], add_special_tokens=False)) for lo, hi in bounds]
        for lo, enc in pieces:
            for t, (a, _) in zip(enc.ids, enc.offsets):
                while k < len(spans) and lo + a >= spans[k][1]:
                    k += 1
                inside = k < len(spans) and spans[k][0] <= lo + a
                if inside and k == len(spans) - 1 and last is None:
                    last = len(ids)
                ids.append(t)
                labels.append(t if inside else IGNORE_INDEX)
        return ids, labels, last if last is not None else len(ids)

    def _render(self, messages: list, add_generation_prompt: bool, where: str, field: str) -> str:
        from jinja2 import TemplateError, TemplateSyntaxError

        try:
            template = _compiled(self.template)
        except TemplateSyntaxError as e:  # the template's own fault, not the row's
            raise RecipeError(
                f"tokenizer {self.fast.name!r}: its chat template does not compile ({first_line(e)}, template line "
                f"{e.lineno}); fix it in tokenizer_config.json or use --chat-template {'|'.join(CHAT_TEMPLATES)}",
                key="--chat-template",
            ) from None
        try:
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.fast.bos_token or "",
                eos_token=self.fast.eos_token or "",
            )
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            name = (
                f"--chat-template {self.template_name}"
                if self.template_name
                else "the tokenizer's chat template"
            )
            others = "|".join(t for t in CHAT_TEMPLATES if t != self.template_name)
            raise RecipeError(
                f"{where} field {field!r}: {name} refused it ({first_line(e)}); fix the row to suit it (e.g. a system "
                f"turn folded into the first user turn) or use --chat-template {others}",
                key="--chat-template",
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
