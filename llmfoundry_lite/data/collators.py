"""Collators: turn lists of shard samples into model batches (HF conventions, see the data contract).

Samples are ``{"text": str}`` (raw MDS mode; tokenized here, on the fly, as MosaicBERT does) or
``{"tokens": ndarray}`` (concatenated mode; already fixed-length token ids). Both collators take the injected
``tokenizer`` and ``max_seq_len``: the dataloader passes its own ``max_seq_len`` when it builds the collator,
so a recipe sets the sequence length once, on the loader.

Recipe block (inside a dataloader)::

    collator: {name: mlm, mlm_probability: 0.3}     # train; use 0.15 in the eval loader's block
    collator: {name: causal_lm, sequence_id: true}  # packed documents, attention kept within a document
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Optional

import numpy as np
import torch

from llmfoundry_lite import registry
from llmfoundry_lite.batch import IGNORE_INDEX
from llmfoundry_lite.errors import RecipeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _texts(samples: Sequence[Mapping[str, Any]]) -> list[str] | None:
    if samples and "text" in samples[0]:
        return [str(s["text"]) for s in samples]
    return None


def _token_rows(samples: Sequence[Mapping[str, Any]], max_seq_len: int | None) -> torch.Tensor:
    key = "tokens" if "tokens" in samples[0] else "input_ids"
    rows = np.stack([np.asarray(s[key]) for s in samples])
    if max_seq_len is not None:
        rows = rows[:, :max_seq_len]
    return torch.from_numpy(rows.astype(np.int64))


class _Base:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_seq_len: int | None, padding: str):
        if tokenizer is None:
            raise RecipeError("a collator needs a tokenizer; add a `tokenizer:` section to the recipe")
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.padding = padding

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer.pad_token is None:
            raise RecipeError(
                f"tokenizer {self.tokenizer.name_or_path!r} has no pad token, needed to batch raw text"
            )
        enc = self.tokenizer(
            texts,
            truncation=self.max_seq_len is not None,
            max_length=self.max_seq_len,
            padding="max_length" if (self.padding == "max_length" and self.max_seq_len) else "longest",
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


class MLMCollator(_Base):
    """Masked LM: mask ``mlm_probability`` of the real, non-special tokens; 80% [MASK], 10% random, 10% kept."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_seq_len: int | None = None,
        mlm_probability: float = 0.15,
        padding: str = "max_length",
    ):
        super().__init__(tokenizer, max_seq_len, padding)
        if not 0.0 < mlm_probability < 1.0:
            raise RecipeError(f"mlm_probability must be in (0, 1), got {mlm_probability}", key="collator")
        from llmfoundry_lite.data.tokenizers import check_mlm_tokenizer

        check_mlm_tokenizer(tokenizer)
        self.mlm_probability = mlm_probability
        self.mask_id = int(tokenizer.mask_token_id)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        # Random replacements come from ordinary tokens only, so no [CLS]/[PAD]/... appears mid-text.
        vocab = torch.ones(len(tokenizer), dtype=torch.bool)
        vocab[self.special_ids[self.special_ids < len(tokenizer)]] = False
        self.random_pool = torch.nonzero(vocab).flatten()

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Tokenize (if raw text), pad, and mask a list of samples."""
        texts = _texts(samples)
        if texts is not None:
            batch = self._encode(texts)
        else:
            ids = _token_rows(samples, self.max_seq_len)
            batch = {"input_ids": ids, "attention_mask": (ids != self.tokenizer.pad_token_id).long()}
        return self.mask(batch)

    def mask(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Apply 80/10/10 masking in place of ``input_ids`` and set ``labels`` (IGNORE_INDEX where not masked)."""
        ids = batch["input_ids"]
        maskable = (batch["attention_mask"] == 1) & ~torch.isin(ids, self.special_ids)
        prob = torch.full(ids.shape, self.mlm_probability)
        masked = torch.bernoulli(prob).bool() & maskable
        labels = torch.where(masked, ids, torch.full_like(ids, IGNORE_INDEX))
        replace = torch.bernoulli(torch.full(ids.shape, 0.8)).bool() & masked
        # Half of the remaining 20% -> random token; the other half keeps the original token.
        randomize = torch.bernoulli(torch.full(ids.shape, 0.5)).bool() & masked & ~replace
        ids = ids.clone()
        ids[replace] = self.mask_id
        n_rand = int(randomize.sum())
        if n_rand:
            ids[randomize] = self.random_pool[torch.randint(len(self.random_pool), (n_rand,))]
        batch["input_ids"] = ids
        batch["labels"] = labels
        return batch


class CausalLMCollator(_Base):
    """Causal LM: labels are the (unshifted) input ids, padding IGNORE_INDEX; optional ``sequence_id`` per document."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_seq_len: int | None = None,
        sequence_id: bool = False,
        padding: str = "max_length",
        append_eos: bool = True,
    ):
        from llmfoundry_lite.data.tokenizers import prepare_causal_tokenizer

        super().__init__(prepare_causal_tokenizer(tokenizer), max_seq_len, padding)
        self.sequence_id = sequence_id
        self.append_eos = append_eos
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id

    def _encode_causal(self, texts: list[str]) -> dict[str, torch.Tensor]:
        # A raw document ends with EOS (as in concatenated shards) so the model learns where text stops.
        if self.append_eos:
            texts = [t + self.tokenizer.eos_token for t in texts]
        return self._encode(texts)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Tokenize (if raw text) or stack token rows; build labels and optionally ``sequence_id``."""
        texts = _texts(samples)
        if texts is not None:
            batch = self._encode_causal(texts)
        else:
            ids = _token_rows(samples, self.max_seq_len)
            # Concatenated rows are full; a dedicated pad id (never eos) marks any padding that is there.
            real = (
                ids != self.pad_id if self.pad_id not in (self.eos_id, self.bos_id) else torch.ones_like(ids)
            )
            batch = {"input_ids": ids, "attention_mask": real.long()}
        ids, attn = batch["input_ids"], batch["attention_mask"]
        batch["labels"] = torch.where(attn == 1, ids, torch.full_like(ids, IGNORE_INDEX))
        if self.sequence_id:
            batch["sequence_id"] = self.document_ids(ids, attn)
        return batch

    def document_ids(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Index of the document each token belongs to: a new one starts at BOS or right after EOS; -1 = pad."""
        starts = torch.zeros_like(ids, dtype=torch.bool)
        if self.eos_id is not None:
            starts[:, 1:] |= ids[:, :-1] == self.eos_id
        if self.bos_id is not None and self.bos_id != self.eos_id:
            bos = ids == self.bos_id
            bos[:, 0] = False
            # "</s><s>" is one boundary, not two.
            prev_eos = torch.zeros_like(bos)
            if self.eos_id is not None:
                prev_eos[:, 1:] = ids[:, :-1] == self.eos_id
            starts |= bos & ~prev_eos
        seq = torch.cumsum(starts.long(), dim=1)
        return torch.where(attn == 1, seq, torch.full_like(seq, -1))


@registry.collators.register("mlm")
def build_mlm_collator(
    tokenizer: Any = None,
    max_seq_len: Optional[int] = None,
    mlm_probability: float = 0.15,
    padding: Literal["max_length", "longest"] = "max_length",
) -> MLMCollator:
    """Masked-LM batches (BERT 80/10/10); tokenizes raw text on the fly; max_seq_len comes from the loader."""
    return MLMCollator(tokenizer, max_seq_len=max_seq_len, mlm_probability=mlm_probability, padding=padding)


@registry.collators.register("causal_lm")
def build_causal_lm_collator(
    tokenizer: Any = None,
    max_seq_len: Optional[int] = None,
    sequence_id: bool = False,
    padding: Literal["max_length", "longest"] = "max_length",
    append_eos: bool = True,
) -> CausalLMCollator:
    """Causal-LM batches: labels = input ids (padding IGNORE_INDEX), optional per-document sequence_id."""
    return CausalLMCollator(
        tokenizer, max_seq_len=max_seq_len, sequence_id=sequence_id, padding=padding, append_eos=append_eos
    )


class FinetuneCollator:
    """Finetuning batches from ``data convert --finetune`` rows: padded; labels -100 and sequence_id -1 at padding.

    The labels come from conversion (-100 on prompts, labels on responses) and are kept as they are; rows that
    were packed carry ``sequence_id`` (one per example) so attention stays within each example.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, max_seq_len: int | None, padding: str = "max_length"
    ):
        if tokenizer is None:
            raise RecipeError("a collator needs a tokenizer; add a `tokenizer:` section to the recipe")
        if max_seq_len is None:
            raise RecipeError("the finetune collator needs the loader's max_seq_len", key="max_seq_len")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else int(pad)
        self.max_seq_len, self.padding = max_seq_len, padding

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad the examples (or packed rows) of a batch to one length."""
        if not samples or "labels" not in samples[0]:
            raise RecipeError(
                "the finetune collator reads rows made by `llmfoundry-lite data convert --finetune` (input_ids, "
                "labels); this dataset has none",
                key="collator",
            )
        lengths = [len(s["input_ids"]) for s in samples]
        if max(lengths) > self.max_seq_len:
            raise RecipeError(
                f"a finetuning row has {max(lengths)} tokens, more than max_seq_len {self.max_seq_len}; reconvert "
                f"with --max-seq-len {self.max_seq_len} or raise max_seq_len",
                key="max_seq_len",
            )
        width = self.max_seq_len if self.padding == "max_length" else max(lengths)
        packed = "sequence_id" in samples[0]
        ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((len(samples), width), dtype=torch.long)
        seq = torch.full((len(samples), width), -1, dtype=torch.long)
        for b, (s, n) in enumerate(zip(samples, lengths)):
            ids[b, :n] = torch.from_numpy(np.asarray(s["input_ids"], dtype=np.int64))
            labels[b, :n] = torch.from_numpy(np.asarray(s["labels"], dtype=np.int64))
            attn[b, :n] = 1
            if packed:
                seq[b, :n] = torch.from_numpy(np.asarray(s["sequence_id"], dtype=np.int64))
        batch = {"input_ids": ids, "attention_mask": attn, "labels": labels}
        if packed:
            batch["sequence_id"] = seq
        return batch


@registry.collators.register("finetune")
def build_finetune_collator(
    tokenizer: Any = None,
    max_seq_len: Optional[int] = None,
    padding: Literal["max_length", "longest"] = "max_length",
) -> FinetuneCollator:
    """Finetuning batches (data convert --finetune): padded, labels only on responses, sequence_id when packed."""
    return FinetuneCollator(tokenizer, max_seq_len=max_seq_len, padding=padding)
