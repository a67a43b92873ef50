"""Composer checkpoint -> Hugging Face folder (config.json, safetensors, tokenizer, model card README.md).

llama runs give a ``LlamaForCausalLM`` folder; BERT-family runs (pretraining or GLUE) are exported by
``export_bert.py``: MosaicBERT in its published layout with its modeling code (``trust_remote_code=True``), classic
BERT as transformers' own ``BertForMaskedLM``. A llama checkpoint carries its model config
(``ComposerLlama.get_extra_state``); the run's ``recipe.yaml`` (written next to the checkpoints) or ``--recipe`` is
the fallback for the config and the tokenizer location.

    llmfoundry-lite export runs/my-run/checkpoints/latest-rank0.pt hf-out/
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('hf-out')"
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional

import torch

from llmfoundry_lite.checkpoints import find_checkpoint, load_model_state
from llmfoundry_lite.errors import RecipeError, first_line
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
    from llmfoundry_lite import registry
    from llmfoundry_lite.models.llama import LLAMA, LlamaConfig

    if isinstance(extra, Mapping) and extra.get("family") == LLAMA.name:
        fields = {f.name for f in dataclasses.fields(LlamaConfig)}
        return LlamaConfig(**{k: v for k, v in extra["config"].items() if k in fields})
    model_block = (recipe or {}).get("model") or {}
    if (
        getattr(registry.model_family(model_block.get("name")), "name", None) == LLAMA.name
        and "embed.weight" in decoder_sd
    ):
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
            f"cannot load tokenizer {name!r}: {first_line(e)}; pass --tokenizer PATH",
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
    return _llama_checkpoint(path, model_sd, recipe, tokenizer)


def _llama_checkpoint(
    path: pathlib.Path,
    model_sd: Mapping[str, Any],
    recipe: Optional[Mapping[str, Any]],
    tokenizer: Optional[str],
) -> LlamaCheckpoint:
    extra = model_sd.get("_extra_state")
    decoder_sd = {k[len("model.") :]: v for k, v in model_sd.items() if k.startswith("model.")}
    cfg = _llama_config(extra, recipe, decoder_sd)
    tok_name = tokenizer
    if tok_name is None and isinstance(extra, Mapping):
        tok_name = extra.get("tokenizer")
    return LlamaCheckpoint(path, cfg, decoder_sd, _tokenizer(tok_name or _recipe_tokenizer(recipe)))


def _recipe_tokenizer(recipe: Optional[Mapping[str, Any]]) -> Optional[str]:
    return ((recipe or {}).get("tokenizer") or {}).get("path") or None


def load_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe given with ``--recipe`` (its base chain merged, interpolations resolved; not validated)."""
    from llmfoundry_lite.recipe import compose

    if not os.path.isfile(path):
        raise RecipeError(f"no such recipe file {str(path)!r}", key="--recipe")
    return compose(path)[0]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_checkpoint(
    checkpoint_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer: Optional[str] = None,
    dtype: Optional[str] = None,
    recipe: Optional[str | os.PathLike] = None,
) -> pathlib.Path:
    """Write a Hugging Face folder (config, safetensors, tokenizer, README.md) from a Composer checkpoint.

    llama -> LlamaForCausalLM; mosaic_bert -> the published MosaicBERT layout with its code (``auto_map``); bert ->
    BertForMaskedLM; a GLUE checkpoint of either -> the family's sequence-classification model. ``recipe``: the
    run's recipe when no recipe.yaml lies next to the checkpoint.
    """
    from llmfoundry_lite.apps import export_bert

    if dtype is not None and dtype not in DTYPES:
        raise RecipeError(f"unknown dtype {dtype!r}; choose fp32, bf16 or fp16", key="--dtype")
    target = DTYPES.get(dtype) if dtype else None
    path = find_checkpoint(checkpoint_path, key="CHECKPOINT")
    model_sd = load_model_state(path, key="CHECKPOINT")
    run_recipe = load_recipe_file(recipe) if recipe is not None else _recipe_near(path)
    out = pathlib.Path(out_dir)
    # The tokenizer loads and the weights map before anything is written: a failed export leaves no folder.
    if export_bert.is_bert_state(model_sd):
        cfg = export_bert.bert_config(export_bert.split_state(model_sd)[0], run_recipe, str(path))
        refuse_hf_export(cfg.ffn, "MosaicBERT")  # its remote code has no routed experts either
        tok = _tokenizer(tokenizer or _recipe_tokenizer(run_recipe))
        with tempfile_folder(out) as tmp:
            kind, config = export_bert.export_bert(path, model_sd, cfg, run_recipe, tok, tmp, target)
            context = (run_recipe or {}).get("max_seq_len") or config["max_position_embeddings"]
            export_bert.prepare_tokenizer_for_encoder(tok, context)
            tok.save_pretrained(str(tmp))
            write_model_card(tmp, path, run_recipe, kind, config)
        return out
    from llmfoundry_lite.models.llama import hf_config_dict, state_dict_to_hf

    ckpt = _llama_checkpoint(path, model_sd, run_recipe, tokenizer)
    cfg, decoder_sd, tok = ckpt.config, ckpt.weights, ckpt.tokenizer
    refuse_hf_export(cfg.ffn)  # SMoE-Dropout's routed experts have no LlamaForCausalLM form
    prepare_tokenizer_for_decoder(tok, cfg.max_seq_len)
    try:
        hf_sd = state_dict_to_hf(decoder_sd, cfg)
    except KeyError as e:
        raise RecipeError(
            f"checkpoint weights do not match a llama model (missing {e})", key="CHECKPOINT"
        ) from None
    if target is not None:
        hf_sd = {k: v.to(target) for k, v in hf_sd.items()}
    from safetensors.torch import save_file

    with tempfile_folder(out) as tmp:
        config = hf_config_dict(cfg, tok)
        config["torch_dtype"] = str(next(iter(hf_sd.values())).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        save_file(hf_sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(str(tmp))
        write_model_card(tmp, path, run_recipe, "LlamaForCausalLM", config)
    return out


@contextlib.contextmanager
def tempfile_folder(out: pathlib.Path) -> Iterator[pathlib.Path]:
    """Write into ``out`` (created); a failure removes a folder this export created, leaving no half-written one."""
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise


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


# ---------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------

TRAIN_LOSS = "loss/train/total"
USAGE = {
    "LlamaForCausalLM": (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(DIR)\nmodel = AutoModelForCausalLM.from_pretrained(DIR)\n"
        'print(tok.decode(model.generate(**tok("Once upon a time", return_tensors="pt"), max_new_tokens=32)[0]))'
    ),
    "MosaicBertForMaskedLM": (
        "from transformers import pipeline\n"
        'fill = pipeline("fill-mask", model=DIR, trust_remote_code=True)\nprint(fill("Paris is the [MASK] of France."))'
    ),
    "BertForMaskedLM": (
        'from transformers import pipeline\nfill = pipeline("fill-mask", model=DIR)\n'
        'print(fill("Paris is the [MASK] of France."))'
    ),
    "MosaicBertForSequenceClassification": (
        "from transformers import AutoModelForSequenceClassification\n"
        "model = AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)"
    ),
    "BertForSequenceClassification": (
        "from transformers import AutoModelForSequenceClassification\n"
        "model = AutoModelForSequenceClassification.from_pretrained(DIR)"
    ),
}


def _training_facts(path: pathlib.Path) -> dict[str, Any]:
    """Batches and tokens seen (the checkpoint's timestamp) and the last logged training loss (metrics.jsonl)."""
    facts: dict[str, Any] = {}
    try:  # mmap: only the small timestamp is read, whatever the checkpoint's size
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        stamp = ckpt.get("state", {}).get("timestamp", {})
        stamp = stamp.get("Timestamp", stamp)  # Composer saves {"Timestamp": {"batch": ..., "token": ...}}
        facts.update({k: int(stamp[k]) for k in ("batch", "sample", "token") if k in stamp})
    except Exception:  # the weights loaded already; the card only loses these lines
        pass
    for folder in (path.parent, path.parent.parent):
        metrics = folder / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if TRAIN_LOSS in row:
                    facts["loss"] = row[TRAIN_LOSS]
            break
    return facts


def _glue_results(path: pathlib.Path) -> Optional[str]:
    """The GLUE results table (results.md of a ``glue`` run) in a folder above the checkpoint, if there is one."""
    for folder in list(path.parents)[:4]:
        results = folder / "results.md"
        if results.is_file() and (folder / "results.json").is_file():
            text = results.read_text()
            return text.split("\n", 1)[1].strip() if text.startswith("# ") else text.strip()
    return None


def write_model_card(
    out: pathlib.Path,
    path: pathlib.Path,
    recipe: Optional[Mapping[str, Any]],
    kind: str,
    config: Mapping[str, Any],
) -> None:
    """README.md: what the model is, how it was trained (recipe, data, tokens, final loss), how to load it."""
    from omegaconf import OmegaConf

    facts = _training_facts(path)
    recipe = recipe or {}
    model = recipe.get("model") or {}
    loader = recipe.get("train_loader") or {}
    data = {**loader, **(loader.get("dataset") or {})}  # the text loader's keys, or a dataset block's
    data_text = ", ".join(f"{k}: {data[k]}" for k in ("remote", "local", "split") if data.get(k)) or "unknown"
    rows = [
        ("Architecture", f"{kind} ({model.get('name', config.get('model_type'))})"),
        ("Shape", f"{config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}, "
                  f"{config.get('num_attention_heads')} heads, vocabulary {config.get('vocab_size')}"),
        ("Exported from", f"`{path}`"),
        ("Run", str(recipe.get("run_name", "unknown"))),
        ("Training data", data_text),
        ("Batches", f"{facts['batch']:,}" if "batch" in facts else "unknown"),
        ("Tokens seen", f"{facts['token']:,}" if facts.get("token") else "unknown"),
        ("Final training loss", f"{facts['loss']:.4f} (last logged)" if "loss" in facts else "unknown"),
    ]  # fmt: skip
    lines = [
        "---",
        "library_name: transformers",
        "tags: [llmfoundry-lite]",
        "---",
        f"# {recipe.get('run_name') or out.name}",
        "",
        "Trained with llmfoundry-lite and exported by `llmfoundry-lite export`.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Use",
        "",
        "```python",
        'DIR = "."  # this folder, or its hub name',
        USAGE.get(kind, ""),
        "```",
    ]
    glue = _glue_results(path)
    if glue:
        lines += ["", "## GLUE", "", glue]
    if recipe:
        lines += [
            "",
            "## Recipe",
            "",
            "```yaml",
            OmegaConf.to_yaml(OmegaConf.create(dict(recipe))).rstrip(),
            "```",
        ]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def register_cli(app: Any) -> None:
    """Add `llmfoundry-lite export CHECKPOINT OUT_DIR`."""
    import typer

    @app.command("export")
    def export_cmd(
        checkpoint: str = typer.Argument(
            ..., help="Composer checkpoint (.pt) of a run or GLUE job, or its folder"
        ),
        out_dir: str = typer.Argument(..., help="folder to write the Hugging Face model into"),
        tokenizer: Optional[str] = typer.Option(
            None, help="tokenizer folder or hub name (default: the run's)"
        ),
        dtype: Optional[str] = typer.Option(
            None, help="cast weights: fp32, bf16 or fp16 (default: as saved)"
        ),
        recipe: Optional[str] = typer.Option(
            None, help="the run's recipe, when no recipe.yaml lies next to the checkpoint (GLUE jobs)"
        ),
    ) -> None:
        """Export a Composer checkpoint to a Hugging Face folder (llama, MosaicBERT, BERT; GLUE classifiers)."""
        out = export_checkpoint(checkpoint, out_dir, tokenizer=tokenizer, dtype=dtype, recipe=recipe)
        kind = json.loads((out / "config.json").read_text())["architectures"][0]
        typer.echo(f"exported {checkpoint} -> {out} ({kind}, safetensors, tokenizer, README.md)")
