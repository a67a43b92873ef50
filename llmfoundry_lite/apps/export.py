"""Composer checkpoint of a llama run -> Hugging Face folder (config.json, safetensors, tokenizer).

The model config travels inside the checkpoint (``ComposerLlama.get_extra_state`` stores it in the model state
dict), so a checkpoint is self-describing; the run's ``recipe.yaml`` (written next to the checkpoints) is the
fallback for the config and the tokenizer location.

    llmfoundry-lite export runs/my-run/checkpoints/latest-rank0.pt hf-out/
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('hf-out')"
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch

from llmfoundry_lite.checkpoints import find_checkpoint, load_model_state
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.ffn import refuse_hf_export

RECIPE_FILENAME = "recipe.yaml"


def _recipe_near(path: pathlib.Path) -> Optional[Mapping[str, Any]]:
    """The run's resolved recipe.yaml from the checkpoint's folder or its parent, if any."""
    from omegaconf import OmegaConf

    for folder in (path.parent, path.parent.parent):
        recipe = folder / RECIPE_FILENAME
        if recipe.is_file():
            return OmegaConf.to_container(OmegaConf.load(recipe), resolve=False)
    return None


def _llama_config(extra: Any, recipe: Optional[Mapping[str, Any]], decoder_sd: Mapping[str, torch.Tensor]):
    from llmfoundry_lite.models.llama import LlamaConfig

    if isinstance(extra, Mapping) and extra.get("family") == "llama":
        fields = {f.name for f in dataclasses.fields(LlamaConfig)}
        return LlamaConfig(**{k: v for k, v in extra["config"].items() if k in fields})
    model_block = (recipe or {}).get("model") or {}
    if model_block.get("name") == "llama" and "embed.weight" in decoder_sd:
        fields = {f.name for f in dataclasses.fields(LlamaConfig)}
        kwargs = {k: v for k, v in model_block.items() if k in fields and v is not None}
        kwargs["vocab_size"] = decoder_sd["embed.weight"].shape[0]
        return LlamaConfig(**kwargs)
    raise RecipeError(
        "not a llama checkpoint (no llama model config in the checkpoint or its recipe.yaml); "
        "only `model.name: llama` runs can be exported",
        key="CHECKPOINT",
    )


def _tokenizer(name: Optional[str]) -> Any:
    if not name:
        raise RecipeError(
            "the checkpoint does not say which tokenizer it was trained with; pass --tokenizer PATH",
            key="--tokenizer",
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise RecipeError(
            f"cannot load tokenizer {name!r}: {str(e).splitlines()[0]}; pass --tokenizer PATH",
            key="--tokenizer",
        ) from None


@dataclasses.dataclass
class LlamaCheckpoint:
    """What a llama run's checkpoint holds: its file, model config, decoder weights and tokenizer."""

    path: pathlib.Path
    config: Any  # LlamaConfig
    weights: dict[str, torch.Tensor]  # the decoder's state dict (keys without the ``model.`` prefix)
    tokenizer: Any


def read_llama_checkpoint(
    checkpoint_path: str | os.PathLike,
    tokenizer: Optional[str] = None,
    check: Optional[Callable[[Mapping[str, Any], Optional[Mapping[str, Any]]], None]] = None,
) -> LlamaCheckpoint:
    """Locate and load a llama checkpoint; the tokenizer is ``tokenizer``, else the one the run recorded.

    ``check(model_state, recipe)`` runs before the llama config is read (e.g. to name an encoder checkpoint).
    """
    path = find_checkpoint(checkpoint_path, key="CHECKPOINT")
    model_sd = load_model_state(path, key="CHECKPOINT")
    recipe = _recipe_near(path)
    if check is not None:
        check(model_sd, recipe)
    extra = model_sd.get("_extra_state")
    decoder_sd = {k[len("model.") :]: v for k, v in model_sd.items() if k.startswith("model.")}
    cfg = _llama_config(extra, recipe, decoder_sd)
    tok_name = tokenizer
    if tok_name is None and isinstance(extra, Mapping):
        tok_name = extra.get("tokenizer")
    if tok_name is None and recipe is not None:
        tok_name = ((recipe.get("tokenizer") or {}).get("path")) or None
    return LlamaCheckpoint(path, cfg, decoder_sd, _tokenizer(tok_name))


def export_checkpoint(
    checkpoint_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer: Optional[str] = None,
    dtype: Optional[str] = None,
) -> pathlib.Path:
    """Write a Hugging Face LlamaForCausalLM folder (config, safetensors, tokenizer) from a Composer checkpoint."""
    from safetensors.torch import save_file

    from llmfoundry_lite.models.llama import hf_config_dict, state_dict_to_hf

    # The tokenizer loads before anything is written: a failed export leaves no half-written folder.
    ckpt = read_llama_checkpoint(checkpoint_path, tokenizer)
    cfg, decoder_sd, tok = ckpt.config, ckpt.weights, ckpt.tokenizer
    refuse_hf_export(cfg.ffn)  # SMoE-Dropout's routed experts have no LlamaForCausalLM form
    prepare_tokenizer_for_decoder(tok, cfg.max_seq_len)

    try:
        hf_sd = state_dict_to_hf(decoder_sd, cfg)
    except KeyError as e:
        raise RecipeError(
            f"checkpoint weights do not match a llama model (missing {e})", key="CHECKPOINT"
        ) from None
    if dtype is not None:
        target = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
        if target is None:
            raise RecipeError(f"unknown dtype {dtype!r}; choose fp32, bf16 or fp16", key="--dtype")
        hf_sd = {k: v.to(target) for k, v in hf_sd.items()}

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config_dict(cfg, tok)
    config["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[
        next(iter(hf_sd.values())).dtype
    ]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_file(hf_sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(str(out))
    return out


def prepare_tokenizer_for_decoder(tok: Any, max_seq_len: int) -> None:
    """Make the saved tokenizer fit the standard HF calls: ``model.generate(**tok(text, return_tensors="pt"))``.

    A WordPiece/BERT-style tokenizer also returns ``token_type_ids``, which ``LlamaForCausalLM.generate`` rejects;
    and ``model_max_length`` should be the model's context, not the tokenizer's default (often 1e30).
    """
    # Set on the instance and in init_kwargs: save_pretrained writes tokenizer_config.json from init_kwargs.
    tok.model_input_names = ["input_ids", "attention_mask"]
    tok.model_max_length = int(max_seq_len)
    tok.init_kwargs.update(model_input_names=tok.model_input_names, model_max_length=tok.model_max_length)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # batched generate/padding needs one; decoders conventionally reuse EOS


def register_cli(app: Any) -> None:
    """Add `llmfoundry-lite export CHECKPOINT OUT_DIR`."""
    import typer

    @app.command("export")
    def export_cmd(
        checkpoint: str = typer.Argument(..., help="Composer checkpoint (.pt) of a llama run, or its folder"),
        out_dir: str = typer.Argument(..., help="folder to write the Hugging Face model into"),
        tokenizer: Optional[str] = typer.Option(
            None, help="tokenizer folder or hub name (default: the run's)"
        ),
        dtype: Optional[str] = typer.Option(
            None, help="cast weights: fp32, bf16 or fp16 (default: as saved)"
        ),
    ) -> None:
        """Export a Composer checkpoint to a Hugging Face folder (AutoModelForCausalLM loads it)."""
        out = export_checkpoint(checkpoint, out_dir, tokenizer=tokenizer, dtype=dtype)
        typer.echo(f"exported {checkpoint} -> {out} (LlamaForCausalLM, safetensors, tokenizer)")
