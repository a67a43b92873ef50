"""What the rest of the code may ask of a model family, declared once per family: a :class:`FamilySpec`.

A family's ``__init__.py`` builds its spec and calls :func:`register_family` (one line): that registers its
builders as ``models`` entries, and each builder then carries the spec (``builder.family``), which data checks,
evaluation, export, ``show`` and ``estimate`` read through ``registry.model_family(name)``. A third-party
family does the same in its own package and names its builders in the ``llmfoundry_lite_models`` entry-point
group (README "Plugins"); no other module of this package changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional

from llmfoundry_lite import registry

Objective = Literal["mlm", "causal_lm"]  # also the name of the collator that makes its batches


@dataclass(frozen=True)
class FamilySpec:
    """One model family: its training objective, recipe entries, blocks and Hugging Face adapters."""

    name: str  # also ``get_extra_state()["family"]`` of its checkpoints
    objective: Objective
    builders: Mapping[str, Callable[..., Any]]  # ``models`` registry entries: recipe name -> builder
    blocks: tuple[type, ...] = ()  # the FSDP / activation-checkpointing units its models declare
    config_cls: Optional[type] = None  # the config dataclass its checkpoints carry
    hf_import: Optional[Callable[..., Any]] = None  # HF checkpoint (folder or hub name) -> config, weights
    hf_export: Optional[Callable[..., Any]] = None  # (weights, config) -> HF state dict
    hf_config: Optional[Callable[..., Any]] = None  # (config, tokenizer) -> HF config.json dict
    takes_sequence_id: bool = False  # attention can keep packed documents apart (batches' ``sequence_id``)

    @property
    def encoder(self) -> bool:
        """True for bidirectional encoders (scored by GLUE, not by next-token likelihood)."""
        return self.objective == "mlm"


_FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Register ``spec``'s builders as ``models`` entries that carry it; returns the spec."""
    for entry, builder in spec.builders.items():
        builder.family = spec  # type: ignore[attr-defined]
        registry.models.register(entry, func=builder)
    _FAMILIES[spec.name] = spec
    return spec


def family(name: str) -> Optional[FamilySpec]:
    """The registered family called ``name`` (a checkpoint's ``family``), None when there is none."""
    registry.load_builtins()
    return _FAMILIES.get(name)
