"""`smoe_schedule`: SMoE-Dropout's k as training state, its per-k evaluation and the learned router's loss.

Added to every run whose model has SMoE-Dropout FFNs (``model.ffn.name: smoe_dropout``; ``train`` adds it, as it
adds ``stream_counts`` to mixtures). It reads the schedule from the model's ``ffn`` block:

==========================  ====================================================================
``smoe/k``                  experts per token for this batch (``k_at`` of the fraction of the run done)
``smoe/active_params``      weight entries a token multiplies at this k (FLOPs and MFU count these)
``smoe/balance_loss``       ``router: learned`` only: the Switch load-balancing loss added to the loss
==========================  ====================================================================

- Each batch runs at ``k_at(model.ffn, elapsed fraction)``; k and the schedule are saved in checkpoints, so a
  resumed run (kill -9 included) goes on with the same k (the router is a model weight, saved with it).
- Evaluation runs at the training k; with ``model.ffn.eval_k: [1, 2, 4, 8, 16]`` every evaluator ``eval`` also
  runs once per k as ``eval/k1``, ... (metrics ``metrics/eval/k8/LanguageCrossEntropy``), training k restored
  afterwards.
- ``router: learned``: ``balance_coef`` x the mean balance loss of the last forward is added to the loss.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from composer.core import Callback, Evaluator, State
from composer.loggers import Logger

from llmfoundry_lite import registry
from llmfoundry_lite.models.ffn import (
    FFNConfig,
    active_experts,
    balance_loss,
    ffn_config,
    iter_eval_k,
    k_at,
    set_active_experts,
    smoe_config,
    smoe_layers,
)


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)  # DDP keeps the model in .module; FSDP wraps children in place


@registry.callbacks.register("smoe_schedule")
class SMoESchedule(Callback):
    """Sets SMoE-Dropout's k each batch from ``model.ffn``'s schedule; logs it; evaluates at ``eval_k``."""

    def __init__(self) -> None:
        self.k: Optional[int] = None  # the training k of the last batch (checkpointed)
        self._loaded: Optional[int] = None
        self._eval_labels: dict[str, int] = {}
        self._train_k: Optional[int] = None
        self._ready = False

    def _cfg(self, state: State) -> Optional[FFNConfig]:
        return smoe_config(_unwrap(state.model))

    def _setup(self, state: State) -> None:
        """Once: restore a checkpoint's k and add one evaluator per ``eval_k``."""
        if self._ready:
            return
        self._ready = True
        cfg = self._cfg(state)
        if cfg is None:
            return
        if self._loaded is not None:
            self.k = self._loaded
            set_active_experts(_unwrap(state.model), self.k)
        extra: list[Evaluator] = []
        for ev in list(state.evaluators or []):
            if ev.label in self._eval_labels:
                continue
            for k in iter_eval_k(cfg):
                label = f"{ev.label}/k{k}"
                if label in state.eval_metrics:
                    continue
                extra.append(
                    Evaluator(
                        label=label,
                        dataloader=ev.dataloader,
                        metric_names=ev.metric_names,
                        subset_num_batches=ev.subset_num_batches,
                        eval_interval=ev.eval_interval,
                    )
                )
                state.eval_metrics[label] = copy.deepcopy(state.eval_metrics[ev.label])
                self._eval_labels[label] = k
        state.evaluators = [*state.evaluators, *extra]

    def after_load(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._setup(state)

    def fit_start(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._setup(state)

    def eval_standalone_start(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._setup(state)

    def batch_start(self, state: State, logger: Logger) -> None:
        """Set this batch's k from the fraction of the run done before it, and log it."""
        cfg = self._cfg(state)
        if cfg is None:
            return
        try:
            fraction = float(state.get_elapsed_duration() or 0.0)
        except (AssertionError, ValueError, TypeError):  # no max_duration: hold k_max
            fraction = 1.0
        self.k = k_at(cfg, fraction)
        model = _unwrap(state.model)
        set_active_experts(model, self.k)
        active = sum(3 * m.up_proj.in_features * m.expert_width * m.k for m in smoe_layers(model))
        logger.log_metrics({"smoe/k": self.k, "smoe/active_params": active})

    def after_loss(self, state: State, logger: Logger) -> None:
        """``router: learned``: add ``balance_coef`` x the balance loss to the loss this microbatch backpropagates."""
        cfg = self._cfg(state)
        if cfg is None or cfg.router != "learned" or cfg.balance_coef == 0:
            return
        aux = balance_loss(_unwrap(state.model))
        if aux is None:
            return
        if isinstance(state.loss, dict):
            state.loss = {**state.loss, "balance": cfg.balance_coef * aux}
        else:
            state.loss = state.loss + cfg.balance_coef * aux
        logger.log_metrics({"smoe/balance_loss": float(aux.detach())})

    def eval_start(self, state: State, logger: Logger) -> None:
        """Run a per-k evaluator at its k (others at the training k)."""
        k = self._eval_labels.get(str(state.dataloader_label))
        if k is None:
            return
        model = _unwrap(state.model)
        self._train_k = active_experts(model)
        set_active_experts(model, k)

    def eval_end(self, state: State, logger: Logger) -> None:
        """Back to the training k."""
        if self._train_k is not None:
            set_active_experts(_unwrap(state.model), self._train_k)
            self._train_k = None

    def state_dict(self) -> dict[str, Any]:
        """The k of the last trained batch."""
        return {"k": self.k}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on with a checkpoint's k (applied to the model once it is loaded)."""
        self._loaded = state.get("k")


def recipe_callbacks(model_block: Any, callbacks: list[Any]) -> list[Any]:
    """``smoe_schedule`` when the recipe's ``model.ffn`` is SMoE-Dropout, unless the recipe lists it already."""
    ffn = model_block.get("ffn") if isinstance(model_block, dict) else None
    if not ffn_config(ffn).is_smoe or any(isinstance(c, SMoESchedule) for c in callbacks):
        return []
    return [SMoESchedule()]
