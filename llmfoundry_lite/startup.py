"""Start-up: what ``import composer`` pulls in that no run of ours uses, deferred; and a fast process exit.

Both rely on private behaviour (of torchmetrics, transformers and mcli; of CPython's exit), tested in
``tests/test_compat.py``. :func:`install_lean_imports` is called by the CLI's ``main`` before anything imports
Composer; importing this module changes nothing. Only the standard library at import time.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.abc
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

# ``import composer`` imports torchmetrics, whose package __init__ imports every metric module: BERTScore's
# ``from transformers import AutoModel, AutoTokenizer`` loads transformers' modelling and generation code (and
# through it sklearn.metrics, scipy.stats and pandas), the audio metrics ``import scipy.signal``; Composer's
# MosaicML-platform logger imports mcli; ``composer.algorithms`` imports transformers' BERT, whose generation code
# imports sklearn.metrics for assisted decoding. None of it runs in a training run, and it is a large part of
# a short run's start-up (scripts/benchmark_cli.py measures it). Once installed (the CLI's main does it before
# anything imports torch), the hook acts only on an import of torchmetrics or mcli that has not happened yet:
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
        transformers = importlib.import_module("transformers")  # its lazy top level only
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
    # composer.algorithms) import scipy.optimize.linear_sum_assignment at import: all of scipy.linalg/optimize.
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
    # torchmetrics' plotting helpers import matplotlib.pyplot at import for type aliases and
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


def exit_fast(code: int) -> None:
    """End the process with ``code`` after everything a normal exit runs, minus the interpreter's teardown.

    After a run, CPython's finalisation (clearing the modules of torch, Composer, transformers one object at a
    time) takes a noticeable share of a short CLI run and does nothing a user needs. This does what matters of a normal
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
    # Buffered files nobody closed would lose their tail to os._exit. Hundreds of thousands of live objects
    # after a run: an ABC subclass check per object is slow, so pick the file types once and filter in C.
    # type(), not isinstance: isinstance reads __class__, which some objects warn on.
    objs = gc.get_objects()
    file_types = {t for t in set(map(type, objs)) if issubclass(t, io.IOBase)}
    for obj in itertools.compress(objs, map(file_types.__contains__, map(type, objs))):
        with contextlib.suppress(Exception):
            if not obj.closed and obj.writable():
                obj.flush()
    os._exit(code)
