"""A run's checkpoints before the Trainer touches them: a writable save folder with room for one, the
``latest`` link repaired after a kill, and the checkpoint's RNG restored on a mid-epoch resume.
Locating and loading checkpoints for other verbs is :mod:`llmfoundry_lite.checkpoints`."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import torch
from composer import Trainer
from composer.core import Callback, State
from composer.loggers import Logger

from llmfoundry_lite.checkpoints import LATEST, is_complete
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
