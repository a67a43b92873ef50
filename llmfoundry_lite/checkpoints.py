"""Composer checkpoints on disk: find the file a path means, and read the model weights out of it.

One locator and one loader for everything that starts from a run's checkpoint (``glue``, ``export``). A path is
a checkpoint file, or a run's save folder: then its ``latest-rank0.pt`` (Composer's symlink), else the newest
complete ``*.pt`` in it. Sharded (FSDP) checkpoints are folders of shards that only Composer reads back; they are
refused with a message saying how to save a monolithic one. ``check_hf_folder`` is the other side's check: a
Hugging Face model folder (``init_from_hf``, ``generate HF_DIR``), told apart from a Composer checkpoint.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmfoundry_lite.errors import RecipeError, first_line

LATEST = "latest-rank0.pt"  # Composer's symlink to the last checkpoint of rank 0
# Prefixes DDP / FSDP / activation checkpointing / torch.compile may leave in parameter names.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a whole ``torch.save`` file (a folder of shards counts as complete).

    torch.save writes a zip whose directory comes last, so a file cut short by a kill has none.
    """
    path = Path(path)
    try:
        if path.is_dir():
            return True
        with zipfile.ZipFile(path) as z:
            return len(z.namelist()) > 0
    except (OSError, zipfile.BadZipFile):
        return False


def find_checkpoint(path: str | os.PathLike, key: str = "checkpoint") -> Path:
    """The checkpoint file ``path`` names: itself, or in a save folder its latest (or newest complete) ``*.pt``.

    Errors are RecipeErrors naming ``key`` (the recipe key or argument the path came from).
    """
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        return p
    if not p.is_dir():
        raise RecipeError(
            f"no such checkpoint {str(path)!r}: it does not exist; point to a Composer checkpoint file "
            "(e.g. CHECKPOINT_FOLDER/latest-rank0.pt) or a run's save_folder",
            key=key,
        )
    # A kill while saving leaves the pointer dangling or at a partial file: then take the newest whole file.
    if (p / LATEST).exists() and is_complete(p / LATEST):
        return (p / LATEST).resolve()
    files = [f for f in p.glob("*.pt") if f.is_file() and is_complete(f)]  # is_file: not a dangling link
    files.sort(key=lambda f: f.stat().st_mtime)
    if files:
        return files[-1]
    if (p / ".metadata").exists():
        raise RecipeError(
            f"{str(path)!r} is a sharded (FSDP) checkpoint; save a monolithic one "
            "(fsdp state_dict_type: full) and point to it",
            key=key,
        )
    if (p / "config.json").is_file():
        raise RecipeError(
            f"{str(path)!r} is a Hugging Face model folder (config.json), not a Composer checkpoint; use it as "
            "init_from_hf (model.init_from_hf, glue.init_from_hf) or with `generate`, or point to a run's *.pt",
            key=key,
        )
    raise RecipeError(f"no Composer checkpoint (*.pt) in folder {str(path)!r}", key=key)


def clean_name(name: str) -> str:
    """A parameter name without the wrapper prefixes DDP, FSDP, activation checkpointing or compile add."""
    if name.startswith("module."):
        name = name[len("module.") :]
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def load_model_state(path: str | os.PathLike, key: str = "checkpoint", mmap: bool = False) -> dict[str, Any]:
    """The model state dict of the Composer checkpoint at ``path`` (file or save folder), names cleaned.

    Entries are tensors, plus any ``_extra_state`` a model stores (e.g. its config). ``mmap`` maps the tensors
    instead of reading them (for a look at names and shapes).
    """
    import torch

    file = find_checkpoint(path, key)
    try:  # full unpickling: Composer checkpoints hold Python objects besides tensors
        ckpt = torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # truncated, unpicklable, not a torch file
        raise RecipeError(
            f"cannot read checkpoint {str(file)!r}: {type(e).__name__}: {first_line(str(e))}", key=key
        ) from None
    state = ckpt.get("state", ckpt) if isinstance(ckpt, Mapping) else None
    model_state = state.get("model") if isinstance(state, Mapping) else None
    if not isinstance(model_state, Mapping):
        raise RecipeError(f"{str(file)!r} is not a Composer checkpoint (no state['model'])", key=key)
    return {clean_name(k): v for k, v in model_state.items()}


def check_weights_match(
    own: Mapping[str, Any],
    state: Mapping[str, Any],
    source: str,
    key: str,
    hint: str = "",
    extra_ok: bool = False,
) -> None:
    """RecipeError naming the first weight ``state`` lacks, has extra (unless ``extra_ok``) or shapes unlike ``own``.

    ``own`` is the receiving model's state dict; ``hint`` (after a semicolon) says what usually causes a mismatch.
    """
    tail = f"; {hint}" if hint else ""
    extra = [k for k in state if k not in own]
    if extra and not extra_ok:
        raise RecipeError(
            f"{source} has {len(extra)} weights the model lacks (e.g. {extra[0]!r}){tail}", key=key
        )
    missing = [k for k in own if k not in state]
    if missing:
        raise RecipeError(
            f"{source} lacks {len(missing)} of the model's weights (e.g. {missing[0]!r}){tail}", key=key
        )
    for k, v in state.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            raise RecipeError(
                f"{source}: {k} has shape {tuple(v.shape)} but the model has {tuple(own[k].shape)}{tail}",
                key=key,
            )


# What transformers' save_pretrained writes as weights: one file, or shards listed by an index.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def looks_like_hub_name(path: str) -> bool:
    """Whether ``path`` could be a Hub repo id (``name`` or ``org/name``) rather than a local path."""
    return (
        not os.path.exists(os.path.expanduser(path))
        and not path.startswith(("/", ".", "~"))
        and path.count("/") <= 1
    )


def check_hf_folder(path: str, key: str) -> dict[str, Any] | None:
    """config.json of the Hugging Face model folder ``path``; a one-line RecipeError (``key``) when it is not one.

    Said before transformers is asked, whose errors here are tracebacks or pages long: a Composer checkpoint given
    instead, no config.json, config.json without weights, a sharded index naming a missing shard. A Hub name
    gives None (transformers resolves it).
    """
    if looks_like_hub_name(path):
        return None
    p = Path(os.path.expanduser(path))
    export_hint = (
        "export it first (llmfoundry-lite export CHECKPOINT HF_DIR), or give it where a Composer checkpoint goes "
        "(load_path with load_weights_only: true; glue.checkpoint)"
    )
    if not p.exists():
        raise RecipeError(f"no such Hugging Face model folder {path!r}", key=key)
    if p.is_file():
        hint = export_hint if is_complete(p) else "give the folder holding config.json and the weights"
        what = "a Composer checkpoint file" if is_complete(p) else "a file"
        raise RecipeError(f"{path!r} is {what}, not a Hugging Face model folder; {hint}", key=key)
    config_file = p / "config.json"
    if not config_file.is_file():
        if any(p.glob("*.pt")) or (p / ".metadata").exists():
            raise RecipeError(
                f"{path!r} is a Composer checkpoint folder, not a Hugging Face model folder; {export_hint}",
                key=key,
            )
        raise RecipeError(f"{path!r} has no config.json: not a Hugging Face model folder", key=key)
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise RecipeError(f"cannot read {str(config_file)!r}: {first_line(e)}", key=key) from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise RecipeError(
            f"{str(config_file)!r} has no model_type: not a transformers model config (save the model with "
            "save_pretrained)",
            key=key,
        )
    for name in HF_WEIGHT_FILES:
        index = p / (name + ".index.json")
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise RecipeError(
                    f"cannot read the shard index {str(index)!r}: {first_line(str(e))}", key=key
                ) from None
            missing = [s for s in shards if not (p / s).is_file()]
            if missing:
                raise RecipeError(
                    f"{str(index)!r} lists {len(missing)} shard(s) not in the folder (e.g. {missing[0]!r}); copy "
                    "every shard next to it",
                    key=key,
                )
            return config
        if (p / name).is_file():
            return config
    raise RecipeError(
        f"{path!r} has a config.json but no weights ({' or '.join(HF_WEIGHT_FILES)}, or a sharded *.index.json); "
        "copy the weights into the folder",
        key=key,
    )


def refuse_missing_weights(source: str, missing: list[str], key: str) -> None:
    """One-line RecipeError when a Hugging Face checkpoint lacks weights (transformers would make them random)."""
    if missing:
        raise RecipeError(
            f"{source!r} lacks {len(missing)} of the model's weights (e.g. {sorted(missing)[0]!r}); the checkpoint "
            "is incomplete",
            key=key,
        )
