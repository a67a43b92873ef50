"""Attention apart from the model math: kernel choice, masks, GQA, varlen (unpadded) sequences, a KV cache.

A family's attention module projects q/k/v and calls one function here: :func:`causal_attention` (decoders:
causal, padding and document masks, grouped-query heads, decoding against a :class:`KVCache`) or
:func:`varlen_attention` (encoders on unpadded tokens, ALiBi). Each runs flash-attn or
``torch.nn.functional.scaled_dot_product_attention``, decided per call by :func:`select_attention_kernel` from
what actually reaches the kernel (device, dtype of q/k/v, mask). Both compute the same function, so models can
be trained on GPU and evaluated on CPU.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.configs import AttnImpl

# ---------------------------------------------------------------------------------------------------------
# flash-attn (optional, lazily imported: it only builds on CUDA machines) and the choice of kernel
# ---------------------------------------------------------------------------------------------------------

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


def flash_on(device_type: str, name: str):
    """``flash_attn.<name>`` for a call on a CUDA device, else None without trying the import.

    Elsewhere flash-attn cannot run anyway, and the import attempt is a graph break under ``torch.compile``.
    """
    return flash_attn_function(name) if device_type == "cuda" else None


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
# Masks: causal + padding + documents (decoders), ALiBi (Press et al., "Train Short, Test Long")
# ---------------------------------------------------------------------------------------------------------


def decoder_mask(
    seq_len: int,
    attention_mask: Optional[torch.Tensor],
    sequence_id: Optional[torch.Tensor],
    device: torch.device,
) -> Optional[torch.Tensor]:
    """Boolean (B, 1, S, S) mask (True = may attend), or None when plain causal attention suffices.

    Combines causality, key padding (only when some position is padding) and document masking for packed
    sequences (a token attends only within its own ``sequence_id``). Every query may attend to itself so that
    fully padded rows stay finite.
    """
    needs_padding = attention_mask is not None and not bool(attention_mask.bool().all())
    if sequence_id is None and not needs_padding:
        return None
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None]
    if sequence_id is not None:
        allowed = allowed & (sequence_id[:, :, None] == sequence_id[:, None, :])
    if needs_padding:
        allowed = allowed & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(seq_len, dtype=torch.bool, device=device)[None]
    return allowed[:, None]


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
# Decoders: causal attention with grouped-query heads, optionally against a KV cache
# ---------------------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of the positions decoded so far, one preallocated (B, max_len, kv_heads, head_dim) pair per layer.

    ``pos`` is the number of positions already stored (the rotary offset of the next token); a forward writes
    each layer's new keys/values at ``pos`` (:meth:`update`), then the decoder :meth:`advance` s it once.
    Buffers take the dtype and device of the first keys stored, so they follow autocast.
    """

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.pos = 0
        self.keys: list[Optional[torch.Tensor]] = [None] * n_layers
        self.values: list[Optional[torch.Tensor]] = [None] * n_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` (B, S, kv_heads, head_dim) at positions pos..pos+S; return all stored so far."""
        end = self.pos + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        if self.keys[layer] is None:
            self.keys[layer] = k.new_empty(k.shape[0], self.max_len, *k.shape[2:])
            self.values[layer] = v.new_empty(v.shape[0], self.max_len, *v.shape[2:])
        keys, values = self.keys[layer], self.values[layer]
        keys[:, self.pos : end] = k
        values[:, self.pos : end] = v
        return keys[:, :end], values[:, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as stored (after every layer has written them)."""
        self.pos += n


@dataclass
class LayerKV:
    """One layer's view of a :class:`KVCache` (what a block's attention writes to)."""

    cache: KVCache
    layer: int

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`KVCache.update`."""
        return self.cache.update(self.layer, k, v)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    impl: str,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal attention, q (B, Sq, H, hd) over k/v (B, Sk, Hkv, hd) -> (B, Sq, H, hd).

    ``Sq < Sk`` is decoding: the queries are the last ``Sq`` positions (a bottom-right aligned causal mask).
    ``mask`` is :func:`decoder_mask`'s (padding/documents, Sq == Sk) or None. Fewer kv heads (GQA) are
    repeated for SDPA; flash-attn takes them as they are.
    """
    B, Sq, H, hd = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    flash = flash_on(q.device.type, "flash_attn_func")
    kernel = select_attention_kernel(
        impl,
        q.device.type,
        q.dtype,
        flash is not None,
        None if mask is None else "a padding or document (sequence_id) mask",
    )
    if kernel == "flash":
        return flash(q, k, v, causal=True)  # bottom-right aligned when Sq < Sk (flash-attn >= 2.1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if Hkv != H:  # CPU SDPA kernels need equal head counts
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    if mask is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    elif Sq == Sk:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif Sq == 1:  # the newest token sees every stored position
        out = F.scaled_dot_product_attention(q, k, v)
    else:  # SDPA's is_causal aligns top-left; decoding needs bottom-right
        allowed = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(diagonal=Sk - Sq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# Encoders: bidirectional attention over unpadded (varlen) token streams
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
    # some sequence is shorter than seq_len; a Python bool read here, not a tensor inside the (compiled) layers
    has_padding: bool = False
    _bias: dict = field(default_factory=dict, repr=False)  # SDPA masks, built once per forward

    @property
    def is_identity(self) -> bool:
        """True when every position is kept (no padding removed): eager mode then skips the gathers.

        Always False while compiling: one graph serves batches with and without padding (gathering every position
        is the identity) instead of a recompile the first time the other kind of batch arrives.
        """
        return not torch.compiler.is_compiling() and (self.padded_stream or not self.has_padding)


def unpad_info(attention_mask: torch.Tensor, keep_all: bool = False) -> Unpadded:
    """Indices/cu_seqlens of the real tokens; ``keep_all`` keeps padding too (classic padded execution)."""
    mask = attention_mask.bool()
    batch, seq_len = mask.shape
    lengths = mask.sum(dim=1, dtype=torch.int32)
    if keep_all:
        indices = torch.arange(batch * seq_len, device=mask.device)
        full = torch.full_like(lengths, seq_len)
        cu = F.pad(torch.cumsum(full, 0, dtype=torch.int32), (1, 0))
        padded = not bool(mask.all())
        return Unpadded(indices, cu, seq_len, batch, seq_len, mask, padded_stream=padded, has_padding=padded)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    max_len = int(lengths.max().item()) if batch else 0
    return Unpadded(indices, cu, max_len, batch, seq_len, mask, has_padding=indices.numel() < batch * seq_len)


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


def attention_bias(info: Unpadded, slopes: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive SDPA mask: key padding (B,1,1,S) plus ALiBi (1,H,S,S) when ``slopes`` is given; None if neither.

    Cached on ``info``, so it is built once per forward and shared by all layers. A large finite negative
    (not -inf) keeps rows made only of padding finite. Under ``torch.compile`` each layer builds it inside its
    graph instead (fused there): a cache written by the first layer's graph would fail a guard of the next one.
    """
    compiling = torch.compiler.is_compiling()
    if not compiling and dtype in info._bias:
        return info._bias[dtype]
    if not compiling and slopes is None and not info.has_padding:  # compiled: one graph, padded or not
        bias = None
    else:
        keymask = torch.zeros(info.key_mask.shape, dtype=dtype, device=info.key_mask.device)
        keymask = keymask.masked_fill(~info.key_mask, torch.finfo(dtype).min)[:, None, None, :]
        bias = keymask if slopes is None else alibi_bias(slopes, info.seq_len).to(dtype)[None] + keymask
    if not compiling:
        info._bias[dtype] = bias
    return bias


def varlen_attention(
    qkv: torch.Tensor,
    info: Unpadded,
    impl: str,
    slopes: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Bidirectional attention over the sequences ``info`` describes: packed qkv (T, 3, H, hd) -> (T, H * hd).

    ``slopes`` are ALiBi's (fp32, (H,)) or None. flash-attn's varlen kernel takes the token stream as it is;
    the SDPA path pads per batch (attention is a small share of the FLOPs at encoder lengths) and masks padded
    keys, while the caller's projections and FFNs stay unpadded.
    """
    T, _, H, hd = qkv.shape
    fn = flash_on(qkv.device.type, "flash_attn_varlen_qkvpacked_func")
    kernel = select_attention_kernel(
        impl,
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
            qkv,
            info.cu_seqlens,  # int32 (B+1,), on the tokens' device
            info.max_seqlen,  # a Python int: a tensor here would sync or fail
            dropout_p=dropout,
            causal=False,
            # flash-attn wants fp32 (nheads,) slopes; its bias -slope*|i-j| is ALiBi's symmetric one
            alibi_slopes=None if slopes is None else slopes.to(qkv.device, torch.float32),
        )
        return ctx.reshape(T, H * hd)
    B, S = info.batch, info.seq_len
    q, k, v = pad(qkv, info).view(B, S, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    bias = attention_bias(info, slopes, q.dtype)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    return unpad(ctx.transpose(1, 2).reshape(B, S, H * hd), info)
