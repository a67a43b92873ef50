"""BERT-family encoders: MosaicBERT and classic BERT are two configurations of one class.

Read top to bottom: config -> embeddings -> Post-LN layer -> encoder trunk (with unpadding) -> masked-only
MLM head -> Composer wrapper. Hugging Face checkpoint import: ``hf_adapter.py``; recipe entries: ``builder.py``.

MosaicBERT (Portes et al. 2023) = ALiBi instead of learned positions, GeGLU feed-forward, low-precision
LayerNorm, unpadding (padding tokens never reach the projections/FFNs), an MLM head evaluated only at
masked positions, vocabulary padded to a multiple of 64, no NSP. Classic BERT = learned positions,
GELU MLP, LayerNorm; it loads Hugging Face ``BertModel`` / ``BertForMaskedLM`` weights exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from torch import nn

from llmfoundry_lite.batch import IGNORE_INDEX
from llmfoundry_lite.checkpoints import check_weights_match
from llmfoundry_lite.models.accounting import TransformerFlops, count_params
from llmfoundry_lite.models.attention import (
    Unpadded,
    alibi_slopes,
    check_attn_impl,
    pad,
    unpad,
    unpad_info,
)
from llmfoundry_lite.models.bert.layers import GeGLU, GeluMLP, SelfAttention, make_norm
from llmfoundry_lite.models.configs import BertConfig
from llmfoundry_lite.models.ffn import make_ffn, skipped_params_fn
from llmfoundry_lite.models.head import LMHead, TiedEmbedding
from llmfoundry_lite.models.lm_loss import LabelStats, StatsAccuracy, StatsCrossEntropy

# ---------------------------------------------------------------------------------------------------------
# Embeddings and one Post-LN layer
# ---------------------------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    """Word + token-type (+ learned position) embeddings, then norm and dropout."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        # Also the MLM decoder (tied): the head projects through it, so FSDP gathers it for that use too.
        self.word = TiedEmbedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.position = (
            nn.Embedding(cfg.max_position_embeddings, cfg.d_model) if cfg.position == "learned" else None
        )
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """(T,) ids of the real tokens (already unpadded) -> (T, d)."""
        x = self.word(input_ids)
        if token_type_ids is None:
            x = x + self.token_type.weight[0]
        else:
            x = x + self.token_type(token_type_ids)
        if self.position is not None:
            x = x + self.position(position_ids)
        return self.dropout(self.norm(x))


class BertLayer(nn.Module):
    """Post-LN layer as in BERT: x = norm(x + drop(attn(x))); x = norm(x + ffn(x)), the FFN's dropout included."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout, attn_impl=cfg.attn_impl)
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.layer_norm_eps)
        if cfg.ffn != "mlp":
            # MosaicBERT's GLU drops out the gated activation inside, before its down-projection; nothing after.
            self.ffn = make_ffn(cfg.ffn, cfg.d_model, cfg.intermediate_size, lambda: GeGLU(cfg.d_model, cfg.intermediate_size, dropout=cfg.hidden_dropout), "bert", cfg.hidden_dropout)  # fmt: skip
            self.ffn_dropout: nn.Module = nn.Identity()
        else:  # classic BERT: dropout on the MLP's output, as in transformers' BertOutput
            self.ffn = GeluMLP(cfg.d_model, cfg.intermediate_size)
            self.ffn_dropout = nn.Dropout(cfg.hidden_dropout)
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, info: Unpadded, slopes: torch.Tensor | None) -> torch.Tensor:
        """(T, d) -> (T, d) on the (unpadded) token stream."""
        x = self.norm1(x + self.dropout(self.attn(x, info, slopes)))
        return self.norm2(x + self.ffn_dropout(self.ffn(x)))


# ---------------------------------------------------------------------------------------------------------
# The encoder trunk
# ---------------------------------------------------------------------------------------------------------


class BertEncoder(nn.Module):
    """Embeddings + N layers. ``forward(input_ids, attention_mask, token_type_ids=None) -> (B, S, d)``.

    Composer's FSDP wraps each child of the ComposerModel (this encoder, the MLM head) as a root and asks
    *that child* for ``fsdp_wrap_fn`` / ``activation_checkpointing_fn`` / ``param_init_fn``: they live here.
    """

    def __init__(self, cfg: BertConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.n_layers))
        # ALiBi slopes per device, fp32, not a buffer: FSDP's mixed precision (and .half()) would round
        # buffers to bf16, and flash-attn wants fp32 slopes. Nothing to checkpoint: they follow from n_heads.
        self._slopes: dict[torch.device, torch.Tensor] = {}
        self.apply(self.param_init_fn)

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """One FSDP unit per encoder layer, and one for the word embedding the MLM head also multiplies by."""
        return isinstance(module, (BertLayer, TiedEmbedding))

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        """Activation checkpointing recomputes each encoder layer."""
        return isinstance(module, BertLayer)

    def alibi_slopes(self, device: torch.device) -> torch.Tensor | None:
        """fp32 ALiBi slopes (n_heads,) on ``device``; None with learned positions."""
        if self.cfg.position != "alibi":
            return None
        if device not in self._slopes:
            self._slopes[device] = alibi_slopes(self.cfg.n_heads).to(device)
        return self._slopes[device]

    def param_init_fn(self, m: nn.Module) -> None:
        """Initialise one module's own parameters (BERT's N(0, std), zero biases, unit norms)."""
        std = self.cfg.init_std
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Unpadded]:
        """Hidden states of the real tokens only, (T, d), plus the unpadding info to scatter them back.

        Under FSDP call ``encoder(..., unpadded=True)`` instead: only ``forward`` gathers the sharded weights.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        info = unpad_info(attention_mask, keep_all=not self.cfg.unpad)
        # Padding leaves here, before the embeddings: no later op ever sees it (ids are cheap to gather).
        ids = unpad(input_ids, info)
        types = unpad(token_type_ids, info) if token_type_ids is not None else None
        positions = None
        if self.embeddings.position is not None:
            if info.seq_len > self.cfg.max_position_embeddings:
                raise ValueError(
                    f"sequence length {info.seq_len} exceeds max_position_embeddings="
                    f"{self.cfg.max_position_embeddings} of learned positions (ALiBi models have no such limit)"
                )
            positions = info.indices % info.seq_len
        x = self.embeddings(ids, types, positions)
        slopes = self.alibi_slopes(x.device)
        for layer in self.layers:
            x = layer(x, info, slopes)
        return x, info

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        unpadded: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, Unpadded]:
        """Last hidden states (B, S, d), zeros at padding; ``unpadded=True``: :meth:`encode`'s ((T, d), info)."""
        x, info = self.encode(input_ids, attention_mask, token_type_ids)
        return (x, info) if unpadded else pad(x, info)

    @classmethod
    def from_hf(cls, path_or_name: str, **overrides: Any) -> BertEncoder:
        """Encoder with the weights of a HF BERT or published MosaicBERT checkpoint (folder or hub name).

        ``overrides`` set execution/regularisation fields of :class:`BertConfig` (``unpad=True``,
        ``hidden_dropout=0.0``...). By default padding positions are computed as the checkpoint's own code does:
        by transformers' BertModel for classic BERT, zeros (unpadded) for MosaicBERT.
        """
        from llmfoundry_lite.models.bert.hf_adapter import load_hf_bert

        cfg, enc_sd, _ = load_hf_bert(path_or_name, **overrides)
        check_weights_fit(cfg, enc_sd, None, path_or_name, "init_from_hf")
        if "unpad" not in overrides and cfg.position == "learned":
            cfg = dataclasses.replace(cfg, unpad=False)
        enc = cls(cfg)
        enc.load_state_dict(enc_sd)
        return enc


# ---------------------------------------------------------------------------------------------------------
# Masked-language-model head (only at masked positions; decoder tied to the word embeddings)
# ---------------------------------------------------------------------------------------------------------


class MLMHead(LMHead):
    """Dense -> GELU -> norm -> tied decoder + bias, as in BERT's ``cls.predictions``.

    The decoder is the encoder's word embedding, passed per call (``tied_to``): under FSDP that is the
    embedding's own unit, which gathers its weight for the call. Only the first ``vocab_size`` rows of the
    padded vocabulary are scored.
    """

    def __init__(self, cfg: BertConfig, vocab_size: int):
        super().__init__(
            cfg.d_model,
            cfg.vocab_size,
            tied=True,
            bias=True,
            n_valid=vocab_size,
            count_correct=cfg.use_train_metrics,
        )
        self.cfg = cfg
        self.transform = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.layer_norm_eps)
        self.apply(self.param_init_fn)

    def param_init_fn(self, m: nn.Module) -> None:
        """N(0, std) dense weight, zero biases, unit norm (Composer's FSDP asks the head for this)."""
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, MLMHead):
            nn.init.zeros_(m.bias)

    def forward(
        self,
        h: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        tied_to: Optional[TiedEmbedding] = None,
    ) -> Any:
        """(N, d) -> logits (N, padded_vocab); with ``targets`` (N,) -> (mean cross-entropy, LabelStats)."""
        return super().forward(self.norm(F.gelu(self.transform(h))), targets, tied_to)


@dataclass
class MLMOutput:
    """Training/eval output of :class:`BertMLM`: the masked-token loss, computed in forward without logits.

    ``loss`` is the mean cross-entropy over masked tokens (decoder, bias and softmax fused and chunked), and
    ``stats()`` its sum, count and -- in evaluation, or training with ``use_train_metrics`` -- argmax hits, which
    the metrics read. ``masked_logits`` (M, vocab), aligned with ``masked_labels`` (M,), and the full ``logits``
    (B, S, vocab; zeros at padding) satisfy the logits contract for other metrics and callers but are computed
    lazily, on first access, through the head's forward: nothing is paid unless asked for.
    """

    loss: torch.Tensor
    masked_labels: torch.Tensor
    _stats: LabelStats
    _masked_hidden: torch.Tensor  # trunk output at masked positions (the head's input)
    _hidden: torch.Tensor
    _info: Unpadded
    _head: Callable[[torch.Tensor], torch.Tensor]  # hidden -> padded-vocabulary logits
    _vocab: int
    _logits: Optional[torch.Tensor] = None
    _masked_logits: Optional[torch.Tensor] = None

    @property
    def masked_logits(self) -> torch.Tensor:
        """Logits (M, vocab) at masked positions, materialised on first access."""
        if self._masked_logits is None:
            self._masked_logits = self._head(self._masked_hidden)[:, : self._vocab]
        return self._masked_logits

    @property
    def logits(self) -> torch.Tensor:
        """All-position logits (B, S, vocab), materialised on first access."""
        if self._logits is None:
            self._logits = pad(self._head(self._hidden)[:, : self._vocab], self._info)
        return self._logits

    def stats(self) -> LabelStats:
        """Summed cross-entropy, count and (when computed) argmax hits over the masked positions."""
        return self._stats


# ---------------------------------------------------------------------------------------------------------
# Composer wrapper
# ---------------------------------------------------------------------------------------------------------


class BertMLM(ComposerModel):
    """Encoder + masked-only MLM head as a Composer model; ``.encoder`` is the trunk (for GLUE)."""

    def __init__(self, cfg: BertConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size  # the tokenizer's; logits are sliced to it (padded rows never win)
        self.encoder = BertEncoder(cfg)
        self.head = MLMHead(cfg, vocab_size)
        # Counted now, before FSDP shards the parameters: the trunk's matrices for every real token; the head
        # (transform + tied decoder) only for masked tokens.
        self.flops = TransformerFlops(
            matmul_params=count_params(self.encoder.layers, matrices_only=True),
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            head_params=count_params(self.head.transform, matrices_only=True)
            + count_params(self.encoder.embeddings.word),
            skipped=skipped_params_fn(self.encoder),  # SMoE: experts not selected at the current k
        )
        self.train_metrics = self._metrics() if cfg.use_train_metrics else {}
        self.val_metrics = self._metrics()

    @staticmethod
    def _metrics() -> dict[str, Any]:
        return {"LanguageCrossEntropy": StatsCrossEntropy(), "MaskedAccuracy": StatsAccuracy()}

    def forward(self, batch: dict) -> MLMOutput:
        """Run the trunk on real tokens, then the head only where labels are not IGNORE_INDEX (all if no labels)."""
        # Through the modules' __call__ (not .encode): under FSDP that is what gathers each unit's weights.
        h, info = self.encoder(
            batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"), unpadded=True
        )
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"]
        labels = unpad(labels.reshape(info.batch, info.seq_len), info)  # (T,) labels of real tokens
        sel = torch.nonzero(labels != IGNORE_INDEX, as_tuple=False).flatten()
        masked_h, masked_labels = h.index_select(0, sel), labels.index_select(0, sel)
        # Head on masked tokens only, loss fused in; looked up per call, so under FSDP these are the units.
        word = self.encoder.embeddings.word
        loss, stats = self.head(masked_h, masked_labels, word)
        head = functools.partial(self.head, targets=None, tied_to=word)
        return MLMOutput(loss, masked_labels, stats, masked_h, h, info, head, self.vocab_size)

    def loss(self, outputs: Any, batch: dict) -> torch.Tensor:
        """Mean cross-entropy over masked tokens."""
        if isinstance(outputs, MLMOutput):
            return outputs.loss
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            batch["labels"].reshape(-1),
            ignore_index=IGNORE_INDEX,
        )

    def eval_forward(self, batch: dict, outputs: Any = None) -> MLMOutput:
        """Same as forward (metrics only need masked positions)."""
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict:
        """Masked-token cross-entropy and masked accuracy (in training only with ``use_train_metrics``)."""
        return self.train_metrics if is_train else self.val_metrics

    def update_metric(self, batch: dict, outputs: Any, metric: Any) -> None:
        """Feed the masked positions' statistics (or logits and labels, for other metrics) to a metric."""
        if isinstance(outputs, MLMOutput):
            stats = outputs.stats()
            if isinstance(metric, StatsCrossEntropy) or (
                isinstance(metric, StatsAccuracy) and stats.correct is not None
            ):
                metric.update(stats)
            else:
                metric.update(outputs.masked_logits.contiguous(), outputs.masked_labels)
        else:
            logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
            metric.update(logits.reshape(-1, logits.shape[-1]).contiguous(), batch["labels"].reshape(-1))

    def flops_per_batch(self, batch: dict) -> int:
        """Training FLOPs (fwd+bwd = 3x fwd) counting real tokens only and the head on masked tokens only."""
        return self.flops.per_batch(batch)

    def check_runtime(self, device_type: str, precision: Optional[str] = None) -> None:
        """RecipeError (``model.attn_impl``) when the configured attention kernel cannot run on this device."""
        check_attn_impl(self.cfg.attn_impl, device_type, precision)


def check_weights_fit(cfg: BertConfig, enc: dict, head: Optional[dict], source: str, key: str) -> None:
    """RecipeError naming the first weight missing from, or shaped unlike, the model its config describes.

    For imported checkpoints (``hf_adapter``): ``enc``/``head`` are state dicts of the encoder and MLM head.
    """
    with torch.device("meta"):
        model = BertMLM(cfg, cfg.vocab_size)
    parts = [(model.encoder.state_dict(), enc, "")] + (
        [(model.head.state_dict(), head, "head.")] if head else []
    )
    for own, got, prefix in parts:
        check_weights_match(
            {prefix + k: v for k, v in own.items()}, {prefix + k: v for k, v in got.items()}, source, key,
            "its config.json describes another shape", extra_ok=True,
        )  # fmt: skip
