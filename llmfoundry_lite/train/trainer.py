"""The one place a Composer ``Trainer`` is built, for pretraining and GLUE alike: device, precision (bf16 on CPU
through autocast), microbatching, the model's runtime check, quiet warnings and the fast CPU-name lookup."""

from __future__ import annotations

from typing import Any, Optional

import torch
from composer import Trainer
from composer.core import Callback, State
from composer.loggers import Logger

from llmfoundry_lite import compat
from llmfoundry_lite.bench import cpu_model
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.quiet import quiet_dependency_warnings


class CPUAutocast(Callback):
    """bf16 autocast around forward and loss on CPU (Composer accepts only fp32 precision on CPU)."""

    def __init__(self) -> None:
        self._ctx: Any = None

    def _enter(self) -> None:
        self._ctx = torch.autocast("cpu", dtype=torch.bfloat16)
        self._ctx.__enter__()

    def _exit(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def before_forward(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._enter()

    def after_loss(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._exit()

    def eval_before_forward(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._enter()

    def eval_after_forward(self, state: State, logger: Logger) -> None:  # noqa: D102
        self._exit()


def resolve_device(requested: Optional[str], key: str = "device") -> str:
    """``auto`` -> ``gpu`` when CUDA is available, else ``cpu``; RecipeError (``key``) for a GPU that is not there."""
    requested = requested or "auto"
    if requested == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if requested == "gpu" and not torch.cuda.is_available():
        raise RecipeError("device 'gpu' requested but CUDA is not available; use device: auto", key=key)
    return requested


def resolve_precision(requested: Optional[str], device_name: str, key: str = "precision") -> str:
    """The recipe's precision, else amp_bf16 on GPU and fp32 elsewhere; only fp32 and amp_bf16 run on CPU."""
    if requested:
        if device_name == "cpu" and requested not in ("fp32", "amp_bf16"):
            raise RecipeError(f"{requested} needs a GPU; use fp32 or amp_bf16 on CPU", key=key)
        return requested
    return "amp_bf16" if device_name == "gpu" else "fp32"


def composer_precision(device_name: str, precision: str) -> str:
    """The precision Composer itself runs with: amp_bf16 on CPU is fp32 with bf16 autocast (:class:`CPUAutocast`).

    What model surgery (e.g. low-precision LayerNorm at Event.INIT) sees, so it matches the Trainer's.
    """
    return "fp32" if device_name == "cpu" and precision == "amp_bf16" else precision


class ReleaseStreaming(Callback):
    """Stop streaming datasets' background threads at fit end, free their shared memory at close (compat explains)."""

    @staticmethod
    def _datasets(state: State) -> list[Any]:
        loaders = [state.train_dataloader] + [e.dataloader.dataloader for e in state.evaluators or []]
        return [loader.dataset for loader in loaders if getattr(loader, "dataset", None) is not None]

    def fit_end(self, state: State, logger: Logger) -> None:  # noqa: D102
        for dataset in self._datasets(state):
            compat.stop_streaming_threads(dataset)

    def close(self, state: State, logger: Logger) -> None:  # noqa: D102
        for dataset in self._datasets(state):
            compat.release_streaming_memory(dataset)


class ClosingTrainer(Trainer):
    """Composer's Trainer, whose ``close()`` also drops what would keep it alive until exit (compat explains)."""

    def close(self) -> None:  # noqa: D102
        super().close()
        compat.release_closed_engine(self)
        compat.clear_state_dict_name_cache()


def make_trainer(
    model: Any,
    train_dataloader: Any,
    eval_dataloader: Any = None,
    *,
    device: Optional[str] = "auto",
    precision: Optional[str] = None,
    callbacks: Optional[list[Any]] = None,
    loggers: Optional[list[Any]] = None,
    device_train_microbatch_size: Any = None,
    key_prefix: str = "",
    **kwargs: Any,
) -> Trainer:
    """A Composer Trainer for ``model`` on ``device`` ("auto", "cpu", "gpu" or "mps"), freed once closed.

    Runs the model's ``check_runtime(device, precision)`` before anything is trained; amp_bf16 on CPU becomes
    fp32 with bf16 autocast around forward and loss; ``auto`` microbatching only on GPU (it searches GPU memory).
    Errors name ``{key_prefix}device`` / ``{key_prefix}precision``. Other keyword arguments go to the Trainer.
    """
    quiet_dependency_warnings()
    compat.use_cpu_model_lookup(cpu_model)  # py-cpuinfo's subprocess: a second of every start-up
    device_name = resolve_device(device, f"{key_prefix}device")
    precision = resolve_precision(precision, device_name, f"{key_prefix}precision")
    check = getattr(model, "check_runtime", None)
    if callable(
        check
    ):  # e.g. a flash-attention model on CPU: one line now, not a traceback at the first batch
        check(device_name, precision)
    callbacks = [*(callbacks or []), ReleaseStreaming()]
    if composer_precision(device_name, precision) != precision:
        callbacks.append(CPUAutocast())
        precision = composer_precision(device_name, precision)
    micro = device_train_microbatch_size
    if micro == "auto" and device_name != "gpu":
        micro = None  # auto microbatching searches for the largest size that fits in GPU memory
    return ClosingTrainer(
        model=model,
        train_dataloader=train_dataloader,
        eval_dataloader=eval_dataloader,
        device=device_name,
        precision=precision,
        callbacks=callbacks,
        loggers=list(loggers or []),
        device_train_microbatch_size=micro,
        **kwargs,
    )
