"""LLaMA-style decoder: RMSNorm, SwiGLU, rotary embeddings, grouped-query attention, no biases.

Read top to bottom: norm -> rotary -> attention -> feed-forward -> block -> decoder -> Composer wrapper (the config,
LlamaConfig, is in ``models/configs.py``, torch-free; Hugging Face conversion: ``hf_adapter.py``; the ``llama``
recipe entry: ``builder.py``). Parallelism (FSDP), precision and activation checkpointing are
applied from outside: the decoder only *declares* which modules are blocks (``fsdp_wrap_fn``,
``activation_checkpointing_fn``, ``param_init_fn``, the hooks Composer's FSDP wrapper looks for).

Speed choices (figures: docs/model-families.md): one fused QKV projection, one fused gate+up projection, RoPE
applied once to the fused q/k slice, and in training the LM head runs only on positions that carry a label, its
loss fused in (``head.LMHead``): no (tokens, vocab) logits tensor. Metrics read the summed loss and argmax hits
it returns (LabelStats); train metrics are off unless ``use_train_metrics: true``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from torch import nn

from llmfoundry_lite.batch import IGNORE_INDEX
from llmfoundry_lite.models.accounting import TransformerFlops, parameter_counts
from llmfoundry_lite.models.attention import (
    KVCache,
    LayerKV,
    causal_attention,
    check_attn_impl,
    decoder_mask,
)
from llmfoundry_lite.models.configs import LlamaConfig
from llmfoundry_lite.models.ffn import make_ffn, skipped_params_fn
from llmfoundry_lite.models.head import LMHead, TiedEmbedding
from llmfoundry_lite.models.lm_loss import (
    LabelStats,
    StatsAccuracy,
    StatsCrossEntropy,
    StatsPerplexity,
)

# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 like the reference (weight applied in the input dtype)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Hand-written: faster than F.rms_norm on CPU (docs/model-families.md).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def reset_parameters(self) -> None:
        """Ones."""
        nn.init.ones_(self.weight)


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings: the angle t * theta_j of each (position t, dimension pair j), as cos and sin.

    Pairs are adjacent dimensions (2j, 2j+1) of a head (Meta's layout), so eager mode rotates them with one
    complex multiply, faster than HF's rotate-half form (docs/model-families.md). Converting HF weights permutes
    the q/k projection rows accordingly (``hf_adapter.rope_permutation``); attention scores are unchanged.
    """

    def __init__(self, head_dim: int, theta: float, scaling: Optional[Mapping[str, Any]] = None):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self._cache: dict[torch.device, torch.Tensor] = {}  # not a buffer: nothing to checkpoint or shard

    def forward(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """fp32 (seq_len, 1, head_dim/2, 2): [cos, sin], broadcasting over (B, S, heads, head_dim/2, 2).

        Real rather than complex (it reads as e^{i angle} through ``view_as_complex``, a free view): a complex
        tensor entering a compiled block is something inductor generates no code for.
        """
        cached = self._cache.get(device)
        if cached is None or cached.shape[0] < seq_len:  # grow once; shorter sequences slice the table
            exponent = (
                torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
            )
            inv_freq = 1.0 / (self.theta**exponent)
            if self.scaling is not None:
                inv_freq = scaled_frequencies(inv_freq, self.scaling)
            angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
            cis = torch.polar(torch.ones_like(angles), angles)[:, None, :]
            cached = self._cache[device] = torch.view_as_real(cis)
        return cached[:seq_len]


def scaled_frequencies(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    """RoPE frequencies under Hugging Face's ``linear`` or ``llama3`` scaling, computed as transformers does."""
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths slowed down by the factor, short ones kept, the band between interpolated
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2j], x[2j+1]) of x (B, S, heads, head_dim) by ``RotaryEmbedding``'s angles (fp32 math)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        # The same rotation in real arithmetic: inductor fuses it into one loop (it has no complex codegen).
        x0, x1 = pairs.unbind(-1)
        cos, sin = rotation.unbind(-1)
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rotation))
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary embeddings and one fused QKV projection."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.attn_impl = cfg.attn_impl
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.wo._is_residual_out = True  # scaled init

    def forward(
        self,
        x: torch.Tensor,
        rotation: torch.Tensor,
        mask: Optional[torch.Tensor],
        kv: Optional[LayerKV] = None,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        H, Hkv, hd = self.n_heads, self.kv_heads, self.head_dim
        # split (not slicing): its backward is one cat instead of zero-filled full-size buffers per slice
        qk, v = self.wqkv(x).view(B, S, H + 2 * Hkv, hd).split([H + Hkv, Hkv], dim=2)
        q, k = apply_rotary(qk, rotation).split([H, Hkv], dim=2)  # one rotary pass for q and k together
        if kv is not None:  # decoding: attend to every position stored so far
            k, v = kv.update(k, v)
        return self.wo(causal_attention(q, k, v, self.attn_impl, mask).reshape(B, S, H * hd))


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) W_down, with gate and up fused into one matmul."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=False)  # rows [0, hidden) gate, [hidden, 2h) up
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.w2._is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class LlamaBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + ffn(norm(.)). The unit of FSDP and checkpointing."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = make_ffn(cfg.ffn, cfg.d_model, cfg.ffn_dim, lambda: SwiGLU(cfg.d_model, cfg.ffn_dim), "llama")  # fmt: skip

    def forward(
        self,
        x: torch.Tensor,
        rotation: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        kv: Optional[LayerKV] = None,
    ) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), rotation, mask, kv)
        return h + self.ffn(self.ffn_norm(h))


# ---------------------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LlamaOutput:
    """What the decoder returns when given labels.

    ``loss`` is the mean cross-entropy over labelled positions and ``stats`` its sum, count and (when computed)
    argmax hits, which the metrics read. No logits are kept: ``label_logits`` (labelled positions only, aligned
    with ``label_targets``) and ``logits`` (full ``(B, S, vocab)``) are computed on first access from the final
    hidden states by ``_head`` (ComposerLlama routes it through the decoder's forward, so under FSDP the head's
    weight is gathered for it).
    """

    loss: torch.Tensor
    stats: LabelStats
    label_targets: torch.Tensor
    hidden: torch.Tensor
    keep: torch.Tensor  # (B, S) bool: positions that carry a label
    _head: Any = None
    _logits: Optional[torch.Tensor] = None
    _label_logits: Optional[torch.Tensor] = None

    @property
    def logits(self) -> torch.Tensor:
        """Full-vocabulary logits (B, S, vocab), materialised lazily."""
        if self._logits is None:
            self._logits = self._head(self.hidden)
        return self._logits

    @property
    def label_logits(self) -> torch.Tensor:
        """Logits (N_labelled, vocab) at labelled positions, materialised lazily."""
        if self._label_logits is None:
            self._label_logits = self._head(self.hidden[self.keep])
        return self._label_logits


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with positions: position t predicts labels[t + 1]; the last position predicts nothing."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat((labels[:, 1:], pad), dim=1)


class LlamaDecoder(nn.Module):
    """Token embedding, a stack of LlamaBlocks, a final RMSNorm and an LM head (tied or not)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = (TiedEmbedding if cfg.tie_embeddings else nn.Embedding)(cfg.vocab_size, cfg.d_model)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = LMHead(
            cfg.d_model, cfg.vocab_size, tied=cfg.tie_embeddings, count_correct=cfg.use_train_metrics
        )
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self.param_init_fn)

    # -- hooks Composer's FSDP wrapper and checkpointing look for (model code applies neither) --
    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """Shard each block as its own FSDP unit, and the head's weight: logits are also asked for after forward."""
        return isinstance(module, (LlamaBlock, TiedEmbedding)) or (
            isinstance(module, LMHead) and module.weight is not None
        )

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        """Recompute each block's activations in backward when activation checkpointing is on."""
        return isinstance(module, LlamaBlock)

    def param_init_fn(self, module: nn.Module) -> None:
        """Initialise one module's own parameters: N(0, std), residual outputs scaled by 1/sqrt(2 L)."""
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            scale = (
                1 / math.sqrt(2 * self.cfg.n_layers) if getattr(module, "_is_residual_out", False) else 1.0
            )
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
        elif isinstance(module, nn.Embedding) or (isinstance(module, LMHead) and module.weight is not None):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            module.reset_parameters()

    def head(self, hidden: torch.Tensor, targets: Optional[torch.Tensor] = None) -> Any:
        """The LM head on final hidden states: logits, or with ``targets`` (loss, LabelStats) (see LMHead)."""
        return self.lm_head(hidden, targets, self.embed if self.cfg.tie_embeddings else None)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        sequence_id: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, S, d_model); with ``cache``, of positions ``cache.pos`` onwards."""
        B, S = input_ids.shape
        start = 0 if cache is None else cache.pos
        if start + S > self.cfg.max_seq_len:
            raise ValueError(
                f"input sequence length {start + S} exceeds max_seq_len={self.cfg.max_seq_len}; raise "
                "model.max_seq_len or shorten the data's sequences"
            )
        if cache is not None and (attention_mask is not None or sequence_id is not None):
            raise ValueError("decoding with a KV cache takes unpadded single-document rows (no masks)")
        x = self.embed(input_ids)
        rotation = self.rotary(start + S, x.device)[start:]
        mask = decoder_mask(S, attention_mask, sequence_id, x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, rotation, mask, None if cache is None else LayerKV(cache, i))
        if cache is not None:
            cache.advance(S)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        sequence_id: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        last_logits_only: bool = False,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor | LlamaOutput:
        """Logits (B, S, vocab) without labels; with labels a LlamaOutput whose head ran on labelled positions only.

        ``cache``: decode ``input_ids`` as the positions after those the cache holds, and store theirs.
        """
        hidden = self.hidden_states(input_ids, attention_mask, sequence_id, cache)
        if labels is None:
            return self.head(hidden[:, -1:] if last_logits_only else hidden)
        targets = shifted_targets(labels)
        keep = targets != IGNORE_INDEX
        label_targets = targets[keep]
        # Head on labelled positions only (padding and last positions skipped), chunked, loss fused in.
        loss, stats = self.head(hidden[keep], label_targets)
        return LlamaOutput(loss, stats, label_targets, hidden, keep, self.head)

    def get_output_embeddings(self) -> Optional[LMHead]:
        """The untied LM head (None when tied to the input embedding), as Hugging Face models name it."""
        return None if self.cfg.tie_embeddings else self.lm_head


# ---------------------------------------------------------------------------------------------------------
# Composer wrapper
# ---------------------------------------------------------------------------------------------------------


class ComposerLlama(ComposerModel):
    """Composer model around LlamaDecoder: causal-LM loss with the shift, CE / perplexity / token accuracy."""

    def __init__(self, cfg: LlamaConfig, tokenizer: Any = None, init_device: str = "cpu"):
        super().__init__()
        self.cfg = cfg
        # "meta": allocate nothing; Composer's FSDP materialises each block with LlamaDecoder.param_init_fn.
        with torch.device("meta") if init_device == "meta" else contextlib.nullcontext():
            self.model = LlamaDecoder(cfg)
        # Counted now, before FSDP shards the parameters: every non-embedding weight, plus the LM head's matmul,
        # which runs whether tied or not.
        self.flops = TransformerFlops(
            matmul_params=parameter_counts(self)[1] + cfg.vocab_size * cfg.d_model,
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            skipped=skipped_params_fn(self.model),  # SMoE: experts not selected at the current k
        )
        self.tokenizer = tokenizer
        self.train_metrics = self._metrics() if cfg.use_train_metrics else {}
        self.val_metrics = self._metrics()

    @staticmethod
    def _metrics() -> dict[str, Any]:
        return {
            "LanguageCrossEntropy": StatsCrossEntropy(ignore_index=IGNORE_INDEX),
            "LanguagePerplexity": StatsPerplexity(ignore_index=IGNORE_INDEX),
            "TokenAccuracy": StatsAccuracy(ignore_index=IGNORE_INDEX),
        }

    # The config travels inside the state dict, so exporting a Composer checkpoint needs nothing else.
    def get_extra_state(self) -> dict[str, Any]:
        """Model config and tokenizer location, saved with every checkpoint."""
        tok_path = getattr(self.tokenizer, "name_or_path", None) if self.tokenizer is not None else None
        if tok_path and os.path.isdir(tok_path):
            tok_path = os.path.abspath(tok_path)  # export may run from another working directory
        return {"family": "llama", "config": dataclasses.asdict(self.cfg), "tokenizer": tok_path}

    def set_extra_state(self, state: Any) -> None:
        """Accept the saved config (the architecture itself is rebuilt by the recipe)."""
        self._loaded_extra_state = state

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor | LlamaOutput:
        """Logits (B, S, vocab), or a LlamaOutput (loss, ``.logits``) when the batch has labels."""
        return self.model(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            sequence_id=batch.get("sequence_id"),
            labels=batch.get("labels"),
        )

    def loss(self, outputs: Any, batch: Mapping[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mean token cross-entropy of next-token prediction (labels shifted by one, IGNORE_INDEX ignored)."""
        if isinstance(outputs, LlamaOutput):
            return outputs.loss
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
        targets = shifted_targets(batch["labels"])
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)

    def eval_forward(self, batch: Mapping[str, Any], outputs: Optional[Any] = None) -> Any:
        """Forward for evaluation (reuses training outputs when given)."""
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Any]:
        """Cross-entropy, perplexity and token accuracy (in training only with ``use_train_metrics``)."""
        return self.train_metrics if is_train else self.val_metrics

    def update_metric(self, batch: Any, outputs: Any, metric: Any) -> None:
        """Update a metric on labelled positions only, from the forward's LabelStats where the metric takes them."""
        if isinstance(outputs, LlamaOutput):
            stats = outputs.stats
            if isinstance(metric, (StatsCrossEntropy, StatsPerplexity)) or (
                isinstance(metric, StatsAccuracy) and stats.correct is not None
            ):
                metric.update(stats)
                return
            logits, targets = outputs.label_logits, outputs.label_targets
        else:
            logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
            logits, targets = logits.flatten(0, 1), shifted_targets(batch["labels"]).flatten()
        metric.update(logits.detach().float(), targets)

    def flops_per_batch(self, batch: Mapping[str, Any]) -> int:
        """Training FLOPs: 6 x (non-embedding params + LM head) per real token plus attention (accounting.py)."""
        return self.flops.per_batch(batch)

    def check_runtime(self, device_type: str, precision: Optional[str] = None) -> None:
        """RecipeError (``model.attn_impl``) when the configured attention kernel cannot run on this device."""
        check_attn_impl(self.cfg.attn_impl, device_type, precision)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        eos_token_id: Optional[Union[int, Sequence[int]]] = None,
        generator: Optional[torch.Generator] = None,
        stop_early: bool = True,
        top_p: Optional[float] = None,
        use_cache: bool = True,
        on_token: Optional[Callable[[torch.Tensor], Optional[bool]]] = None,
    ) -> torch.Tensor:
        """Sample continuations of ``input_ids`` (B, S) (temperature 0 = greedy); returns prompt + new tokens.

        With ``use_cache`` the prompt runs once (prefill) and each step feeds only the newest token, reading
        earlier keys/values from a KVCache; past ``max_seq_len`` a step recomputes the last ``max_seq_len``
        tokens, as without the cache. ``top_k``/``top_p`` filter the distribution before sampling;
        ``on_token`` gets each step's new tokens (B,), for streaming, and ends generation by returning True.
        ``eos_token_id``: one stop id or several; a finished sequence is padded with the first.
        """
        ids = input_ids
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        # Several stop ids: a chat model ends its turn with its template's end-of-turn token, not always EOS.
        stop_ids = (
            []
            if eos_token_id is None
            else [eos_token_id]
            if isinstance(eos_token_id, int)
            else list(eos_token_id)
        )
        stops = torch.tensor(stop_ids, device=ids.device) if stop_ids else None
        max_len = self.cfg.max_seq_len
        cache = KVCache(self.cfg.n_layers, min(max_len, ids.shape[1] + max_new_tokens)) if use_cache else None
        for _ in range(max_new_tokens):
            if cache is not None and ids.shape[1] <= cache.max_len:
                logits = self.model(ids[:, cache.pos :], last_logits_only=True, cache=cache)
            else:
                logits = self.model(ids[:, -max_len:], last_logits_only=True)
            nxt = sample_next(logits[:, -1].float(), temperature, top_k, top_p, generator)
            if stops is not None:
                nxt = torch.where(done, torch.full_like(nxt, int(stops[0])), nxt)
                done = done | torch.isin(nxt, stops)
            ids = torch.cat((ids, nxt[:, None]), dim=1)
            if on_token is not None and on_token(nxt) is True:  # the caller saw its stop text
                break
            if stop_early and stops is not None and bool(done.all()):
                break
        return ids


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, vocab): argmax at temperature 0, else a filtered sample."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        # nucleus: keep the most likely tokens whose mass reaches top_p (the first one always)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        sorted_drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(sorted_drop.scatter(-1, order, sorted_drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
