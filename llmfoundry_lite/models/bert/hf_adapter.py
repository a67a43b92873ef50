"""Hugging Face BERT checkpoints -> the classic configuration of :class:`BertEncoder` and its weights.

``BertModel`` / ``BertForMaskedLM`` folders (safetensors or .bin) map one to one: q/k/v are fused into ``Wqkv``
and the vocabulary rows are padded to a multiple of 64 (zeros, never predicted).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.bert.model import BertConfig, pad_vocab


def load_hf_bert(
    path_or_name: str, key: str = "init_from_hf", **overrides: Any
) -> tuple[BertConfig, dict, Optional[dict]]:
    """(classic config, encoder state dict, MLM-head state dict or None) from an HF BERT checkpoint."""
    from transformers import AutoConfig, BertForMaskedLM

    try:
        model_type = AutoConfig.from_pretrained(path_or_name).model_type
        if model_type != "bert":
            raise RecipeError(f"{path_or_name!r} is a {model_type!r} checkpoint, not BERT", key=key)
        hf, info = BertForMaskedLM.from_pretrained(path_or_name, output_loading_info=True)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RecipeError(
            f"cannot load a Hugging Face BERT checkpoint from {path_or_name!r} ({first}); use a local folder "
            "saved by transformers (hub names need internet)",
            key=key,
        ) from None
    hc = hf.config
    if getattr(hc, "position_embedding_type", "absolute") != "absolute":
        raise RecipeError(f"{path_or_name}: only absolute position embeddings are supported", key=key)
    if hc.hidden_act not in ("gelu", "gelu_python"):
        raise RecipeError(
            f"{path_or_name}: hidden_act {hc.hidden_act!r} is not supported (need 'gelu')", key=key
        )
    vocab = pad_vocab(hc.vocab_size)
    kw = dict(
        vocab_size=vocab,
        d_model=hc.hidden_size,
        n_layers=hc.num_hidden_layers,
        n_heads=hc.num_attention_heads,
        intermediate_size=hc.intermediate_size,
        max_position_embeddings=hc.max_position_embeddings,
        type_vocab_size=hc.type_vocab_size,
        attention_dropout=hc.attention_probs_dropout_prob,
        hidden_dropout=hc.hidden_dropout_prob,
        layer_norm_eps=hc.layer_norm_eps,
        init_std=hc.initializer_range,
        pad_token_id=hc.pad_token_id if hc.pad_token_id is not None else 0,
    )
    cfg = BertConfig.classic(**{**kw, **overrides})
    sd = hf.state_dict()
    extra = vocab - hc.vocab_size

    def padrows(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(extra, *t.shape[1:])]) if extra else t

    e = "bert.embeddings."
    enc = {
        "embeddings.word.weight": padrows(sd[e + "word_embeddings.weight"]),
        "embeddings.position.weight": sd[e + "position_embeddings.weight"],
        "embeddings.token_type.weight": sd[e + "token_type_embeddings.weight"],
        "embeddings.norm.weight": sd[e + "LayerNorm.weight"],
        "embeddings.norm.bias": sd[e + "LayerNorm.bias"],
    }
    for i in range(hc.num_hidden_layers):
        p, q = f"bert.encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            enc[q + f"attn.Wqkv.{kind}"] = torch.cat(
                [sd[p + f"attention.self.{n}.{kind}"] for n in ("query", "key", "value")]
            )
            enc[q + f"attn.out.{kind}"] = sd[p + f"attention.output.dense.{kind}"]
            enc[q + f"norm1.{kind}"] = sd[p + f"attention.output.LayerNorm.{kind}"]
            enc[q + f"ffn.up.{kind}"] = sd[p + f"intermediate.dense.{kind}"]
            enc[q + f"ffn.down.{kind}"] = sd[p + f"output.dense.{kind}"]
            enc[q + f"norm2.{kind}"] = sd[p + f"output.LayerNorm.{kind}"]
    head = None
    if "cls.predictions.transform.dense.weight" not in set(info.get("missing_keys", [])):
        c = "cls.predictions."
        head = {
            "transform.weight": sd[c + "transform.dense.weight"],
            "transform.bias": sd[c + "transform.dense.bias"],
            "norm.weight": sd[c + "transform.LayerNorm.weight"],
            "norm.bias": sd[c + "transform.LayerNorm.bias"],
            "bias": padrows(sd[c + "bias"]),
        }
    return cfg, {k: v.detach().clone() for k, v in enc.items()}, head
