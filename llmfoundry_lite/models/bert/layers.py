"""BERT's layers: bidirectional self-attention on unpadded tokens, the two feed-forward nets, its norms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmfoundry_lite.models.attention import Unpadded, varlen_attention
from llmfoundry_lite.models.configs import Norm


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused QKV projection, on unpadded tokens."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        attn_dropout: float = 0.0,
        bias: bool = True,
        attn_impl: str = "auto",
    ):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.attn_dropout = attn_dropout
        self.attn_impl = attn_impl
        self.Wqkv = nn.Linear(d_model, 3 * d_model, bias=bias)  # one GEMM instead of three
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, info: Unpadded, slopes: torch.Tensor | None = None) -> torch.Tensor:
        """(T, d) -> (T, d) over the sequences described by ``info``; ``slopes`` are ALiBi's (or None)."""
        qkv = self.Wqkv(x).view(x.shape[0], 3, self.n_heads, self.head_dim)
        dropout = self.attn_dropout if self.training else 0.0
        return self.out(varlen_attention(qkv, info, self.attn_impl, slopes, dropout))


class GeluMLP(nn.Module):
    """Classic BERT feed-forward: Linear -> GELU (erf) -> Linear."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = True):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d)."""
        return self.down(F.gelu(self.up(x)))


class GeGLU(nn.Module):
    """Gated GELU feed-forward as in MosaicBERT (``BertGatedLinearUnitMLP``; Shazeer 2020's GEGLU).

    One bias-free up-projection yields [gate | value]; dropout acts on ``gelu(gate) * value`` *before* the
    down-projection (which has a bias), so the caller adds no dropout of its own after it.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.d_ff = d_ff
        self.up = nn.Linear(d_model, 2 * d_ff, bias=False)  # [gate | value] in one GEMM, as the reference
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d)."""
        gate, value = self.up(x).split(self.d_ff, dim=-1)
        return self.down(self.dropout(F.gelu(gate) * value))


class LowPrecisionLayerNorm(nn.LayerNorm):
    """LayerNorm that runs in the autocast dtype (e.g. bf16) instead of being upcast to fp32.

    Outside autocast it is an ordinary LayerNorm; the parameters stay fp32 and are cast per call.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` in the current autocast precision."""
        device_type = x.device.type
        if not torch.is_autocast_enabled(device_type):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device_type)
        w = self.weight.to(dtype) if self.weight is not None else None
        b = self.bias.to(dtype) if self.bias is not None else None
        with torch.autocast(device_type=device_type, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, w, b, self.eps)


# Norm's "fused_layernorm" (the MosaicBERT reference YAMLs' name) is an alias of the low-precision LayerNorm.
NORMS: dict[str, type[nn.LayerNorm]] = {
    "layernorm": nn.LayerNorm,
    "low_precision_layernorm": LowPrecisionLayerNorm,
    "fused_layernorm": LowPrecisionLayerNorm,
}


def make_norm(kind: Norm, d_model: int, eps: float) -> nn.Module:
    """A norm of one of the :data:`Norm` kinds (the choice is checked where the config is)."""
    return NORMS[kind](d_model, eps=eps)
