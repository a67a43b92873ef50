"""``model.ffn``'s settings and their checks, apart from the layers (no torch): the recipe's fast validation reads
them through the signature table without importing the model code."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional

from llmfoundry_lite.errors import RecipeError

FFNName = Literal["dense", "smoe_dropout"]
Schedule = Literal["linear", "cosine", "exponential", "step", "constant"]
Router = Literal["random_frozen", "learned"]


@dataclass(frozen=True)
class FFNConfig:
    """``model.ffn``: the dense FFN (default) or SMoE-Dropout over the same weights."""

    name: FFNName = "dense"
    n_experts: int = 16
    k_min: Optional[int] = None  # None: n_experts // 2 (the paper's start)
    k_max: Optional[int] = None  # None: n_experts
    schedule: Schedule = "linear"  # how k goes from k_min to k_max over the run (k_at)
    router: Router = "random_frozen"
    balance_coef: float = 0.01  # learned router only: weight of the Switch load-balancing loss
    k: Optional[int] = None  # k outside training (eval, generate, glue); None: k_max
    eval_k: Optional[list[int]] = None  # evaluate at each of these k too (metrics/eval/k8/...)

    def __post_init__(self) -> None:
        if self.eval_k is not None and not isinstance(self.eval_k, tuple):
            object.__setattr__(self, "eval_k", tuple(self.eval_k))

    @property
    def is_smoe(self) -> bool:
        """True for SMoE-Dropout."""
        return self.name == "smoe_dropout"

    @property
    def lo(self) -> int:
        """k at the start of training."""
        return self.k_min if self.k_min is not None else max(1, self.n_experts // 2)

    @property
    def hi(self) -> int:
        """k at the end of training."""
        return self.k_max if self.k_max is not None else self.n_experts

    @property
    def inference_k(self) -> int:
        """k outside a training schedule."""
        return self.k if self.k is not None else self.hi


def ffn_config(value: Any) -> FFNConfig:
    """``model.ffn`` as an FFNConfig: from an FFNConfig, a mapping (recipe, checkpoint), or None / a string (dense)."""
    if isinstance(value, FFNConfig):
        return value
    if isinstance(value, Mapping):
        return FFNConfig(**dict(value))
    return FFNConfig()


def check_ffn(value: Any, hidden: int, keypath: str = "model") -> None:
    """RecipeError naming ``{keypath}.ffn.<key>`` for unknown keys, bad types, or experts/k the FFN cannot have."""
    from llmfoundry_lite import registry

    prefix = f"{keypath}.ffn" if keypath else "ffn"
    if isinstance(value, Mapping):
        registry.check_dataclass(FFNConfig, dict(value), prefix)
    elif not isinstance(value, FFNConfig):
        return  # a family's own dense choice (BERT's "geglu" / "mlp")
    cfg = ffn_config(value)
    if not cfg.is_smoe:
        if cfg.k is not None:  # an inference k that nothing would apply: say so rather than run dense
            raise RecipeError(
                f"k={cfg.k} chooses the experts per token of SMoE-Dropout FFNs, and this FFN is {cfg.name}; "
                f"drop it, or set {prefix}.name=smoe_dropout",
                key=f"{prefix}.k",
            )
        return

    def err(key: str, msg: str) -> RecipeError:
        return RecipeError(msg, key=f"{prefix}.{key}")

    n = cfg.n_experts
    if n < 1:
        raise err("n_experts", f"must be a positive integer, got {n}")
    if hidden % n:
        divisors = [d for d in range(2, min(hidden, 64) + 1) if hidden % d == 0]
        raise err(
            "n_experts",
            f"{n} does not divide the FFN hidden width {hidden}; choose a divisor (e.g. {divisors[-4:]})",
        )
    for key in ("k_min", "k_max", "k"):
        v = getattr(cfg, key)
        if v is not None and not 1 <= v <= n:
            raise err(key, f"must be between 1 and n_experts={n}, got {v}")
    if cfg.lo > cfg.hi:
        raise err("k_min", f"k_min={cfg.lo} is above k_max={cfg.hi}; k rises from k_min to k_max")
    for v in cfg.eval_k or ():
        if not 1 <= v <= n:
            raise err("eval_k", f"every k must be between 1 and n_experts={n}, got {v}")
    if cfg.balance_coef < 0:
        raise err("balance_coef", f"must be non-negative, got {cfg.balance_coef}")
