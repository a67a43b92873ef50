"""A run's checkpoints before the Trainer touches them: a writable save folder with room for one, the
``latest`` link repaired after a kill, and the checkpoint's RNG restored on a mid-epoch resume.
Locating and loading checkpoints for other verbs is :mod:`llmfoundry_lite.checkpoints`."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from composer import Trainer
from composer.core import Callback, State
from composer.loggers import Logger

from llmfoundry_lite.checkpoints import LATEST, clean_name, is_complete, load_model_state
from llmfoundry_lite.compat import restore_checkpoint_rng
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.accounting import count_params


def estimate_checkpoint_bytes(model: torch.nn.Module, world: int = 1, sharded: bool = False) -> int:
    """Bytes one checkpoint takes on one process's disk: fp32 weights plus two Adam moments."""
    total = count_params(model) * 4 * 3
    return total // max(1, world) if sharded else total


def check_save_folder(folder: str | os.PathLike, need_bytes: int = 0) -> None:
    """RecipeError naming ``save_folder`` when the folder cannot be created/written or lacks room for a checkpoint."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RecipeError(
            f"cannot write checkpoints to {str(path)!r} ({e.strerror or e}); choose a writable folder",
            key="save_folder",
        ) from None
    free = shutil.disk_usage(path).free
    if need_bytes and free < need_bytes:
        raise RecipeError(
            f"only {free / 2**20:,.0f} MiB free under {str(path)!r}, a checkpoint needs about "
            f"{need_bytes / 2**20:,.0f} MiB; free space or choose another folder",
            key="save_folder",
        )


# Composer algorithms that replace modules at Event.INIT, inside the Trainer and before it loads ``load_path``:
# with them the model built here is not yet the model the checkpoint must fit.
SURGERY_ALGORITHMS = ("alibi", "gated_linear_units", "stochastic_depth")


def _dims(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_checkpoint_fits(model: torch.nn.Module, load_path: str, strict: bool = True) -> None:
    """RecipeError naming ``load_path`` when its model weights cannot load into ``model``: a tensor of another shape,
    no tensor in common, or (``strict``) a weight one side lacks. Reads names and shapes only (memory-mapped)."""
    state = load_model_state(load_path, key="load_path", mmap=True)
    own = {clean_name(k): v for k, v in model.state_dict().items()}
    fix = "point load_path at a checkpoint of this recipe's model, or change the model block to match it"
    shared = [
        k for k, v in own.items() if isinstance(v, torch.Tensor) and isinstance(state.get(k), torch.Tensor)
    ]
    if not shared:
        theirs = next((k for k, v in state.items() if isinstance(v, torch.Tensor)), "none")
        ours = next((k for k, v in own.items() if isinstance(v, torch.Tensor)), "none")
        raise RecipeError(
            f"{load_path!r} holds another model: no weight in common ({theirs!r} in the checkpoint, {ours!r} "
            f"in this recipe); {fix}",
            key="load_path",
        )
    for k in shared:
        if tuple(state[k].shape) != tuple(own[k].shape):
            raise RecipeError(
                f"{load_path!r} holds a model of another shape ({k}: {_dims(state[k].shape)} in the checkpoint, "
                f"{_dims(own[k].shape)} in this recipe); {fix}",
                key="load_path",
            )
    if strict:
        missing = [k for k in own if k not in state]
        extra = [k for k in state if k not in own]
        if missing or extra:
            what = (
                f"lacks {len(missing)} of this recipe's model weights (e.g. {missing[0]!r})"
                if missing
                else f"has {len(extra)} weights this recipe's model lacks (e.g. {extra[0]!r})"
            )
            raise RecipeError(
                f"{load_path!r} {what}; {fix}, or set load_strict_model_weights=false to load the weights they share",
                key="load_path",
            )


_CKPT_RE = re.compile(r"ep(\d+)-ba(\d+)-rank0\.pt$")


def repair_latest_checkpoint(folder: str | os.PathLike, latest: str = LATEST) -> Path | None:
    """Point ``latest`` at the newest complete checkpoint in ``folder`` (a kill can leave a partial file).

    Returns the checkpoint autoresume will load, or None when there is none.
    """
    folder = Path(folder)
    link = folder / latest
    if link.exists() and is_complete(link.resolve()):
        return link.resolve()
    if not link.is_symlink() and not link.exists():
        return None
    found = []
    for p in folder.glob("ep*-ba*-rank0.pt"):
        m = _CKPT_RE.search(p.name)
        if m and is_complete(p):
            found.append((int(m.group(2)), p))
    target = os.readlink(link) if link.is_symlink() else str(link)
    print(f"warning: {link} -> {target} is missing or incomplete", file=sys.stderr)
    link.unlink()
    if not found:
        return None
    best = max(found, key=lambda t: t[0])[1]
    os.symlink(best.name, link)
    print(f"warning: resuming from {best.name} instead", file=sys.stderr)
    return best


class ResumeRNG(Callback):
    """Restore the checkpoint's RNG state right before the first batch of a mid-epoch resume.

    Composer restores RNG on resume only at an epoch boundary or while spinning a dataloader; with a streaming
    dataset (which resumes itself) a mid-epoch resume would draw random numbers (MLM masks, dropout) from a
    fresh stream. Restoring here, after the dataloader iterator exists, makes a resumed run bit-identical.
    """

    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    def before_dataloader(self, state: State, logger: Logger) -> None:  # noqa: D102
        if self.trainer is not None:
            restore_checkpoint_rng(self.trainer)
