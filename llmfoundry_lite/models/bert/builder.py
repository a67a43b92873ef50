"""Recipe entries ``mosaic_bert`` and ``bert``: one builder whose keys are :class:`BertConfig`'s fields.

The two entries differ only in defaults (``CLASSIC`` for ``bert``); ``llmfoundry-lite list models bert`` prints
the keys with their types and defaults, all read from the dataclass.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.bert.hf_adapter import load_hf_bert
from llmfoundry_lite.models.bert.model import BertMLM, check_weights_fit
from llmfoundry_lite.models.configs import CLASSIC, BertConfig, padded_vocab
from llmfoundry_lite.models.schema import config_builder, vocab_size_from

log = logging.getLogger(__name__)

# Fields a checkpoint does not fix: they keep the recipe's values when weights come from init_from_hf.
EXECUTION_FIELDS = (
    "norm",
    "unpad",
    "attention_dropout",
    "hidden_dropout",
    "init_std",
    "attn_impl",
    "use_train_metrics",
)


def build_bert_mlm(
    tokenizer: Any = None,
    *,
    config: BertConfig,
    vocab_size: Optional[int] = None,
    vocab_multiple: int = 64,
    init_from_hf: Optional[str] = None,
) -> BertMLM:
    """BertMLM from a config; the vocabulary is the tokenizer's (or ``vocab_size``) padded to ``vocab_multiple``."""
    real_vocab = vocab_size_from(tokenizer, vocab_size)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    cfg = dataclasses.replace(
        config,
        vocab_size=padded_vocab(real_vocab, vocab_multiple),
        pad_token_id=config.pad_token_id if pad_id is None else pad_id,
    )
    if init_from_hf is None:
        return BertMLM(cfg, real_vocab)
    keep = {k: getattr(cfg, k) for k in EXECUTION_FIELDS}
    hf_cfg, enc_sd, head_sd = load_hf_bert(init_from_hf, key="model.init_from_hf", **keep)
    check_weights_fit(hf_cfg, enc_sd, head_sd, init_from_hf, "model.init_from_hf")
    if (hf_cfg.position, hf_cfg.ffn) != (cfg.position, cfg.ffn):
        # The architecture is the checkpoint's; a recipe that says otherwise is a mistake, not a preference.
        kind = (
            "MosaicBERT (ALiBi, GLU)"
            if hf_cfg.ffn == "geglu"
            else "classic BERT (learned positions, GELU MLP)"
        )
        model = "mosaic_bert" if hf_cfg.ffn == "geglu" else "bert"
        raise RecipeError(
            f"{init_from_hf} is a {kind} checkpoint but the recipe asks for position: {cfg.position}, "
            f"ffn: {cfg.ffn}; use model.name={model} with its default position/ffn",
            key="model.init_from_hf",
        )
    if hf_cfg.vocab_size < cfg.vocab_size:
        raise RecipeError(
            f"tokenizer has {real_vocab} tokens but {init_from_hf} has a vocabulary of {hf_cfg.vocab_size}",
            key="model.init_from_hf",
        )
    shape = ("d_model", "n_layers", "n_heads", "intermediate_size")
    if any(getattr(hf_cfg, k) != getattr(cfg, k) for k in shape):
        log.warning(
            "init_from_hf: model shape taken from %s (%s)",
            init_from_hf,
            ", ".join(f"{k}={getattr(hf_cfg, k)}" for k in shape),
        )
    model = BertMLM(hf_cfg, real_vocab)
    model.encoder.load_state_dict(enc_sd)
    if head_sd is not None:
        model.head.load_state_dict(head_sd)
    return model


# The tokenizer supplies the padding id; the vocabulary size is build_bert_mlm's own (optional) key.
build_mosaic_bert = config_builder(
    BertConfig,
    build_bert_mlm,
    name="build_mosaic_bert",
    doc="MosaicBERT encoder for MLM: ALiBi, GeGLU, low-precision LayerNorm, unpadding, masked-only head.",
    omit=("pad_token_id",),
)
build_bert = config_builder(
    BertConfig,
    build_bert_mlm,
    name="build_bert",
    doc="Classic BERT (learned positions, GELU MLP, LayerNorm) on the same encoder class; loads HF weights.",
    defaults=CLASSIC,
    omit=("pad_token_id",),
)
