"""Moved to :mod:`llmfoundry_lite.recipe` (loading, schema, validation); this name re-exports it for the modules
that still import ``llmfoundry_lite.config``. Import from ``llmfoundry_lite.recipe`` in new code."""

from __future__ import annotations

from llmfoundry_lite.recipe import *  # noqa: F403
from llmfoundry_lite.recipe import __all__  # noqa: F401
