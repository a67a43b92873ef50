"""The built-in families' config dataclasses, each the schema of its recipe entries, and their parameter counts,
without torch: ``validate`` checks a built-in model block and ``show`` counts its parameters from these alone (in a
blink), where building the model on the meta device imports torch and Composer (seconds). The model code
(``llama/model.py``, ``bert/``) builds from the same classes; tests/test_model_configs.py checks every count against
the built model of every recipe.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.ffn_config import FFNConfig, check_ffn, ffn_config

# The RoPE scalings implemented (llama/model.py ``scaled_frequencies``) and the keys each reads.
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
AttnImpl = Literal["auto", "flash", "sdpa"]  # the attention kernel (models/attention.py): an execution choice
# "fused_layernorm" is the name the MosaicBERT reference YAMLs use (Composer's apex-based FusedLayerNorm, gone
# from Composer): an alias of the low-precision LayerNorm, which serves the same purpose, so they keep working.
Norm = Literal["layernorm", "low_precision_layernorm", "fused_layernorm"]

# ---------------------------------------------------------------------------------------------------------
# LLaMA
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LlamaConfig:
    """Shape and numerics of a LLaMA-style decoder; also the schema of the ``llama`` recipe entry (builder.py)."""

    vocab_size: int = 32000
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: Optional[int] = None  # None = n_heads (multi-head attention); fewer = grouped-query attention
    # Per-head width when it is not d_model / n_heads (imported checkpoints setting head_dim, e.g. Mistral-Nemo).
    head_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None  # None = LLaMA rule from d_model, multiple_of, ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE frequency scaling as Hugging Face writes it (set by init_from_hf): {rope_type: linear, factor} or
    # {rope_type: llama3, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}.
    rope_scaling: Optional[dict] = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    attn_impl: AttnImpl = "auto"  # an execution choice: the same function either way
    # Train-time cross-entropy/perplexity/accuracy logged every batch (llm-foundry's switch of that name). Off:
    # the loss is already logged, and accuracy needs an argmax over the vocabulary each batch.
    use_train_metrics: bool = False
    # Dense SwiGLU, or SMoE-Dropout experts over the same weights (models/ffn.py).
    ffn: FFNConfig = FFNConfig()

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        """Per-head dimension: ``head_size``, else d_model / n_heads."""
        return self.head_size or self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden size: explicit, or 2/3 * 4d (times the multiplier) rounded up to ``multiple_of``."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        hidden = int(2 * 4 * self.d_model / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self, prefix: str = "model") -> None:
        """Raise RecipeError naming the offending key for ill-typed fields and shapes the architecture cannot run."""

        def err(key: str, msg: str) -> RecipeError:
            return RecipeError(msg, key=f"{prefix}.{key}" if prefix else key)

        # Types and choices (attn_impl) come from the annotations, as for a recipe block.
        registry.check_dataclass(type(self), dataclasses.asdict(self), prefix)
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
            if getattr(self, key) <= 0:
                raise err(key, f"must be a positive integer, got {getattr(self, key)}")
        if self.head_size is not None and self.head_size <= 0:
            raise err("head_size", f"must be a positive integer, got {self.head_size}")
        if self.head_size is None and self.d_model % self.n_heads:
            raise err(
                "n_heads",
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "choose n_heads dividing d_model",
            )
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise err(
                "n_kv_heads",
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                "choose a divisor of n_heads",
            )
        if self.head_dim % 2:
            raise err(
                "head_size" if self.head_size else "n_heads",
                f"head dimension {'head_size' if self.head_size else 'd_model/n_heads'} = {self.head_dim} is odd; "
                "rotary embeddings need an even head dimension",
            )
        if self.ffn_hidden_size is not None and self.ffn_hidden_size <= 0:
            raise err("ffn_hidden_size", f"must be positive, got {self.ffn_hidden_size}")
        if self.norm_eps <= 0:
            raise err("norm_eps", f"must be positive, got {self.norm_eps}")
        if self.rope_theta <= 0:
            raise err("rope_theta", f"must be positive, got {self.rope_theta}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            if kind not in ROPE_SCALING_KEYS:
                raise err(
                    "rope_scaling",
                    f"rope_type {kind!r} is not supported; choose {' or '.join(ROPE_SCALING_KEYS)}",
                )
            for name in ROPE_SCALING_KEYS[kind]:
                value = self.rope_scaling.get(name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise err(
                        f"rope_scaling.{name}", f"{kind} scaling needs a positive number, got {value!r}"
                    )
        check_ffn(self.ffn, self.ffn_dim, prefix)


def llama_parameters(cfg: LlamaConfig) -> tuple[int, int]:
    """(total, non-embedding) parameters of the decoder ``cfg`` describes (llama/model.py's layers, by hand)."""
    d = cfg.d_model
    ffn = ffn_config(cfg.ffn)
    attn = d * (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * d  # wqkv, wo
    mlp = 3 * d * cfg.ffn_dim + (d * ffn.n_experts if ffn.is_smoe else 0)  # w13, w2 (+ the SMoE router)
    tables = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)  # embedding (+ an untied LM head)
    total = tables + cfg.n_layers * (2 * d + attn + mlp) + d  # two RMSNorms a block, a final one
    return total, total - tables


# ---------------------------------------------------------------------------------------------------------
# BERT (MosaicBERT and classic BERT: two configurations of one encoder)
# ---------------------------------------------------------------------------------------------------------


Position = Literal["alibi", "learned"]
FFN = Literal["geglu", "mlp"]

# Original BERT's choices where MosaicBERT (the dataclass defaults) differs.
CLASSIC: dict[str, Any] = {"position": "learned", "ffn": "mlp", "norm": "layernorm", "attention_dropout": 0.1}


@dataclass
class BertConfig:
    """Shape ("science") and execution ("impl") knobs of the encoder; ``unpad`` never changes results.

    Also the schema of the ``mosaic_bert`` and ``bert`` recipe entries (builder.py): a field here is a key there.
    """

    vocab_size: int = 30528  # already padded to a multiple of 64 by the builders
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512  # learned positions only; ALiBi extrapolates beyond it
    type_vocab_size: int = 2
    position: Position = "alibi"
    ffn: Union[FFN, FFNConfig] = "geglu"  # or SMoE-Dropout experts over the GeGLU's weights (models/ffn.py)
    norm: Norm = "low_precision_layernorm"
    unpad: bool = True
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02
    pad_token_id: int = 0
    attn_impl: AttnImpl = "auto"  # an execution choice: the same function either way
    # Train-time masked cross-entropy/accuracy logged every batch (llm-foundry's switch of that name). Off: the
    # loss is already logged; on, they reuse the loss and take one argmax over the masked positions.
    use_train_metrics: bool = False

    @classmethod
    def classic(cls, **kw: Any) -> BertConfig:
        """Original BERT: learned positions, GELU MLP, LayerNorm, attention dropout 0.1."""
        return cls(**{**CLASSIC, **kw})

    def validate(self, keypath: str = "model") -> None:
        """Raise RecipeError naming the offending key for ill-typed fields, impossible shapes and values."""

        def err(key: str, msg: str) -> RecipeError:
            return RecipeError(msg, key=f"{keypath}.{key}" if keypath else key)

        # Types and choices (position, ffn, norm, attn_impl) come from the annotations, as for a recipe block.
        registry.check_dataclass(type(self), dataclasses.asdict(self), keypath)
        for key in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            if getattr(self, key) <= 0:
                raise err(key, f"must be a positive integer, got {getattr(self, key)!r}")
        if self.d_model % self.n_heads:
            raise err(
                "d_model",
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "pick n_heads that divides d_model",
            )
        for key in ("attention_dropout", "hidden_dropout"):
            v = getattr(self, key)
            if not 0.0 <= v < 1.0:
                raise err(key, f"must be in [0, 1), got {v!r}")
        if self.layer_norm_eps <= 0:
            raise err("layer_norm_eps", f"must be positive, got {self.layer_norm_eps!r}")
        if self.init_std <= 0:
            raise err("init_std", f"must be positive, got {self.init_std!r}")
        check_ffn(self.ffn, self.intermediate_size, keypath)


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round the vocabulary up to a multiple (tensor-core friendly GEMM shapes)."""
    return int(math.ceil(n / multiple) * multiple)


def padded_vocab(real_vocab: int, multiple: int) -> int:
    """The BERT builders' vocabulary: the tokenizer's (or ``vocab_size``) padded to ``model.vocab_multiple``."""
    if multiple <= 0:
        raise RecipeError(f"must be a positive integer, got {multiple!r}", key="model.vocab_multiple")
    return pad_vocab(real_vocab, multiple)


def bert_parameters(cfg: BertConfig) -> tuple[int, int]:
    """(total, non-embedding) parameters of the MLM model ``cfg`` describes (bert/'s layers, by hand)."""
    d, hidden = cfg.d_model, cfg.intermediate_size
    norm = 2 * d  # LayerNorm: scale and bias
    if cfg.ffn == "mlp":
        ffn = 2 * d * hidden + hidden + d  # up, down (with biases)
    else:
        smoe = ffn_config(cfg.ffn)  # "geglu" is the dense GeGLU
        ffn = 3 * d * hidden + d + (d * smoe.n_experts if smoe.is_smoe else 0)  # [gate|up], down (+ router)
    layer = (3 * d * d + 3 * d) + (d * d + d) + 2 * norm + ffn  # Wqkv, out, two norms, FFN
    positions = cfg.max_position_embeddings if cfg.position == "learned" else 0
    tables = (cfg.vocab_size + positions + cfg.type_vocab_size) * d
    head = cfg.vocab_size + (d * d + d) + norm  # decoder bias (weight tied), transform, norm
    total = tables + norm + cfg.n_layers * layer + head
    return total, total - tables


# ---------------------------------------------------------------------------------------------------------
# The built-in entries
# ---------------------------------------------------------------------------------------------------------

# ``models`` entries these classes describe: entry -> (config class, the entry's defaults where they differ).
ENTRIES: dict[str, tuple[type, Mapping[str, Any]]] = {
    "llama": (LlamaConfig, {}),
    "mosaic_bert": (BertConfig, {}),
    "bert": (BertConfig, CLASSIC),
}


def entry_parameters(block: Mapping[str, Any], vocab_size: Optional[int]) -> Optional[tuple[int, int]]:
    """(total, non-embedding) parameters of a built-in entry's ``model:`` block, its shape checked as the builder
    checks it (RecipeError naming the key); None for other entries. Keys and types were checked already.

    ``vocab_size``: the tokenizer's, used when the block sets none. ``init_from_hf`` is ignored here, as on the
    meta device: the block's shape keys describe the model.
    """
    name = block.get("name")
    if not isinstance(name, str) or name not in ENTRIES:
        return None
    cls, defaults = ENTRIES[name]
    fields = {f.name for f in dataclasses.fields(cls)} - {"vocab_size", "pad_token_id"}  # the builders' own
    cfg = cls(**{**defaults, **{k: v for k, v in block.items() if k in fields}})
    vocab = block.get("vocab_size") if block.get("vocab_size") is not None else vocab_size
    if vocab is None:
        return None  # the builder would ask for a tokenizer
    if cls is BertConfig:
        cfg = dataclasses.replace(cfg, vocab_size=padded_vocab(vocab, block.get("vocab_multiple", 64)))
        cfg.validate()
        return bert_parameters(cfg)
    cfg = dataclasses.replace(cfg, vocab_size=vocab)
    cfg.validate()
    return llama_parameters(cfg)
