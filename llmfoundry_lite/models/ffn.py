"""The ``model.ffn`` choice of both families: the dense gated FFN, or SMoE-Dropout (Chen et al., ICLR 2023).

SMoE-Dropout splits a dense gated FFN (LLaMA's SwiGLU, MosaicBERT's GeGLU) into ``n_experts`` experts by
partitioning its hidden width: expert ``e`` owns rows ``[e h, (e+1) h)`` of the gate and of the up projection
and the same columns of the down projection (``h = hidden / n_experts``), so the parameters *are* the dense
FFN's and the state dict keeps the dense module's names (plus ``router.weight``). Each token goes through the
top-``k`` experts of a linear router, weighted by a softmax over the ``k`` chosen logits (the official code's
gates). With ``router: random_frozen`` (the method) the router is randomly initialised and never trained
(``requires_grad`` False: no gradient, no optimizer state, no weight decay); ``learned`` is the Switch
Transformer baseline, trained with its load-balancing loss (added to the loss by the ``smoe_schedule``
callback). ``k`` rises from ``k_min`` to ``k_max`` over training (``k_at``); at inference any ``k`` works
("self-slimmable", :func:`set_active_experts`).

Compute follows the routing: tokens are grouped by expert (one sort) and each expert runs on its own tokens
only (one fused gate|up matmul, one down matmul); at ``k = n_experts`` every expert sees every token, so the
dense matmuls run once and the softmax weights scale the hidden activations per expert block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.experts import dense_experts, expert_loop
from llmfoundry_lite.models.ffn_config import (  # noqa: F401 (re-exported: the families import them from here)
    FFNConfig,
    FFNName,
    Router,
    Schedule,
    check_ffn,
    ffn_config,
)

# ---------------------------------------------------------------------------------------------------------
# The schedule of k (the official code's calculate_gate_number, over the fraction of the run done)
# ---------------------------------------------------------------------------------------------------------


def k_at(cfg: FFNConfig, fraction: float) -> int:
    """k for a batch that starts when ``fraction`` of the run (0..1) is done.

    linear: ``round((k_max - k_min) f) + k_min``; cosine: ``k_max - round((k_max - k_min) cos(pi f / 2))``;
    exponential: ``k_max - round((k_max - k_min) 0.99^floor(300 f))``; step: k_min doubling up to k_max in equal
    parts of the run; constant: k_max.
    """
    lo, hi = cfg.lo, cfg.hi
    f = min(max(float(fraction), 0.0), 1.0)
    if cfg.schedule == "linear":
        k = round((hi - lo) * f) + lo
    elif cfg.schedule == "cosine":
        k = hi - round((hi - lo) * math.cos(math.pi * f / 2))
    elif cfg.schedule == "exponential":
        k = hi - round((hi - lo) * 0.99 ** math.floor(300 * f))
    elif cfg.schedule == "step":
        levels = [lo]
        while levels[-1] * 2 < hi:
            levels.append(levels[-1] * 2)
        levels.append(hi)
        k = levels[min(int(len(levels) * f), len(levels) - 1)]
    else:
        k = hi
    return int(min(max(k, lo), hi))


def mean_k(cfg: FFNConfig, points: int = 1000) -> float:
    """The average k over a whole run (what ``estimate`` charges FLOPs for)."""
    return sum(k_at(cfg, (i + 0.5) / points) for i in range(points)) / points


# ---------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------


class SMoEDropoutFFN(nn.Module):
    """A gated FFN split into experts, routed top-k; its weights keep the dense module's names and layout.

    ``gate_act``: F.silu (SwiGLU) or F.gelu (GeGLU). ``names``: (fused gate|up, down) attribute names of the
    dense module (``("w13", "w2")`` for LLaMA, ``("up", "down")`` for MosaicBERT). ``down_bias``, ``dropout``:
    MosaicBERT's GLU has a bias on the down projection and dropout before it.
    """

    unit_weights = False  # test-only switch: weights 1 instead of the softmax (k = N is then the dense FFN)

    def __init__(
        self,
        d_model: int,
        hidden: int,
        cfg: FFNConfig,
        gate_act: Callable[[torch.Tensor], torch.Tensor],
        names: tuple[str, str],
        down_bias: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.cfg, self.hidden, self.gate_act, self.names = cfg, hidden, gate_act, names
        self.n_experts = cfg.n_experts
        self.expert_width = hidden // cfg.n_experts
        self.k = cfg.inference_k
        setattr(self, names[0], nn.Linear(d_model, 2 * hidden, bias=False))  # rows [0, h) gate, [h, 2h) up
        setattr(self, names[1], nn.Linear(hidden, d_model, bias=down_bias))
        getattr(self, names[1])._is_residual_out = True
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.router = nn.Linear(d_model, cfg.n_experts, bias=False)
        self.router.weight.requires_grad_(cfg.router == "learned")
        self.aux_loss: Optional[torch.Tensor] = None  # the learned router's balance loss of the last forward

    @property
    def up_proj(self) -> nn.Linear:
        """The fused [gate | up] projection."""
        return getattr(self, self.names[0])

    @property
    def down_proj(self) -> nn.Linear:
        """The down projection."""
        return getattr(self, self.names[1])

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, k={self.k}, router={self.cfg.router}"

    def skipped_params(self) -> int:
        """Weight entries a token does not multiply at the current k (the unselected experts' share)."""
        per_expert = 3 * self.up_proj.in_features * self.expert_width
        return (self.n_experts - self.k) * per_expert

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T, d) -> router logits (T, N) in fp32, chosen experts (T, k), their weights (T, k)."""
        with torch.autocast(x.device.type, enabled=False):  # routing decisions independent of precision
            logits = F.linear(x.float(), self.router.weight.float())
        if self.k >= self.n_experts:
            idx = torch.arange(self.n_experts, device=x.device).expand(x.shape[0], -1)
            vals = logits
        else:
            vals, idx = torch.topk(logits, self.k, dim=-1)
        weights = torch.ones_like(vals) if self.unit_weights else torch.softmax(vals, dim=-1)
        return logits, idx, weights

    def _balance_loss(self, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Switch Transformer: N * sum_e (share of assignments to e) * (mean router probability of e)."""
        counts = torch.bincount(idx.flatten(), minlength=self.n_experts).float()
        share = counts / max(idx.numel(), 1)
        prob = torch.softmax(logits, dim=-1).mean(dim=0)
        return self.n_experts * (share * prob).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, idx, weights = self.route(x)
        self.aux_loss = (
            self._balance_loss(logits, idx) if self.cfg.router == "learned" and self.training else None
        )
        w_up, w_down = self.up_proj.weight, self.down_proj.weight
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        p_drop = self.dropout.p if self.dropout is not None and self.training else 0.0
        if self.unit_weights:
            weights = torch.ones_like(weights)
        if (
            self.k >= self.n_experts
        ):  # every expert sees every token: the dense matmuls, weights per expert block
            out = dense_experts(x, w_up, w_down, weights, self.gate_act, p_drop, dtype)
        else:
            out = self._grouped(x, idx, weights, w_up, w_down, p_drop, dtype)
        if self.down_proj.bias is not None:
            out = out + self.down_proj.bias
        return out.reshape(shape)

    def _grouped(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        weights: torch.Tensor,
        w_up: torch.Tensor,
        w_down: torch.Tensor,
        p_drop: float,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Sort the (token, expert) assignments by expert; run each expert on its tokens only; add back."""
        k = idx.shape[1]
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        tokens = order // k  # the token of each sorted assignment
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        ws = weights.flatten().index_select(0, order)
        return expert_loop(x, w_up, w_down, ws, tokens, counts, self.gate_act, p_drop, dtype)


def make_ffn(
    value: Any,
    d_model: int,
    hidden: int,
    dense: Callable[[], nn.Module],
    family: Literal["llama", "bert"],
    dropout: float = 0.0,
) -> nn.Module:
    """A block's FFN: ``dense()`` unless ``value`` (``model.ffn``) asks for SMoE-Dropout over the same weights."""
    cfg = ffn_config(value)
    if not cfg.is_smoe:
        return dense()
    if family == "llama":
        return SMoEDropoutFFN(d_model, hidden, cfg, F.silu, ("w13", "w2"))
    return SMoEDropoutFFN(d_model, hidden, cfg, F.gelu, ("up", "down"), down_bias=True, dropout=dropout)


# ---------------------------------------------------------------------------------------------------------
# Model-level helpers (any model: a ComposerModel, its FSDP-wrapped form, a bare decoder)
# ---------------------------------------------------------------------------------------------------------


def smoe_layers(model: nn.Module) -> list[SMoEDropoutFFN]:
    """The model's SMoE-Dropout FFNs, in order."""
    return [m for m in model.modules() if isinstance(m, SMoEDropoutFFN)]


def smoe_config(model: nn.Module) -> Optional[FFNConfig]:
    """The ``model.ffn`` config of a model with SMoE-Dropout FFNs, else None."""
    layers = smoe_layers(model)
    return layers[0].cfg if layers else None


def set_active_experts(model: nn.Module, k: int) -> int:
    """Route every token of every SMoE layer through ``k`` experts from now on; returns the layers set."""
    layers = smoe_layers(model)
    for m in layers:
        if not 1 <= int(k) <= m.n_experts:
            raise ValueError(f"k must be between 1 and n_experts={m.n_experts}, got {k}")
        m.k = int(k)
    return len(layers)


def choose_active_experts(model: nn.Module, k: int, source: str, key: str = "--k") -> None:
    """:func:`set_active_experts` for a user's choice (``eval``/``generate --k``): a dense ``source`` or a ``k``
    outside 1..n_experts is a one-line RecipeError naming ``key``."""
    cfg = smoe_config(model)
    if cfg is None:
        raise RecipeError(
            f"{source} has dense FFNs, not SMoE-Dropout experts; {key} chooses the experts per token of a "
            "model trained with model.ffn.name=smoe_dropout (drop it for this one)",
            key=key,
        )
    if not 1 <= k <= cfg.n_experts:
        raise RecipeError(f"must be between 1 and n_experts={cfg.n_experts} of {source}, got {k}", key=key)
    set_active_experts(model, k)


def parse_k_list(text: str, key: str = "--k") -> list[int]:
    """``"1,4,16"`` as [1, 4, 16] (order kept, repeats dropped); RecipeError naming ``key`` for anything else."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part.lstrip("-").isdigit():
            raise RecipeError(f"expected experts per token as integers, e.g. 1,4,16; got {text!r}", key=key)
        if int(part) not in out:
            out.append(int(part))
    return out


def active_experts(model: nn.Module) -> Optional[int]:
    """The k the model's SMoE layers route with now (None without SMoE layers)."""
    layers = smoe_layers(model)
    return layers[0].k if layers else None


def skipped_params_fn(model: nn.Module) -> Optional[Callable[[], int]]:
    """For FLOPs accounting: a function giving the weight entries unselected experts skip now; None if dense.

    Holds the layers themselves, so it follows :func:`set_active_experts` after FSDP wraps the blocks.
    """
    layers = smoe_layers(model)
    if not layers:
        return None
    return lambda: sum(m.skipped_params() for m in layers)


def schedule_average(
    model: nn.Module, fn: Callable[[], Optional[float]], points: int = 1000
) -> Optional[float]:
    """``fn()`` averaged over a training run's k schedule (each k weighted by its share of the run).

    For whole-run estimates (``estimate``'s FLOPs): ``fn()`` as is for dense models; the model's k is restored.
    """
    cfg = smoe_config(model)
    if cfg is None:
        return fn()
    before = active_experts(model)
    shares: dict[int, int] = {}
    for i in range(points):
        k = k_at(cfg, (i + 0.5) / points)
        shares[k] = shares.get(k, 0) + 1
    total = 0.0
    try:
        for k, count in shares.items():
            set_active_experts(model, k)
            value = fn()
            if value is None:
                return None
            total += value * count / points
    finally:
        set_active_experts(model, before)
    return total


def balance_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Mean load-balancing loss of the learned routers in the last training forward (None if none)."""
    losses = [m.aux_loss for m in smoe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).mean() if losses else None


def refuse_hf_export(value: Any, layout: str = "LlamaForCausalLM") -> None:
    """RecipeError (``model.ffn``) for SMoE models: a Hugging Face ``layout`` folder has no routed experts."""
    if ffn_config(value).is_smoe:
        raise RecipeError(
            f"an SMoE-Dropout model cannot be written as a Hugging Face {layout} (its FFNs are routed "
            "experts); evaluate it from the Composer checkpoint, or train with model.ffn.name=dense to export",
            key="model.ffn",
        )


def iter_eval_k(cfg: Optional[FFNConfig]) -> Iterable[int]:
    """The extra evaluation k's of ``model.ffn.eval_k`` (sorted, unique)."""
    return sorted(set(cfg.eval_k or ())) if cfg is not None else []


__all__ = [
    "FFNConfig",
    "SMoEDropoutFFN",
    "active_experts",
    "balance_loss",
    "check_ffn",
    "choose_active_experts",
    "ffn_config",
    "k_at",
    "make_ffn",
    "mean_k",
    "parse_k_list",
    "refuse_hf_export",
    "set_active_experts",
    "skipped_params_fn",
    "smoe_config",
    "smoe_layers",
]
