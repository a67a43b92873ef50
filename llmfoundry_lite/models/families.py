"""Importing this registers every built-in model family: each subpackage of ``models/`` declares its spec."""

from __future__ import annotations

import importlib
import pkgutil

from llmfoundry_lite import models

FAMILY_PACKAGES = tuple(
    f"{models.__name__}.{m.name}" for m in pkgutil.iter_modules(models.__path__) if m.ispkg
)

for _package in FAMILY_PACKAGES:
    importlib.import_module(_package)
