"""Parameter counts and training FLOPs of a model: one definition each, used by the models, `show`,
`estimate` and the cost monitor.
"""

from __future__ import annotations

from typing import Any

import torch


def parameter_counts(model: Any) -> tuple[int, int]:
    """(total, non-embedding): non-embedding leaves out token/position embedding tables and an untied LM head."""
    if hasattr(model, "param_counts"):
        return tuple(int(x) for x in model.param_counts())  # type: ignore[return-value]
    total = sum(p.numel() for p in model.parameters())
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    inner = getattr(model, "model", None)
    out = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        emb_ids.add(id(out.weight))
    emb = sum(p.numel() for p in model.parameters() if id(p) in emb_ids)
    return total, total - emb
