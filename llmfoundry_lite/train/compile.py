"""``compile:`` in a recipe: ``torch.compile`` applied to each transformer block, from outside the model code, and
a callback that counts what the compiler did (graphs, recompiles, graph breaks, seconds) and logs it.

Per block rather than the whole model (or Composer's ``compile_config``, which compiles the whole model): the
blocks are the units FSDP shards and activation checkpointing recomputes, so compiling each one in place
(``nn.Module.compile``) leaves both wrappers, the parameter names and the checkpoints exactly as in eager mode;
every block shares one compiled graph (same code, parameters are graph inputs), so L blocks cost one compile.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from llmfoundry_lite.errors import RecipeError, first_line
from llmfoundry_lite.recipe import CompileConfig, compile_settings

# torch's artifact logger for "why did this function recompile" (enabled by torch._logging.set_logs).
RECOMPILES_LOGGER = "torch._dynamo.guards.__recompiles"
# compilation_time_metrics keys that cover a whole compile: forward (dynamo + backend) and the lazy backward.
_COMPILE_TIME_KEYS = ("_compile.compile_inner", "backward._backward_impl")


def compile_units(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: modules its family declares as both FSDP and checkpointing units.

    Read from the hooks the families already define for Composer (``fsdp_wrap_fn``, ``activation_checkpointing_fn``),
    so the blocks compiled are exactly the ones FSDP wraps; an embedding that is its own FSDP unit is left eager.
    """
    units: list[nn.Module] = []
    seen: set[int] = set()
    for owner in model.modules():
        wrap = getattr(owner, "fsdp_wrap_fn", None)
        ckpt = getattr(owner, "activation_checkpointing_fn", None)
        if not callable(wrap) and not callable(ckpt):
            continue
        for m in owner.modules():
            is_block = (not callable(wrap) or wrap(m)) and (not callable(ckpt) or ckpt(m))
            if m is not owner and is_block and id(m) not in seen:
                seen.add(id(m))
                units.append(m)
    return units


def compile_kwargs(settings: CompileConfig) -> dict[str, Any]:
    """``torch.compile`` keyword arguments for the settings (``mode`` only means something to inductor)."""
    kwargs: dict[str, Any] = {
        "backend": settings.backend,
        "fullgraph": settings.fullgraph,
        "dynamic": None if settings.dynamic == "auto" else settings.dynamic,
    }
    if settings.backend == "inductor":
        kwargs["mode"] = settings.mode
    return kwargs


def apply_compile(model: nn.Module, value: Any, model_name: str = "model") -> int:
    """Compile each block of ``model`` in place as the recipe's ``compile:`` value asks; the number compiled.

    RecipeError (key ``compile``) for a model that declares no blocks (the Hugging Face baselines).
    """
    settings = value if isinstance(value, CompileConfig) else compile_settings(value)
    if settings is None:
        return 0
    units = compile_units(model)
    if not units:
        raise RecipeError(
            f"model {model_name!r} declares no transformer blocks (fsdp_wrap_fn) to compile one by one; "
            "remove compile, or use mosaic_bert, bert or llama",
            key="compile",
        )
    kwargs = compile_kwargs(settings)
    # Dynamo's caches are keyed by code object, process-wide: graphs that an earlier run in this process (a
    # notebook, a test session) compiled for the same block class, with another backend or shapes, would count as
    # this run's recompiles. A run starts from a clean cache, as a fresh `train` process does.
    import torch._dynamo

    torch._dynamo.reset()
    for unit in units:
        if settings.dynamic == "auto":
            _compile_at_first_call(unit, kwargs)
        else:
            unit.compile(**kwargs)
    return len(units)


def _compile_at_first_call(unit: nn.Module, kwargs: dict[str, Any]) -> None:
    """``dynamic: auto``: compile at the first call, when the input is seen; a flat token stream is traced dynamic.

    An unpadded block (MosaicBERT) sees (tokens, d) with a different token count every batch: torch's automatic
    dynamic shapes would recompile every graph piece once on the second batch, symbolic shapes from the start do
    not. Padded (batch, seq, d) inputs keep torch's default (static until a size changes). The first call is
    compiled too, so a resumed run computes every batch as the uninterrupted one did.
    """
    eager = unit.forward
    compiled: list[Any] = []

    def forward(*args: Any, **kw: Any) -> Any:
        if not compiled:
            x = args[0] if args else None
            flat = isinstance(x, torch.Tensor) and x.dim() == 2
            compiled.append(torch.compile(eager, **{**kwargs, "dynamic": True if flat else None}))
        return compiled[0](*args, **kw)

    unit.forward = forward  # an instance attribute: parameters, hooks, FSDP and checkpoint wrappers unchanged


class _Recompiles(logging.Handler):
    """Keeps torch's recompile messages (count and the last guard that failed) instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self.last_cause = ""

    def emit(self, record: logging.LogRecord) -> None:  # noqa: D102
        text = record.getMessage()
        if "Recompiling function" not in text:
            return
        self.count += 1
        lines = [ln.strip() for ln in text.splitlines()]
        where = lines[0].replace("Recompiling function ", "")
        guard = next((ln[2:] for ln in lines if ln.startswith("- ")), "")
        self.last_cause = f"{where}: {guard}" if guard else where


class CompileMonitor(Callback):
    """Logs ``compile/seconds``, ``compile/graphs``, ``compile/recompiles`` and ``compile/graph_breaks`` whenever
    they change (before the progress line reads them), and prints one warning line, once, naming the cause when
    recompiles or graph breaks exceed ``warn_recompiles``."""

    def __init__(self, warn_recompiles: int = 3) -> None:
        self.warn_recompiles = warn_recompiles
        self._handler = _Recompiles()
        self._base: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._warned = False

    @staticmethod
    def _totals() -> dict[str, float]:
        from torch._dynamo.utils import counters

        return {
            "seconds": compile_seconds(),
            "graphs": float(counters["stats"]["unique_graphs"]),
            "graph_breaks": float(sum(counters["graph_break"].values())),
        }

    def fit_start(self, state: State, logger: Logger) -> None:  # noqa: D102
        self.start()

    def start(self) -> None:
        """Start counting (counters are process-wide: what earlier runs in this process compiled is subtracted)."""
        log = logging.getLogger(RECOMPILES_LOGGER)
        if self._handler not in log.handlers:
            import torch._logging

            torch._logging.set_logs(recompiles=True)  # enables the artifact; our handler keeps it off stderr
            log.addHandler(self._handler)
            log.propagate = False
        self._base = self._totals()

    def stats(self) -> dict[str, float]:
        """Compile seconds, graphs, recompiles and graph breaks since fit start."""
        now = self._totals()
        out = {k: now[k] - self._base.get(k, 0.0) for k in now}
        out["recompiles"] = float(self._handler.count)
        return out

    def after_train_batch(self, state: State, logger: Logger) -> None:
        """Log the counters when they changed; warn once past the threshold."""
        stats = self.stats()
        if stats != self._last:
            logger.log_metrics({f"compile/{k}": v for k, v in stats.items()})
            self._last = stats
        if self._warned:
            return
        cause = self._cause(stats)
        if cause is not None:
            self._warned = True
            if dist.get_global_rank() == 0:
                print(f"warning: torch.compile {cause}", flush=True)

    def _cause(self, stats: dict[str, float]) -> Optional[str]:
        if stats["recompiles"] > self.warn_recompiles:
            return (
                f"recompiled {int(stats['recompiles'])} times (more than compile.warn_recompiles="
                f"{self.warn_recompiles}); last cause: {self._handler.last_cause}"
            )
        if stats["graph_breaks"] > self.warn_recompiles:
            from torch._dynamo.utils import counters

            reason, _ = counters["graph_break"].most_common(1)[0]
            first = first_line(reason)
            return (
                f"broke the graph {int(stats['graph_breaks'])} times (more than compile.warn_recompiles="
                f"{self.warn_recompiles}); most frequent cause: {first}"
            )
        return None

    def close(self, state: State, logger: Logger) -> None:  # noqa: D102
        log = logging.getLogger(RECOMPILES_LOGGER)
        if self._handler in log.handlers:
            log.removeHandler(self._handler)


def compile_seconds() -> float:
    """Seconds spent compiling in this process so far (forward and backward graphs)."""
    from torch._dynamo.utils import compilation_time_metrics

    return sum(sum(compilation_time_metrics.get(k, ())) for k in _COMPILE_TIME_KEYS)
