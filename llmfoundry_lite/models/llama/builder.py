"""Recipe entry ``llama``: a builder whose keys are :class:`LlamaConfig`'s fields (``list models llama`` shows them)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

from llmfoundry_lite.batch import check_vocab_fits
from llmfoundry_lite.models.configs import LlamaConfig
from llmfoundry_lite.models.llama.hf_adapter import load_hf_llama
from llmfoundry_lite.models.llama.model import ComposerLlama
from llmfoundry_lite.models.schema import config_builder, vocab_size_from


def build_llama_model(
    tokenizer: Any = None,
    *,
    config: LlamaConfig,
    vocab_size: Optional[int] = None,
    init_from_hf: Optional[str] = None,
    init_device: Literal["cpu", "meta"] = "cpu",
) -> ComposerLlama:
    """ComposerLlama from a config; ``init_from_hf`` takes shape and weights from a HF Llama checkpoint."""
    tok_vocab = len(tokenizer) if tokenizer is not None else None
    if init_from_hf is not None:
        # The checkpoint fixes the architecture; of the block's keys only the execution choice is kept.
        cfg, weights = load_hf_llama(init_from_hf)
        cfg = dataclasses.replace(cfg, attn_impl=config.attn_impl, use_train_metrics=config.use_train_metrics)
    else:
        cfg, weights = dataclasses.replace(config, vocab_size=vocab_size_from(tokenizer, vocab_size)), None
    if tok_vocab is not None:
        check_vocab_fits(
            cfg.vocab_size, tok_vocab, "model.init_from_hf" if init_from_hf else "model.vocab_size"
        )
    model = ComposerLlama(cfg, tokenizer, init_device="cpu" if weights is not None else init_device)
    if weights is not None:
        model.model.load_state_dict(weights, strict=True)
    return model


build_llama = config_builder(
    LlamaConfig,
    build_llama_model,
    name="build_llama",
    doc="LLaMA-style decoder (RMSNorm, SwiGLU, RoPE, GQA); `init_from_hf` starts from a HF Llama checkpoint.",
)
