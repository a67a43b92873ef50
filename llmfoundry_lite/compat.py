"""Every place this project leans on a dependency's private internals or exact wording, in one module.

Each shim says what it relies on and why; ``tests/test_compat.py`` fails loudly, naming the shim, when an
upgrade changes that behaviour. Upgrading Composer, streaming, transformers, torch or typer/click: run it first.
:data:`TESTED_VERSIONS` lists the versions each shim was tested against: another installed version warns once,
naming the shims at risk. A shim whose failure would change results (a resumed run's RNG, offline hub access,
a preemption checkpoint) raises :class:`CompatError` when it cannot do its job, never returns a default; the
speed shims only lose their speed-up. The start-up import stand-ins and the fast exit are :mod:`.startup`.
Only the standard library at import time: the CLI imports this module before torch loads.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib
import importlib.util
import re
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from llmfoundry_lite.errors import RecipeError

# ---------------------------------------------------------------------------------------------------------
# Version guard
# ---------------------------------------------------------------------------------------------------------


class CompatError(RecipeError):
    """A shim found the private behaviour it relies on gone: one line naming it and the versions (exit 2)."""


class UntestedVersionWarning(UserWarning):
    """An installed dependency differs from the version the shims that touch it were tested against."""


@dataclasses.dataclass(frozen=True)
class Tested:
    """A dependency (its distribution name), the version its shims were tested on, and those shims."""

    distribution: str
    version: str  # a prefix: "4.53" accepts any 4.53.x
    shims: tuple[str, ...]


TESTED_VERSIONS: tuple[Tested, ...] = (
    Tested(
        "mosaicml",
        "0.32.1",
        ("use_cpu_model_lookup", "restore_checkpoint_rng", "save_checkpoint_now", "release_closed_engine"),
    ),
    Tested(
        "mosaicml-streaming",
        "0.13.0",
        (
            "stop_streaming_threads",
            "close_prefix_scan_handles",
            "release_streaming_memory",
            "import_mds_writer",
        ),
    ),
    Tested("transformers", "4.53", ("hub_offline", "no_split_module_names", "startup.install_lean_imports")),
    # Composer restores torch's generator states as this torch saved them.
    Tested("torch", "2.7.0", ("restore_checkpoint_rng", "clear_state_dict_name_cache")),
)
_checked: set[str] = set()


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def untested(distribution: str, installed: str | None) -> tuple[str, ...]:
    """The shims at risk with ``installed`` (a version of ``distribution``): () when it is the tested one."""
    for t in TESTED_VERSIONS:
        if t.distribution == distribution and installed is not None:
            same = installed == t.version or installed.startswith(t.version + ".")
            return () if same else t.shims
    return ()


def check_version(distribution: str) -> None:
    """Warn once per process when ``distribution`` is not the version its shims were tested against."""
    if distribution in _checked:
        return
    _checked.add(distribution)
    installed = installed_version(distribution)
    at_risk = untested(distribution, installed)
    if at_risk:
        tested = next(t.version for t in TESTED_VERSIONS if t.distribution == distribution)
        warnings.warn(
            f"{distribution} {installed} is installed; llmfoundry_lite's shims {', '.join(at_risk)} were tested "
            f"on {tested} (run tests/test_compat.py to check them)",
            UntestedVersionWarning,
            stacklevel=3,
        )


def _moved(shim: str, distribution: str, what: str) -> CompatError:
    """The error of a shim whose private dependency moved."""
    installed = installed_version(distribution)
    tested = next(t.version for t in TESTED_VERSIONS if t.distribution == distribution)
    return CompatError(
        f"compat.{shim}: {what} in {distribution} {installed} (tested on {tested}); install "
        f"{distribution}=={tested}, or update llmfoundry_lite/compat.py and run tests/test_compat.py"
    )


# ---------------------------------------------------------------------------------------------------------
# Composer
# ---------------------------------------------------------------------------------------------------------


def use_cpu_model_lookup(lookup: Callable[[], str]) -> None:
    """Answer Composer's CPU-model lookup (``collect_env.get_cpu_model``) with ``lookup``.

    ``Trainer.__init__`` logs the CPU model through py-cpuinfo, which starts a subprocess (about a second, a sixth
    of a small run's start-up); ``/proc/cpuinfo`` gives the same string. Relies on ``get_composer_env_dict``
    calling the module-level ``get_cpu_model`` at call time.
    """
    check_version("mosaicml")
    from composer.utils import collect_env

    collect_env.get_cpu_model = lookup


def restore_checkpoint_rng(trainer: Any) -> bool:
    """Restore the RNG state Composer loaded from a checkpoint but kept pending; True when there was one.

    Composer keeps it in ``Trainer._rng_state`` (None when nothing was loaded) and restores it only at an epoch
    boundary or while spinning a dataloader; a streaming dataset resumes itself mid-epoch, so without this the
    resumed run would draw random numbers from a fresh stream. Clearing it afterwards stops Composer from
    restoring it a second time. CompatError when the field is gone: a resume must never silently lose its RNG.
    """
    check_version("mosaicml")
    check_version("torch")
    if not hasattr(trainer, "_rng_state"):
        raise _moved(
            "restore_checkpoint_rng", "mosaicml", "Trainer._rng_state (a loaded checkpoint's RNG) is gone"
        )
    state = trainer._rng_state
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
    check_version("mosaicml")
    save = getattr(saver, "_save_checkpoint", None)
    if save is None:
        raise _moved("save_checkpoint_now", "mosaicml", "CheckpointSaver._save_checkpoint is gone")
    save(state, logger)


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

    check_version("mosaicml")
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
# transformers / huggingface_hub
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Cached hub files only: no download, and no minute of retries when there is no network.

    transformers copies ``HF_HUB_OFFLINE`` into its private ``transformers.utils.hub._is_offline_mode`` at import,
    and ``is_offline_mode()`` reads that copy; setting the environment variable later changes nothing.
    CompatError when either attribute is gone or ``is_offline_mode()`` does not answer True after the switch.
    """
    check_version("transformers")
    import huggingface_hub.constants as hc
    import transformers.utils.hub as th

    if not hasattr(th, "_is_offline_mode") or not hasattr(hc, "HF_HUB_OFFLINE"):
        raise _moved("hub_offline", "transformers", "transformers.utils.hub._is_offline_mode is gone")
    saved = hc.HF_HUB_OFFLINE, th._is_offline_mode
    hc.HF_HUB_OFFLINE, th._is_offline_mode = True, True
    try:
        if not th.is_offline_mode():
            raise _moved("hub_offline", "transformers", "is_offline_mode() no longer reads _is_offline_mode")
        yield
    finally:
        hc.HF_HUB_OFFLINE, th._is_offline_mode = saved


def no_split_module_names(model: Any) -> set[str]:
    """Class names of a Hugging Face model's transformer blocks (its private ``_no_split_modules``).

    transformers declares there which modules must not be split across devices, i.e. the repeated blocks; FSDP
    wraps and activation-checkpoints the same units. Empty when the model declares none (BERT).
    """
    check_version("transformers")
    return set(getattr(model, "_no_split_modules", None) or ())


# ---------------------------------------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------------------------------------

_MDS_PACKAGES = ("streaming", "streaming.base", "streaming.base.format", "streaming.base.format.mds")
_MDS_WRITER_MODULE = "streaming.base.format.mds.writer"


def stop_streaming_threads(dataset: Any) -> None:
    """Stop the download/ready threads of a StreamingDataset whose iteration was left unfinished.

    streaming 0.13 stops an epoch's two background threads only when the epoch is iterated to its end or the next
    ``__iter__`` starts (its private ``_iterator.exit()``). A run that stops mid-epoch (``max_duration`` in batches,
    an eval subset) leaves them polling forever, and through them the dataset and its shared memory stay alive:
    dozens of open /dev/shm files per finished run in a long-lived process (tests, notebooks, sweeps in-process).
    """
    check_version("mosaicml-streaming")
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
    check_version("mosaicml-streaming")
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

    ``import streaming`` costs seconds of CPU, the largest part of converting a small corpus, because its
    ``__init__`` pulls in every dataset class and transformers; the writer needs only leaf modules. The four
    packages on the way are put in ``sys.modules`` as modules whose real ``__init__`` runs, in place, on the first
    access to a name it defines (PEP 562 ``__getattr__``), so ``from streaming import StreamingDataset`` later in
    the process works as usual and the writer class is the same object. Any surprise falls back to the plain
    import. Relies on the writer living at ``streaming.base.format.mds.writer``.
    """
    check_version("mosaicml-streaming")
    leaf = sys.modules.get(_MDS_WRITER_MODULE)
    if leaf is not None:  # a second call: asking the (deferred) package would run its __init__ after all
        return leaf.MDSWriter
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
        return importlib.import_module(_MDS_WRITER_MODULE).MDSWriter
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
