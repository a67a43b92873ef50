"""Parameter counts and training FLOPs: one definition each, for the models, `show`, `estimate`, the cost monitor
and the benchmarks.

Training FLOPs (forward + backward = 3 x forward) of a transformer, per batch::

    3 * (2 * N * tokens  +  2 * 2 * n_layers * d_model * attention_pairs  +  2 * H * labelled)

``N`` is the weight-matrix entries every token multiplies (the blocks; for decoders also the LM head, which runs
whether tied or not), ``attention_pairs`` the (query, key) pairs QK^T and AV compute (sum over sequences of
length^2, not halved for causal masks, as PaLM's MFU counts them), and ``H`` weights applied only to
labelled tokens (MosaicBERT's MLM head runs on masked tokens only). Tokens are real tokens: padding is not
useful work, whether a model skips it (unpadding) or not, so MFU compares implementations fairly.
Per token at a full sequence length ``S`` this is ``6 N + 12 n_layers d_model S`` (+ the head's share).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from llmfoundry_lite.batch import batch_tokens


def count_params(module: nn.Module, *, matrices_only: bool = False) -> int:
    """Parameters of ``module``, each shared (tied) tensor once; ``matrices_only``: weight matrices only.

    Weight matrices (2-D and up: linear and embedding weights) are what a token multiplies; biases and norm
    scales are left out with ``matrices_only``. Count before FSDP wraps a model: its parameters are shards then.
    """
    return sum(p.numel() for p in module.parameters() if not matrices_only or p.dim() >= 2)


def _output_embeddings(model: nn.Module) -> Optional[nn.Module]:
    """The LM head of a model or of the network it wraps (``get_output_embeddings``, HF's convention)."""
    for obj in (model, getattr(model, "model", None)):
        fn = getattr(obj, "get_output_embeddings", None)
        if callable(fn):
            return fn()
    return None


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, non-embedding): non-embedding leaves out token/position embedding tables and an untied LM head."""
    total = count_params(model)
    tables = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Embedding)}
    head = _output_embeddings(model)
    if head is not None and getattr(head, "weight", None) is not None:
        tables[id(head.weight)] = head.weight
    return total, total - sum(w.numel() for w in tables.values())


def layer_shape(model: Any) -> tuple[int, int]:
    """(n_layers, d_model) from a model's config (ours: ``.cfg``; Hugging Face: ``.model.config``); (0, 0) if unknown."""
    for obj in (getattr(model, "cfg", None), getattr(getattr(model, "model", None), "config", None)):
        if obj is None:
            continue
        n_layers = (
            getattr(obj, "n_layers", None)
            or getattr(obj, "num_hidden_layers", None)
            or getattr(obj, "n_layer", 0)
        )
        d = getattr(obj, "d_model", None) or getattr(obj, "hidden_size", None) or getattr(obj, "n_embd", 0)
        if n_layers and d:
            return int(n_layers), int(d)
    return 0, 0


@dataclass(frozen=True)
class TransformerFlops:
    """The module docstring's training-FLOPs formula for one model's shape."""

    matmul_params: int  # N: weight entries every real token multiplies
    n_layers: int
    d_model: int
    head_params: int = 0  # H: weight entries multiplied only at labelled positions
    # Entries of N a token skips right now (SMoE-Dropout's unselected experts, models/ffn.py): N counts active
    # parameters at the current k.
    skipped: Optional[Callable[[], int]] = None

    def flops(self, tokens: float, attention_pairs: float, labelled: float = 0) -> float:
        """Training FLOPs of ``tokens`` real tokens with ``attention_pairs`` pairs and ``labelled`` labels."""
        active = self.matmul_params - (self.skipped() if self.skipped is not None else 0)
        forward = (
            2 * active * tokens
            + 2 * 2 * self.n_layers * self.d_model * attention_pairs
            + 2 * self.head_params * labelled
        )
        return 3 * forward

    def per_batch(self, batch: Mapping[str, Any]) -> int:
        """Training FLOPs of a batch (what a model's ``flops_per_batch`` returns)."""
        t = batch_tokens(batch)
        return int(self.flops(t.tokens, t.attention_pairs, t.labelled))

    def per_token(self, seq_len: int, labelled_fraction: float = 0.0) -> float:
        """Training FLOPs per token of full-length sequences of ``seq_len``, a fraction of them labelled."""
        return self.flops(seq_len, seq_len * seq_len, labelled_fraction * seq_len) / seq_len


def model_flops(model: Any, batch: Mapping[str, Any]) -> Optional[float]:
    """``flops_per_batch`` of a (possibly DDP-wrapped) model, or None when it does not count FLOPs."""
    fn = getattr(model, "flops_per_batch", None) or getattr(
        getattr(model, "module", None), "flops_per_batch", None
    )
    if not callable(fn):
        return None
    try:
        return float(fn(batch))
    except NotImplementedError:
        return None
