"""Regenerate ``llmfoundry_lite/registry_index.py`` from the live registries (after adding, renaming or
re-documenting a built-in entry): ``python scripts/registry_index.py``."""

from __future__ import annotations

from llmfoundry_lite import registry, registry_index

if __name__ == "__main__":
    source = registry.render_index(registry.builtin_index())
    with open(registry_index.__file__, "w", encoding="utf-8") as f:
        f.write(source)
    print(f"wrote {registry_index.__file__}")
