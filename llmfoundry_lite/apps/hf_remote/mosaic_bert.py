"""MosaicBERT for Hugging Face ``transformers`` (``trust_remote_code=True``): masked LM and sequence classification.

Written into every folder ``llmfoundry-lite export`` makes from a ``mosaic_bert`` run, and named by its config's
``auto_map``. Self-contained: torch and transformers only (4.51 and later, 5.x included); flash-attn's varlen
kernel is used when it imports and the inputs are bf16/fp16 on CUDA, else PyTorch's SDPA computes the same function.

The weight names and config keys are those of the published MosaicBERT (``mosaicml/mosaic-bert-base``): fused
``attention.self.Wqkv``, ``mlp.gated_layers`` ([gate | value], no bias), ``mlp.wo``, ``mlp.layernorm``, ALiBi
instead of position embeddings (``alibi_starting_size`` is kept for compatibility; the bias is built per batch).
Post-LN layers; padding tokens are removed before the projections and feed-forward layers and restored as zeros.

    from transformers import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained("EXPORTED_DIR", trust_remote_code=True)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    SequenceClassifierOutput,
)


class MosaicBertConfig(BertConfig):
    """transformers' BertConfig plus MosaicBERT's keys.

    ``alibi_starting_size``: the published key (size of the precomputed ALiBi table there; unused here).
    ``valid_vocab_size``: the tokenizer's size when ``vocab_size`` is padded (to a multiple of 64); MLM logits of
    the padding rows are set to the dtype's minimum so no pipeline ever predicts them. None: all rows are real.
    """

    model_type = "mosaic_bert"

    def __init__(
        self,
        alibi_starting_size: int = 512,
        attention_probs_dropout_prob: float = 0.0,
        valid_vocab_size: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(attention_probs_dropout_prob=attention_probs_dropout_prob, **kwargs)
        self.alibi_starting_size = alibi_starting_size
        self.valid_vocab_size = valid_vocab_size


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al.): 2^(-8/n)...; non-powers of two interleave the 2n sequence."""
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = [2.0 ** (-8.0 * (i + 1) / closest) for i in range(closest)]
    if closest != n_heads:
        extra = [2.0 ** (-8.0 * (i + 1) / (2 * closest)) for i in range(2 * closest)]
        slopes += extra[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_qkvpacked_func
    except Exception:  # not installed, or a build that does not import on this machine
        return None
    return flash_attn_varlen_qkvpacked_func


class _Unpadded:
    """Where the real tokens of a (B, S) batch are once flattened, and the attention bias for the SDPA path."""

    def __init__(self, attention_mask: torch.Tensor):
        self.mask = attention_mask.bool()
        self.batch, self.seq_len = self.mask.shape
        self.indices = torch.nonzero(self.mask.flatten(), as_tuple=False).flatten()
        lengths = self.mask.sum(dim=1, dtype=torch.int32)
        self.cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        self.max_seqlen = int(lengths.max().item()) if self.batch else 0
        self._bias: dict = {}

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (T, ...)."""
        return x.reshape(self.batch * self.seq_len, *x.shape[2:]).index_select(0, self.indices)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, S, ...), zeros at padding."""
        out = x.new_zeros(self.batch * self.seq_len, *x.shape[1:])
        out.index_copy_(0, self.indices, x)
        return out.reshape(self.batch, self.seq_len, *x.shape[1:])

    def bias(self, slopes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """ALiBi ``-slope * |i - j|`` plus a large negative at padded keys: (B, H, S, S), built once per forward."""
        if dtype not in self._bias:
            pos = torch.arange(self.seq_len, device=slopes.device, dtype=torch.float32)
            alibi = -slopes.float()[:, None, None] * (pos[None, :] - pos[:, None]).abs()[None]
            keys = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            keys = keys.masked_fill(~self.mask, torch.finfo(dtype).min)[:, None, None, :]
            self._bias[dtype] = alibi.to(dtype)[None] + keys
        return self._bias[dtype]


class MosaicBertEmbeddings(nn.Module):
    """Word + token-type embeddings (no positions: ALiBi), LayerNorm, dropout."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        """(T,) ids and types of the real tokens -> (T, d)."""
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class MosaicBertSelfAttention(nn.Module):
    """Bidirectional attention over unpadded tokens with one fused ``Wqkv`` projection and ALiBi."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.p_dropout = config.attention_probs_dropout_prob
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, x: torch.Tensor, info: _Unpadded, slopes: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, d)."""
        T, d = x.shape
        qkv = self.Wqkv(x)
        dropout = self.p_dropout if self.training else 0.0
        flash = _flash_varlen() if qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16) else None
        if flash is not None:
            ctx = flash(
                qkv.view(T, 3, self.n_heads, self.head_dim),
                info.cu_seqlens,
                info.max_seqlen,
                dropout_p=dropout,
                causal=False,
                alibi_slopes=slopes.to(qkv.device, torch.float32),
            )
            return ctx.reshape(T, d)
        B, S = info.batch, info.seq_len
        q, k, v = info.pad(qkv).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=info.bias(slopes, q.dtype), dropout_p=dropout)
        return info.unpad(ctx.transpose(1, 2).reshape(B, S, d))


class MosaicBertSelfOutput(nn.Module):
    """Output projection, dropout, residual, LayerNorm (Post-LN)."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """LayerNorm(residual + dropout(dense(h)))."""
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class MosaicBertAttention(nn.Module):
    """``attention.self`` (Wqkv) + ``attention.output`` (dense, LayerNorm), as the published names nest them."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.self = MosaicBertSelfAttention(config)
        self.output = MosaicBertSelfOutput(config)

    def forward(self, x: torch.Tensor, info: _Unpadded, slopes: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, d)."""
        return self.output(self.self(x, info, slopes), x)


class MosaicBertGatedMLP(nn.Module):
    """GeGLU feed-forward: gelu(gate) * value from one bias-free projection, dropout, ``wo``, residual, LayerNorm."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.d_ff = config.intermediate_size
        self.gated_layers = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, d)."""
        gate, value = self.gated_layers(x).split(self.d_ff, dim=-1)
        return self.layernorm(self.wo(self.dropout(F.gelu(gate) * value)) + x)


class MosaicBertLayer(nn.Module):
    """One Post-LN layer: attention block, then gated feed-forward block."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.attention = MosaicBertAttention(config)
        self.mlp = MosaicBertGatedMLP(config)

    def forward(self, x: torch.Tensor, info: _Unpadded, slopes: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, d)."""
        return self.mlp(self.attention(x, info, slopes))


class MosaicBertEncoder(nn.Module):
    """The stack of layers (``bert.encoder.layer.N``)."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(MosaicBertLayer(config) for _ in range(config.num_hidden_layers))
        self.n_heads = config.num_attention_heads

    def forward(self, x: torch.Tensor, info: _Unpadded) -> torch.Tensor:
        """(T, d) -> (T, d)."""
        slopes = alibi_slopes(self.n_heads).to(x.device)
        for layer in self.layer:
            x = layer(x, info, slopes)
        return x


class MosaicBertPooler(nn.Module):
    """[CLS] hidden state -> dense -> tanh."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, S, d) -> (B, d)."""
        return torch.tanh(self.dense(hidden[:, 0]))


class MosaicBertPreTrainedModel(PreTrainedModel):
    """Weight initialisation and config class shared by the MosaicBERT models."""

    config_class = MosaicBertConfig
    base_model_prefix = "bert"

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()


class MosaicBertModel(MosaicBertPreTrainedModel):
    """Embeddings + encoder (+ pooler): last hidden states (B, S, d), zeros at padding positions."""

    def __init__(self, config: MosaicBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = MosaicBertEmbeddings(config)
        self.encoder = MosaicBertEncoder(config)
        self.pooler = MosaicBertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The word embedding."""
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the word embedding."""
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Encode a padded batch; padding tokens never reach the projections."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        info = _Unpadded(attention_mask)
        x = self.embeddings(info.unpad(input_ids), info.unpad(token_type_ids))
        hidden = info.pad(self.encoder(x, info))
        pooled = self.pooler(hidden) if self.pooler is not None else None
        if return_dict is False:
            return (hidden, pooled)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


class MosaicBertPredictionHeadTransform(nn.Module):
    """dense -> GELU -> LayerNorm (``cls.predictions.transform``)."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d)."""
        return self.LayerNorm(F.gelu(self.dense(h)))


class MosaicBertLMPredictionHead(nn.Module):
    """Transform, then the decoder (tied to the word embedding) with its own bias."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.transform = MosaicBertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., vocab)."""
        return self.decoder(self.transform(h))


class MosaicBertOnlyMLMHead(nn.Module):
    """``cls.predictions``."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.predictions = MosaicBertLMPredictionHead(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., vocab)."""
        return self.predictions(h)


class MosaicBertForMaskedLM(MosaicBertPreTrainedModel):
    """MosaicBERT with its masked-language-model head; logits (B, S, vocab), zeros' logits at padding."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__(config)
        self.bert = MosaicBertModel(config, add_pooling_layer=False)
        self.cls = MosaicBertOnlyMLMHead(config)
        # Tied as in the published model; exported files also carry the (equal) decoder weight, so loading does not
        # depend on how a transformers version re-ties weights.
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        """The MLM decoder."""
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        """Replace the MLM decoder."""
        self.cls.predictions.decoder = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> MaskedLMOutput:
        """Logits at every position; with ``labels`` (-100 = ignore) also the mean masked-token cross-entropy."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state
        logits = self.cls(hidden)
        valid = getattr(self.config, "valid_vocab_size", None)
        if valid is not None and valid < logits.shape[-1]:
            logits[..., valid:] = torch.finfo(logits.dtype).min  # padding rows of the vocabulary
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.shape[-1]).float(), labels.view(-1), ignore_index=-100
            )
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return MaskedLMOutput(loss=loss, logits=logits)


class MosaicBertForSequenceClassification(MosaicBertPreTrainedModel):
    """MosaicBERT + pooler + dropout + linear classifier (regression when ``num_labels == 1``)."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MosaicBertModel(config, add_pooling_layer=True)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        """Logits (B, num_labels); with ``labels`` also cross-entropy (or MSE for one label)."""
        pooled = self.bert(input_ids, attention_mask, token_type_ids).pooler_output
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return SequenceClassifierOutput(loss=loss, logits=logits)
