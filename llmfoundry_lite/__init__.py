"""llmfoundry_lite: YAML-driven pretraining recipes (MosaicBERT, LLaMA) on Composer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from omegaconf import DictConfig


def load_recipe(path: str, overrides: list[str] | None = None) -> DictConfig:
    """Load a recipe (base chain, interpolation, overrides), resolved and validated."""
    from llmfoundry_lite.recipe import load_recipe as _load

    return _load(path, overrides)


def build_model(cfg: Any) -> Any:
    """Build the recipe's tokenizer and Composer model."""
    from llmfoundry_lite.train.build import build_model as _build

    return _build(cfg)


__all__ = ["__version__", "build_model", "load_recipe"]
