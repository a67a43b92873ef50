"""The BERT family's configuration: the ``mosaic_bert`` / ``bert`` recipe schema (a field here is a key there)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Union

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.attention import AttnImpl
from llmfoundry_lite.models.bert.layers import Norm
from llmfoundry_lite.models.ffn import FFNConfig, check_ffn

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
