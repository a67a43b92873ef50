"""``generate --chat``: a prompt as one user turn of a chat-finetuned model, and where the model's reply ends.

The turn is rendered by the tokenizer's chat template (or the named one ``data convert --finetune --chat-template``
used, from :data:`llmfoundry_lite.data.finetune.CHAT_TEMPLATES`) with the generation prompt, as transformers'
``apply_chat_template(..., add_generation_prompt=True)`` renders it, and tokenized without adding special tokens
(the template writes its own BOS). That is the text finetuning put before each labelled reply.

The reply ends where finetuning's labels ended: at the template's end-of-turn text (``<|im_end|>``,
``<|eot_id|>``, ``<end_of_turn>``, or EOS). When that text is one token it is a stop id; when the tokenizer has no
such token (a named template on a tokenizer without its special tokens) it is a stop *text*, found as the reply is
decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from llmfoundry_lite.errors import RecipeError, first_line

# A reply no template changes (no spaces to trim, no markup), to find what a template writes after a reply.
_MARK = "REPLYMARK7F3A"


@dataclass
class ChatPrompt:
    """A one-turn chat ready to generate from: the prompt's ids, the stop ids, and a stop text (or None)."""

    ids: list[int]
    stop_ids: list[int]
    stop_text: Optional[str]


def chat_prompt(
    tok: Any, prompt: str, system: Optional[str] = None, template: Optional[str] = None
) -> ChatPrompt:
    """The generation prompt of ``prompt`` as a user turn (after ``system``, if given) under the tokenizer's chat
    template, or the named ``template``; RecipeError naming ``--chat-template`` when there is none or it refuses."""
    from llmfoundry_lite.data.finetune import CHAT_TEMPLATES, check_chat_template

    check_chat_template(template)
    text = CHAT_TEMPLATES[template] if template else getattr(tok, "chat_template", None)
    if not text:
        raise RecipeError(
            f"tokenizer {getattr(tok, 'name_or_path', '')!r} has no chat template; pass the one its finetuning "
            f"data was converted with: --chat-template {'|'.join(CHAT_TEMPLATES)}",
            key="--chat-template",
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    try:
        rendered = tok.apply_chat_template(
            messages, chat_template=text, add_generation_prompt=True, tokenize=False
        )
        probe = tok.apply_chat_template(
            [*messages, {"role": "assistant", "content": _MARK}], chat_template=text, tokenize=False
        )
    except Exception as e:  # the template's raise_exception (e.g. no system role), or a template error
        hint = " (this template takes no system turn: leave out --system)" if system else ""
        raise RecipeError(
            f"the chat template refused the prompt ({first_line(e)}){hint}", key="--chat-template"
        ) from None
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    stop_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    stop_text = _end_of_turn(tok, probe.split(_MARK, 1)[1] if _MARK in probe else "")
    if stop_text is not None:
        as_ids = tok(stop_text, add_special_tokens=False)["input_ids"]
        if len(as_ids) == 1:
            stop_ids.append(as_ids[0])
            stop_text = None
        elif stop_text == tok.eos_token:
            stop_text = None
    return ChatPrompt(ids, list(dict.fromkeys(stop_ids)), stop_text)


def _end_of_turn(tok: Any, after: str) -> Optional[str]:
    """The text a template writes right after a reply to end its turn: a special token of the tokenizer, else the
    markup up to the first line break (ChatML's ``<|im_end|>`` on a tokenizer that lacks it); None if nothing."""
    after = after.lstrip(" ")
    specials = sorted(
        {*tok.all_special_tokens, *getattr(tok, "additional_special_tokens", [])}, key=len, reverse=True
    )
    for special in specials:
        if special and after.startswith(special):
            return special
    head = after.split("\n", 1)[0].strip()
    return head or None


class StopText:
    """Holds back streamed text that could begin ``stop``; at ``stop`` writes what came before it and says stop."""

    def __init__(self, stop: str, write: Any):
        self.stop, self.write, self.pending, self.done = stop, write, "", False

    def __call__(self, text: str) -> bool:
        if self.done:
            return True
        self.pending += text
        at = self.pending.find(self.stop)
        if at >= 0:
            self.write(self.pending[:at])
            self.pending, self.done = "", True
            return True
        keep = next((n for n in range(len(self.stop) - 1, 0, -1) if self.pending.endswith(self.stop[:n])), 0)
        self.write(self.pending[: len(self.pending) - keep])
        self.pending = self.pending[len(self.pending) - keep :]
        return False

    def flush(self) -> None:
        """Write what was held back (generation ended without the stop text)."""
        if not self.done:
            self.write(self.pending)
        self.pending = ""
