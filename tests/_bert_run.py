"""A MosaicBERT run folder the way `train` leaves one (checkpoint + recipe), for the verbs that read checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_mosaicbert_run(block: dict[str, Any], tokenizer_dir: str, run: Path) -> Any:
    """Build ``block`` with seeded weights moved off their init (so predictions are not uniform), save it under
    ``run`` as ``ck.pt`` + ``recipe.yaml``; return the model (eval mode)."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from llmfoundry_lite import registry

    torch.manual_seed(0)
    model = registry.build(
        "models", block, "model", tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir)
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    run.mkdir()
    torch.save({"state": {"model": model.state_dict()}}, run / "ck.pt")
    OmegaConf.save({"model": block, "tokenizer": {"path": tokenizer_dir}}, run / "recipe.yaml")
    return model
