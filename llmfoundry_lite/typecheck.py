"""Does a YAML value fit a Python annotation? The checks behind every recipe key, and the one way a type is spelled
for a recipe author (messages and ``llmfoundry-lite list REGISTRY NAME`` alike).

Plain YAML data only (numbers, strings, lists, mappings, null): classes a YAML file cannot spell (devices,
modules, callables) are not checked. Composer durations (``10ba``, ``0.5dur``) are parsed here, by the same rule as
``composer.core.Time.from_timestring``, so validating a recipe need not import Composer (tests compare the two).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from llmfoundry_lite.errors import RecipeError, suggest


class Duration:
    """The annotation of a Composer duration (``composer.core.Time``) where Composer is not imported."""


# Composer's TimeUnit values; a duration is a number followed by one of them (case-insensitive).
TIME_UNITS = ("iter", "ep", "ba", "sp", "tok", "dur", "sec")
_TIME_STR = re.compile(r"^(.+)(" + "|".join(TIME_UNITS) + r")$", flags=re.IGNORECASE)
_WALL_CLOCK = re.compile(r"^(\d{1,2}h)?(\d{1,2}m)?(\d{1,2}s)?$")


def is_time_type(tp: Any) -> bool:
    """True for Composer's ``Time`` class and for :class:`Duration`."""
    if tp is Duration:
        return True
    return getattr(tp, "__name__", "") == "Time" and "composer" in getattr(tp, "__module__", "")


def parse_duration(text: str) -> tuple[float | int, str]:
    """(value, unit) of a Composer duration string; ValueError (or TypeError) where Composer raises them.

    Composer's rule: ``1h30m`` wall-clock forms are seconds; otherwise a number (scientific notation allowed)
    followed by a unit, the number an integer for every unit but ``dur``.
    """
    if text and _WALL_CLOCK.match(text) and any(text.endswith(c) for c in "hms"):
        parts = dict((p[-1], int(p[:-1])) for p in re.findall(r"\d+[hms]", text))
        if parts.get("h", 0) < 24 and parts.get("m", 0) < 60 and parts.get("s", 0) < 60:  # datetime's ranges
            return parts.get("h", 0) * 3600 + parts.get("m", 0) * 60 + parts.get("s", 0), "sec"
    match = _TIME_STR.findall(text)
    if len(match) != 1:
        raise ValueError(f"Invalid time string: {text}")
    number, unit = match[0]
    unit = unit.lower()  # Composer's TimeUnit takes any case ('10BA' is 10 batches)
    value = float(number)
    if unit != "dur":
        if int(value) != value:
            raise TypeError(f"value {value} is not an integer. Units {unit} require integer values.")
        return int(value), unit
    return value, unit


def time_error(value: Any) -> str | None:
    """None if ``value`` is a Composer duration string (``10ba``, ``0.06dur``...) or an integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    if not isinstance(value, str):
        return f"expected a duration like '10ba', '1000sp', '1ep', '0.5dur' or '1000tok', got {value!r}"
    try:
        parse_duration(value)
    except Exception:
        return (
            f"malformed duration {value!r}; use a number followed by a unit: "
            "ba (batches), sp (samples), tok (tokens), ep (epochs) or dur (fraction of the run)"
        )
    return None


def describe_annotation(tp: Any) -> str:
    """A type annotation as a recipe author reads it: 'float', 'int | null', 'duration', "one of 'a', 'b'"."""
    if tp is inspect.Parameter.empty or tp is Any:
        return "any"
    if tp is None or tp is type(None):
        return "null"
    if isinstance(tp, str):  # an unresolved forward reference
        return tp
    if is_time_type(tp):
        return "duration"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return describe_annotation(args[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Union or origin is types.UnionType:
        if any(is_time_type(a) for a in args):  # Union[str, Time]: a recipe writes a duration string
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


def type_error(value: Any, tp: Any) -> str | None:
    """None when ``value`` (plain YAML data) fits annotation ``tp``; otherwise why not."""
    if tp is Any or tp is inspect.Parameter.empty or tp is None:
        return None
    if tp is type(None):
        return None if value is None else "expected null"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if any(is_time_type(a) for a in args) and not isinstance(value, bool):
            # Union[str, Time]: Composer parses the string as a duration and has no meaning for a bare number
            # (its schedulers fail on it with an AttributeError once the run has started).
            if isinstance(value, str):
                return time_error(value)
            if isinstance(value, (int, float)) and int not in args and float not in args:
                v = int(value) if float(value).is_integer() else value
                return f"a bare number has no unit; write a duration such as '{v}ba' (batches), '{v}ep' (epochs) or '{v}dur' (fraction of the run)"
        if any(type_error(value, a) is None for a in args):
            return None
        options = [describe_annotation(a) for a in args if a is not type(None)]
        return f"expected {' or '.join(options)}, got {value!r}"
    if origin is typing.Literal:
        return None if value in args else f"expected one of {', '.join(repr(a) for a in args)}, got {value!r}"
    if origin is typing.Annotated:
        return type_error(value, args[0])
    if tp is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"expected an integer, got {value!r}"
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
        ok = isinstance(value, dict)
        return None if ok else f"expected a mapping with keys of {tp.__name__}, got {value!r}"
    if is_time_type(tp):
        return time_error(value)
    return None  # other classes (devices, modules, ...): not checkable from YAML


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


# ---------------------------------------------------------------------------------------------------------
# Annotations as source text (the signature table of registry_index.py)
# ---------------------------------------------------------------------------------------------------------

_NAMES: dict[str, Any] = {
    "Any": Any,
    "None": type(None),
    "bool": bool,
    "int": int,
    "float": float,
    "str": str,
    "list": list,
    "tuple": tuple,
    "dict": dict,
    "Sequence": Sequence,
    "Literal": typing.Literal,
    "Union": typing.Union,
    "Duration": Duration,
}


def annotation_source(tp: Any) -> str:
    """The part of annotation ``tp`` that :func:`type_error` checks, as text :func:`annotation_from_source` reads.

    Whatever :func:`type_error` does not look into (classes, callables, enums) becomes ``Any``; Composer's
    ``Time`` becomes ``Duration``; a dataclass (checked field by field) is kept by its import path.
    """
    if tp is inspect.Parameter.empty or tp is Any or tp is None or isinstance(tp, str):
        return "Any"
    if tp is type(None):
        return "None"
    if is_time_type(tp):
        return "Duration"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return annotation_source(args[0])
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is typing.Union or origin is types.UnionType:
        # Sorted, None last: typing caches equal unions, so Optional[Union[float, int]] reads back as whichever
        # order a process built first (Union[int, float, None] once torch is imported): the table must not depend
        # on import order.
        parts = sorted(dict.fromkeys(annotation_source(a) for a in args), key=lambda p: (p == "None", p))
        # A union with Any accepts anything; Python 3.10's get_type_hints writes `x: Any = None` as
        # Optional[Any], 3.11 and later leave it Any: both are Any here, so the generated table is the same.
        return "Any" if "Any" in parts else f"Union[{', '.join(parts)}]"
    if origin in (list, tuple, Sequence, typing.Sequence):
        name = "tuple" if origin is tuple else ("list" if origin is list else "Sequence")
        if not args:
            return name
        inner = ", ".join("..." if a is Ellipsis else annotation_source(a) for a in args)
        return f"{name}[{inner}]"
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        return "dict"
    if tp in (bool, int, float, str, list, tuple):
        return tp.__name__
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return f"{tp.__module__}:{tp.__qualname__}"
    return "Any"


def annotation_from_source(text: str) -> Any:
    """The annotation :func:`annotation_source` wrote; a dataclass path is imported (only the module named)."""
    import importlib

    names = dict(_NAMES)

    def dataclass_ref(match: re.Match) -> str:
        obj: Any = importlib.import_module(match.group(1))
        for part in match.group(2).split("."):
            obj = getattr(obj, part)
        alias = f"_dc{len(names)}"
        names[alias] = obj
        return alias

    text = re.sub(r"([A-Za-z_][\w.]*):([A-Za-z_][\w.]*)", dataclass_ref, text)
    return eval(text, {"__builtins__": {}}, names)  # noqa: S307 (generated text of a fixed vocabulary)
