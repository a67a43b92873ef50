"""A recipe's model built on the meta device: shapes and parameter counts without allocating or downloading.

The built-in families need no build for either: their configs check the block and count its parameters without
torch (``models/configs.py``); plugin families and other entries are built here (torch and Composer: seconds).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmfoundry_lite import registry
from llmfoundry_lite.compat import hub_offline
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.configs import entry_parameters
from llmfoundry_lite.recipe.schema import section as _section

# Stands in for the tokenizer's vocabulary when a block is checked before any tokenizer exists.
PLACEHOLDER_VOCAB = 1024


def meta_model(block: Mapping[str, Any], tokenizer: Any = None) -> Any:
    """The ``model:`` block's model with every tensor on the meta device."""
    import torch

    registry.load_builtins()  # first, outside the meta device: importing torch._dynamo under it fails
    with torch.device("meta"):
        return registry.build("models", dict(block), "model", tokenizer=tokenizer)


def _offline_tokenizer(cfg: Any) -> Any:
    """The recipe's tokenizer from local files only; RecipeError asking for ``model.vocab_size`` otherwise."""
    from llmfoundry_lite.data.checks import looks_local

    block = _section(cfg, "tokenizer")
    try:
        with hub_offline():
            return registry.build("tokenizers", block, "tokenizer")
    except Exception:  # hub names offline, missing folders: say how to avoid needing it
        path = str((block or {}).get("path"))
        if Path(path).expanduser().exists():
            why = "that folder holds no tokenizer that loads;"
        elif looks_local(path):
            why = "that folder does not exist yet (build it first, or)"
        else:
            why = "that hub name is not in the local cache and nothing is downloaded here;"
        example = " (model.vocab_size=30522 for bert-base-uncased)" if "bert" in path else ""
        raise RecipeError(
            f"the model takes its vocabulary size from the tokenizer {path!r}: {why} "
            f"set model.vocab_size{example}",
            key="model.vocab_size",
        ) from None


def build_meta_model(cfg: Any) -> Any:
    """The recipe's model with every tensor on the meta device (a 7B recipe allocates nothing).

    The tokenizer is only loaded when the model block does not set ``vocab_size``; a tokenizer that is not
    available offline (a hub name) then raises a RecipeError asking for ``model.vocab_size``.
    """
    block = dict(_section(cfg, "model") or {})
    block.pop("init_from_hf", None)  # weights are irrelevant; the block's shape keys describe the model
    tokenizer = _offline_tokenizer(cfg) if block.get("vocab_size") is None else None
    return meta_model(block, tokenizer)


def count_parameters(cfg: Any) -> tuple[int, int] | None:
    """(total, non-embedding) parameters of the recipe's model, or None when its tokenizer is not available."""
    from llmfoundry_lite.models.accounting import parameter_counts  # torch

    try:
        return parameter_counts(build_meta_model(cfg))
    except RecipeError:
        return None


def static_parameters(cfg: Any) -> tuple[int, int] | None:
    """:func:`count_parameters` without building: a built-in family's count from its config (no torch); None for
    other models, when the model is invalid, and when the vocabulary needs a tokenizer these files cannot size."""
    from llmfoundry_lite.data.checks import tokenizer_length

    block = dict(_section(cfg, "model") or {})
    tokenizer = _section(cfg, "tokenizer") or {}
    vocab = None
    if block.get("vocab_size") is None and isinstance(tokenizer, Mapping) and tokenizer.get("name") == "hf":
        vocab = tokenizer_length(str(tokenizer.get("path")))
    try:
        return entry_parameters(block, vocab)
    except Exception:  # an invalid block: the build reports it as it always did
        return None


def check_without_build(block: Mapping[str, Any]) -> bool:
    """True when a built-in family's config has checked ``block`` (no torch; RecipeError when invalid), False
    when only building the model can (other entries)."""
    vocab = block.get("vocab_size")
    try:
        return entry_parameters(block, PLACEHOLDER_VOCAB if vocab is None else vocab) is not None
    except RecipeError:
        raise
    except Exception:  # what a config cannot judge, the build does (or leaves to train time)
        return False


def check_model_shape(block: Mapping[str, Any]) -> None:
    """Build the model block on the meta device (no memory) so shape errors surface at validation time.

    The vocabulary comes from the tokenizer at train time; a placeholder stands in for it here.
    """
    if check_without_build(block):
        return
    kwargs = dict(block)
    kwargs.pop("init_from_hf", None)
    obj = registry.lookup("models", kwargs.get("name"), key="model.name")
    params, _ = registry.signature_params(obj)
    if "vocab_size" in params and kwargs.get("vocab_size") is None:
        kwargs["vocab_size"] = PLACEHOLDER_VOCAB
    try:
        meta_model(kwargs)
    except RecipeError:
        raise
    except Exception:  # a builder that cannot run on the meta device: left to train time
        return
