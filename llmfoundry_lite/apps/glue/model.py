"""The model finetuned on a GLUE task: the pretrained encoder (with its starting weights), a BERT-style pooler and
a classification (or, for STS-B, regression) head, and the task's metrics from torchmetrics."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torchmetrics
from composer.models import ComposerModel
from torchmetrics.classification import BinaryF1Score, MatthewsCorrCoef, MulticlassAccuracy
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from llmfoundry_lite.apps.glue.config import GlueConfig
from llmfoundry_lite.checkpoints import check_weights_match, find_checkpoint, load_model_state
from llmfoundry_lite.errors import RecipeError

# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------

METRIC_NAMES = ("accuracy", "f1", "matthews", "spearman", "pearson")


class _ZeroIfUndefined:
    """A correlation is undefined when one side is constant (a collapsed model): score it 0, not NaN, so that one
    such run does not turn the task mean and the GLUE average into NaN."""

    def compute(self) -> torch.Tensor:
        """The metric, 0 where torchmetrics gives NaN."""
        return torch.nan_to_num(super().compute().float(), nan=0.0)  # type: ignore[misc]


class _Spearman(_ZeroIfUndefined, SpearmanCorrCoef):
    pass


class _Pearson(_ZeroIfUndefined, PearsonCorrCoef):
    pass


def glue_metric(name: str, num_labels: int) -> torchmetrics.Metric:
    """A fresh torchmetrics metric for GLUE metric ``name`` on a task with ``num_labels`` labels (1: regression).

    Classification metrics take predicted labels, correlations take scores; see GlueClassifier.update_metric.
    """
    if (
        name == "accuracy"
    ):  # the fraction of exact matches ("micro"; torchmetrics' default is a per-class mean)
        return MulticlassAccuracy(num_classes=max(num_labels, 2), average="micro")
    if name == "f1":  # of the positive class (label 1), as GLUE reports for QQP and MRPC
        return BinaryF1Score()
    if name == "matthews":
        if num_labels <= 2:
            return MatthewsCorrCoef(task="binary")
        return MatthewsCorrCoef(task="multiclass", num_classes=num_labels)
    if name in ("spearman", "pearson"):
        with warnings.catch_warnings():  # "will save all targets and predictions": GLUE eval sets are small
            warnings.simplefilter("ignore")
            return _Spearman() if name == "spearman" else _Pearson()
    raise ValueError(f"unknown GLUE metric {name!r}; choose from {', '.join(METRIC_NAMES)}")


# ---------------------------------------------------------------------------------------------------------
# Model: classification / regression head on the encoder
# ---------------------------------------------------------------------------------------------------------


def _hidden_size(encoder: torch.nn.Module) -> int:
    for obj in (encoder, getattr(encoder, "config", None), getattr(encoder, "cfg", None)):
        for attr in ("hidden_size", "d_model", "dim"):
            v = getattr(obj, attr, None) if obj is not None else None
            if isinstance(v, int):
                return v
    # Otherwise ask the encoder itself (one tiny forward).
    dev = next(encoder.parameters()).device
    with torch.no_grad():
        h = encoder(
            torch.ones(1, 2, dtype=torch.long, device=dev), torch.ones(1, 2, dtype=torch.long, device=dev)
        )
    return int(h.shape[-1])


class GlueClassifier(ComposerModel):
    """Encoder + BERT-style pooler ([CLS] -> dense -> tanh) + dropout + linear head; MSE for one label."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        num_labels: int,
        metrics: Sequence[str] = ("accuracy",),
        dropout: float = 0.1,
        hidden_size: int | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.num_labels = num_labels
        hidden = hidden_size or _hidden_size(encoder)
        self.pooler = torch.nn.Linear(hidden, hidden)
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = torch.nn.Linear(hidden, num_labels)
        for lin in (self.pooler, self.classifier):  # BERT's initialisation for new layers
            torch.nn.init.normal_(lin.weight, std=0.02)
            torch.nn.init.zeros_(lin.bias)
        self.metric_names = tuple(metrics)
        self.eval_metrics = {m: glue_metric(m, num_labels) for m in self.metric_names}

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Logits (B, num_labels) for a tokenized batch."""
        hidden = self.encoder(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        pooled = torch.tanh(self.pooler(hidden[:, 0]))
        return self.classifier(self.dropout(pooled))

    def loss(self, outputs: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Cross-entropy, or mean squared error for regression (STS-B)."""
        if self.num_labels == 1:
            return torch.nn.functional.mse_loss(outputs.squeeze(-1).float(), batch["labels"].float())
        return torch.nn.functional.cross_entropy(outputs.float(), batch["labels"].long())

    def eval_forward(self, batch: Mapping[str, Any], outputs: Any = None) -> torch.Tensor:
        """Logits for evaluation."""
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, torchmetrics.Metric]:
        """Task metrics for evaluation; none during training (they would only cost time)."""
        return {} if is_train else self.eval_metrics

    def update_metric(
        self, batch: Mapping[str, Any], outputs: torch.Tensor, metric: torchmetrics.Metric
    ) -> None:
        """Feed predicted labels (or scores for regression) and targets to ``metric``."""
        if self.num_labels == 1:  # fp32: bf16 scores would tie where they should not (Spearman ranks them)
            metric.update(outputs.squeeze(-1).float(), batch["labels"].float())
        else:
            metric.update(outputs.argmax(-1), batch["labels"].long())


# ---------------------------------------------------------------------------------------------------------
# Starting weights
# ---------------------------------------------------------------------------------------------------------


def load_weights(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    key: str,
    skip_prefixes: Sequence[str] = (),
) -> None:
    """Load ``state`` into ``module``; apart from keys under ``skip_prefixes`` both must have the same weights."""
    skip = tuple(skip_prefixes)
    own = module.state_dict()
    hint = "the recipe's model block (and model-surgery algorithms) must match the run that saved it"
    wanted = {k: v for k, v in state.items() if not k.startswith(skip)}
    own = {k: v for k, v in own.items() if not k.startswith(skip)}
    check_weights_match(own, wanted, source, key, hint)
    module.load_state_dict(wanted, strict=False)


def check_starting_weights(cfg: Any, glue: GlueConfig) -> None:
    """RecipeError unless the recipe names pretrained weights (or explicitly allows a random start)."""
    if glue.checkpoint:
        find_checkpoint(glue.checkpoint, key="glue.checkpoint")
    elif not (glue.init_from_hf or (cfg.get("model") or {}).get("init_from_hf") or glue.allow_random_init):
        raise RecipeError(
            "no pretrained weights to finetune; set glue.checkpoint=PATH (or --checkpoint PATH) to a pretraining "
            "run's Composer checkpoint, glue.init_from_hf=HF_BERT, or allow_random_init: true (smoke tests)",
            key="glue.checkpoint",
        )


def apply_init_surgery(model: torch.nn.Module, cfg: Any, precision: str = "fp32") -> list[str]:
    """Apply the recipe's algorithms that rewrite the model at Event.INIT (ALiBi, gated linear units,
    low-precision LayerNorm...), so the model has the pretraining run's structure before its weights load.

    Returns the names of the algorithms applied. Other algorithms (schedules, regularizers) are pretraining
    concerns and are not used for finetuning.
    """
    from composer.core import Event, State
    from composer.devices import DeviceCPU
    from composer.loggers import Logger

    from llmfoundry_lite.train.build import build_multi

    algorithms = build_multi(cfg, "algorithms")
    if not algorithms:
        return []
    state = State(
        model=model, rank_zero_seed=0, run_name="glue-surgery", device=DeviceCPU(), precision=precision
    )
    applied = []
    for alg in algorithms:
        if alg.match(Event.INIT, state):
            alg.apply(Event.INIT, state, Logger(state))
            applied.append(type(alg).__name__)
    return applied


def build_encoder(
    cfg: Any, glue: GlueConfig, checkpoint: str | None = None, precision: str = "fp32"
) -> tuple[torch.nn.Module, Any]:
    """The pretrained encoder and its tokenizer, from ``glue.init_from_hf`` or the recipe's model + checkpoint."""
    from llmfoundry_lite.train.build import build_model, build_tokenizer

    checkpoint = checkpoint if checkpoint is not None else glue.checkpoint
    tokenizer = build_tokenizer(cfg)
    if glue.init_from_hf:
        from llmfoundry_lite.models.bert import CLASSIC, BertConfig, BertEncoder

        # One attention-dropout rule for both routes (glue.init_from_hf here, model.init_from_hf in the builder): the
        # recipe's model.attention_dropout (mosaic_bert: 0.0, as the reference finetunes), never the checkpoint's.
        block = cfg.get("model") or {}
        default = (
            CLASSIC["attention_dropout"] if block.get("name") == "bert" else BertConfig.attention_dropout
        )
        p = block.get("attention_dropout")
        return BertEncoder.from_hf(
            glue.init_from_hf, attention_dropout=default if p is None else p
        ), tokenizer
    model = build_model(cfg, tokenizer)
    apply_init_surgery(model, cfg, precision)
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        raise RecipeError(
            f"model {cfg.model.get('name')!r} has no '.encoder' trunk to finetune; use a BERT-family "
            "model (e.g. mosaic_bert)",
            key="model.name",
        )
    if checkpoint:
        state = load_model_state(checkpoint, key="glue.checkpoint")
        # Load the whole pretraining model so its own key prefixes (whatever wraps the encoder) line up.
        load_weights(model, state, f"checkpoint {checkpoint!r}", "glue.checkpoint")
    return encoder, tokenizer
