"""Named registries of components, signature-checked construction, and third-party plugins.

A recipe block ``{name: X, **kwargs}`` selects entry ``X`` of a registry; ``kwargs`` are checked against the
entry's constructor signature *before* anything is built, so mistakes surface as one clear message.
Third-party packages add entries through the entry-point group ``llmfoundry_lite_<registry>``
(for example ``[project.entry-points.llmfoundry_lite_callbacks] my_cb = "pkg.mod:MyCallback"``).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import catalogue

from llmfoundry_lite.errors import RecipeError, suggest

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
    "llmfoundry_lite.models.hf",
    "llmfoundry_lite.models.bert",
    "llmfoundry_lite.models.llama",
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


def describe(obj: Any) -> str:
    """First line of an entry's docstring, for ``llmfoundry-lite list``."""
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


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
# Signature checks
# ---------------------------------------------------------------------------------------------------------


def _callable_for_signature(obj: Any) -> Callable:
    return obj.__init__ if inspect.isclass(obj) else obj


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


def _type_hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(_callable_for_signature(obj))
    except Exception:  # unresolved forward refs in third-party code: skip type checks
        return {}


def _describe_type(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def type_error(value: Any, tp: Any) -> str | None:
    """None when ``value`` (plain YAML data) fits annotation ``tp``; otherwise why not."""
    if tp is Any or tp is inspect.Parameter.empty or tp is None:
        return None
    if tp is type(None):
        return None if value is None else "expected null"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        errors = [type_error(value, a) for a in args]
        if any(e is None for e in errors):
            return None
        return (
            f"expected {' or '.join(_describe_type(a) for a in args if a is not type(None))}, got {value!r}"
        )
    if origin is typing.Literal:
        return None if value in args else f"expected one of {', '.join(repr(a) for a in args)}, got {value!r}"
    if origin is typing.Annotated:
        return type_error(value, args[0])
    if tp is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if tp is int:
        return (
            None
            if isinstance(value, int) and not isinstance(value, bool)
            else f"expected an integer, got {value!r}"
        )
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"expected a number, got {value!r}"
    if tp is str:
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return f"expected a list, got {value!r}"
        elem_types = [a for a in args if a is not Ellipsis]
        for i, v in enumerate(value):
            et = (
                elem_types[i]
                if origin is tuple and len(elem_types) > 1 and i < len(elem_types)
                else (elem_types[0] if elem_types else Any)
            )
            err = type_error(v, et)
            if err:
                return f"item {i}: {err}"
        return None
    if origin in (dict, Mapping, typing.Mapping) or tp in (dict,):
        return None if isinstance(value, dict) else f"expected a mapping, got {value!r}"
    if dataclasses.is_dataclass(tp):
        return (
            None
            if isinstance(value, dict)
            else f"expected a mapping with keys of {tp.__name__}, got {value!r}"
        )
    if _is_time_type(tp):
        return time_error(value)
    return None  # other classes (devices, modules, ...): not checkable from YAML


def _is_time_type(tp: Any) -> bool:
    return getattr(tp, "__name__", "") == "Time" and "composer" in getattr(tp, "__module__", "")


def time_error(value: Any) -> str | None:
    """None if ``value`` is a Composer duration string (``10ba``, ``0.06dur``...) or an integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    if not isinstance(value, str):
        return f"expected a duration like '10ba', '1000sp', '1ep', '0.5dur' or '1000tok', got {value!r}"
    from composer.core import Time

    try:
        Time.from_timestring(value)
    except Exception:
        return (
            f"malformed duration {value!r}; use a number followed by a unit: "
            "ba (batches), sp (samples), tok (tokens), ep (epochs) or dur (fraction of the run)"
        )
    return None


def check_args(
    registry: str,
    obj: Any,
    kwargs: Mapping[str, Any],
    keypath: str,
    extra_injected: frozenset[str] = frozenset(),
) -> None:
    """Raise RecipeError for unknown, missing or ill-typed constructor arguments of a registry entry."""
    params, var_kw = signature_params(obj)
    injected = INJECTED.get(registry, frozenset()) | extra_injected
    hints = _type_hints(obj)
    nested = getattr(obj, "__nested_components__", {})  # param name -> registry of a nested block
    for k, v in kwargs.items():
        path = f"{keypath}.{k}" if keypath else k
        if k in injected and k in params:
            raise RecipeError(f"{k!r} is supplied by the framework and cannot be set in a recipe", key=path)
        if k not in params:
            if var_kw:
                continue
            allowed = [p for p in params if p not in injected]
            raise RecipeError(
                f"unknown key {k!r}{suggest(k, allowed)}; allowed keys: {', '.join(allowed) or '(none)'}",
                key=path,
            )
        if k in nested and v is not None:
            check_component(nested[k], v, path)
            continue
        tp = hints.get(k, params[k].annotation)
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            check_dataclass(tp, v, path)
            continue
        err = type_error(v, tp)
        if err:
            raise RecipeError(err, key=path)
    for name, p in params.items():
        if (
            p.default is inspect.Parameter.empty
            and name not in injected
            and name not in kwargs
            and name not in ("self", "args", "kwargs")
        ):
            raise RecipeError(f"missing required key {name!r}", key=f"{keypath}.{name}" if keypath else name)


def check_dataclass(cls: type, value: Mapping[str, Any], keypath: str) -> None:
    """Check a mapping against a dataclass's fields (unknown, missing, types), recursively."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in value.items():
        path = f"{keypath}.{k}" if keypath else str(k)
        if k not in fields:
            raise RecipeError(
                f"unknown key {k!r}{suggest(k, fields)}; allowed keys: {', '.join(fields)}", key=path
            )
        tp = hints.get(k, Any)
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            check_dataclass(tp, v, path)
            continue
        err = type_error(v, tp)
        if err:
            raise RecipeError(err, key=path)
    for name, f in fields.items():
        if (
            f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and name not in value
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
    """Validate one component block against its registry entry without building it."""
    name, kwargs = split_block(block, keypath, default_name)
    obj = lookup(registry, name, key=f"{keypath}.name" if default_name is None else keypath)
    check_args(registry, obj, kwargs, keypath, extra_injected)


def build(
    registry: str, block: Any, keypath: str = "", default_name: str | None = None, **injected: Any
) -> Any:
    """Validate and construct a component block; ``injected`` args are passed when the entry accepts them."""
    name, kwargs = split_block(block, keypath, default_name)
    obj = lookup(registry, name, key=f"{keypath}.name" if default_name is None else keypath)
    check_args(registry, obj, kwargs, keypath, frozenset(injected))
    params, var_kw = signature_params(obj)
    supplied = {k: v for k, v in injected.items() if k in params}
    try:
        return obj(**supplied, **kwargs)
    except RecipeError as e:  # an entry names its own argument ('local'); the user needs 'train_loader.local'
        section = keypath.split(".")[0].split("[")[0]
        if keypath and e.key and not e.absolute and not e.key.startswith(section):
            raise RecipeError(e.detail, file=e.file, key=f"{keypath}.{e.key}") from None
        raise


# ---------------------------------------------------------------------------------------------------------
# Describing entries (``llmfoundry-lite list [REGISTRY [NAME]]``)
# ---------------------------------------------------------------------------------------------------------


def builtin_entries(registry: str) -> dict[str, Any]:
    """The built-in entries of a registry (entry-point plugins left out), importing the modules that add them."""
    check_registry_name(registry)
    load_builtins()
    namespace = ("llmfoundry_lite", registry)
    return {keys[-1]: obj for keys, obj in catalogue.REGISTRY.copy().items() if tuple(keys[:-1]) == namespace}


def plugin_entry_points(registry: str) -> list[Any]:
    """The (unloaded) entry points third-party packages declare for a registry."""
    from importlib.metadata import entry_points

    return list(entry_points(group=f"llmfoundry_lite_{registry}"))


def listing(registry: str) -> dict[str, str]:
    """Entry name -> one-line description, without importing the built-in modules.

    The built-ins' descriptions come from the generated ``registry_index`` (their modules import torch and
    Composer, seconds of start-up that a listing does not need); plugins are imported for their docstrings.
    Built-ins win over a plugin of the same name, as in ``catalogue.Registry.get_all``.
    """
    check_registry_name(registry)
    from llmfoundry_lite.registry_index import BUILTINS

    result: dict[str, str] = {}
    for ep in plugin_entry_points(registry):
        try:
            result[ep.name] = describe(ep.load())
        except Exception as e:  # a broken plugin must not hide the other names
            first = (str(e).strip().splitlines() or [""])[0]
            result[ep.name] = f"(cannot be imported from {ep.value}: {type(e).__name__}: {first})"
    result.update(BUILTINS.get(registry, {}))
    return result


def builtin_index() -> dict[str, dict[str, str]]:
    """Registry -> entry name -> description of the built-ins, read from the live registries (imports torch)."""
    return {
        reg: {name: describe(obj) for name, obj in sorted(builtin_entries(reg).items())}
        for reg in REGISTRY_NAMES
    }


def render_index(index: dict[str, dict[str, str]]) -> str:
    """The source of ``registry_index.py`` with ``index`` as BUILTINS, laid out as ruff formats it."""
    from llmfoundry_lite import registry_index

    with open(registry_index.__file__, encoding="utf-8") as f:
        head = f.read().split("BUILTINS: dict[str, dict[str, str]] = ", 1)[0]
    lines = ["{"]
    for reg, entries in index.items():
        lines.append(f"    {_quote(reg)}: {{")
        lines.extend(f"        {_quote(name)}: {_quote(desc)}," for name, desc in entries.items())
        lines.append("    },")
    lines.append("}")
    return head + "BUILTINS: dict[str, dict[str, str]] = " + "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    # ruff's formatter prefers double quotes unless the text holds one.
    return '"' + text.replace("\\", "\\\\") + '"' if '"' not in text else repr(text)


@dataclasses.dataclass(frozen=True)
class ArgInfo:
    """One recipe key of a registry entry: its name, type and default (None when the key is required)."""

    name: str
    type: str
    default: str | None


def format_value(value: Any) -> str:
    """A default value spelled as in a YAML recipe (null, true, [0.9, 0.95], '{run_name}/x.txt')."""
    import enum

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return format_value(value.value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        import yaml

        text = yaml.safe_dump(value, width=10**9).strip()  # quotes only what YAML would misread
        return text[: -len("\n...")] if text.endswith("\n...") else text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return getattr(value, "__qualname__", None) or repr(value)


def describe_annotation(tp: Any) -> str:
    """A type annotation as a recipe author reads it: 'float', 'int | null', 'duration', "one of 'a', 'b'"."""
    if tp is inspect.Parameter.empty or tp is Any:
        return "any"
    if tp is None or tp is type(None):
        return "null"
    if isinstance(tp, str):  # an unresolved forward reference
        return tp
    if _is_time_type(tp):
        return "duration"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return describe_annotation(args[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Union or origin is types.UnionType:
        if any(_is_time_type(a) for a in args):  # Union[str, Time]: a recipe writes a duration string
            args = tuple(a for a in args if a not in (str, int))
        parts = list(dict.fromkeys(describe_annotation(a) for a in args))
        return " | ".join(sorted(parts, key=lambda p: p == "null"))  # null last
    if origin is not None:
        name = getattr(origin, "__name__", None) or str(origin).replace("typing.", "")
        if not args:
            return name
        inner = []
        for a in args:
            if a is Ellipsis:
                inner.append("...")
            elif isinstance(a, list):  # Callable[[A, B], C]
                inner.append("[" + ", ".join(describe_annotation(x) for x in a) + "]")
            else:
                inner.append(describe_annotation(a))
        return f"{name}[{', '.join(inner)}]"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def entry_args(registry: str, obj: Any) -> tuple[list[ArgInfo], list[str], bool]:
    """An entry's recipe keys with types and defaults, the arguments the framework supplies, and ``**kwargs``."""
    params, var_kw = signature_params(obj)
    hints = _type_hints(obj)
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
