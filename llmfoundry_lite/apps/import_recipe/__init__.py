"""`llmfoundry-lite import-recipe FOUNDRY.yaml [-o OURS.yaml]`: an llm-foundry (or mosaicml/examples BERT) YAML
translated into a recipe here, validated, with every key that has no equivalent listed with the reason.

- :mod:`.translate`: the sections (tokenizer, loaders, optimizer, callbacks, FSDP, top-level keys) and the tables
  of what maps to what;
- :mod:`.models`: the model block (``mpt_causal_lm``, ``hf_causal_lm``, ``mosaic_bert``);
- here: the verb. It refuses a file that is already one of our recipes, writes the translation, runs the same
  validation as ``validate`` on it and says what it checked: ``valid`` only when that validation passes, else
  ``structure valid`` with what is not ready (and what cannot be checked here: hub tokenizers, remote data).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from llmfoundry_lite.apps.import_recipe.translate import Translation, translate
from llmfoundry_lite.errors import RecipeError, first_line

__all__ = ["Translation", "import_recipe", "readiness", "register_cli", "translate"]


def _looks_like_ours(data: Mapping[str, Any]) -> Optional[str]:
    """What marks ``data`` as a recipe of this framework rather than an upstream YAML (None if nothing does)."""
    if "base" in data:
        return "a base: key"
    tok = data.get("tokenizer")
    if isinstance(tok, Mapping) and "path" in tok:
        return "tokenizer.path"
    for section in ("train_loader", "eval_loader"):
        block = data.get(section)
        if isinstance(block, Mapping) and "collator" in block and "dataset" not in block:
            return f"{section}.collator"
    return None


def _refuse_own_recipe(src: Path, data: Mapping[str, Any]) -> None:
    """RecipeError when ``src`` is already one of our recipes: translating it would rewrite it for the worse."""
    from llmfoundry_lite.recipe import load_recipe

    mark = _looks_like_ours(data)
    if mark is None:
        try:
            load_recipe(src)
        except RecipeError:
            return  # not a valid recipe here: an upstream YAML
        mark = "it validates as one"
    raise RecipeError(
        f"already a llmfoundry-lite recipe ({mark}), not an llm-foundry YAML: use it as it is "
        f"(llmfoundry-lite validate {src})",
        file=str(src),
    )


def _not_checkable(recipe: Mapping[str, Any]) -> list[str]:
    """What the recipe fetches at run time and this command cannot look at: hub tokenizers, remote data."""
    from llmfoundry_lite.data.checks import looks_local

    out = []
    tok = recipe.get("tokenizer")
    if isinstance(tok, Mapping) and isinstance(tok.get("path"), str) and not looks_local(tok["path"]):
        if not os.path.isdir(os.path.expanduser(tok["path"])):
            out.append(f"hub tokenizer {tok['path']!r}")
    model = recipe.get("model")
    if isinstance(model, Mapping) and isinstance(model.get("init_from_hf"), str):
        if not os.path.isdir(os.path.expanduser(model["init_from_hf"])):
            out.append(f"hub checkpoint {model['init_from_hf']!r}")
    for section in ("train_loader", "eval_loader"):
        block = recipe.get(section)
        if not isinstance(block, Mapping):
            continue
        remotes = [block.get("remote")] + [
            s.get("remote") for s in (block.get("streams") or {}).values() if isinstance(s, Mapping)
        ]
        out += [f"{section} data at {r!r}" for r in remotes if isinstance(r, str) and "://" in r]
    return out


def readiness(dest: Path, recipe: Mapping[str, Any], check_resources: bool) -> list[str]:
    """What was checked, as the lines the verb prints: ``valid`` only when ``validate`` would pass.

    The structure was validated already; this runs the checks of what the run needs outside the recipe
    (data, tokenizer, logins), the same code as ``llmfoundry-lite validate``. With ``check_resources`` a
    failure is the user's error (exit 2); without, it is reported and the recipe is kept.
    """
    from llmfoundry_lite.recipe import load_recipe

    try:
        load_recipe(dest, check_resources=True)
    except RecipeError as e:
        if check_resources:
            raise
        lines = [f"structure valid; not ready to train: {first_line(e)}"]
        pending = _not_checkable(recipe)
        if pending:
            lines.append("not checked here (fetched at run time): " + "; ".join(pending))
        lines.append(f"when they are in place: llmfoundry-lite validate {dest}")
        return lines
    return [f"valid: llmfoundry-lite train {dest}"]


def import_recipe(
    path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    check_resources: bool = False,
) -> Translation:
    """Translate the YAML at ``path``, write it to ``out`` (default: next to it, ``NAME.lite.yaml``), validate it.

    The returned translation's ``checked`` says what the validation found (see :func:`readiness`).
    """
    import yaml

    from llmfoundry_lite.recipe import load_recipe, to_yaml

    src = Path(path)
    if not src.is_file():
        raise RecipeError(f"no such file {str(src)!r}", key="FOUNDRY_YAML")
    try:
        data = yaml.safe_load(src.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"invalid YAML: {first_line(e)}", file=str(src)) from None
    if not isinstance(data, Mapping):
        raise RecipeError("expected a mapping of settings at the top level", file=str(src))
    _refuse_own_recipe(src, data)
    t = translate(data, str(src))
    dest = Path(out) if out is not None else default_destination(src)
    header = [f"# Translated from {src} by `llmfoundry-lite import-recipe` ({t.kind})."]
    if t.unmapped:
        header.append("# Not translated (no equivalent here):")
        header += [f"#   {k}: {v}" for k, v in t.unmapped.items()]
    if t.notes:
        header.append("# Translated with a difference:")
        header += [f"#   {k}: {v}" for k, v in t.notes.items()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(header) + "\n" + to_yaml(t.recipe), encoding="utf-8")
    load_recipe(dest)  # the structure; RecipeError names the written file and the key
    t.checked = readiness(dest, t.recipe, check_resources)
    return t


def default_destination(src: Path) -> Path:
    """``NAME.lite.yaml`` next to the source."""
    return src.with_name(f"{src.stem}.lite.yaml")


def register_cli(app: Any) -> None:
    """Add the ``import-recipe`` verb to the main CLI."""
    import typer

    @app.command("import-recipe")
    def import_recipe_cmd(
        foundry_yaml: str = typer.Argument(
            ..., help="An llm-foundry (or mosaicml/examples BERT) training YAML."
        ),
        out: Optional[str] = typer.Option(
            None, "--out", "-o", help="Where to write the recipe (default: FOUNDRY.lite.yaml next to it)."
        ),
        check: bool = typer.Option(
            False,
            "--check/--no-check",
            help="Fail (exit 2) unless the data splits, tokenizer and logins it names are in place.",
        ),
    ) -> None:
        """Translate an llm-foundry YAML into a recipe; list every key with no equivalent and why."""
        dest = out or str(default_destination(Path(foundry_yaml)))
        t = import_recipe(foundry_yaml, dest, check_resources=check)
        typer.echo(t.report(dest))
        for line in t.checked:
            typer.echo(line)
