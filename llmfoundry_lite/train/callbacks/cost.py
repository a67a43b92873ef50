"""`cost_monitor`: MFU, throughput and dollars while a run trains, logged to every logger.

Metrics (every batch):

==========================  ====================================================================
``cost/mfu``                model FLOPs / (devices x peak) over the last ``window_size`` batches
``cost/tokens_per_sec``     tokens/s over the window (all devices)
``cost/flops_per_sec``      model FLOP/s over the window (all devices)
``cost/gpu_hours``          device-hours elapsed since the run started (resumed runs included)
``cost/usd``                dollars spent so far (device-hours x price)
``cost/usd_projected``      projected dollars for the whole run (Composer's RuntimeEstimator)
``cost/hours_projected``    projected wall-clock hours for the whole run
==========================  ====================================================================

Peak per device: on GPU the dense bf16 table entry of the detected (or named) device (llmfoundry_lite.hardware);
on CPU a 2048x2048 fp32 matmul measured at fit start (~0.5 s), even when the recipe names a GPU (the cluster it
is meant for); ``peak_flops`` overrides both. Dollars only with a price: the table's for a GPU, else the one
given (on CPU only when no GPU is named, so a GPU's price never bills a CPU run). Model FLOPs come
from the model's ``flops_per_batch`` (MFU is not logged for models without it).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Optional

from composer.callbacks import RuntimeEstimator
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from llmfoundry_lite import hardware, registry
from llmfoundry_lite.models.accounting import model_flops

METRICS = (
    "cost/mfu",
    "cost/tokens_per_sec",
    "cost/flops_per_sec",
    "cost/gpu_hours",
    "cost/usd",
    "cost/usd_projected",
    "cost/hours_projected",
)


class _Capture:
    """A stand-in Logger for the inner RuntimeEstimator: keeps what it logs instead of logging it twice."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        self.metrics.update(metrics)

    def log_hyperparameters(self, hparams: dict[str, Any]) -> None:
        pass


@registry.callbacks.register("cost_monitor")
class CostMonitor(Callback):
    """Logs MFU, tokens/s, GPU-hours, dollars so far and projected total dollars to every logger."""

    def __init__(
        self,
        gpu: Optional[str] = None,
        usd_per_gpu_hour: Optional[float] = None,
        peak_flops: Optional[float] = None,
        window_size: int = 10,
        hardware: Optional[dict] = None,
    ) -> None:
        if window_size < 1:
            from llmfoundry_lite.errors import RecipeError

            raise RecipeError(
                f"must be at least 1, got {window_size}", key="callbacks.cost_monitor.window_size"
            )
        self.gpu = gpu
        self.usd_per_gpu_hour = usd_per_gpu_hour
        self.peak_flops = peak_flops
        self.window_size = window_size
        self.hardware = hardware
        self.peak: float = 0.0
        self.device_kind: str = ""
        self.peak_source: str = ""
        self.price: float = 0.0
        self.devices = 1
        self._window: deque[tuple[float, int, float]] = deque(maxlen=window_size + 1)
        self._t0 = 0.0
        self._wct0 = 0.0
        self._runtime = RuntimeEstimator(skip_batches=1, time_unit="seconds")
        self._capture = _Capture()
        self._has_flops = True
        self._eval_t0: Optional[float] = None

    # Resolving the device and price happens at fit start, once the device is known.
    def fit_start(self, state: State, logger: Logger) -> None:
        """Find the per-device peak and price, start the clocks."""
        from llmfoundry_lite import bench

        self.devices = dist.get_world_size()
        on_gpu = state.device.name == "gpu"
        # A GPU named in the recipe (its cost: block) describes the cluster it is meant for, not this CPU.
        gpu = self.gpu if on_gpu else None
        if gpu and self.peak_flops is None:
            entry = hardware.lookup(gpu, self.hardware, key="callbacks.cost_monitor.gpu")
            self.peak, self.device_kind, self.peak_source = entry.peak_flops, hardware.normalize(gpu), "table"
        else:
            self.peak, self.device_kind, self.peak_source = bench.device_peak(
                "gpu" if on_gpu else "cpu", self.peak_flops, self.hardware
            )
            if gpu:
                self.device_kind = hardware.normalize(gpu)
        if self.usd_per_gpu_hour is not None and (on_gpu or not self.gpu):
            self.price = float(self.usd_per_gpu_hour)
        elif on_gpu:
            entry = hardware.table(self.hardware).get(self.device_kind)
            self.price = entry.usd_per_gpu_hour if entry else 0.0
        else:  # a CPU has no list price: dollars only when the user gave one for it
            self.price = 0.0
        logger.log_hyperparameters(
            {
                "cost/device": self.device_kind,
                "cost/devices": self.devices,
                "cost/peak_flops_per_device": self.peak,
                "cost/peak_source": self.peak_source,
                "cost/usd_per_device_hour": self.price,
            }
        )
        self._t0 = time.perf_counter()
        self._wct0 = state.timestamp.total_wct.total_seconds()
        self._window.clear()
        self._window.append((self._t0, int(state.timestamp.token), 0.0))
        self._runtime.init(state, self._capture)

    def batch_start(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._runtime.batch_start(state, self._capture)

    def eval_start(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._eval_t0 = time.perf_counter()

    def eval_end(self, state: State, logger: Logger) -> None:
        """Keep evaluation time out of the throughput window (it still counts as money spent)."""
        self._runtime.eval_end(state, self._capture)
        if self._eval_t0 is not None:
            pause = time.perf_counter() - self._eval_t0
            self._window = deque(
                ((t + pause, tok, fl) for t, tok, fl in self._window), maxlen=self._window.maxlen
            )
            self._eval_t0 = None

    def _model_flops(self, state: State) -> float:
        if not self._has_flops:
            return 0.0
        flops = model_flops(state.model, state.batch)
        if flops is None:
            self._has_flops = False
            return 0.0
        # Per-device batch; ranks see batches of the same shape, so scale by the device count.
        return flops * self.devices

    def batch_end(self, state: State, logger: Logger) -> None:
        """Log the cost metrics for this batch."""
        self._runtime.batch_end(state, self._capture)
        now = time.perf_counter()
        prev_flops = self._window[-1][2] if self._window else 0.0
        self._window.append((now, int(state.timestamp.token), prev_flops + self._model_flops(state)))
        t_a, tok_a, fl_a = self._window[0]
        dt = now - t_a
        metrics: dict[str, float] = {}
        if dt > 0:
            metrics["cost/tokens_per_sec"] = (int(state.timestamp.token) - tok_a) / dt
            if self._has_flops:
                flops_per_sec = (self._window[-1][2] - fl_a) / dt
                metrics["cost/flops_per_sec"] = flops_per_sec
                if self.peak > 0:
                    metrics["cost/mfu"] = flops_per_sec / (self.peak * self.devices)
        elapsed = self._wct0 + (now - self._t0)
        gpu_hours = elapsed / 3600.0 * self.devices
        metrics["cost/gpu_hours"] = gpu_hours
        if self.price > 0:  # no price (a CPU, an unknown device): no dollars rather than $0.00
            metrics["cost/usd"] = gpu_hours * self.price
        total = self._projected_seconds(state, elapsed)
        if total is not None:
            metrics["cost/hours_projected"] = total / 3600.0
            if self.price > 0:
                metrics["cost/usd_projected"] = total / 3600.0 * self.devices * self.price
        logger.log_metrics(metrics)

    def _projected_seconds(self, state: State, elapsed: float) -> Optional[float]:
        """Elapsed plus Composer's remaining-time estimate; elapsed / fraction done until it has one."""
        remaining = self._capture.metrics.get("time/remaining_estimate")
        if remaining is not None:
            return elapsed + float(remaining)
        try:
            frac = float(state.get_elapsed_duration())
        except Exception:
            return None
        return elapsed / frac if frac > 0 else None


def apply_recipe_cost(cfg: Any, callbacks: list) -> None:
    """Fill unset ``cost_monitor`` arguments from the recipe's ``cost:`` block; add one if the block exists alone.

    For ``build_trainer``: a recipe with a ``cost:`` block gets dollars in its logs without also listing the
    callback.
    """
    block = cfg.get("cost") if hasattr(cfg, "get") else None
    cost = hardware.parse_cost(block)
    if block is not None and not any(isinstance(cb, CostMonitor) for cb in callbacks):
        callbacks.append(CostMonitor())
    for cb in callbacks:
        if isinstance(cb, CostMonitor):
            cb.gpu = cb.gpu or cost.gpu
            cb.usd_per_gpu_hour = (
                cb.usd_per_gpu_hour if cb.usd_per_gpu_hour is not None else cost.usd_per_gpu_hour
            )
            cb.peak_flops = cb.peak_flops if cb.peak_flops is not None else cost.peak_flops
            cb.hardware = {**(cost.hardware or {}), **(cb.hardware or {})} or None
