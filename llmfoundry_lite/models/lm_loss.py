"""LM head + cross-entropy without a full (tokens, vocab) logits tensor, and metrics fed from what it computed.

At a real vocabulary the head and the loss dominate a small model's step, and the plain
``F.cross_entropy(F.linear(h, W))`` keeps the logits, their log-softmax, a zero-filled gradient and the
log-softmax backward's output alive at once. :func:`linear_cross_entropy` walks the labelled rows in chunks
instead: per chunk it computes the logits, the loss and -- when gradients are wanted -- the gradients of the
hidden states and of the head's weight right away (softmax - one-hot is the logits' gradient), so backward only
scales them. Same three matmuls as the plain path, none of the (tokens, vocab) temporaries (figures:
docs/model-families.md; tests/test_speed_paths.py). A decoder bias and a padded vocabulary (MosaicBERT's tied
MLM decoder: rows past the tokenizer's vocabulary) ride along: the bias is added in the chunk's matmul, padding
rows are never multiplied. The per-token losses and (when asked) argmax hits come out as :class:`LabelStats`,
which the metric classes below accept in place of logits: train and eval metrics cost nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity, MaskedAccuracy

# Bytes of one chunk's fp32 logits: each chunk rereads the head's weight, so few large chunks win; past this
# size only memory grows (docs/model-families.md).
CHUNK_BYTES = 128 * 2**20


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


# Vocabulary columns per block on CPU. One (rows x 30,522) logits product with K=256 ran at ~115 GFLOP/s here
# (MKL/AVX-512, 2 threads; scripts/profile_tiny.py --shapes), the same product in blocks of 512 vocabulary rows,
# written straight into the buffer's column slices, at ~170: the weight's block and the output tile stay in cache.
# Each block's max, exp and sum then run while it is still in cache (an online softmax across blocks), and the
# gradient pass scales each block right before its two matmuls. GPUs tile wide outputs themselves: one block there.
CPU_VOCAB_BLOCK = 512


@dataclass
class _Pass:
    """What one chunked pass over the rows produced: sums, and the gradients it was asked for (fp32 / cdtype)."""

    loss_sum: torch.Tensor
    correct: Optional[torch.Tensor]
    grad_h: Optional[torch.Tensor] = None
    grad_w: Optional[torch.Tensor] = None
    grad_b: Optional[torch.Tensor] = None


def _blocks(vocab: int, device: torch.device) -> list[slice]:
    step = CPU_VOCAB_BLOCK if device.type == "cpu" else vocab
    return [slice(j, min(j + step, vocab)) for j in range(0, vocab, step)]


def _chunked_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    n_valid: int,
    chunk_rows: int,
    with_correct: bool,
    grads: tuple[bool, bool, bool],
) -> _Pass:
    """Loss (and, per ``grads`` = (hidden, weight, bias), gradients of the mean loss) chunk by chunk.

    Only the first ``n_valid`` rows of ``weight``/``bias`` are vocabulary (the rest is padding to a multiple of
    64): views of those rows are multiplied, and the padding rows' gradients stay zero.
    """
    n = hidden.shape[0]
    cdtype = _compute_dtype(hidden)
    scale = 1.0 / max(n, 1)
    dev = hidden.device
    blocks = _blocks(n_valid, dev)
    with torch.autocast(dev.type, enabled=False):
        h, w = hidden.to(cdtype), weight[:n_valid].to(cdtype)
        b = None if bias is None else bias[:n_valid].to(cdtype)
        out = _Pass(
            torch.zeros((), dtype=torch.float32, device=dev),
            torch.zeros((), dtype=torch.int64, device=dev) if with_correct else None,
            torch.empty_like(h) if grads[0] else None,
            torch.zeros(weight.shape, dtype=torch.float32, device=dev) if grads[1] else None,
            torch.zeros(bias.shape, dtype=torch.float32, device=dev)
            if grads[2] and bias is not None
            else None,
        )
        gw = None if out.grad_w is None else out.grad_w[:n_valid]  # views: padding rows are never written
        gb = None if out.grad_b is None else out.grad_b[:n_valid]
        want_grad = any(grads)
        # One logits buffer for all chunks: a fresh large tensor per chunk is a fresh mmap on Linux, page-faulted
        # and zeroed on first touch, which halved the logits matmul's speed.
        rows = min(chunk_rows, n)
        buf = torch.empty((rows, n_valid), dtype=cdtype, device=dev)
        fbuf = buf if cdtype == torch.float32 else torch.empty(buf.shape, dtype=torch.float32, device=dev)
        bmax = torch.empty((rows, len(blocks)), dtype=torch.float32, device=dev)
        bsum = torch.empty_like(bmax)
        barg = torch.empty((rows, len(blocks)), dtype=torch.int64, device=dev) if with_correct else None
        for i in range(0, n, chunk_rows):
            hc, tc = h[i : i + chunk_rows], targets[i : i + chunk_rows]
            r = len(tc)
            cbuf, lbuf, mx, sm = buf[:r], fbuf[:r], bmax[:r], bsum[:r]
            # Pass 1, block by block while it is in cache: logits (the decoder bias rides in the matmul), the
            # block's max (and argmax), exp(logits - block max) in place, and its sum.
            for k, cols in enumerate(blocks):
                if b is None:
                    torch.mm(hc, w[cols].t(), out=cbuf[:, cols])
                else:
                    torch.addmm(b[cols], hc, w[cols].t(), out=cbuf[:, cols])
                blk = lbuf[:, cols] if fbuf is buf else lbuf[:, cols].copy_(cbuf[:, cols])
                if barg is None:
                    torch.amax(blk, 1, out=mx[:, k])
                else:
                    torch.max(blk, 1, out=(mx[:, k], barg[:r, k]))
                blk.sub_(mx[:, k, None]).exp_()
                torch.sum(blk, 1, out=sm[:, k])
            row_max = mx.amax(1, keepdim=True)
            rescale = (mx - row_max).exp_()  # block max -> row max, per block
            sum_exp = (sm * rescale).sum(1)
            # The target's logit directly (a dot product per row) rather than from the exponentiated buffer.
            target_logit = (hc.float() * w[tc].float()).sum(1)
            if b is not None:
                target_logit += b[tc].float()
            out.loss_sum += (row_max.squeeze(1) + sum_exp.log() - target_logit).sum()
            if barg is not None:  # the first block holding the row's max, then the first column in it
                best = mx.argmax(1, keepdim=True)
                starts = torch.tensor([c.start for c in blocks], device=dev)
                pred = starts[best.squeeze(1)] + barg[:r].gather(1, best).squeeze(1)
                out.correct += (pred == tc).sum()
            if not want_grad:
                continue
            # d(mean loss)/d(logits) = (softmax - one_hot) / n. Pass 2: each block becomes its softmax share times
            # 1/n, then feeds both gradient matmuls while in cache; the one-hot part is subtracted afterwards as
            # (rows, d) corrections, not written into the buffer.
            factor = rescale.mul_((scale / sum_exp)[:, None])
            gh = None if out.grad_h is None else out.grad_h[i : i + r]
            for k, cols in enumerate(blocks):
                probs = lbuf[:, cols].mul_(factor[:, k, None])
                g = probs if fbuf is buf else cbuf[:, cols].copy_(probs)
                if gh is not None:
                    if k == 0:
                        torch.mm(g, w[cols], out=gh)
                    else:
                        gh.addmm_(g, w[cols])
                if gw is not None:
                    if g.dtype == torch.float32:
                        gw[cols].addmm_(g.t(), hc)
                    else:  # addmm_ needs one dtype; the fp32 accumulator keeps bf16 chunks from losing bits
                        gw[cols] += torch.mm(g.t(), hc).float()
                if gb is not None:
                    gb[cols] += probs.sum(0)  # fp32 column sums of the same block
            if gh is not None:
                gh.sub_(w[tc], alpha=scale)
            if gw is not None:
                gw.index_add_(0, tc, hc.float(), alpha=-scale)
            if gb is not None:
                gb.index_add_(0, tc, torch.full((r,), -scale, device=dev))
    return out


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` whose gradients are computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, targets, n_valid, chunk_rows, with_correct, stats_out):  # type: ignore[override]
        n = hidden.shape[0]
        grads = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        p = _chunked_pass(hidden, weight, bias, targets, n_valid, chunk_rows, with_correct, grads)
        gw = None if p.grad_w is None else p.grad_w.to(weight.dtype)
        gb = None if p.grad_b is None else p.grad_b.to(bias.dtype)
        ctx.save_for_backward(p.grad_h, gw, gb)
        stats_out.append(LabelStats(p.loss_sum, torch.tensor(n, device=hidden.device), p.correct))
        return p.loss_sum * (1.0 / max(n, 1))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        scaled = [None if g is None else (g * grad_out).to(g.dtype) for g in ctx.saved_tensors]
        return scaled[0], scaled[1], scaled[2], None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    n_valid: Optional[int] = None,
    with_correct: bool = False,
    chunk_bytes: Optional[int] = None,
) -> tuple[torch.Tensor, LabelStats]:
    """Mean cross-entropy of ``hidden (N, d) @ weight (V, d).T + bias`` against ``targets (N,)``, and its LabelStats.

    Equal to ``F.cross_entropy(F.linear(hidden, weight, bias)[:, :n_valid].float(), targets)`` (fp32 softmax,
    matmuls in the autocast dtype when autocast is on) without ever holding more than one chunk of logits.
    ``n_valid``: only the first rows of ``weight``/``bias`` are vocabulary (a padded tied decoder); the others
    never enter the softmax and get zero gradients. ``with_correct`` also counts argmax hits (token accuracy).
    Every row must carry a target (select labelled rows first). ``chunk_bytes`` bounds one chunk's fp32 logits
    (default :data:`CHUNK_BYTES`).
    """
    n_valid = weight.shape[0] if n_valid is None else n_valid
    chunk_rows = _chunk_rows(n_valid, chunk_bytes or CHUNK_BYTES)
    params = (hidden, weight) + ((bias,) if bias is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in params):
        stats: list[LabelStats] = []
        loss = _LinearCrossEntropy.apply(
            hidden, weight, bias, targets, n_valid, chunk_rows, with_correct, stats
        )
        return loss, stats[0]
    # No gradients (evaluation): the same chunked pass, loss and hits only.
    n = hidden.shape[0]
    with torch.no_grad():
        p = _chunked_pass(hidden, weight, bias, targets, n_valid, chunk_rows, with_correct, (False,) * 3)
    stats = LabelStats(p.loss_sum, torch.tensor(n, device=hidden.device), p.correct)
    return p.loss_sum / max(n, 1), stats


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
