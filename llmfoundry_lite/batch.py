"""The batch contract between data/ (which makes batches) and models/ (which read them), below both.

A batch is a mapping of ``input_ids`` (B, S), optional ``attention_mask`` (1 = real token), ``labels``
(IGNORE_INDEX where nothing is predicted), ``token_type_ids`` and ``sequence_id``: Hugging Face's names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100  # label of positions that carry no target (padding, unmasked MLM tokens): torch's default


@dataclass(frozen=True)
class BatchTokens:
    """What a batch asks of a model: real tokens, attention (query, key) pairs, labelled tokens."""

    tokens: int
    attention_pairs: int
    labelled: int


def batch_tokens(batch: Mapping[str, Any]) -> BatchTokens:
    """Count a batch's real tokens (attention mask, else every position), their attention pairs and labels."""
    import torch

    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    lengths = mask.sum(dim=1) if mask is not None else torch.full((ids.shape[0],), ids.shape[-1])
    tokens = int(lengths.sum())
    labels = batch.get("labels")
    labelled = int((labels != IGNORE_INDEX).sum()) if labels is not None else tokens
    return BatchTokens(tokens, int((lengths.long() ** 2).sum()), labelled)


def check_vocab_fits(
    vocab_size: int, tokenizer_vocab: int, key: str, tokenizer: str = "the tokenizer"
) -> None:
    """RecipeError (``key``) when a model's vocabulary is smaller than its tokenizer's: ids would overflow it.

    Token ids past the embedding table fail deep inside the first forward pass (or index garbage on GPU).
    """
    if vocab_size < tokenizer_vocab:
        from llmfoundry_lite.errors import RecipeError

        raise RecipeError(
            f"{vocab_size} is smaller than the vocabulary of {tokenizer} ({tokenizer_vocab} ids); remove "
            f"model.vocab_size (it defaults to the tokenizer's) or set at least {tokenizer_vocab}",
            key=key,
        )
