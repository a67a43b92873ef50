"""Tokenizers: train small WordPiece/BPE tokenizers offline, and load any HF tokenizer for a recipe.

Recipe block::

    tokenizer:
      name: hf
      path: ./tokenizers/wordpiece      # a local folder, or a hub name such as bert-base-uncased
      model_max_length: 128

Trained tokenizers are saved in Hugging Face format (``tokenizer.json`` + ``tokenizer_config.json``), so
``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads them without a network.

* ``wordpiece``: BERT-style, lowercasing, ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``, a post-processor adding
  ``[CLS] ... [SEP]``; loads as ``BertTokenizerFast``.
* ``bpe``: LLaMA-style byte-level BPE (any byte sequence encodes, so ``<unk>`` is never produced in practice),
  ``<unk>=0 <s>=1 </s>=2 <pad>=3``; ``<s>`` is prepended by the post-processor like LLaMA's tokenizer. We add a
  dedicated ``<pad>`` token (rather than reusing ``</s>``) so padding is never confused with a document end when
  a collator derives ``sequence_id`` from EOS positions. Loads as ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, Optional

from llmfoundry_lite import registry
from llmfoundry_lite.compat import hub_offline
from llmfoundry_lite.data.checks import TRAIN_HINT, hub_offline_reason, locate_tokenizer, resolve
from llmfoundry_lite.errors import RecipeError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BPE_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def train_tokenizer(
    kind: Literal["wordpiece", "bpe"],
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike,
) -> pathlib.Path:
    """Train a WordPiece (BERT) or byte-level BPE (LLaMA-style) tokenizer on ``texts``; save it in HF format."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind not in ("wordpiece", "bpe"):
        raise RecipeError(f"unknown tokenizer kind {kind!r}; choose 'wordpiece' or 'bpe'")
    if vocab_size < 64:
        raise RecipeError(f"vocab_size {vocab_size} is too small; use at least 64 (e.g. 2000 for tests)")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if kind == "wordpiece":
        from transformers import BertTokenizerFast

        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(
            lowercase=True, clean_text=True, handle_chinese_chars=True
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=list(WORDPIECE_SPECIALS), show_progress=False
        )
        tok.train_from_iterator(texts, trainer=trainer)
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        tok.decoder = decoders.WordPiece(prefix="##")
        hf = BertTokenizerFast(tokenizer_object=tok, do_lower_case=True)
    else:
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(BPE_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", bos_id)]
                ),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
        )
    hf.save_pretrained(str(out))
    return out


@registry.tokenizers.register("hf")
def hf_tokenizer(
    path: str,
    model_max_length: Optional[int] = None,
    kwargs: Optional[dict] = None,
) -> Any:
    """A Hugging Face tokenizer by hub name or local folder (AutoTokenizer)."""
    from transformers import AutoTokenizer

    # Fails at once for a missing folder, an MDS folder, or a hub name that is neither cached nor reachable.
    files = locate_tokenizer(path)
    extra: dict[str, Any] = dict(kwargs or {})
    if model_max_length is not None:
        extra["model_max_length"] = model_max_length
    # A cached hub tokenizer without network: load it from the cache instead of retrying the hub for a minute.
    cached_only = not files.local and files.folder is not None and hub_offline_reason() is not None
    try:
        with hub_offline() if cached_only else contextlib.nullcontext():
            return AutoTokenizer.from_pretrained(os.path.expanduser(path), **extra)
    except (OSError, ValueError, KeyError) as e:
        first = first_line(e)
        if len(first) > 200:  # transformers lists every model type it knows in one line
            first = first[:200] + "..."
        where = resolve(path) if files.local else path
        raise RecipeError(
            f"cannot load tokenizer {where!r} ({first}); {TRAIN_HINT}", key="tokenizer.path"
        ) from None


def check_mlm_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise RecipeError unless the tokenizer has the mask and pad tokens MLM needs."""
    missing = [t for t in ("mask_token", "pad_token") if getattr(tokenizer, t, None) is None]
    if missing:
        raise RecipeError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no {' or '.join(missing)}, which masked "
            f"language modelling needs; use a BERT-style tokenizer ({TRAIN_HINT.replace('|bpe', '')})"
        )


def prepare_causal_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Check a tokenizer for causal LM; documented fix-up: a missing pad token is set to the eos token."""
    if tokenizer.eos_token is None:
        raise RecipeError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no eos token, which packing documents "
            "for causal LM needs; name the separator the data was converted with (`data convert --eos-text`), "
            "e.g. tokenizer.kwargs.eos_token='[SEP]' for a BERT WordPiece tokenizer, or use a tokenizer with one "
            f"({TRAIN_HINT})",
            key="tokenizer.kwargs.eos_token",
            absolute=True,
        )
    if tokenizer.pad_token is None:
        # Labels at padding are IGNORE_INDEX via the attention mask, so reusing eos as pad is safe (GPT-2/LLaMA habit).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Batched encoding for conversion (worker processes): the Rust tokenizer alone, without transformers
# ---------------------------------------------------------------------------------------------------------

Ids = Optional[tuple[int, ...]]  # a document separator: None, or the ids put before/after each document


@dataclasses.dataclass
class FastTokenizer:
    """A ``tokenizers.Tokenizer`` (as JSON, picklable) and its special tokens; loading needs no transformers."""

    name: str
    json: str
    bos_id: Optional[int]
    eos_id: Optional[int]
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    chat_template: Optional[str] = None


def _special_content(v: Any) -> Optional[str]:
    return v.get("content") if isinstance(v, dict) else v


def load_fast_tokenizer(name_or_path: str) -> FastTokenizer:
    """Load a tokenizer for batched encoding: a local HF folder (tokenizer.json) directly, else through HF."""
    import json

    from tokenizers import Tokenizer

    path = pathlib.Path(os.path.expanduser(name_or_path))
    template = None
    if (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        config: dict[str, Any] = {}
        for fname in ("special_tokens_map.json", "tokenizer_config.json"):
            f = path / fname
            if f.is_file():
                with open(f) as fh:
                    config.update(json.load(fh))
        bos = _special_content(config.get("bos_token"))
        eos = _special_content(config.get("eos_token"))
        bos_id = tok.token_to_id(bos) if bos else None
        eos_id = tok.token_to_id(eos) if eos else None
        template = config.get("chat_template")
        if (
            template is None and (path / "chat_template.jinja").is_file()
        ):  # transformers >= 4.43 saves it apart
            template = (path / "chat_template.jinja").read_text()
    else:
        try:
            hf = hf_tokenizer(name_or_path)
        except RecipeError as e:
            raise RecipeError(e.detail, key="--tokenizer") from None
        if not getattr(hf, "is_fast", False):
            raise RecipeError(
                f"tokenizer {name_or_path!r} has no fast (Rust) version; batched conversion needs one",
                key="--tokenizer",
            )
        tok, bos_id, eos_id = hf.backend_tokenizer, hf.bos_token_id, hf.eos_token_id
        bos, eos, template = hf.bos_token, hf.eos_token, getattr(hf, "chat_template", None)
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    tok.no_truncation()
    tok.no_padding()
    return FastTokenizer(name_or_path, tok.to_str(), bos_id, eos_id, bos, eos, template)


def separator_ids(fast: FastTokenizer, which: str, wanted: Optional[bool], text: Optional[str]) -> Ids:
    """The ids put before (bos) or after (eos) each packed document: ``text`` tokenized, else the special token."""
    if text is not None:
        from tokenizers import Tokenizer

        # No special tokens added around it (llm-foundry's add_special_tokens=False); a special token written in
        # the text ('[SEP]') is still recognised as that one token.
        ids = tuple(Tokenizer.from_str(fast.json).encode(text, add_special_tokens=False).ids)
        if not ids:
            raise RecipeError(
                f"{text!r} gives no tokens with tokenizer {fast.name!r}; give a text it encodes, e.g. '[SEP]'",
                key=f"--{which}-text",
            )
        return ids
    tid = fast.bos_id if which == "bos" else fast.eos_id
    if wanted is None:  # default: use it when the tokenizer defines it
        return None if tid is None else (tid,)
    if not wanted:
        return None
    if tid is None:
        raise RecipeError(
            f"tokenizer {fast.name!r} has no {which} token but --{which} was requested; use --no-{which}, "
            f"--{which}-text TEXT (e.g. '[SEP]'), or a tokenizer that defines it",
            key="--tokenizer",
        )
    return (tid,)


def encode_wrapped(tok: Any, texts: list[str], bos: Ids, eos: Ids) -> Any:
    """Token ids of ``texts``, each between ``bos`` and ``eos``, concatenated (int32)."""
    import numpy as np

    # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets, which packing does not need.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    pieces = []
    pre = np.array(bos, dtype=np.int32) if bos else None
    post = np.array(eos, dtype=np.int32) if eos else None
    for e in encode(texts, add_special_tokens=False):
        if pre is not None:
            pieces.append(pre)
        pieces.append(np.asarray(e.ids, dtype=np.int32))
        if post is not None:
            pieces.append(post)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
