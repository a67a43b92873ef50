"""Shared measuring tools: matmul peak, device peak lookup, machine description, interleaved training steps.

``scripts/benchmark.py`` (CPU) and ``scripts/gpu_check.py`` (one GPU) time models with the same pieces here:
:class:`Pair` runs training-step functions over the same batches in interleaved rounds, :func:`train_step_fn`
builds one step (optionally under bf16 autocast), :func:`matmul_peak` measures the peak MFU is quoted against.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from llmfoundry_lite import hardware
from llmfoundry_lite.batch import batch_tokens


def matmul_peak(
    n: int = 2048,
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    inner: int = 1,
) -> float:
    """Best observed FLOP/s of an ``n x n`` matmul (the 'peak' of BENCHMARKS.md's MFU).

    Each of ``repeats`` timings covers ``inner`` back-to-back products and one synchronisation, so on a GPU
    the kernel launch and the sync are amortised (``inner=10`` at n=8192 bf16 is how the GPU check measures).
    """
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(max(1, inner // 2)):  # first calls pay for allocation, thread start-up and clock ramp-up
        torch.matmul(a, b)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b)
        sync(device)
        best = min(best, (time.perf_counter() - t) / inner)
    return 2 * n**3 / best


def sync(device: str | torch.device) -> None:
    """Wait for queued kernels of ``device`` (a no-op on CPU): timings on a GPU end here."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def device_peak(
    device: str = "auto", peak_flops: Optional[float] = None, extra: Optional[dict] = None
) -> tuple[float, str, str]:
    """(peak FLOP/s, accelerator name, where the number came from) of one local device.

    GPU: the bf16 table entry for the detected device name; CPU: a 2048x2048 fp32 matmul measured now.
    ``peak_flops`` (from the recipe or CLI) wins over both.
    """
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu":
        name = torch.cuda.get_device_name()
        kind = hardware.detect_kind(name) or name
        if peak_flops:
            return float(peak_flops), kind, "given"
        entries = hardware.table(extra)
        if kind in entries:
            return entries[kind].peak_flops, kind, "dense bf16 table"
        return 0.0, kind, f"unknown device {name!r}: set cost.peak_flops"
    if peak_flops:
        return float(peak_flops), hardware.CPU, "given"
    return matmul_peak(), hardware.CPU, "measured (2048x2048 fp32 matmul)"


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, else platform)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> dict[str, Any]:
    """CPU, cores, torch threads, accelerator and library versions, for benchmark reports."""
    import composer
    import transformers

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "composer": composer.__version__,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def train_step_fn(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
    autocast: Optional[torch.dtype] = None,
) -> Callable[[dict], None]:
    """One full training step (forward, loss, backward, AdamW) of ``model`` on a batch.

    ``autocast=torch.bfloat16`` runs forward and loss under autocast on the model's device, as Composer's
    ``amp_bf16`` does (fp32 weights and optimizer state, bf16 matmuls).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-5)
    device_type = next(model.parameters()).device.type
    model.train()

    def step(batch: dict) -> None:
        with torch.autocast(device_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


class Pair:
    """Training-step functions (two or more) over the same batches, timed in interleaved rounds.

    The order alternates round by round so machine noise (and GPU clock changes) hit every model alike. Each
    timed chunk ends with a device synchronisation, so GPU timings cover the work, not just its launch.
    Token counts are taken from the batches beforehand: counting inside the timed loop would synchronise.
    """

    def __init__(self, steps: dict[str, Callable[[dict], Any]], batches: list[dict], device: str = "cpu"):
        self.steps = steps
        self.batches = batches
        self.device = device
        self.batch_tokens = [batch_tokens(b).tokens for b in batches]
        self.seconds: dict[str, list[float]] = {n: [] for n in steps}
        self.tokens: dict[str, list[int]] = {n: [] for n in steps}
        self._pos = {n: 0 for n in steps}

    def _run(self, name: str, n: int) -> tuple[float, int]:
        tokens = 0
        sync(self.device)
        t = time.perf_counter()
        for _ in range(n):
            i = self._pos[name] % len(self.batches)
            self._pos[name] += 1
            self.steps[name](self.batches[i])
            tokens += self.batch_tokens[i]
        sync(self.device)
        return time.perf_counter() - t, tokens

    def run(
        self,
        rounds: int,
        steps_per_round: int,
        peaks: Optional[list[float]] = None,
        peak_fn: Optional[Callable[[], float]] = None,
        warmup: int = 1,
    ) -> None:
        """Warm up, then ``rounds`` rounds in alternating order; ``peak_fn()`` is appended to ``peaks`` before each."""
        for name in self.steps:
            self._run(name, warmup)
        names = list(self.steps)
        for r in range(rounds):
            if peaks is not None:
                peaks.append((peak_fn or matmul_peak)())
            for name in names if r % 2 == 0 else names[::-1]:
                dt, tok = self._run(name, steps_per_round)
                self.seconds[name].append(dt)
                self.tokens[name].append(tok)

    def tokens_per_s(self, name: str) -> float:
        """Median over rounds of tokens/s."""
        return statistics.median(t / s for t, s in zip(self.tokens[name], self.seconds[name]))

    def per_round_ratio(self, a: str, b: str) -> list[float]:
        """tokens/s of ``a`` over ``b``, round by round."""
        return [
            (ta / sa) / (tb / sb)
            for ta, sa, tb, sb in zip(self.tokens[a], self.seconds[a], self.tokens[b], self.seconds[b])
        ]
