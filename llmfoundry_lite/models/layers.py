"""Transformer building blocks shared by the model families: attention, unpadding, norms, feed-forward nets.

Attention runs through flash-attn or ``torch.nn.functional.scaled_dot_product_attention``; which one is
decided per call by :func:`select_attention_kernel` from what actually reaches the kernel (device, dtype of
q/k/v, mask). Both compute the same function, so models can be trained on GPU and evaluated on CPU.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.lm_loss import linear_cross_entropy

# ---------------------------------------------------------------------------------------------------------
# flash-attn (optional, lazily imported: it only builds on CUDA machines) and the choice of kernel
# ---------------------------------------------------------------------------------------------------------

AttnImpl = Literal["auto", "flash", "sdpa"]
ATTN_IMPLS: tuple[str, ...] = typing.get_args(AttnImpl)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
# Composer precisions under which q/k/v reach the kernel in fp32 (flash-attn takes bf16/fp16 only).
FP32_PRECISIONS = ("fp32",)


class AttentionKernelError(ValueError):
    """An attention call that cannot run with the kernel its model was configured for."""


@cache
def flash_attn_function(name: str):
    """``flash_attn.<name>`` when flash-attn imports, else None (a missing or broken CUDA build alike)."""
    try:
        import flash_attn
    except Exception:
        return None
    return getattr(flash_attn, name, None)


def flash_unavailable(
    device_type: str,
    dtype: Optional[torch.dtype],
    flash_importable: bool,
    unsupported_mask: Optional[str] = None,
) -> Optional[str]:
    """Why flash-attn cannot run an attention call (None when it can); ``dtype`` None: not known yet."""
    if device_type not in ("cuda", "gpu"):
        return f"the model runs on {device_type}, and flash-attn needs a CUDA GPU"
    if not flash_importable:
        return "flash-attn is not installed or does not import (pip install 'llmfoundry-lite[gpu]')"
    if dtype is not None and dtype not in FLASH_DTYPES:
        return f"attention inputs are {dtype}, and flash-attn needs bf16/fp16 (precision: amp_bf16)"
    if unsupported_mask is not None:
        return f"the batch needs {unsupported_mask}, which this flash-attn path cannot apply"
    return None


def check_attn_impl(attn_impl: str, device_type: str, precision: Optional[str] = None) -> None:
    """RecipeError (``model.attn_impl``) when ``flash`` is requested for a run it cannot serve.

    For the train side to call before the first batch, when the device and precision are known; what only a
    batch shows (a mask flash cannot apply) is left to :func:`select_attention_kernel`.
    """
    if attn_impl != "flash":
        return
    dtype = torch.float32 if precision in FP32_PRECISIONS else None
    why = flash_unavailable(device_type, dtype, flash_attn_function("flash_attn_func") is not None)
    if why is not None:
        raise RecipeError(
            f"'flash' cannot run: {why}; set auto (falls back to SDPA) or sdpa", key="model.attn_impl"
        )


def select_attention_kernel(
    requested: str,
    device_type: str,
    dtype: torch.dtype,
    flash_importable: bool,
    unsupported_mask: Optional[str] = None,
) -> Literal["flash", "sdpa"]:
    """The kernel for one attention call: ``"flash"`` or ``"sdpa"``.

    ``dtype`` is that of the q/k/v tensors handed to the kernel (under autocast they are bf16 even when the
    block input is fp32); ``unsupported_mask`` names a mask this flash path cannot apply (None if there is
    none). ``auto`` takes flash when it can run and SDPA otherwise; an explicit ``flash`` that cannot run
    raises AttentionKernelError with the reason instead of falling back silently.
    """
    if requested not in ATTN_IMPLS:
        raise AttentionKernelError(
            f"attn_impl must be one of {', '.join(map(repr, ATTN_IMPLS))}, got {requested!r}"
        )
    if requested == "sdpa":
        return "sdpa"
    why = flash_unavailable(device_type, dtype, flash_importable, unsupported_mask)
    if why is None:
        return "flash"
    if requested == "flash":
        raise AttentionKernelError(
            f"attn_impl 'flash' cannot run: {why}; set model.attn_impl to auto (falls back to SDPA) or sdpa"
        )
    return "sdpa"


# ---------------------------------------------------------------------------------------------------------
# ALiBi (Press et al., "Train Short, Test Long")
# ---------------------------------------------------------------------------------------------------------


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes: a geometric sequence 2^(-8/n)...; non-powers of two interleave the 2n sequence."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if n_heads <= 0:
        raise ValueError(f"n_heads must be positive, got {n_heads}")
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two_slopes(closest)
    if closest != n_heads:
        # The paper's rule: take the first closest slopes, then every other slope of the 2*closest sequence.
        slopes += power_of_two_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Symmetric bidirectional ALiBi bias ``-slope * |i - j|`` of shape (heads, seq_len, seq_len)."""
    pos = torch.arange(seq_len, device=slopes.device, dtype=torch.float32)
    dist = (pos[None, :] - pos[:, None]).abs()
    return -slopes.float()[:, None, None] * dist[None]


# ---------------------------------------------------------------------------------------------------------
# Unpadding: run token-wise layers only on real tokens
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Unpadded:
    """Where the real tokens of a padded (batch, seq) block live once flattened to (tokens, ...)."""

    indices: torch.Tensor  # (T,) positions of real tokens in the flattened batch*seq
    cu_seqlens: torch.Tensor  # (B+1,) int32 cumulative sequence lengths (flash-attn's layout)
    max_seqlen: int
    batch: int
    seq_len: int
    key_mask: torch.Tensor  # (B, S) bool, True for real tokens (for the padded SDPA path)
    padded_stream: bool = False  # padding tokens kept in the stream (classic padded execution)
    _bias: dict = field(default_factory=dict, repr=False)  # SDPA masks, built once per forward

    @property
    def is_identity(self) -> bool:
        """True when every position is kept (no padding removed)."""
        return self.indices.numel() == self.batch * self.seq_len


def unpad_info(attention_mask: torch.Tensor, keep_all: bool = False) -> Unpadded:
    """Indices/cu_seqlens of the real tokens; ``keep_all`` keeps padding too (classic padded execution)."""
    mask = attention_mask.bool()
    batch, seq_len = mask.shape
    lengths = mask.sum(dim=1, dtype=torch.int32)
    if keep_all:
        indices = torch.arange(batch * seq_len, device=mask.device)
        full = torch.full_like(lengths, seq_len)
        cu = F.pad(torch.cumsum(full, 0, dtype=torch.int32), (1, 0))
        return Unpadded(indices, cu, seq_len, batch, seq_len, mask, padded_stream=not bool(mask.all()))
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    max_len = int(lengths.max().item()) if batch else 0
    return Unpadded(indices, cu, max_len, batch, seq_len, mask)


def unpad(x: torch.Tensor, info: Unpadded) -> torch.Tensor:
    """(B, S, ...) -> (T, ...): keep the real tokens only."""
    flat = x.reshape(info.batch * info.seq_len, *x.shape[2:])
    return flat if info.is_identity else flat.index_select(0, info.indices)


def pad(x: torch.Tensor, info: Unpadded) -> torch.Tensor:
    """(T, ...) -> (B, S, ...): scatter real tokens back, zeros at padding positions."""
    if info.is_identity:
        return x.reshape(info.batch, info.seq_len, *x.shape[1:])
    out = x.new_zeros(info.batch * info.seq_len, *x.shape[1:])
    out.index_copy_(0, info.indices, x)  # in place on a fresh buffer: no second copy
    return out.reshape(info.batch, info.seq_len, *x.shape[1:])


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------


def attention_bias(info: Unpadded, slopes: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive SDPA mask: key padding (B,1,1,S) plus ALiBi (1,H,S,S) when ``slopes`` is given; None if neither.

    Cached on ``info``, so it is built once per forward and shared by all layers. A large finite negative
    (not -inf) keeps rows made only of padding finite.
    """
    if dtype in info._bias:
        return info._bias[dtype]
    has_padding = not bool(info.key_mask.all())
    if slopes is None and not has_padding:
        bias = None
    else:
        keymask = torch.zeros(info.key_mask.shape, dtype=dtype, device=info.key_mask.device)
        keymask = keymask.masked_fill(~info.key_mask, torch.finfo(dtype).min)[:, None, None, :]
        bias = keymask if slopes is None else alibi_bias(slopes, info.seq_len).to(dtype)[None] + keymask
    info._bias[dtype] = bias
    return bias


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

    def forward(
        self,
        x: torch.Tensor,
        info: Unpadded,
        slopes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(T, d) -> (T, d) over the sequences described by ``info``; ``slopes`` are ALiBi's (or None)."""
        T, d = x.shape
        qkv = self.Wqkv(x)  # under autocast this is bf16 whatever x is: choose the kernel from it
        dropout = self.attn_dropout if self.training else 0.0
        fn = flash_attn_function("flash_attn_varlen_qkvpacked_func")
        kernel = select_attention_kernel(
            self.attn_impl,
            qkv.device.type,
            qkv.dtype,
            fn is not None,
            # the varlen kernel takes sequence boundaries, not a key-padding mask inside the stream
            "a key-padding mask over padding kept in the token stream (unpad: false)"
            if info.padded_stream
            else None,
        )
        if kernel == "flash":
            ctx = fn(
                qkv.view(T, 3, self.n_heads, self.head_dim),
                info.cu_seqlens,  # int32 (B+1,), on the tokens' device
                info.max_seqlen,  # a Python int: a tensor here would sync or fail
                dropout_p=dropout,
                causal=False,
                # flash-attn wants fp32 (nheads,) slopes; its bias -slope*|i-j| is ALiBi's symmetric one
                alibi_slopes=None if slopes is None else slopes.to(qkv.device, torch.float32),
            )
            return self.out(ctx.reshape(T, d))
        # SDPA path: attention itself is a small share of the FLOPs at BERT lengths, so it runs padded per
        # batch (bias masks padded keys) while the projections and FFNs stay unpadded.
        B, S = info.batch, info.seq_len
        qkv = pad(qkv, info).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = attention_bias(info, slopes, q.dtype)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        ctx = ctx.transpose(1, 2).reshape(B, S, d)
        return self.out(unpad(ctx, info))


class TiedEmbedding(nn.Embedding):
    """An embedding that is also the tied output projection: ``forward(h, unembed=True) = h @ weight.T``.

    Models call it for both uses instead of reading ``.weight`` elsewhere, so when FSDP wraps it as a unit every
    use runs inside that unit's forward, with its weight gathered.
    """

    def forward(
        self,
        x: torch.Tensor,
        unembed: bool = False,
        bias: Optional[torch.Tensor] = None,
        targets: Optional[torch.Tensor] = None,
        n_valid: Optional[int] = None,
        with_correct: bool = False,
    ) -> Any:
        """Ids (...) -> (..., d); with ``unembed``, hidden states (..., d) -> logits (..., vocab) plus ``bias``.

        With ``unembed`` and ``targets`` (N,): hidden states (N, d) -> (mean cross-entropy, LabelStats) over the
        first ``n_valid`` vocabulary rows, fused and chunked (``lm_loss.linear_cross_entropy``): no logits kept.
        """
        if not unembed:
            return super().forward(x)
        if targets is None:
            return F.linear(x, self.weight, bias)
        return linear_cross_entropy(
            x, self.weight, targets, bias=bias, n_valid=n_valid, with_correct=with_correct
        )


# ---------------------------------------------------------------------------------------------------------
# Feed-forward networks
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------------------------------------


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


# "fused_layernorm" is the name the MosaicBERT reference YAMLs use (Composer's apex-based FusedLayerNorm, gone
# from Composer): an alias of the low-precision LayerNorm, which serves the same purpose (a LayerNorm that does not
# upcast to fp32), so those recipes keep working with the same behaviour.
Norm = Literal["layernorm", "low_precision_layernorm", "fused_layernorm"]
NORMS: dict[str, type[nn.LayerNorm]] = {
    "layernorm": nn.LayerNorm,
    "low_precision_layernorm": LowPrecisionLayerNorm,
    "fused_layernorm": LowPrecisionLayerNorm,
}


def make_norm(kind: Norm, d_model: int, eps: float) -> nn.Module:
    """A norm of one of the :data:`Norm` kinds (the choice is checked where the config is)."""
    return NORMS[kind](d_model, eps=eps)
