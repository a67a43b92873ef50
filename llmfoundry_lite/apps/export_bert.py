"""Composer checkpoint of a BERT-family run (pretraining or GLUE finetuning) -> Hugging Face folder.

- ``mosaic_bert`` (ALiBi, GeGLU): the published MosaicBERT layout (``mosaicml/mosaic-bert-base``'s weight names and
  config keys) plus its modeling code, ``mosaic_bert.py``, named by ``auto_map``: ``AutoModelForMaskedLM`` (or, for
  a GLUE checkpoint, ``AutoModelForSequenceClassification``) loads it with ``trust_remote_code=True``.
- classic ``bert`` (learned positions, GELU MLP): transformers' own ``BertForMaskedLM`` /
  ``BertForSequenceClassification``, no remote code.

The encoder's shape comes from the weights; what they cannot tell (``n_heads``, eps, dropouts) from the run's
``recipe.yaml`` next to the checkpoint, or ``--recipe`` (a GLUE run's checkpoint has no recipe beside it).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any, Optional

import torch

from llmfoundry_lite.errors import RecipeError

REMOTE_CODE = pathlib.Path(__file__).parent / "hf_remote" / "mosaic_bert.py"
_TASK_HEAD = ("pooler.weight", "pooler.bias", "classifier.weight", "classifier.bias")
# (position, ffn) pairs that a Hugging Face layout expresses: MosaicBERT's and classic BERT's.
LAYOUTS = {("alibi", "geglu"): "mosaic_bert", ("learned", "mlp"): "bert"}


def is_bert_state(model_sd: Mapping[str, Any]) -> bool:
    """Whether a Composer model state is a BERT-family model (BertMLM, or the GLUE classifier around its encoder)."""
    return "encoder.embeddings.word.weight" in model_sd


def split_state(model_sd: Mapping[str, Any]) -> tuple[dict, Optional[dict], Optional[dict]]:
    """(encoder, MLM head or None, GLUE task head {pooler, classifier} or None) state dicts of a BERT checkpoint."""
    enc = {k[len("encoder.") :]: v for k, v in model_sd.items() if k.startswith("encoder.")}
    head = {k[len("head.") :]: v for k, v in model_sd.items() if k.startswith("head.")}
    task = {k: model_sd[k] for k in _TASK_HEAD if k in model_sd}
    return enc, head or None, (task if len(task) == len(_TASK_HEAD) else None)


def bert_config(enc: Mapping[str, torch.Tensor], recipe: Optional[Mapping[str, Any]], source: str) -> Any:
    """The encoder's BertConfig: shape from the weights, the rest from the recipe's model block (or its HF start)."""
    from llmfoundry_lite.models.bert import CLASSIC, BertConfig, load_hf_bert
    from llmfoundry_lite.models.ffn import ffn_config

    if recipe is None:
        raise RecipeError(
            f"no recipe.yaml next to {source}: the number of attention heads is not in the weights; pass "
            "--recipe RECIPE.yaml (the recipe the run or GLUE job was started with)",
            key="--recipe",
        )
    block = recipe.get("model") or {}
    fields = {f.name for f in dataclasses.fields(BertConfig)}
    hf_start = (recipe.get("glue") or {}).get("init_from_hf") or block.get("init_from_hf")
    if hf_start:  # the encoder was built from that checkpoint's config.json
        kw = dataclasses.asdict(load_hf_bert(hf_start, key="--recipe")[0])
    else:
        kw = dict(CLASSIC) if block.get("name") == "bert" else {}
        kw.update({k: v for k, v in block.items() if k in fields and v is not None})
    n_layers = 1 + max(int(k.split(".")[1]) for k in enc if k.startswith("layers."))
    geglu = "layers.0.ffn.up.bias" not in enc  # GeGLU's up-projection has no bias, the GELU MLP's has
    up = enc["layers.0.ffn.up.weight"].shape[0]
    kw.update(
        vocab_size=enc["embeddings.word.weight"].shape[0],
        d_model=enc["embeddings.word.weight"].shape[1],
        n_layers=n_layers,
        intermediate_size=up // 2 if geglu else up,
        type_vocab_size=enc["embeddings.token_type.weight"].shape[0],
        position="learned" if "embeddings.position.weight" in enc else "alibi",
        ffn="geglu" if geglu else "mlp",
    )
    layout = (kw["position"], kw["ffn"])
    router = enc.get("layers.0.ffn.router.weight")
    if router is not None:  # SMoE-Dropout over the GeGLU's weights: the run's model.ffn, N from the router
        ffn = dict(block["ffn"]) if isinstance(block.get("ffn"), Mapping) else {}
        kw["ffn"] = ffn_config({**ffn, "name": "smoe_dropout", "n_experts": router.shape[0]})
    if kw["position"] == "learned":
        kw["max_position_embeddings"] = enc["embeddings.position.weight"].shape[0]
    cfg = BertConfig(**{k: v for k, v in kw.items() if k in fields})
    cfg.validate()
    if layout not in LAYOUTS:
        raise RecipeError(
            f"position: {layout[0]} with ffn: {layout[1]} has no Hugging Face layout (MosaicBERT is alibi + "
            "geglu, BERT learned + mlp), so this checkpoint cannot be exported",
            key="model.ffn",
        )
    return cfg


def export_bert(
    source: pathlib.Path,
    model_sd: Mapping[str, Any],
    cfg: Any,
    recipe: Optional[Mapping[str, Any]],
    tok: Any,
    out: pathlib.Path,
    dtype: Optional[torch.dtype],
) -> tuple[str, dict[str, Any]]:
    """Write config.json, model.safetensors (and mosaic_bert.py) into ``out``; return (architecture, config).

    ``cfg`` is :func:`bert_config` of the checkpoint's encoder.
    """
    from safetensors.torch import save_file

    from llmfoundry_lite.models.bert.hf_adapter import (
        classic_bert_hf_config,
        classic_bert_to_hf,
        mosaic_bert_hf_config,
        mosaic_bert_to_hf,
    )
    from llmfoundry_lite.models.bert.model import check_weights_fit

    enc, head, task = split_state(model_sd)
    cfg = dataclasses.replace(cfg, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    check_weights_fit(cfg, enc, head, str(source), "CHECKPOINT")
    vocab = len(tok)
    if vocab > cfg.vocab_size:
        raise RecipeError(
            f"the tokenizer has {vocab} tokens but the model's vocabulary is {cfg.vocab_size}; pass the run's "
            "tokenizer with --tokenizer",
            key="--tokenizer",
        )
    mosaic = LAYOUTS[(cfg.position, cfg.ffn)] == "mosaic_bert"
    if mosaic:
        sd = mosaic_bert_to_hf(enc, None if task else head)
        config = mosaic_bert_hf_config(cfg, valid_vocab_size=vocab if vocab < cfg.vocab_size else None)
        kind = "MosaicBertForSequenceClassification" if task else "MosaicBertForMaskedLM"
        # pipeline() loads a tokenizer for a model type it does not know only when the config names its class
        config["tokenizer_class"] = type(tok).__name__
        config["auto_map"] = {
            "AutoConfig": "mosaic_bert.MosaicBertConfig",
            "AutoModel": "mosaic_bert.MosaicBertModel",
            "AutoModelForMaskedLM": "mosaic_bert.MosaicBertForMaskedLM",
            "AutoModelForSequenceClassification": "mosaic_bert.MosaicBertForSequenceClassification",
        }
    else:  # padding rows of the vocabulary are cut: transformers' BERT has no way to keep them out of predictions
        sd = classic_bert_to_hf(enc, None if task else head, cfg, vocab)
        config = classic_bert_hf_config(cfg, vocab)
        kind = "BertForSequenceClassification" if task else "BertForMaskedLM"
    if task:
        sd.update({
            "bert.pooler.dense.weight": task["pooler.weight"], "bert.pooler.dense.bias": task["pooler.bias"],
            "classifier.weight": task["classifier.weight"], "classifier.bias": task["classifier.bias"],
        })  # fmt: skip
        n_labels = task["classifier.weight"].shape[0]
        config["num_labels"] = n_labels
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(n_labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(n_labels)}
        if n_labels == 1:
            config["problem_type"] = "regression"
        dropout = (recipe or {}).get("glue", {}) or {}
        config["classifier_dropout"] = dropout.get("classifier_dropout", 0.1)
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    config["architectures"] = [kind]
    config["torch_dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    config = {k: v for k, v in config.items() if v is not None or k == "classifier_dropout"}
    if mosaic:
        shutil.copyfile(REMOTE_CODE, out / REMOTE_CODE.name)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return kind, config


def prepare_tokenizer_for_encoder(tok: Any, max_len: int) -> None:
    """Give the saved tokenizer the model's context as ``model_max_length`` when it has none of its own."""
    if not tok.model_max_length or tok.model_max_length > 10**6:  # transformers' "unset" is ~1e30
        tok.model_max_length = int(max_len)
        tok.init_kwargs["model_max_length"] = tok.model_max_length
