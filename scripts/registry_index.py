"""Regenerate ``llmfoundry_lite/registry_index.py`` from the live registries (after adding, renaming,
re-documenting or changing the arguments of a built-in entry): ``python scripts/registry_index.py``."""

from __future__ import annotations

from llmfoundry_lite import registry_index, registry_listing

if __name__ == "__main__":
    source = registry_listing.render_index(
        registry_listing.builtin_index(),
        registry_listing.builtin_signatures(),
        registry_listing.builtin_families(),
    )
    with open(registry_index.__file__, "w", encoding="utf-8") as f:
        f.write(source)
    print(f"wrote {registry_index.__file__}")
