"""LM head + cross-entropy without a full (tokens, vocab) logits tensor, and metrics fed from what it computed.

At a real vocabulary the head and the loss dominate a small model's step: for d=256, L=4 and vocab 30,522 the
(2,032 x 30,522) fp32 logits are 248 MB, and the plain ``F.cross_entropy(F.linear(h, W))`` keeps them, their
log-softmax, a zero-filled gradient and the log-softmax backward's output alive at once (~1 GB, and page faults
on every fresh allocation). :func:`linear_cross_entropy` walks the labelled rows in chunks of a few MB instead:
per chunk it computes the logits, the loss and -- when gradients are wanted -- the gradients of the hidden
states and of the head's weight right away (softmax - one-hot is the logits' gradient), so backward only scales
them. Same three matmuls as the plain path, none of the (tokens, vocab) temporaries (scripts/profile_tiny.py,
tests/test_speed_paths.py). The per-token losses and (when asked) argmax hits come out as :class:`LabelStats`,
which the metric classes below accept in place of logits: train and eval metrics cost nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity, MaskedAccuracy

# Bytes of one chunk's fp32 logits. Measured on CPU (d=256, vocab 30,522, 2,032 rows, fwd+bwd, one thread, CPU
# seconds): plain path 1.81; chunks of 8 MB 1.64, 16 MB 1.50, 32-128 MB 1.47. Smaller chunks make the weight-gradient
# accumulation (one vocab x d read-modify-write per chunk) dominate; larger ones only cost memory.
CHUNK_BYTES = 32 * 2**20


@dataclass
class LabelStats:
    """Summed cross-entropy, token count and (optionally) argmax hits over labelled positions of one batch."""

    loss_sum: torch.Tensor  # fp32 scalar, detached
    count: torch.Tensor  # int64 scalar
    correct: Optional[torch.Tensor] = None  # int64 scalar; None when accuracy was not asked for


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would multiply in here: the autocast dtype inside an autocast region."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


def _chunk_rows(vocab: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * vocab))


def _chunk_logits_stats(
    logits: torch.Tensor, targets: torch.Tensor, with_correct: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(row max, sum of exp(logits - max), target logits, hits) of fp32 logits; exponentiates them in place."""
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    correct = (logits.argmax(-1) == targets).sum() if with_correct else None
    row_max = logits.amax(-1, keepdim=True)
    logits.sub_(row_max).exp_()  # in place: the logits buffer becomes the unnormalised softmax
    return row_max.squeeze(1), logits.sum(-1), target_logit, correct


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` whose gradients are computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx: Any, hidden, weight, targets, chunk_rows, with_correct, stats_out):  # type: ignore[override]
        n = hidden.shape[0]
        cdtype = _compute_dtype(hidden)
        scale = 1.0 / max(n, 1)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(cdtype), weight.to(cdtype)
            grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
            correct = torch.zeros((), dtype=torch.int64, device=hidden.device) if with_correct else None
            for i in range(0, n, chunk_rows):
                hc, tc = h[i : i + chunk_rows], targets[i : i + chunk_rows]
                logits = torch.mm(hc, w.t()).float()
                row_max, sum_exp, target_logit, hits = _chunk_logits_stats(logits, tc, with_correct)
                loss_sum += (row_max + sum_exp.log() - target_logit).sum()
                if hits is not None:
                    correct += hits
                # d(mean loss)/d(logits) = (softmax - one_hot) / n, built in the same buffer
                probs = logits.mul_((scale / sum_exp)[:, None])
                probs[torch.arange(len(tc), device=tc.device), tc] -= scale
                g = probs.to(cdtype)
                if grad_h is not None:
                    torch.mm(g, w, out=grad_h[i : i + chunk_rows])
                if g.dtype == torch.float32:
                    grad_w.addmm_(g.t(), hc)
                else:  # addmm_ needs one dtype; the fp32 accumulator keeps bf16 chunks from losing bits
                    grad_w += torch.mm(g.t(), hc).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        stats_out.append(LabelStats(loss_sum, torch.tensor(n, device=hidden.device), correct))
        return loss_sum * scale

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else (grad_h * grad_out).to(grad_h.dtype)
        return gh, (grad_w * grad_out).to(grad_w.dtype), None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    with_correct: bool = False,
    chunk_bytes: Optional[int] = None,
) -> tuple[torch.Tensor, LabelStats]:
    """Mean cross-entropy of ``hidden (N, d) @ weight (V, d).T`` against ``targets (N,)``, and its LabelStats.

    Equal to ``F.cross_entropy(F.linear(hidden, weight).float(), targets)`` (fp32 softmax, matmuls in the
    autocast dtype when autocast is on) without ever holding more than one chunk of logits; ``with_correct``
    also counts argmax hits (token accuracy). Every row must carry a target (select labelled rows first).
    ``chunk_bytes`` bounds one chunk's fp32 logits (default :data:`CHUNK_BYTES`).
    """
    chunk_rows = _chunk_rows(weight.shape[0], chunk_bytes or CHUNK_BYTES)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        stats: list[LabelStats] = []
        loss = _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, with_correct, stats)
        return loss, stats[0]
    # No gradients (evaluation): the same chunked pass, loss and hits only.
    n = hidden.shape[0]
    cdtype = _compute_dtype(hidden)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.int64, device=hidden.device) if with_correct else None
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        h, w = hidden.to(cdtype), weight.to(cdtype)
        for i in range(0, n, chunk_rows):
            logits = torch.mm(h[i : i + chunk_rows], w.t()).float()
            row_max, sum_exp, target_logit, hits = _chunk_logits_stats(
                logits, targets[i : i + chunk_rows], with_correct
            )
            loss_sum += (row_max + sum_exp.log() - target_logit).sum()
            if hits is not None:
                correct += hits
    stats = LabelStats(loss_sum, torch.tensor(n, device=hidden.device), correct)
    return loss_sum / max(n, 1), stats


def logits_stats(
    logits: torch.Tensor, targets: torch.Tensor, loss_sum: Optional[torch.Tensor] = None
) -> LabelStats:
    """LabelStats of already computed logits (N, V) at labelled rows; ``loss_sum`` reuses a loss already taken."""
    with torch.no_grad():
        if loss_sum is None:
            loss_sum = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        correct = (logits.argmax(-1) == targets).sum()
    return LabelStats(loss_sum.detach().float(), torch.tensor(targets.numel(), device=logits.device), correct)


# Composer's metrics, also accepting LabelStats instead of (logits, targets): the states, names, reductions and
# values are Composer's (so checkpoints and logs are unchanged); only the recomputation goes.


class _SumsFromLabelStats:
    """Mixin for Composer's summed-loss metrics: add LabelStats' sums, or compute from logits as Composer does."""

    def update(self, output: Any, target: Optional[torch.Tensor] = None) -> None:  # type: ignore[override]
        """Add summed loss and count from LabelStats, or compute them from logits as Composer does."""
        if isinstance(output, LabelStats):
            self.sum_loss += output.loss_sum.to(self.sum_loss.device)
            self.total_items += output.count.to(self.total_items.device)
        else:
            super().update(output, target)  # type: ignore[misc]


class StatsCrossEntropy(_SumsFromLabelStats, LanguageCrossEntropy):
    """LanguageCrossEntropy that also accepts LabelStats."""


class StatsPerplexity(_SumsFromLabelStats, LanguagePerplexity):
    """LanguagePerplexity that also accepts LabelStats."""


class StatsAccuracy(MaskedAccuracy):
    """MaskedAccuracy that also accepts LabelStats carrying argmax hits."""

    def update(self, preds: Any, target: Optional[torch.Tensor] = None) -> None:  # type: ignore[override]
        """Add hits and count from LabelStats, or take the argmax of logits as Composer does."""
        if isinstance(preds, LabelStats):
            if preds.correct is None:
                raise ValueError("LabelStats without argmax hits: compute them with with_correct=True")
            self.correct += preds.correct.to(self.correct.device)
            self.total += preds.count.to(self.total.device)
        else:
            super().update(preds, target)
