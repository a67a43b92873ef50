"""Checks of the sections training builds, registered with :mod:`llmfoundry_lite.recipe.sections`: the model
block (built on the meta device), the ``fsdp:`` block (Composer's FSDPConfig; and the parallelism config made
from it), and what a run needs outside the recipe (data splits, tokenizer files, logger logins)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llmfoundry_lite.checkpoints import LATEST, check_hf_folder, find_checkpoint, is_complete
from llmfoundry_lite.data.checks import check_recipe_data
from llmfoundry_lite.errors import RecipeError, suggest
from llmfoundry_lite.recipe import iter_multi
from llmfoundry_lite.recipe.sections import register_check, register_section

WANDB_FIX = (
    "run `wandb login` (or set WANDB_API_KEY), or log locally with WANDB_MODE=offline "
    "(WANDB_MODE=disabled turns wandb off)"
)


def fsdp_keys() -> list[str]:
    """Keys an ``fsdp:`` block may set: the public fields of Composer's ``FSDPConfig``."""
    from composer.utils import FSDPConfig

    return [f.name for f in dataclasses.fields(FSDPConfig) if not f.name.startswith("_")]


def validate_fsdp(block: Any) -> dict:
    """The ``fsdp:`` block as a plain dict, checked against Composer's FSDPConfig (RecipeError otherwise)."""
    if block is None:
        return {}
    if isinstance(block, DictConfig):
        block = OmegaConf.to_container(block, resolve=True)
    if not isinstance(block, dict):
        raise RecipeError(f"expected a mapping of FSDP settings, got {block!r}", key="fsdp")
    keys = fsdp_keys()
    for k in block:
        if k not in keys:
            raise RecipeError(f"unknown FSDP setting {k!r}{suggest(str(k), keys)}", key=f"fsdp.{k}")
    from composer.utils import FSDPConfig

    try:
        FSDPConfig(**block)  # Composer's own checks (sharding strategy names, state dict type, ...)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"invalid FSDP settings: {e}", key="fsdp") from None
    return block


def parallelism_config(cfg: DictConfig, world: int, device_name: str) -> dict | None:
    """Composer's ``parallelism_config`` from the recipe's ``fsdp:`` block on GPUs (one or more); None on CPU."""
    block = validate_fsdp(cfg.get("fsdp"))
    if not block:
        return None
    if device_name == "gpu":  # FSDP on one GPU is valid (Composer starts a one-process group for it)
        return {"fsdp": block}
    from composer.utils import dist

    if dist.get_global_rank() == 0:
        print("warning: the fsdp block is ignored on CPU (FSDP shards across GPUs); training without it")
    return None


def check_auto_microbatching(
    data: Mapping[str, Any], torch_version: str | None = None, composer_version: str | None = None
) -> None:
    """RecipeError for FSDP with ``device_train_microbatch_size: auto`` where Composer 0.32 breaks on it.

    Composer 0.32.x defines its FSDP unshard patch only for torch < 2.7.1, and automatic microbatching calls it
    anyway: ``NameError: patch_unshard_for_automicrobatching`` at the first batch. Versions default to the
    installed ones.
    """
    if data.get("fsdp") is None or data.get("device_train_microbatch_size") != "auto":
        return
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        torch_version = torch_version or version("torch")
        composer_version = composer_version or version("mosaicml")
    except PackageNotFoundError:
        return
    if Version(torch_version) >= Version("2.7.1") and Version(composer_version) < Version("0.33"):
        raise RecipeError(
            f"'auto' with an fsdp block fails with torch {torch_version} and Composer {composer_version} "
            "(NameError: patch_unshard_for_automicrobatching); set a number such as 8, or use torch 2.7.0",
            key="device_train_microbatch_size",
        )


def _wandb_settings_mode() -> str:
    import configparser

    config_dir = os.environ.get("WANDB_CONFIG_DIR") or os.path.join(
        os.path.expanduser("~"), ".config", "wandb"
    )
    for path in (os.path.join("wandb", "settings"), os.path.join(config_dir, "settings")):
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except configparser.Error:
            continue
        mode = parser.get("default", "mode", fallback="")
        if mode:
            return mode
    return ""


def wandb_login_problem(init_kwargs: Any = None) -> str | None:
    """Why a wandb run could not start here (no login, not offline), or None; looks only at env and files."""
    import netrc
    from urllib.parse import urlparse

    mode = os.environ.get("WANDB_MODE") or (init_kwargs or {}).get("mode") or _wandb_settings_mode()
    if str(mode).lower() in ("offline", "disabled", "dryrun"):
        return None
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return None
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    home = os.path.expanduser("~")
    # wandb's own lookup: $NETRC alone when set, else ~/.netrc or ~/_netrc.
    netrc_env = os.environ.get("NETRC")
    candidates = [netrc_env] if netrc_env else [os.path.join(home, ".netrc"), os.path.join(home, "_netrc")]
    for path in candidates:
        try:
            if netrc.netrc(os.path.expanduser(path)).authenticators(host):
                return None
        except (OSError, netrc.NetrcParseError):
            continue
    return (
        f"no wandb login found (no WANDB_API_KEY, no {host} entry in ~/.netrc) and WANDB_MODE is not offline"
    )


def check_logger_logins(data: Mapping[str, Any], world: int = 1) -> None:
    """RecipeError naming a wandb logger that could not start here (no login and not offline)."""
    for keypath, default_name, block in iter_multi("loggers", data.get("loggers")):
        block = block or {}
        if block.get("name", default_name) == "wandb":
            problem = wandb_login_problem(block.get("init_kwargs"))
            if problem:
                raise RecipeError(f"{problem}; {WANDB_FIX}", key=keypath)


def check_pretraining_recipe(recipe: str, overrides: list[str] | None = None) -> None:
    """RecipeError (one line) when ``recipe`` is for another verb: a GLUE recipe, which sets ``glue:`` but gets its
    ``train_loader`` (if any) from its base; ``train`` would pretrain that base and ignore ``glue:``."""
    import yaml

    from llmfoundry_lite.recipe import compose

    data, _ = compose(recipe, list(overrides or []))
    if data.get("glue") is None:
        return
    try:
        with open(recipe, encoding="utf-8") as f:
            top = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return
    if not isinstance(top, dict) or "train_loader" in top:
        return  # a pretraining recipe that also carries its GLUE settings
    base = top.get("base")
    pretrain = ""
    if isinstance(base, str):
        pretrain = f"; to pretrain its model, train its base: llmfoundry-lite train {os.path.relpath(os.path.join(os.path.dirname(recipe), base))}"
    raise RecipeError(f"this is a GLUE recipe: llmfoundry-lite glue {recipe}{pretrain}", file=recipe)


def check_hf_bert_alibi(data: Mapping[str, Any]) -> None:
    """RecipeError when Composer's ``alibi`` surgery meets ``hf_bert`` under a transformers it breaks on."""
    model = data.get("model")
    if not isinstance(model, Mapping) or model.get("name") != "hf_bert":
        return  # the only model it concerns: other recipes need not import Composer for it
    from llmfoundry_lite.models.hf import check_alibi_on_hf_bert  # lazily: models.hf imports Composer

    check_alibi_on_hf_bert(data)


def resumes_own_checkpoint(data: Mapping[str, Any]) -> bool:
    """Whether the run will autoresume from checkpoints already in its local save folder (then Composer ignores
    ``load_path``). Needs the run's ``run_name`` (``train`` sets it before checking); read-only."""
    save_folder, run_name = data.get("save_folder"), data.get("run_name")
    if data.get("autoresume") is False or not save_folder or not run_name or "://" in str(save_folder):
        return False
    folder = Path(str(save_folder).replace("{run_name}", str(run_name)))
    return (folder / LATEST).exists() or any(folder.glob("ep*-ba*-rank0.pt"))


def checkpoint_to_load(load_path: str | None) -> str | None:
    """The path Composer loads for ``load_path``: a file as given, a run's save folder's latest checkpoint, a sharded
    (FSDP) folder as given; a one-line RecipeError for a path that holds no whole Composer checkpoint."""
    if not load_path or "://" in load_path or "{" in load_path:  # object stores and Composer's format strings
        return load_path
    path = Path(os.path.expanduser(load_path))
    if path.is_dir() and (path / ".metadata").exists():  # sharded: only Composer reads it
        return load_path
    found = sorted(f.name for f in path.glob("*.pt") if f.is_file()) if path.is_dir() else []
    if found and not any(is_complete(path / name) for name in found):  # find_checkpoint would say "no *.pt"
        raise RecipeError(
            f"every checkpoint in {load_path!r} is cut short ({', '.join(found[:3])}); point load_path at a "
            "complete checkpoint",
            key="load_path",
        )
    file = find_checkpoint(load_path, key="load_path")
    if not is_complete(file):  # torch.load would fail with a zip-format traceback
        raise RecipeError(
            f"{str(file)!r} is not a whole Composer checkpoint (cut short while saving, or another kind of file); "
            "point load_path at a complete checkpoint (e.g. runs/NAME/checkpoints/latest-rank0.pt)",
            key="load_path",
        )
    return str(file)


def check_load_path(data: Mapping[str, Any]) -> None:
    """RecipeError when ``load_path`` names no readable checkpoint (unless the run resumes its own)."""
    if not resumes_own_checkpoint(data):
        checkpoint_to_load(data.get("load_path"))


def check_init_from_hf(data: Mapping[str, Any]) -> None:
    """RecipeError when ``model.init_from_hf`` is a local path that is not a Hugging Face model folder (a hub name
    passes: transformers resolves it when the model is built)."""
    model = data.get("model")
    if isinstance(model, Mapping) and isinstance(model.get("init_from_hf"), str):
        check_hf_folder(model["init_from_hf"], key="model.init_from_hf")


def check_model(block: Any) -> None:
    """The model block checked now, not at train time: a built-in family's by its config (no torch), any other
    built on the meta device, a success remembered (train/memo.py)."""
    from llmfoundry_lite.train.memo import remembered
    from llmfoundry_lite.train.meta import check_without_build

    if isinstance(block, Mapping) and check_without_build(block):
        return

    def build() -> bool:
        from llmfoundry_lite.train.meta import check_model_shape  # torch, Composer and the model code

        check_model_shape(block)
        return True

    if isinstance(block, Mapping):
        remembered("model-shape", dict(block), build)
    else:
        build()


register_section("model", check_model)
register_section("fsdp", validate_fsdp)
register_check(check_auto_microbatching)
register_check(check_hf_bert_alibi)
register_check(check_recipe_data, resources=True)
register_check(check_logger_logins, resources=True)
register_check(check_load_path, resources=True)
register_check(check_init_from_hf, resources=True)
