"""Recipes: YAML with a ``base:`` chain, ``${...}`` interpolation and CLI overrides, validated strictly before
anything is built.

``load.py`` reads and merges (remembering which file set each key), ``schema.py`` holds the top-level keys and
their defaults, ``validate.py`` checks a resolved recipe, and ``sections.py`` runs the checks that the modules
owning a section (training, GLUE) register. This package imports nothing above it: errors, registry, the cost
schema of ``hardware``, the standard library, omegaconf and yaml.
"""

from __future__ import annotations

from llmfoundry_lite.recipe.load import OVERRIDE_ORIGIN, Origins, compose, deep_merge
from llmfoundry_lite.recipe.schema import (
    COMPONENT_SECTIONS,
    DURATION_KEYS,
    DURATION_UNITS,
    LOADER_SECTIONS,
    MULTI_SECTIONS,
    SCHEMA_FIELDS,
    CompileConfig,
    RecipeSchema,
    compile_settings,
    iter_multi,
    section,
    sequence_length,
    to_yaml,
    with_defaults,
    with_sequence_length,
)
from llmfoundry_lite.recipe.sections import register_check, register_section
from llmfoundry_lite.recipe.validate import (
    check_duration,
    check_optimizer_values,
    check_sequence_lengths,
    load_recipe,
    model_context,
    validate,
    world_size,
)

__all__ = [
    "COMPONENT_SECTIONS",
    "DURATION_KEYS",
    "DURATION_UNITS",
    "LOADER_SECTIONS",
    "MULTI_SECTIONS",
    "OVERRIDE_ORIGIN",
    "SCHEMA_FIELDS",
    "CompileConfig",
    "Origins",
    "RecipeSchema",
    "check_duration",
    "check_optimizer_values",
    "check_sequence_lengths",
    "compile_settings",
    "compose",
    "deep_merge",
    "iter_multi",
    "load_recipe",
    "model_context",
    "register_check",
    "register_section",
    "section",
    "sequence_length",
    "to_yaml",
    "validate",
    "with_defaults",
    "with_sequence_length",
    "world_size",
]
