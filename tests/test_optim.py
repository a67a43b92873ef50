"""``decoupled_adamw`` is Composer's DecoupledAdamW updated by torch's fused kernel: the same parameters after a
schedule of steps, the same state (checkpoints load either way), and Composer's loop where the kernel does not apply."""

from __future__ import annotations

import copy

import pytest
import torch
from composer.optim import DecoupledAdamW as ComposerAdamW

from llmfoundry_lite import registry
from llmfoundry_lite.train.optim import DecoupledAdamW

SHAPES = [(300, 16), (16,), (48, 16), (7,)]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def _run(cls, params, steps: int, lrs=None, **kw) -> torch.optim.Optimizer:
    opt = cls(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-3, **kw)
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        for p in params:
            p.grad = None if (i == 1 and p.ndim == 1) else torch.randn(p.shape, generator=g)  # a skipped grad
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[i]  # a schedule: decay follows lr / initial_lr
        opt.step()
    return opt


@pytest.mark.parametrize("amsgrad", [False, True])
def test_fused_update_equals_composers(amsgrad):
    lrs = [1e-2, 1e-2, 5e-3, 2e-3, 1e-3, 1e-4]
    ours, theirs = _params(), _params()
    o = _run(DecoupledAdamW, ours, 6, lrs, amsgrad=amsgrad)
    c = _run(ComposerAdamW, theirs, 6, lrs, amsgrad=amsgrad)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    for pa, pb in zip(ours, theirs):
        sa, sb = o.state[pa], c.state[pb]
        assert sa.keys() == sb.keys() and float(sa["step"]) == float(sb["step"])
        assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], atol=1e-7)
    assert o.param_groups[0]["initial_lr"] == c.param_groups[0]["initial_lr"] == 1e-2


def test_state_loads_across_composers_optimizer_and_ours():
    # Composer's checkpoint into ours (a CPU ``step`` as torch's load_state_dict leaves it), then both go on.
    ours, theirs = _params(), _params()
    c = _run(ComposerAdamW, theirs, 3)
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.copy_(b)
    o = DecoupledAdamW(ours, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-3)
    o.load_state_dict(copy.deepcopy(c.state_dict()))  # as from disk: torch would share the moment tensors
    for opt, params in ((o, ours), (c, theirs)):
        g = torch.Generator().manual_seed(7)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    back = ComposerAdamW(theirs, lr=1e-2)
    back.load_state_dict(copy.deepcopy(o.state_dict()))  # and ours into Composer's
    assert float(back.state[theirs[0]]["step"]) == 4.0


def test_an_initial_lr_of_zero_takes_composers_loop(monkeypatch):
    # Composer then decays by weight_decay alone; the fused kernel cannot express that.
    calls = []
    monkeypatch.setattr(ComposerAdamW, "adamw", staticmethod(lambda *a, **k: calls.append(1)))
    ps = _params()
    opt = DecoupledAdamW(ps, lr=0.0, weight_decay=1e-3)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert calls == [1]


def test_the_registry_builds_ours():
    ps = _params()
    opt = registry.build("optimizers", {"name": "decoupled_adamw", "lr": 1e-3}, "optimizer", params=ps)
    assert type(opt) is DecoupledAdamW and isinstance(opt, ComposerAdamW)
    # Composer keys a checkpoint's optimizer state by the class's qualname: runs saved before this class still load.
    assert DecoupledAdamW.__qualname__ == ComposerAdamW.__qualname__


def test_only_plain_tensors_take_the_fused_kernel():
    from torch.distributed.fsdp._flat_param import FlatParameter
    from torch.distributed.tensor import DTensor

    from llmfoundry_lite.train.optim import _fusable

    assert _fusable(torch.nn.Parameter(torch.ones(2))) and _fusable(torch.ones(2, dtype=torch.bfloat16))
    assert FlatParameter.__torch_dispatch__ is torch.Tensor.__torch_dispatch__  # FSDP1's flat parameters fuse
    assert DTensor.__torch_dispatch__ is not torch.Tensor.__torch_dispatch__  # FSDP2's DTensors take the loop
    assert not _fusable(torch.ones(2, dtype=torch.int64))
