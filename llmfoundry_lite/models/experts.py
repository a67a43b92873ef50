"""The routed experts' compute (k < N): each expert runs on its own tokens only, forward and backward by hand.

Why a hand-written backward: autograd over the expert loop materialises every (token, expert) assignment at
once — the gathered inputs, the concatenated outputs and their gradients are ``T*k x d`` tensors (64 MB for
4,096 tokens at k = 8, d = 512). Allocations that large go straight to ``mmap`` in glibc, so each one is
page-faulted in fresh, every step; on a CPU that cost as much as a third of the expert matmuls. Here every
temporary is one expert's slice (``T*k/N`` rows), which the allocator recycles, and the results are added into
``T x d`` buffers in place.

Saved for backward: each expert's pre-activation ``[gate | up]`` (``T*k x 2h`` in all) and dropout mask; the
gathered inputs are gathered again rather than kept.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


class ExpertLoop(torch.autograd.Function):
    """out[t] = sum over t's assignments of w * down_e(drop(act(gate_e x_t) * up_e x_t)).

    ``x`` (T, d); ``w_up`` (2H, d) rows [gate | up], expert e owning rows [e h, (e+1) h) of each half; ``w_down``
    (d, H), expert e owning the same columns; ``ws`` (A,) the routing weights of the A assignments sorted by
    expert, ``tokens`` (A,) their token indices, ``counts`` the assignments per expert.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        w_up: torch.Tensor,
        w_down: torch.Tensor,
        ws: torch.Tensor,
        tokens: torch.Tensor,
        counts: list[int],
        act: Callable[[torch.Tensor], torch.Tensor],
        p_drop: float,
    ) -> torch.Tensor:
        h = w_down.shape[1] // len(counts)
        out = torch.zeros_like(x)
        pre, masks = [], []
        start = 0
        for e, n in enumerate(counts):
            tok, w = tokens[start : start + n], ws[start : start + n, None]
            start += n
            if n == 0:
                pre.append(None), masks.append(None)
                continue
            hh = F.linear(x.index_select(0, tok), _w13(w_up, e, h))
            gate, up = hh.split(h, dim=1)
            a = act(gate) * up * w
            mask = None
            if p_drop > 0:
                mask = torch.empty_like(a).bernoulli_(1 - p_drop).div_(1 - p_drop)
                a = a * mask
            out.index_add_(0, tok, F.linear(a, w_down[:, e * h : (e + 1) * h]))
            pre.append(hh), masks.append(mask)
        ctx.save_for_backward(x, w_up, w_down, ws, tokens)
        ctx.counts, ctx.act, ctx.pre, ctx.masks = counts, act, pre, masks
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w_up, w_down, ws, tokens = ctx.saved_tensors
        counts, act, pre, masks = ctx.counts, ctx.act, ctx.pre, ctx.masks
        need_x, need_up, need_down, need_ws = ctx.needs_input_grad[:4]
        H = w_down.shape[1]
        h = H // len(counts)
        grad_out = grad_out.contiguous()
        gx = torch.zeros_like(x) if need_x else None
        gup = torch.zeros_like(w_up) if need_up else None
        gdown = torch.zeros_like(w_down) if need_down else None
        gws = torch.zeros_like(ws) if need_ws else None
        start = 0
        for e, n in enumerate(counts):
            sl = slice(start, start + n)
            start += n
            if n == 0:
                continue
            tok, w, hh, mask = tokens[sl], ws[sl, None], pre[e], masks[e]
            gate, up = hh.split(h, dim=1)
            with torch.enable_grad():
                gate_ = gate.detach().requires_grad_()
                g_act = act(gate_)
            a0 = g_act.detach() * up  # before routing weight and dropout
            gy = grad_out.index_select(0, tok)  # (n, d)
            cols = slice(e * h, (e + 1) * h)
            if need_down:
                a = a0 * w if mask is None else a0 * w * mask
                gdown[:, cols] = gy.t() @ a
            ga = gy @ w_down[:, cols]  # (n, h): gradient of the dropped, weighted activation
            if mask is not None:
                ga = ga * mask
            if need_ws:
                gws[sl] = (ga * a0).sum(dim=1)
            ga = ga * w
            (g_gate,) = torch.autograd.grad(g_act, gate_, ga * up)
            ghh = torch.cat((g_gate, ga * g_act.detach()), dim=1)  # (n, 2h)
            if need_up:
                gw13 = ghh.t() @ x.index_select(0, tok)
                gup[cols] = gw13[:h]
                gup[H + e * h : H + (e + 1) * h] = gw13[h:]
            if need_x:
                gx.index_add_(0, tok, ghh @ _w13(w_up, e, h))
        return gx, gup, gdown, gws, None, None, None, None


def _w13(w_up: torch.Tensor, e: int, h: int) -> torch.Tensor:
    """Expert e's [gate_e; up_e] rows as one (2h, d) matrix: one matmul per expert instead of two."""
    H = w_up.shape[0] // 2
    return torch.cat((w_up[e * h : (e + 1) * h], w_up[H + e * h : H + (e + 1) * h]))


def expert_loop(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    ws: torch.Tensor,
    tokens: torch.Tensor,
    counts: list[int],
    act: Callable[[torch.Tensor], torch.Tensor],
    p_drop: float = 0.0,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Run :class:`ExpertLoop`; under autocast, in autocast's dtype (a custom Function is not autocast itself)."""
    if dtype is not None:
        x, w_up, w_down, ws = (t.to(dtype) for t in (x, w_up, w_down, ws))
    with torch.autocast(x.device.type, enabled=False):
        return ExpertLoop.apply(x, w_up, w_down, ws, tokens, counts, act, p_drop)
