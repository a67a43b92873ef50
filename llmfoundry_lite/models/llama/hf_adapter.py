"""Hugging Face ``LlamaForCausalLM`` <-> :class:`LlamaDecoder`: configs, state dicts, checkpoint loading.

Our layout fuses q/k/v and gate/up and pairs rotary dimensions (2j, 2j+1) (Meta's layout); HF pairs (j, j + d/2),
so q/k rows are permuted per head on the way in and back on the way out. Attention scores are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, Optional

import torch

from llmfoundry_lite.checkpoints import check_hf_folder, refuse_missing_weights
from llmfoundry_lite.errors import RecipeError, first_line
from llmfoundry_lite.models.configs import ROPE_SCALING_KEYS, LlamaConfig


def rope_permutation(head_dim: int) -> torch.Tensor:
    """Row order taking HF's rotate-half layout (pairs j, j + d/2) to ours (pairs 2j, 2j+1) within a head."""
    half = head_dim // 2
    return torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()


def rope_from_hf(
    hf_config: Any, key: str = "model.init_from_hf", where: str = ""
) -> tuple[float, Optional[dict[str, Any]]]:
    """RoPE base and scaling (None, or LlamaConfig's ``rope_scaling``) of a HF Llama config; RecipeError for a
    scaling we do not implement (``where`` starts the message).

    transformers 4.x writes a top-level ``rope_theta`` (and ``rope_scaling``), 5.x ``rope_parameters:
    {rope_type, rope_theta, ...}`` only; both are read.
    """
    blocks, scaling = [], None
    for name in ("rope_parameters", "rope_scaling"):
        block = getattr(hf_config, name, None)
        if block is None:
            continue
        if not isinstance(block, Mapping) or any(isinstance(v, Mapping) for v in block.values()):
            raise RecipeError(f"{where}{name}={block!r} (per-layer-type RoPE) is not supported", key=key)
        blocks.append(block)
        kind = block.get("rope_type", block.get("type", "default"))
        if kind == "default":
            continue
        needs = ROPE_SCALING_KEYS.get(kind)
        if needs is None or any(block.get(k) is None for k in needs):
            raise RecipeError(
                f"{where}RoPE scaling {kind!r} ({name}={dict(block)!r}) is not supported: unscaled RoPE, "
                f"{' and '.join(ROPE_SCALING_KEYS)} (with {', '.join(ROPE_SCALING_KEYS['llama3'])}) import",
                key=key,
            )
        scaling = {"rope_type": kind, **{k: block[k] for k in needs}}
    # 5.x keeps theta only in rope_parameters; 4.x would fill a missing top-level rope_theta with its default
    # (10000), so the value under rope_parameters wins.
    for block in blocks:
        if block.get("rope_theta") is not None:
            return float(block["rope_theta"]), scaling
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        raise RecipeError(f"{where}the config has no rope_theta (top-level or in rope_parameters)", key=key)
    return float(theta), scaling


# Architectures whose weights and forward are LlamaForCausalLM's (Mistral: when no sliding window is in effect).
LLAMA_MODEL_TYPES = ("llama", "mistral")


def config_from_hf(
    hf_config: Any, *, source: Optional[str] = None, key: str = "model.init_from_hf", **overrides: Any
) -> LlamaConfig:
    """LlamaConfig from a transformers LlamaConfig; a one-line RecipeError for features we do not implement.

    ``source`` (the folder or hub name) starts each message; ``overrides`` set LlamaConfig fields.
    """
    model_type = getattr(hf_config, "model_type", None)
    arch = ", ".join(getattr(hf_config, "architectures", None) or []) or "none given"
    where = f"{source}: " if source else ""

    def refuse(what: str) -> RecipeError:
        return RecipeError(f"{where}{what} is not supported (architectures: {arch})", key=key)

    if model_type not in LLAMA_MODEL_TYPES:
        raise RecipeError(
            f"{where}not a Llama checkpoint (model_type={model_type!r}, architectures: {arch}); only "
            f"{' and '.join(LLAMA_MODEL_TYPES)} checkpoints import",
            key=key,
        )
    rope_theta, rope_scaling = rope_from_hf(hf_config, key, where)
    for name in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, name, False):
            raise refuse(f"{name}=true (biases)")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act={hf_config.hidden_act!r} (only silu)")
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and head_dim * hf_config.num_attention_heads == hf_config.hidden_size:
        head_dim = None  # the usual width: nothing to keep
    window = getattr(hf_config, "sliding_window", None)
    if model_type == "mistral" and window is not None and window < hf_config.max_position_embeddings:
        raise refuse(
            f"sliding-window attention (sliding_window={window} < max_position_embeddings="
            f"{hf_config.max_position_embeddings})"
        )
    return LlamaConfig(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=hf_config.num_key_value_heads,
        head_size=head_dim,
        ffn_hidden_size=hf_config.intermediate_size,
        norm_eps=hf_config.rms_norm_eps,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_seq_len=hf_config.max_position_embeddings,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        init_std=hf_config.initializer_range,
        **overrides,
    )


def hf_config_dict(cfg: LlamaConfig, tokenizer: Any = None) -> dict[str, Any]:
    """config.json content for transformers' LlamaForCausalLM with our shape."""
    d: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if value is not None:
            d[name] = value
    return d


def _permute_heads(w: torch.Tensor, n_heads: int, order: torch.Tensor) -> torch.Tensor:
    """Reorder the rows of each head's block of a q/k projection weight."""
    return w.unflatten(0, (n_heads, -1))[:, order].flatten(0, 1)


def state_dict_from_hf(sd: Mapping[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Map a LlamaForCausalLM state dict onto LlamaDecoder's (fusing q/k/v and gate/up, RoPE pair layout)."""
    perm = rope_permutation(cfg.head_dim)
    out = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        out[f"blocks.{i}.attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[f"blocks.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[f"blocks.{i}.attn.wqkv.weight"] = torch.cat(
            [
                _permute_heads(sd[a + "q_proj.weight"], cfg.n_heads, perm),
                _permute_heads(sd[a + "k_proj.weight"], cfg.kv_heads, perm),
                sd[a + "v_proj.weight"],
            ],
            dim=0,
        )
        out[f"blocks.{i}.attn.wo.weight"] = sd[a + "o_proj.weight"]
        out[f"blocks.{i}.ffn.w13.weight"] = torch.cat(
            [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]], dim=0
        )
        out[f"blocks.{i}.ffn.w2.weight"] = sd[p + "mlp.down_proj.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def state_dict_to_hf(sd: Mapping[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Map LlamaDecoder's state dict onto LlamaForCausalLM's names (splitting the fused projections)."""
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    inverse = torch.argsort(rope_permutation(cfg.head_dim))
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        b = f"blocks.{i}."
        q, k, v = sd[b + "attn.wqkv.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
        gate, up = sd[b + "ffn.w13.weight"].split([cfg.ffn_dim, cfg.ffn_dim], dim=0)
        out.update(
            {
                p + "input_layernorm.weight": sd[b + "attn_norm.weight"],
                p + "post_attention_layernorm.weight": sd[b + "ffn_norm.weight"],
                p + "self_attn.q_proj.weight": _permute_heads(q, cfg.n_heads, inverse),
                p + "self_attn.k_proj.weight": _permute_heads(k, cfg.kv_heads, inverse),
                p + "self_attn.v_proj.weight": v,
                p + "self_attn.o_proj.weight": sd[b + "attn.wo.weight"],
                p + "mlp.gate_proj.weight": gate,
                p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": sd[b + "ffn.w2.weight"],
            }
        )
    # safetensors refuses shared storage: tied checkpoints omit lm_head (transformers re-ties on load)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def load_hf_llama(
    name_or_path: str, key: str = "model.init_from_hf"
) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Config and (our-layout) weights of a Hugging Face Llama checkpoint: a local folder or a hub name.

    Every weight must be in the checkpoint: transformers would fill a missing one with random values.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    local = check_hf_folder(name_or_path, key)
    if local is not None and local.get("model_type") not in LLAMA_MODEL_TYPES:
        # said before transformers parses it: a model_type it does not know is a page-long error there
        config_from_hf(SimpleNamespace(**local), source=name_or_path, key=key)
    try:
        hf_config = AutoConfig.from_pretrained(name_or_path)
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
    ) as e:  # transformers' own checks of config.json raise these
        where = "its config.json" if local is not None else "is no local folder, and as a Hub id"
        raise RecipeError(f"{name_or_path!r}: {where}: {first_line(e)}", key=key) from None
    cfg = config_from_hf(hf_config, source=name_or_path, key=key)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its multi-line "newly initialized" warning: said in one line below
    # Any failure here is in the user's files: a truncated or corrupt weights file, a shape unlike the config's.
    try:
        hf_model, info = AutoModelForCausalLM.from_pretrained(
            name_or_path, torch_dtype=torch.float32, output_loading_info=True
        )
    except Exception as e:
        raise RecipeError(
            f"cannot load the weights of {name_or_path!r}: {type(e).__name__}: {first_line(e)}", key=key
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    refuse_missing_weights(name_or_path, info.get("missing_keys") or [], key)
    return cfg, state_dict_from_hf(hf_model.state_dict(), cfg)
