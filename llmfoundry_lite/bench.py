"""Shared measuring tools: matmul peak, device peak lookup, machine description, interleaved timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from llmfoundry_lite import hardware


def matmul_peak(
    n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> float:
    """Best observed FLOP/s of an ``n x n`` matmul (the CPU 'peak' of BENCHMARKS.md's MFU)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.matmul(a, b)  # first call pays for allocation and thread start-up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _sync(device: str) -> None:
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


def interleaved(
    steps: dict[str, Callable[[], Any]], rounds: int, steps_per_round: int = 1, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per step of each callable, timed in alternating order round by round (noise hits all alike)."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            for _ in range(steps_per_round):
                steps[name]()
            times[name].append((time.perf_counter() - t) / steps_per_round)
    return times


def median(values: list[float]) -> float:
    """Median (statistics.median; here so scripts need one import)."""
    return statistics.median(values)
