"""Named registries of components, signature-checked construction, and third-party plugins.

A recipe block ``{name: X, **kwargs}`` selects entry ``X`` of a registry; ``kwargs`` are checked against the
entry's constructor signature (an :class:`EntrySpec`) *before* anything is built, so mistakes surface as one clear
message. Until the built-in modules are imported (torch, Composer: seconds), the built-ins' specs come from the
signature table generated into ``registry_index.py``, so checking a recipe imports none of them.
Third-party packages add entries through the entry-point group ``llmfoundry_lite_<registry>``
(for example ``[project.entry-points.llmfoundry_lite_callbacks] my_cb = "pkg.mod:MyCallback"``).
Type checks: ``typecheck.py``; ``llmfoundry-lite list`` and the generated index: ``registry_listing.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from collections.abc import Mapping
from typing import Any

import catalogue

from llmfoundry_lite.errors import RecipeError, suggest

# The type checks live in typecheck.py; these names stay importable from here for the modules that use them.
from llmfoundry_lite.typecheck import (  # noqa: F401
    annotation_from_source,
    annotation_source,
    check_dataclass,
    describe_annotation,
    format_value,
    parse_duration,
    time_error,
    type_error,
)

REGISTRY_NAMES = (
    "models",
    "tokenizers",
    "dataloaders",
    "collators",
    "optimizers",
    "schedulers",
    "algorithms",
    "callbacks",
    "loggers",
    "metrics",
)

# Arguments the framework supplies at build time; a recipe must not (and need not) set them.
INJECTED: dict[str, frozenset[str]] = {
    "models": frozenset({"tokenizer"}),
    "tokenizers": frozenset(),
    "dataloaders": frozenset({"tokenizer", "device_batch_size"}),
    "collators": frozenset({"tokenizer", "max_seq_len"}),
    "optimizers": frozenset({"params"}),
    "schedulers": frozenset(),
    "algorithms": frozenset(),
    "callbacks": frozenset(),
    "loggers": frozenset(),
    "metrics": frozenset(),
}

# Modules whose import registers the built-in entries.
BUILTIN_MODULES = (
    "llmfoundry_lite.train.build",
    "llmfoundry_lite.train.callbacks.cost",
    "llmfoundry_lite.train.callbacks.generate",
    "llmfoundry_lite.train.callbacks.preemption",
    "llmfoundry_lite.apps.evaluate.callback",
    "llmfoundry_lite.train.callbacks.stream_counts",
    "llmfoundry_lite.train.callbacks.smoe_schedule",
    "llmfoundry_lite.data.tokenizers",
    "llmfoundry_lite.data.collators",
    "llmfoundry_lite.data.loaders",
    "llmfoundry_lite.models.families",
    "llmfoundry_lite.sweep",
)

_registries: dict[str, catalogue.Registry] = {
    name: catalogue.create("llmfoundry_lite", name, entry_points=True) for name in REGISTRY_NAMES
}
models = _registries["models"]
tokenizers = _registries["tokenizers"]
dataloaders = _registries["dataloaders"]
collators = _registries["collators"]
optimizers = _registries["optimizers"]
schedulers = _registries["schedulers"]
algorithms = _registries["algorithms"]
callbacks = _registries["callbacks"]
loggers = _registries["loggers"]
metrics = _registries["metrics"]

_builtins_loaded = False


def load_builtins() -> None:
    """Import the modules that register built-in entries (once)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)


def check_registry_name(registry: str) -> None:
    """Raise RecipeError (with the close names) unless ``registry`` is one of REGISTRY_NAMES."""
    if registry not in _registries:
        raise RecipeError(
            f"unknown registry {registry!r}{suggest(registry, REGISTRY_NAMES)}; "
            f"choose from {', '.join(REGISTRY_NAMES)}"
        )


def get_registry(registry: str) -> catalogue.Registry:
    """The registry called ``registry`` (one of REGISTRY_NAMES)."""
    check_registry_name(registry)
    load_builtins()
    return _registries[registry]


def names(registry: str) -> list[str]:
    """Sorted entry names of a registry, built-ins and plugins."""
    return sorted(get_registry(registry).get_all())


@dataclasses.dataclass(frozen=True)
class FamilyFacts:
    """What recipe checks ask of a built-in family, read from the generated index (no model code imported)."""

    name: str
    objective: str
    takes_sequence_id: bool = False

    @property
    def encoder(self) -> bool:
        """True for bidirectional encoders (see FamilySpec.encoder)."""
        return self.objective == "mlm"


def model_family(name: Any) -> Any:
    """The family the ``models`` entry ``name`` declares (its FamilySpec, ``models/spec.py``); None if unknown or
    undeclared. Before the built-in modules are imported, a built-in's facts come from the generated index, so a
    recipe check does not import torch for them."""
    if not _builtins_loaded and isinstance(name, str):
        from llmfoundry_lite.registry_index import FAMILIES

        if name in FAMILIES:
            return FamilyFacts(**FAMILIES[name])
    try:
        return getattr(lookup("models", name), "family", None)
    except RecipeError:
        return None


def lookup(registry: str, name: Any, key: str = "name") -> Any:
    """The registered object for ``name``; unknown names raise a RecipeError listing close names."""
    reg = get_registry(registry)
    if not isinstance(name, str):
        raise RecipeError(f"expected a {registry[:-1]} name (a string), got {name!r}", key=key)
    try:
        return reg.get(name)
    except catalogue.RegistryError:
        all_names = sorted(reg.get_all())
        raise RecipeError(
            f"unknown {registry[:-1]} {name!r}{suggest(name, all_names)}; "
            f"`llmfoundry-lite list {registry}` shows all {len(all_names)}",
            key=key,
        ) from None


# ---------------------------------------------------------------------------------------------------------
# Entry specs: an entry's recipe keys, from its live signature or from the generated table
# ---------------------------------------------------------------------------------------------------------


def signature_params(obj: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """Named parameters of an entry's constructor (no self), and whether it accepts ``**kwargs``."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return {}, True
    params: dict[str, inspect.Parameter] = {}
    var_kw = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is not p.VAR_POSITIONAL:
            params[p.name] = p
    return params, var_kw


def type_hints(obj: Any) -> dict[str, Any]:
    """Resolved annotations of an entry's constructor; {} when they cannot be resolved."""
    try:
        return typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # unresolved forward refs in third-party code: skip type checks
        return {}


NO_DEFAULT: Any = (
    Ellipsis  # a default the table cannot spell (an object): the key is optional, its value unknown
)


@dataclasses.dataclass(frozen=True)
class Param:
    """One constructor argument: its annotation, whether a recipe must set it, and its default."""

    name: str
    type: Any
    required: bool
    default: Any = NO_DEFAULT


@dataclasses.dataclass(frozen=True)
class EntrySpec:
    """What checking a block needs of an entry: its arguments, ``**kwargs``, and nested component blocks."""

    params: dict[str, Param]
    var_kw: bool
    nested: dict[str, str]  # argument -> registry of the block it holds

    @classmethod
    def of(cls, obj: Any) -> EntrySpec:
        """The spec of a live entry (a class or function)."""
        params, var_kw = signature_params(obj)
        hints = type_hints(obj)
        out = {}
        for name, p in params.items():
            required = p.default is inspect.Parameter.empty
            default = NO_DEFAULT if required or not _spellable(p.default) else p.default
            out[name] = Param(name, hints.get(name, p.annotation), required, default)
        return cls(out, var_kw, dict(getattr(obj, "__nested_components__", {})))

    def row(self) -> dict[str, Any]:
        """The spec as data for the generated table (annotations as text)."""
        params = []
        for p in self.params.values():
            item: tuple = (p.name, annotation_source(p.type))
            params.append(item if p.required else (*item, p.default))
        return {"params": params, "var_kw": self.var_kw, "nested": self.nested}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> EntrySpec:
        """The spec a table row describes."""
        params = {}
        for name, tp, *default in row["params"]:
            params[name] = Param(
                name, annotation_from_source(tp), not default, default[0] if default else NO_DEFAULT
            )
        return cls(params, row["var_kw"], dict(row["nested"]))


def _spellable(value: Any) -> bool:
    """Whether a default is plain data the generated table can write as a Python literal."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return not isinstance(value, float) or value == value and abs(value) != float("inf")
    if isinstance(value, (list, tuple)):
        return all(_spellable(v) for v in value)
    return False


def entry_spec(registry: str, name: Any, key: str = "name") -> EntrySpec:
    """The spec of entry ``name``: the live object's once its module is imported, else the generated table's.

    Unknown names raise a RecipeError listing close names (importing the built-ins and plugins to be sure).
    """
    check_registry_name(registry)
    if isinstance(name, str):
        live = catalogue.REGISTRY.get(("llmfoundry_lite", registry, name))
        if live is not None:  # imported already, or registered in this process
            return EntrySpec.of(live)
        if not _builtins_loaded:
            from llmfoundry_lite.registry_index import SIGNATURES

            row = SIGNATURES.get(registry, {}).get(name)
            if row is not None:
                return EntrySpec.from_row(row)
    return EntrySpec.of(lookup(registry, name, key=key))


# ---------------------------------------------------------------------------------------------------------
# Checking and building blocks
# ---------------------------------------------------------------------------------------------------------


def check_args(
    registry: str,
    spec: EntrySpec,
    kwargs: Mapping[str, Any],
    keypath: str,
    extra_injected: frozenset[str] = frozenset(),
) -> None:
    """Raise RecipeError for unknown, missing or ill-typed constructor arguments of a registry entry."""
    params = spec.params
    injected = INJECTED.get(registry, frozenset()) | extra_injected
    for k, v in kwargs.items():
        path = f"{keypath}.{k}" if keypath else k
        if k in injected and k in params:
            raise RecipeError(f"{k!r} is supplied by the framework and cannot be set in a recipe", key=path)
        if k not in params:
            if spec.var_kw:
                continue
            allowed = [p for p in params if p not in injected]
            raise RecipeError(
                f"unknown key {k!r}{suggest(k, allowed)}; allowed keys: {', '.join(allowed) or '(none)'}",
                key=path,
            )
        if k in spec.nested and v is not None:
            check_component(spec.nested[k], v, path)
            continue
        tp = params[k].type
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            check_dataclass(tp, v, path)
            continue
        err = type_error(v, tp)
        if err:
            raise RecipeError(err, key=path)
    for name, p in params.items():
        if (
            p.required
            and name not in injected
            and name not in kwargs
            and name not in ("self", "args", "kwargs")
        ):
            raise RecipeError(f"missing required key {name!r}", key=f"{keypath}.{name}" if keypath else name)


def split_block(block: Any, keypath: str, default_name: str | None = None) -> tuple[str, dict[str, Any]]:
    """``{name: X, **kwargs}`` -> (X, kwargs); ``default_name`` is the dict key in dict-of-components sections."""
    if block is None:
        block = {}
    if not isinstance(block, Mapping):
        raise RecipeError(f"expected a mapping with a 'name:' key, got {block!r}", key=keypath)
    kwargs = dict(block)
    name = kwargs.pop("name", default_name)
    if name is None:
        raise RecipeError("missing required key 'name' (the registry entry to use)", key=f"{keypath}.name")
    return name, kwargs


def check_component(
    registry: str,
    block: Any,
    keypath: str,
    default_name: str | None = None,
    extra_injected: frozenset[str] = frozenset(),
) -> None:
    """Validate one component block against its registry entry without building (or importing) it."""
    name, kwargs = split_block(block, keypath, default_name)
    spec = entry_spec(registry, name, key=f"{keypath}.name" if default_name is None else keypath)
    check_args(registry, spec, kwargs, keypath, extra_injected)


def build(
    registry: str, block: Any, keypath: str = "", default_name: str | None = None, **injected: Any
) -> Any:
    """Validate and construct a component block; ``injected`` args are passed when the entry accepts them."""
    name, kwargs = split_block(block, keypath, default_name)
    obj = lookup(registry, name, key=f"{keypath}.name" if default_name is None else keypath)
    spec = EntrySpec.of(obj)
    check_args(registry, spec, kwargs, keypath, frozenset(injected))
    supplied = {k: v for k, v in injected.items() if k in spec.params}
    try:
        return obj(**supplied, **kwargs)
    except RecipeError as e:  # an entry names its own argument ('local'); the user needs 'train_loader.local'
        section = keypath.split(".")[0].split("[")[0]
        if keypath and e.key and not e.absolute and not e.key.startswith(section):
            raise RecipeError(e.detail, file=e.file, key=f"{keypath}.{e.key}") from None
        raise


@dataclasses.dataclass(frozen=True)
class ArgInfo:
    """One recipe key of a registry entry: its name, type and default (None when the key is required)."""

    name: str
    type: str
    default: str | None


def entry_args(registry: str, obj: Any) -> tuple[list[ArgInfo], list[str], bool]:
    """An entry's recipe keys with types and defaults, the arguments the framework supplies, and ``**kwargs``."""
    params, var_kw = signature_params(obj)
    hints = type_hints(obj)
    nested = getattr(obj, "__nested_components__", {})
    injected = INJECTED.get(registry, frozenset())
    args: list[ArgInfo] = []
    supplied: list[str] = []
    for name, p in params.items():
        if name in injected:
            supplied.append(name)
            continue
        if name in nested:
            tp = f"{nested[name]} block ({{name: ..., ...}})"
        else:
            tp = describe_annotation(hints.get(name, p.annotation))
        # torch's `required` sentinel (e.g. SGD's lr) is a default that means "required".
        required = p.default is p.empty or type(p.default).__name__ == "_RequiredParameter"
        args.append(ArgInfo(name, tp, None if required else format_value(p.default)))
    return args, supplied, var_kw
