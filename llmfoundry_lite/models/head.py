"""The language-model head: hidden states -> vocabulary, as logits or as the fused chunked cross-entropy.

:class:`LMHead` owns its output weight, or is tied to a :class:`TiedEmbedding` handed to each call. Either way
the weight is used inside the forward of the module that owns it, so when FSDP wraps that module as a unit the
weight is gathered for every use, the loss included (``lm_loss.linear_cross_entropy``: no (tokens, vocab)
logits kept in training).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmfoundry_lite.models.lm_loss import linear_cross_entropy


class TiedEmbedding(nn.Embedding):
    """A token embedding whose weight an :class:`LMHead` also projects with.

    ``forward(ids)`` embeds; ``forward(fn)`` returns ``fn(weight)``: the head's use of the weight, run inside
    this module's forward (the call FSDP gathers a unit's weights for).
    """

    def forward(self, x: torch.Tensor | Callable[[torch.Tensor], Any]) -> Any:
        """Ids (...) -> (..., d); a function of the weight -> its result."""
        if callable(x):
            return x(self.weight)
        return super().forward(x)


class LMHead(nn.Module):
    """``hidden @ W.T (+ bias)``; with targets the mean cross-entropy and its LabelStats instead of logits.

    ``tied``: no weight of its own; each call passes the :class:`TiedEmbedding` to project with. ``n_valid``:
    score only the first rows of a padded vocabulary. Argmax hits (for accuracy) are counted in evaluation, or
    always with ``count_correct`` (train metrics on).
    """

    def __init__(
        self,
        d_model: int,
        vocab_size: int,
        *,
        tied: bool = False,
        bias: bool = False,
        n_valid: Optional[int] = None,
        count_correct: bool = False,
    ):
        super().__init__()
        if tied:
            self.register_parameter("weight", None)
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default, same random draws
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None
        self.n_valid = n_valid
        self.count_correct = count_correct

    def forward(
        self,
        hidden: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        tied_to: Optional[TiedEmbedding] = None,
    ) -> Any:
        """Hidden (..., d) -> logits (..., vocab); with ``targets`` (N,): hidden (N, d) -> (loss, LabelStats)."""
        if self.weight is not None:
            return self._project(hidden, targets, self.weight)
        if tied_to is None:
            raise ValueError("a tied LMHead projects with the embedding it is tied to: pass tied_to=")
        return tied_to(lambda weight: self._project(hidden, targets, weight))

    def _project(self, hidden: torch.Tensor, targets: Optional[torch.Tensor], weight: torch.Tensor) -> Any:
        if targets is None:
            return F.linear(hidden, weight, self.bias)
        with_correct = self.count_correct or not torch.is_grad_enabled()
        return linear_cross_entropy(
            hidden, weight, targets, bias=self.bias, n_valid=self.n_valid, with_correct=with_correct
        )
