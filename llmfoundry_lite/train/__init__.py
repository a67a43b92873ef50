"""Training: recipe sections -> Composer objects -> the one Trainer -> fit, with checkpoints and launch.

``build.py`` builds a recipe's sections (and registers the Composer entries), ``checks.py`` registers the checks of
the sections training builds with ``recipe/``, ``trainer.py`` is the one place a Composer ``Trainer`` is made
(pretraining and GLUE), ``checkpoints.py`` guards the save folder and resumes, ``run.py`` is ``train()``,
``launch.py`` the process entry point and multi-process launcher, and ``callbacks/`` what every run carries.

``from llmfoundry_lite.train import train, build_trainer`` works; the names load on first use, so that
``launch.py`` (under this package) installs its stop-signal handlers before torch and Composer load.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"train": "llmfoundry_lite.train.run", "build_trainer": "llmfoundry_lite.train.run"}
__all__ = ["build_trainer", "train"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
