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
            g_act = act(gate)
            a0 = g_act * up  # before routing weight and dropout
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
            ghh = torch.cat((act_backward(act, ga * up, gate), ga * g_act), dim=1)  # (n, 2h)
            if need_up:
                gw13 = ghh.t() @ x.index_select(0, tok)
                gup[cols] = gw13[:h]
                gup[H + e * h : H + (e + 1) * h] = gw13[h:]
            if need_x:
                gx.index_add_(0, tok, ghh @ _w13(w_up, e, h))
        return gx, gup, gdown, gws, None, None, None, None


class DenseExperts(torch.autograd.Function):
    """k = N: every token through every expert, so the dense matmuls; ``w`` (T, N) scales each expert's block.

    By hand for the same reason as :class:`ExpertLoop`: autograd would keep the activation before and after the
    weighting and allocate both gradients (four more ``T x H`` tensors); here the weighting is in place and the
    gradient of ``[gate | up]`` is written into one buffer.
    """

    @staticmethod
    def forward(ctx, x, w_up, w_down, w, act, p_drop):
        T, H = x.shape[0], w_down.shape[1]
        N = w.shape[1]
        hh = F.linear(x, w_up)
        gate, up = hh.split(H, dim=1)
        a = act(gate).mul_(up)
        a.view(T, N, H // N).mul_(w[:, :, None])
        mask = None
        if p_drop > 0:
            mask = torch.empty_like(a).bernoulli_(1 - p_drop).div_(1 - p_drop)
            a.mul_(mask)
        ctx.save_for_backward(x, w_up, w_down, w, hh, a)
        ctx.act, ctx.mask = act, mask
        return F.linear(a, w_down)

    @staticmethod
    def backward(ctx, grad_out):
        x, w_up, w_down, w, hh, a = ctx.saved_tensors
        act, mask = ctx.act, ctx.mask
        need_x, need_up, need_down, need_w = ctx.needs_input_grad[:4]
        T, H = x.shape[0], w_down.shape[1]
        N = w.shape[1]
        gate, up = hh.split(H, dim=1)
        g_down = grad_out.t().mm(a) if need_down else None
        ga = grad_out.mm(w_down)  # gradient of the weighted (and dropped) activation
        if mask is not None:
            ga.mul_(mask)
        s = act(gate)
        g_w = None
        if need_w:
            g_w = (ga.view(T, N, -1) * (s * up).view(T, N, -1)).sum(-1)
        ga.view(T, N, H // N).mul_(w[:, :, None])
        ghh = torch.empty_like(hh)
        torch.mul(ga, s, out=ghh[:, H:])
        ghh[:, :H] = act_backward(act, ga.mul_(up), gate)
        g_x = ghh.mm(w_up) if need_x else None
        g_up = ghh.t().mm(x) if need_up else None
        return g_x, g_up, g_down, g_w, None, None


def act_backward(
    act: Callable[[torch.Tensor], torch.Tensor], grad: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """d act(x) / dx times ``grad``: torch's own backward kernels for SiLU and exact GELU, autograd otherwise."""
    if act is F.silu:
        return torch.ops.aten.silu_backward(grad, x)
    if act is F.gelu:
        return torch.ops.aten.gelu_backward(grad, x, approximate="none")
    with torch.enable_grad():
        x_ = x.detach().requires_grad_()
        return torch.autograd.grad(act(x_), x_, grad)[0]


def dense_experts(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    w: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    p_drop: float = 0.0,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Run :class:`DenseExperts` (autocast as :func:`expert_loop`)."""
    return _apply(DenseExperts, (x, w_up, w_down, w), (act, p_drop), dtype)


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
    return _apply(ExpertLoop, (x, w_up, w_down, ws), (tokens, counts, act, p_drop), dtype)


def _apply(fn: type, tensors: tuple, rest: tuple, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``fn.apply(*tensors, *rest)`` with the tensors in ``dtype`` (autocast's, if any) and autocast off inside."""
    if dtype is not None:
        tensors = tuple(t.to(dtype) for t in tensors)
    with torch.autocast(tensors[0].device.type, enabled=False):
        return fn.apply(*tensors, *rest)
