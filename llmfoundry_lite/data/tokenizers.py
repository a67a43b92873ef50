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
import os
import pathlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, Optional

from llmfoundry_lite import registry
from llmfoundry_lite.compat import hub_offline
from llmfoundry_lite.data.checks import TRAIN_HINT, hub_offline_reason, locate_tokenizer, resolve
from llmfoundry_lite.errors import RecipeError

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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
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
