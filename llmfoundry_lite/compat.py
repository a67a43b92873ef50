"""Every place this project leans on a dependency's private internals or exact wording, in one module.

Each helper says what it relies on and why; ``tests/test_compat.py`` fails loudly, naming the helper, when an
upgrade changes that behaviour. Upgrading Composer, streaming, transformers or typer/click: run it first.
Only the standard library at import time: the CLI imports this module before torch loads.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.abc
import importlib.util
import re
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

# ---------------------------------------------------------------------------------------------------------
# Python itself
# ---------------------------------------------------------------------------------------------------------


def exit_fast(code: int) -> None:
    """End the process with ``code`` after everything a normal exit runs, minus the interpreter's teardown.

    After a run, CPython's finalisation (clearing the modules of torch, Composer, transformers one object at a
    time) takes ~1.3 s of a 3-batch CLI run's ~9 s and does nothing a user needs. This does what matters of a normal
    exit, in its order — wait for non-daemon threads and executors (``threading._shutdown``), run the ``atexit``
    handlers (logging, wandb, streaming's shared-memory cleanup, weakref finalizers; ``atexit._run_exitfuncs``),
    flush every open writable file — then ``os._exit``. Relies on those two private functions (tested).
    """
    import gc
    import io
    import itertools
    import os
    import threading

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    # Buffered files nobody closed would lose their tail to os._exit. ~400k live objects after a run: an ABC
    # subclass check per object took 0.5 s, so pick the file types once and filter in C (0.1 s). type(), not
    # isinstance: isinstance reads __class__, which some objects warn on.
    objs = gc.get_objects()
    file_types = {t for t in set(map(type, objs)) if issubclass(t, io.IOBase)}
    for obj in itertools.compress(objs, map(file_types.__contains__, map(type, objs))):
        with contextlib.suppress(Exception):
            if not obj.closed and obj.writable():
                obj.flush()
    os._exit(code)


# ---------------------------------------------------------------------------------------------------------
# Composer
# ---------------------------------------------------------------------------------------------------------


def use_cpu_model_lookup(lookup: Callable[[], str]) -> None:
    """Answer Composer's CPU-model lookup (``collect_env.get_cpu_model``) with ``lookup``.

    ``Trainer.__init__`` logs the CPU model through py-cpuinfo, which starts a subprocess (about a second, a sixth
    of a small run's start-up); ``/proc/cpuinfo`` gives the same string. Relies on ``get_composer_env_dict``
    calling the module-level ``get_cpu_model`` at call time.
    """
    from composer.utils import collect_env

    collect_env.get_cpu_model = lookup


def restore_checkpoint_rng(trainer: Any) -> bool:
    """Restore the RNG state Composer loaded from a checkpoint but kept pending; True when there was one.

    Composer keeps it in ``Trainer._rng_state`` and restores it only at an epoch boundary or while spinning a
    dataloader; a streaming dataset resumes itself mid-epoch, so without this the resumed run would draw random
    numbers from a fresh stream. Clearing it afterwards stops Composer from restoring it a second time.
    """
    state = getattr(trainer, "_rng_state", None)
    if state is None:
        return False
    from composer.utils import reproducibility

    reproducibility.load_rng_state(state)
    trainer._rng_state = None
    return True


def save_checkpoint_now(saver: Any, state: Any, logger: Any) -> None:
    """Have Composer's ``CheckpointSaver`` write a checkpoint of ``state`` now (outside its schedule).

    Its private ``_save_checkpoint(state, logger)`` is the save the schedule itself runs: file name, the
    ``latest`` symlink, pruning to ``save_num_checkpoints_to_keep``, uploads. A preempted run needs exactly that.
    """
    saver._save_checkpoint(state, logger)


# Composer releases whose Engine registers the exit hook that ``release_closed_engine`` removes (tests/test_compat.py).
ENGINE_EXIT_HOOK_VERSIONS = ("0.32.",)


def release_closed_engine(trainer: Any) -> bool:
    """Remove the ``atexit`` close that a now-closed Trainer's Composer ``Engine`` registered; True when removed.

    ``Engine.__init__`` registers ``atexit.register(Engine._close, state, logger)`` and ``Engine.close()`` never
    unregisters it, so the State of every Trainer (model, optimizer, data loaders, their streaming datasets) lives
    until the process exits: one more per run in a notebook or an in-process sweep. ``atexit.unregister`` removes
    every registration of a function (it compares the function, not its arguments), so the engines still open are
    registered again. Relies on the static ``Engine._close`` registered with ``(state, logger)`` and on ``close()``
    setting ``_is_closed`` (tested); a Composer outside ``ENGINE_EXIT_HOOK_VERSIONS`` is left alone.
    """
    import gc

    import composer
    from composer.core.engine import Engine

    engine = getattr(trainer, "engine", None)
    if not composer.__version__.startswith(ENGINE_EXIT_HOOK_VERSIONS) or not getattr(
        engine, "_is_closed", False
    ):
        return False
    atexit.unregister(Engine._close)
    for other in [o for o in gc.get_objects() if type(o) is Engine and not o._is_closed]:
        atexit.register(Engine._close, other.state, other.logger)
    return True


def clear_state_dict_name_cache() -> bool:
    """Empty torch's unbounded cache of parameter names per (model, name); True when there was one to empty.

    ``torch.distributed.checkpoint.state_dict._get_fqns`` is an ``lru_cache(maxsize=None)`` keyed by the model
    itself, filled by every checkpoint Composer saves through ``get_model_state_dict``: it keeps each saved model
    alive until the process exits. Clearing it is safe (names are recomputed on the next call).
    """
    from torch.distributed.checkpoint import state_dict

    cache_clear = getattr(getattr(state_dict, "_get_fqns", None), "cache_clear", None)
    if cache_clear is None:
        return False
    cache_clear()
    return True


# ---------------------------------------------------------------------------------------------------------
# Start-up: what ``import composer`` pulls in that no run of ours uses
# ---------------------------------------------------------------------------------------------------------

# ``import composer`` imports torchmetrics, whose package __init__ imports every metric module: BERTScore's
# ``from transformers import AutoModel, AutoTokenizer`` loads transformers' modelling and generation code (and
# through it sklearn.metrics, scipy.stats and pandas), the audio metrics ``import scipy.signal``; Composer's
# MosaicML-platform logger imports mcli; ``composer.algorithms`` imports transformers' BERT, whose generation code
# imports sklearn.metrics for assisted decoding. None of it runs in a training run: on a 2-core CPU it is ~1.7 s of CPU and
# ~150 MB of the 3-batch smoke run (scripts/benchmark_cli.py). Installed when this module is imported (the CLI
# imports it before torch), it acts only on an import of torchmetrics or mcli that has not happened yet:
# - during torchmetrics' own import, ``transformers.AutoModel``/``AutoTokenizer`` are stand-ins that forward every
#   attribute (``from_pretrained``) to the real class, which loads then; once torchmetrics is imported they are
#   removed, so any later ``from transformers import AutoModel`` gets the real class;
# - during it, ``scipy.signal`` is a stand-in with the ``hamming`` torchmetrics checks for (a shim for SRMRpy, a
#   speech metric's optional dependency: the one behaviour that goes); any other name loads the real module;
# - during the import of transformers' candidate_generator, ``sklearn.metrics`` is a stand-in whose ``roc_curve``
#   imports the real one when called;
# - during the import of transformers' losses (modeling_utils), ``scipy.optimize`` is a stand-in whose
#   ``linear_sum_assignment`` (object-detection matching) imports the real one when called;
# - during the import of torchmetrics' plotting helpers, ``matplotlib`` (axes, colors, pyplot) is a stand-in: the
#   type aliases are classes that import the real one on an isinstance check, ``plt.style.context`` forwards;
# - mcli is a lazy module (``importlib.util.LazyLoader``): executed on first attribute access.


class _Forward:
    """Stand-in for ``module.name`` (a dotted name): every attribute access or call loads the real object."""

    def __init__(self, module: str, name: str) -> None:
        self._where = (module, name)

    def _target(self) -> Any:
        module, name = self._where
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._target(), attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._target()(*args, **kwargs)


class _ForwardTypeMeta(type):
    """isinstance/issubclass against a class that is imported on the first such check."""

    _where: tuple[str, str]

    def _target(cls) -> type:
        module, name = cls._where
        return getattr(importlib.import_module(module), name)

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, cls._target())

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, cls._target())


def _forward_type(module: str, name: str) -> type:
    """Stand-in for the class ``module.name`` where a type is needed (type hints, isinstance)."""
    return _ForwardTypeMeta(name, (), {"_where": (module, name)})


def _stand_in(name: str, **forwards: Any) -> types.ModuleType:
    """A module ``name`` holding ``forwards``; any other attribute drops it and imports the real module."""
    stand_in = types.ModuleType(name)
    vars(stand_in).update(forwards)

    def __getattr__(attr: str) -> Any:
        if attr.startswith(
            "__"
        ):  # the import system probing (__path__ for ``from x import y``): not a package
            raise AttributeError(attr)
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
        return getattr(importlib.import_module(name), attr)

    stand_in.__getattr__ = __getattr__  # type: ignore[attr-defined]
    return stand_in


def _signal_stand_in() -> types.ModuleType:
    # Through the module itself: called while the stand-in is in place, it swaps in the real scipy.signal.
    return _stand_in("scipy.signal", hamming=_Forward("scipy.signal", "windows.hamming"))


@contextlib.contextmanager
def _modules_stood_in(stand_ins: dict[str, types.ModuleType]) -> Iterator[None]:
    """``sys.modules`` entries for modules not imported yet, removed (with parent bindings) afterwards."""
    placed = {n: m for n, m in stand_ins.items() if n not in sys.modules}
    sys.modules.update(placed)
    try:
        yield
    finally:
        for name, mod in placed.items():
            if sys.modules.get(name) is mod:
                del sys.modules[name]
            parent, _, child = name.rpartition(".")
            if parent and vars(sys.modules.get(parent, types.ModuleType(parent))).get(child) is mod:
                delattr(sys.modules[parent], child)


@contextlib.contextmanager
def _sklearn_stand_ins() -> Iterator[None]:
    # transformers' assisted generation imports sklearn.metrics.roc_curve at import (sklearn, scipy.stats, pandas)
    if "sklearn" in sys.modules or importlib.util.find_spec("sklearn") is None:
        yield
        return
    with _modules_stood_in(
        {
            "sklearn": _stand_in("sklearn"),
            "sklearn.metrics": _stand_in(
                "sklearn.metrics", roc_curve=_Forward("sklearn.metrics", "roc_curve")
            ),
        }
    ):
        yield


@contextlib.contextmanager
def _torchmetrics_stand_ins() -> Iterator[None]:
    placed: list[str] = []
    transformers = None
    if importlib.util.find_spec("transformers") is not None:
        transformers = importlib.import_module("transformers")  # its lazy top level only (~0.3 s)
        for name in ("AutoModel", "AutoTokenizer"):
            if name not in vars(transformers):  # not resolved yet (a resolved class is cheap to keep)
                setattr(transformers, name, _Forward("transformers", name))
                placed.append(name)
    signal = {"scipy.signal": _signal_stand_in()} if importlib.util.find_spec("scipy") is not None else {}
    try:
        with _modules_stood_in(signal):
            yield
    finally:
        for name in placed:
            if isinstance(vars(transformers).get(name), _Forward):
                delattr(transformers, name)  # later lookups resolve the real class


@contextlib.contextmanager
def _scipy_optimize_stand_ins() -> Iterator[None]:
    # transformers' object-detection losses (imported by modeling_utils, so by any model class or
    # composer.algorithms) import scipy.optimize.linear_sum_assignment at import: ~0.4 s of scipy.linalg/optimize.
    if "scipy.optimize" in sys.modules or importlib.util.find_spec("scipy") is None:
        yield
        return
    forward = _Forward("scipy.optimize", "linear_sum_assignment")
    with _modules_stood_in({"scipy.optimize": _stand_in("scipy.optimize", linear_sum_assignment=forward)}):
        yield


class _LazyStyleContext(contextlib.ContextDecorator):
    """``plt.style.context(*args)`` made on entry: torchmetrics decorates its plot functions with one at import."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs
        self.entered: list[Any] = []

    def __enter__(self) -> Any:
        import matplotlib.pyplot as plt

        cm = plt.style.context(*self.args, **self.kwargs)
        self.entered.append(cm)
        return cm.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.entered.pop().__exit__(*exc)


@contextlib.contextmanager
def _matplotlib_stand_ins() -> Iterator[None]:
    # torchmetrics' plotting helpers import matplotlib.pyplot at import (~0.25 s) for type aliases and
    # ``plt.style.context``; a metric's .plot() is the only user.
    if "matplotlib" in sys.modules or importlib.util.find_spec("matplotlib") is None:
        yield
        return
    axes = _stand_in("matplotlib.axes", Axes=_forward_type("matplotlib.axes", "Axes"))
    style = types.SimpleNamespace(context=_LazyStyleContext)
    colors = _stand_in("matplotlib.colors", Colormap=_forward_type("matplotlib.colors", "Colormap"))
    pyplot = _stand_in(
        "matplotlib.pyplot",
        Figure=_forward_type("matplotlib.figure", "Figure"),
        style=style,
    )
    mpl = _stand_in("matplotlib", axes=axes, colors=colors, pyplot=pyplot)
    with _modules_stood_in(
        {"matplotlib": mpl, "matplotlib.axes": axes, "matplotlib.colors": colors, "matplotlib.pyplot": pyplot}
    ):
        yield


class _StandInLoader(importlib.abc.Loader):
    """Runs a module's real loader with stand-ins in place; the module keeps its real loader."""

    def __init__(self, real: Any, stand_ins: Callable[[], Any]) -> None:
        self.real, self.stand_ins = real, stand_ins

    def create_module(self, spec: Any) -> Any:
        return self.real.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__.loader = module.__loader__ = self.real
        with self.stand_ins():
            self.real.exec_module(module)


class _LeanImports(importlib.abc.MetaPathFinder):
    """Meta-path finder for the imports above; every other name goes to the usual finders."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        """The real spec of torchmetrics or mcli, with the loader wrapped; None for anything else."""
        if fullname not in _LEAN:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        stand_ins = _LEAN[fullname]
        if stand_ins is None:
            spec.loader = importlib.util.LazyLoader(spec.loader)
        else:
            spec.loader = _StandInLoader(spec.loader, stand_ins)
        return spec


# Module -> stand-ins to import it with (None: a lazy module).
_LEAN: dict[str, Any] = {
    "torchmetrics": _torchmetrics_stand_ins,
    "torchmetrics.utilities.plot": _matplotlib_stand_ins,
    "transformers.generation.candidate_generator": _sklearn_stand_ins,
    "transformers.loss.loss_utils": _scipy_optimize_stand_ins,
    "mcli": None,
}


def install_lean_imports() -> bool:
    """Put :class:`_LeanImports` first on ``sys.meta_path`` (idempotent); False when there was nothing to defer."""
    if any(isinstance(f, _LeanImports) for f in sys.meta_path):
        return True
    if all(name in sys.modules for name in _LEAN):
        return False
    sys.meta_path.insert(0, _LeanImports())
    return True


# ---------------------------------------------------------------------------------------------------------
# transformers / huggingface_hub
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Cached hub files only: no download, and no minute of retries when there is no network.

    transformers copies ``HF_HUB_OFFLINE`` into its private ``transformers.utils.hub._is_offline_mode`` at import,
    and ``is_offline_mode()`` reads that copy; setting the environment variable later changes nothing.
    """
    import huggingface_hub.constants as hc
    import transformers.utils.hub as th

    saved = hc.HF_HUB_OFFLINE, getattr(th, "_is_offline_mode", None)
    hc.HF_HUB_OFFLINE, th._is_offline_mode = True, True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE, th._is_offline_mode = saved


def no_split_module_names(model: Any) -> set[str]:
    """Class names of a Hugging Face model's transformer blocks (its private ``_no_split_modules``).

    transformers declares there which modules must not be split across devices, i.e. the repeated blocks; FSDP
    wraps and activation-checkpoints the same units. Empty when the model declares none (BERT).
    """
    return set(getattr(model, "_no_split_modules", None) or ())


# ---------------------------------------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------------------------------------

_MDS_PACKAGES = ("streaming", "streaming.base", "streaming.base.format", "streaming.base.format.mds")


def stop_streaming_threads(dataset: Any) -> None:
    """Stop the download/ready threads of a StreamingDataset whose iteration was left unfinished.

    streaming 0.13 stops an epoch's two background threads only when the epoch is iterated to its end or the next
    ``__iter__`` starts (its private ``_iterator.exit()``). A run that stops mid-epoch (``max_duration`` in batches,
    an eval subset) leaves them polling forever, and through them the dataset and its shared memory stay alive:
    dozens of open /dev/shm files per finished run in a long-lived process (tests, notebooks, sweeps in-process).
    """
    iterator = getattr(dataset, "_iterator", None)
    if iterator is not None:
        iterator.exit()  # blocks until both threads have seen it (they check every few milliseconds)
    executor = getattr(dataset, "_executor", None)
    if executor is not None:  # its idle worker threads would otherwise wait until the interpreter exits
        executor.shutdown(wait=False)
        del dataset._executor  # a later __iter__ (resumed training, the next eval) makes a new one


def close_prefix_scan_handles() -> None:
    """Let streaming's search for a free shared-memory prefix close the handles it opens (idempotent).

    streaming 0.13's ``prefix._check_and_find`` attaches to every live dataset's shared memory to find a free
    prefix, through its ``SharedMemory`` wrapper, whose default ``auto_cleanup=True`` registers each handle with
    ``atexit``: the throw-away handles (and their file descriptors) then live until the interpreter exits — six per
    live dataset, each time a dataset is built. Attach-only handles made there now skip that registration, so they
    close when dropped; the handles that create memory (a dataset's own prefix) keep theirs. Relies on prefix.py
    naming the wrapper ``SharedMemory`` in its module globals (tested).
    """
    from streaming.base.shared import prefix
    from streaming.base.shared.memory import SharedMemory

    if getattr(prefix.SharedMemory, "_closes_attachments", False):
        return

    class _ScanSharedMemory(SharedMemory):
        _closes_attachments = True

        def __init__(self, name: Any = None, create: Any = None, size: int = 0, auto_cleanup: Any = None):
            if auto_cleanup is None:
                auto_cleanup = create is not False  # attaching to someone else's memory: nothing to clean up
            super().__init__(name, create, size, auto_cleanup)

    prefix.SharedMemory = _ScanSharedMemory


def release_streaming_memory(dataset: Any) -> int:
    """Close (and, where this process created it, unlink) a finished StreamingDataset's shared memory now.

    Every handle streaming opens registers ``cleanup`` with ``atexit``, which keeps the handle — and its open
    /dev/shm file — alive until the interpreter exits, even after the Trainer is closed and dropped. Call only
    when the dataset will not be iterated again (a closed Trainer). Returns the number of handles released.
    """
    from streaming.base.shared.memory import SharedMemory

    handles: list[Any] = []

    def visit(obj: Any, depth: int) -> None:  # dataset -> SharedScalar -> SharedArray -> SharedMemory
        if isinstance(obj, SharedMemory):
            handles.append(obj)
        elif depth and hasattr(obj, "__dict__"):
            for value in list(vars(obj).values()):
                visit(value, depth - 1)

    stop_streaming_threads(dataset)
    visit(dataset, 3)
    for shm in handles:
        atexit.unregister(shm.cleanup)
        shm.cleanup()
    return len(handles)


def import_mds_writer() -> type:
    """streaming's ``MDSWriter``, importing the package ``__init__`` files (and transformers with them) lazily.

    ``import streaming`` costs ~4 s of CPU, the largest part of converting a small corpus, because its
    ``__init__`` pulls in every dataset class and transformers; the writer needs only leaf modules. The four
    packages on the way are put in ``sys.modules`` as modules whose real ``__init__`` runs, in place, on the first
    access to a name it defines (PEP 562 ``__getattr__``), so ``from streaming import StreamingDataset`` later in
    the process works as usual and the writer class is the same object. Any surprise falls back to the plain
    import. Relies on the writer living at ``streaming.base.format.mds.writer``.
    """
    if "streaming" in sys.modules:
        from streaming import MDSWriter

        return MDSWriter
    added: list[str] = []
    try:
        for name in _MDS_PACKAGES:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.submodule_search_locations is None or spec.loader is None:
                raise ImportError(name)
            sys.modules[name] = _deferred_package(types.ModuleType(name), spec)
            if added:  # bind to the parent as the import system would
                setattr(sys.modules[added[-1]], name.rsplit(".", 1)[1], sys.modules[name])
            added.append(name)
        return importlib.import_module("streaming.base.format.mds.writer").MDSWriter
    except Exception:
        for name in added:
            sys.modules.pop(name, None)
        from streaming import MDSWriter

        return MDSWriter


def _deferred_package(mod: Any, spec: Any) -> Any:
    mod.__spec__, mod.__loader__, mod.__file__ = spec, spec.loader, spec.origin
    mod.__path__, mod.__package__ = list(spec.submodule_search_locations), spec.name

    def __getattr__(attr: str) -> Any:
        # First miss: run the real __init__ in this module's namespace (submodules bound so far are kept).
        mod.__dict__.pop("__getattr__", None)
        exec(spec.loader.get_code(spec.name), mod.__dict__)
        try:
            return mod.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {spec.name!r} has no attribute {attr!r}") from None

    mod.__getattr__ = __getattr__
    return mod


# ---------------------------------------------------------------------------------------------------------
# typer / click
# ---------------------------------------------------------------------------------------------------------


def click_classes(name: str) -> tuple[type, ...]:
    """``click.exceptions.<name>`` and, for typer >= 0.26 (which vendors click as ``typer._click``), its copy too."""
    import click

    classes: list[type] = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        if hasattr(vendored, name) and getattr(vendored, name) not in classes:
            classes.append(getattr(vendored, name))
    return tuple(classes)


# click's wording of two usage errors, reworded by the CLI into one line with a suggestion.
NO_SUCH_COMMAND = re.compile(r"No such command ['\"](.+?)['\"]")
UNEXPECTED_EXTRA_ARGS = re.compile(r"Got unexpected extra argument(?:s|\(s\))? \((.*)\)", re.IGNORECASE)


install_lean_imports()  # before anything imports Composer (the CLI imports this module first)
