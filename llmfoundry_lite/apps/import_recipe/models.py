"""The model block of an upstream YAML: llm-foundry's ``mpt_causal_lm`` and ``hf_causal_lm``, mosaicml/examples'
``mosaic_bert``. Each function fills ``t.out["model"]`` of a :class:`~.translate.Translator` and records in
``t.notes``/``t.unmapped`` what means something else here or has no equivalent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from llmfoundry_lite.errors import RecipeError

MPT_ATTN_IMPL = {"flash": "flash", "torch": "sdpa", "triton": "auto"}
MPT_LLAMA_NORMS = ("rmsnorm", "low_precision_rmsnorm", "triton_rmsnorm")
# pretrained: false with a hub name and no local config.json: the shape must come from the checkpoint, and
# init_from_hf is the one key that reads it (a default-shaped model would be silently another network).
_FRESH_WEIGHTS = (
    "false (that architecture, fresh weights) has no equivalent without its config.json here: the recipe starts "
    "from {name!r} (init_from_hf: its shape and weights); for fresh weights, import again from a local folder "
    "that holds its config.json"
)


def mpt(t: Any, m: Mapping[str, Any]) -> None:
    """MPT as the LLaMA decoder of its size; each MPT default that LLaMA does not share is noted."""
    t.kind = "llm-foundry MPT -> llama"
    attn = dict(m.get("attn_config") or {})
    ffn = dict(m.get("ffn_config") or {})
    d = m.get("d_model", 2048)
    out: dict[str, Any] = {"name": "llama"}
    for k in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size"):
        if k in m:
            out[k] = m[k]
    out["tie_embeddings"] = bool(m.get("tie_word_embeddings", True))  # MPT ties by default
    if m.get("init_device") in ("meta", "cpu"):
        out["init_device"] = m["init_device"]
    elif "init_device" in m:
        t.unmapped["model.init_device"] = f"{m['init_device']!r}: only cpu or meta here"
    # Positions: LLaMA has rotary embeddings; MPT has learned positions unless alibi or rope is set.
    if attn.get("rope"):
        if "rope_theta" in attn:
            out["rope_theta"] = float(attn["rope_theta"])
        if attn.get("rope_impl", "dail") == "dail" and attn.get("rope_dail_config", {}).get("type") == "xpos":
            t.notes["model.attn_config.rope_dail_config"] = "xPos is not LLaMA's RoPE; plain RoPE is used"
    elif attn.get("alibi"):
        t.notes["model.attn_config.alibi"] = "MPT's ALiBi biases are not LLaMA's; the recipe uses RoPE"
    elif m.get("learned_pos_emb", True):
        t.notes["model.learned_pos_emb"] = (
            "MPT's learned position embeddings (its default) are not LLaMA's; the recipe uses RoPE"
        )
    for k in ("rope", "rope_theta", "rope_impl", "rope_dail_config", "rope_hf_config", "alibi"):
        attn.pop(k, None)
    if not attn.get("alibi") and "alibi_bias_max" in attn:
        attn.pop("alibi_bias_max")
    # Normalization.
    norm = m.get("norm_type", "low_precision_layernorm")
    if norm not in MPT_LLAMA_NORMS:
        which = "" if "norm_type" in m else " (MPT's default)"
        t.notes["model.norm_type"] = (
            f"{norm}{which} is a LayerNorm, not LLaMA's RMSNorm; the recipe uses RMSNorm"
        )
    if "norm_eps" in m:
        out["norm_eps"] = m["norm_eps"]
    # Feed-forward: LLaMA's is SwiGLU without biases.
    ffn_type = ffn.pop("ffn_type", "mptmlp")
    act = (ffn.pop("ffn_act_fn", None) or {}).get("name", "gelu" if ffn_type == "mptmlp" else "silu")
    ratio = m.get("expansion_ratio", 4)
    if ffn_type == "mptglu" and act in ("silu", "swish"):
        out["ffn_hidden_size"] = int(ffn.pop("ffn_hidden_size", None) or ratio * d)
    else:
        t.notes["model.ffn_config"] = (
            f"MPT's {ffn_type} with {act} (expansion_ratio {ratio}) is not LLaMA's SwiGLU; the recipe uses "
            "SwiGLU with LLaMA's hidden size (2/3 x 4 x d_model, rounded to 256: about the same parameters)"
        )
        ffn.pop("ffn_hidden_size", None)
    for k in ffn:
        t.unmapped[f"model.ffn_config.{k}"] = "no equivalent in the LLaMA decoder"
    if not m.get("no_bias", False):
        t.notes["model.no_bias"] = "MPT has biases unless no_bias: true; the LLaMA decoder has none"
    # Attention.
    if attn.get("attn_type", "multihead_attention") == "grouped_query_attention":
        out["n_kv_heads"] = attn.get("kv_n_heads", 1)
    elif attn.get("attn_type") == "multiquery_attention":
        out["n_kv_heads"] = 1
    attn.pop("attn_type", None)
    attn.pop("kv_n_heads", None)
    impl = attn.pop("attn_impl", None)
    if impl is not None:
        out["attn_impl"] = MPT_ATTN_IMPL.get(impl, "auto")
        if impl == "triton":
            t.notes["model.attn_config.attn_impl"] = (
                "no triton kernel here; auto uses flash-attn when installed, else PyTorch SDPA"
            )
    if attn.pop("attn_uses_sequence_id", False):
        t.sequence_id = True  # the causal_lm collator emits sequence_id: no attention across documents
    for k, v in attn.items():
        if k == "sliding_window_size" and v in (-1, None):
            continue
        if k in ("attn_pdrop", "clip_qkv", "softmax_scale") and not v:
            continue
        if k == "qk_ln" and not v:
            continue
        t.unmapped[f"model.attn_config.{k}"] = "no equivalent in the LLaMA decoder"
    for k in ("resid_pdrop", "emb_pdrop"):
        if m.get(k):
            t.unmapped[f"model.{k}"] = "the LLaMA decoder has no dropout"
    known = {
        "name", "d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size", "tie_word_embeddings",
        "init_device", "attn_config", "ffn_config", "norm_type", "norm_eps", "expansion_ratio", "no_bias",
        "learned_pos_emb", "resid_pdrop", "emb_pdrop",
    }  # fmt: skip
    reasons = {
        "init_config": "initialization here is LLaMA's (normal, std model.init_std)",
        "logit_scale": "no equivalent in the LLaMA decoder",
        "loss_fn": "a kernel choice; the loss here is torch cross-entropy",
        "fc_type": "a kernel choice (Transformer Engine); layers here are torch.nn.Linear",
        "use_cache": "generation setting; no equivalent in training",
        "verbose": "no equivalent",
        "embedding_fraction": "no equivalent in the LLaMA decoder",
        "use_pad_tok_in_ffn": "no equivalent in the LLaMA decoder",
    }
    for k in m:
        if k not in known:
            t.unmapped[f"model.{k}"] = reasons.get(k, "no equivalent in the LLaMA decoder")
    t.out["model"] = out


def hf_causal_lm(t: Any, m: Mapping[str, Any]) -> None:
    """A Hugging Face causal LM: the LLaMA decoder for Llama checkpoints, else our hf_causal_lm."""
    name = m.get("pretrained_model_name_or_path")
    if not name:
        raise RecipeError(
            "hf_causal_lm needs pretrained_model_name_or_path", key="model.pretrained_model_name_or_path"
        )
    pretrained = bool(m.get("pretrained", True))
    config = _local_hf_config(name)
    is_llama = (config or {}).get("model_type") == "llama" or "llama" in str(name).lower()
    out: dict[str, Any]
    if is_llama:
        t.kind = "llm-foundry hf_causal_lm (Llama) -> llama"
        out = {"name": "llama"}
        if pretrained:
            out["init_from_hf"] = name  # shape and weights from the checkpoint, as from_pretrained does
        elif config is not None:
            out.update(_llama_shape(config))
        else:  # a hub checkpoint whose config.json is not here: its shape comes with it at run time
            out["init_from_hf"] = name
            t.notes["model.pretrained"] = _FRESH_WEIGHTS.format(name=name)
    else:
        t.kind = "llm-foundry hf_causal_lm -> hf_causal_lm"
        out = {"name": "hf_causal_lm"}
        if pretrained:
            out["init_from_hf"] = name
        elif config is not None:
            out["model_type"] = config.get("model_type", "llama")
            out["config"] = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
        else:
            out["init_from_hf"] = name
            t.notes["model.pretrained"] = _FRESH_WEIGHTS.format(name=name)
    overrides = dict(m.get("config_overrides") or {})
    overrides.pop("torch_dtype", None)  # precision comes from the recipe's `precision`
    for k, v in overrides.items():
        t.unmapped[f"model.config_overrides.{k}"] = f"set it in the model block or checkpoint config ({v!r})"
    if m.get("init_device") in ("meta", "cpu") and out["name"] == "llama" and not pretrained:
        out["init_device"] = m["init_device"]
    if m.get("use_flash_attention_2"):
        if out["name"] == "llama":
            out["attn_impl"] = "auto"  # flash-attn when installed
        t.notes["model.use_flash_attention_2"] = "flash-attn is used when installed (attn_impl: auto)"
    reasons = {
        "use_auth_token": "hub logins come from `huggingface-cli login` / HF_TOKEN",
        "trust_remote_code": "remote model code is not run here",
        "peft_config": "parameter-efficient finetuning is not part of this framework",
        "init_device": "weights load on the CPU here",
        "config_overrides": "",
    }
    handled = {"name", "pretrained_model_name_or_path", "pretrained", "use_flash_attention_2"}
    for k in m:
        if k in handled or (k == "config_overrides") or (k == "init_device" and "init_device" in out):
            continue
        t.unmapped[f"model.{k}"] = reasons.get(k) or "no equivalent"
    t.out["model"] = out


def mosaic_bert(t: Any, m: Mapping[str, Any]) -> None:
    """mosaicml/examples' MosaicBERT: its model_config keys renamed to ours."""
    t.kind = "mosaicml/examples MosaicBERT -> mosaic_bert"
    cfg = dict(m.get("model_config") or {})
    out: dict[str, Any] = {"name": "mosaic_bert"}
    names = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "intermediate_size": "intermediate_size",
        "attention_probs_dropout_prob": "attention_dropout",
        "hidden_dropout_prob": "hidden_dropout",
        "max_position_embeddings": "max_position_embeddings",
        "type_vocab_size": "type_vocab_size",
        "layer_norm_eps": "layer_norm_eps",
        "initializer_range": "init_std",
        "vocab_size": "vocab_size",
    }
    for k, v in cfg.items():
        if k in names:
            out[names[k]] = v
        else:
            t.unmapped[f"model.model_config.{k}"] = "no equivalent in the mosaic_bert model"
    if m.get("pretrained_model_name") not in (None, "bert-base-uncased"):
        t.notes["model.pretrained_model_name"] = (
            f"the architecture defaults of {m['pretrained_model_name']!r} are not read; the recipe has "
            "BERT-Base's (768 x 12 layers x 12 heads) unless model_config says otherwise"
        )
    if m.get("pretrained_checkpoint"):
        t.unmapped["model.pretrained_checkpoint"] = (
            "start from a Composer checkpoint with load_path=PATH load_weights_only=true"
        )
    if m.get("gradient_checkpointing"):
        t.unmapped["model.gradient_checkpointing"] = "no activation checkpointing for mosaic_bert here"
    for k in m:
        if k not in ("name", "model_config", "pretrained_model_name", "tokenizer_name", "pretrained_checkpoint",
                     "gradient_checkpointing"):  # fmt: skip
            t.unmapped[f"model.{k}"] = "no equivalent in the mosaic_bert model"
    t.out["model"] = out


def _local_hf_config(name: str) -> Optional[dict]:
    path = Path(os.path.expanduser(str(name))) / "config.json"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return None


def _llama_shape(c: Mapping[str, Any]) -> dict[str, Any]:
    """LLaMA decoder keys from a Hugging Face LlamaConfig (config.json)."""
    pairs = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "ffn_hidden_size",
        "rms_norm_eps": "norm_eps",
        "rope_theta": "rope_theta",
        "vocab_size": "vocab_size",
        "max_position_embeddings": "max_seq_len",
        "tie_word_embeddings": "tie_embeddings",
    }
    return {ours: c[hf] for hf, ours in pairs.items() if c.get(hf) is not None}


MODEL_TRANSLATORS = {"mpt_causal_lm": mpt, "hf_causal_lm": hf_causal_lm, "mosaic_bert": mosaic_bert}
