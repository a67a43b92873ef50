"""A model family's config dataclass as the schema of its registry entries: every recipe key is written once.

:func:`config_builder` turns ``body(tokenizer, *, config, **own_keys)`` into the function a ``models`` entry
registers. Its signature, which the registry checks recipe blocks against and ``llmfoundry-lite list models NAME``
prints, is the dataclass's fields (types and defaults as written there) followed by the body's own keyword
arguments (keys that are not part of the config: ``init_from_hf``, a ``vocab_size`` the tokenizer fills in).
A call packs the fields into one config instance; the model validates it once, when it is constructed.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

from llmfoundry_lite.errors import RecipeError


def config_builder(
    config_cls: type,
    body: Callable[..., Any],
    *,
    name: str,
    doc: str,
    defaults: Optional[Mapping[str, Any]] = None,
    omit: Iterable[str] = (),
) -> Callable[..., Any]:
    """The registry entry ``name`` (docstring ``doc``): ``config_cls``'s fields plus ``body``'s own keywords.

    ``defaults`` replace field defaults for this entry (e.g. classic BERT's); ``omit`` names fields a recipe
    does not set (the framework fills them in). Fields the body takes itself are left to its signature.
    """
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    defaults = dict(defaults or {})
    if set(defaults) - set(fields):
        raise TypeError(f"{name}: defaults for unknown fields {sorted(set(defaults) - set(fields))}")
    body_hints = typing.get_type_hints(body)
    own = [p for p in inspect.signature(body).parameters.values() if p.name != "config"]
    skip = {p.name for p in own} | set(omit)
    keys = []
    for f in fields.values():
        if f.name in skip:
            continue
        if f.default_factory is not dataclasses.MISSING:  # a shared mutable default would leak between runs
            raise TypeError(f"{name}: field {f.name!r} has a default_factory; give it a plain default")
        default = defaults.get(
            f.name, inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        )
        keys.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hints[f.name]
            )
        )
    entry_defaults = {p.name: p.default for p in keys if p.default is not inspect.Parameter.empty}
    key_names = {p.name for p in keys}

    def entry(*args: Any, **kwargs: Any) -> Any:
        values = {**entry_defaults, **{k: kwargs.pop(k) for k in list(kwargs) if k in key_names}}
        return body(*args, config=config_cls(**values), **kwargs)

    positional = [p for p in own if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword = [p for p in own if p.kind is p.KEYWORD_ONLY]
    params = [p.replace(annotation=body_hints.get(p.name, p.annotation)) for p in positional]
    params += keys + [p.replace(annotation=body_hints.get(p.name, p.annotation)) for p in keyword]
    ret = body_hints.get("return", inspect.Signature.empty)
    entry.__signature__ = inspect.Signature(params, return_annotation=ret)  # type: ignore[attr-defined]
    entry.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not p.empty}
    if ret is not inspect.Signature.empty:
        entry.__annotations__["return"] = ret
    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = body.__module__
    entry.__doc__ = doc
    return entry


def vocab_size_from(tokenizer: Any, vocab_size: Optional[int]) -> int:
    """``vocab_size`` when the recipe sets it, else the tokenizer's; RecipeError when there is neither."""
    if vocab_size is not None:
        return vocab_size
    if tokenizer is None:
        raise RecipeError(
            "no tokenizer to size the vocabulary from; add a `tokenizer:` section or set model.vocab_size",
            key="model.vocab_size",
        )
    return len(tokenizer)
