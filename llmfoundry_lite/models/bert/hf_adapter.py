"""Hugging Face BERT checkpoints -> :class:`BertEncoder` configs and weights, in two layouts.

- transformers' ``BertModel`` / ``BertForMaskedLM`` (classic BERT): q/k/v are fused into ``Wqkv``.
- MosaicBERT as published (``mosaicml/mosaic-bert-base``, written by mosaicml/examples' ``bert_layers.py``):
  ALiBi, GLU feed-forward, fused ``Wqkv``; renamed one to one by :data:`MOSAIC_BERT_NAMES`.

The layout is told by the weight names (both configs say ``model_type: bert``). Vocabulary rows are padded to a
multiple of 64 (zeros, never predicted).
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Optional

import torch

from llmfoundry_lite.checkpoints import check_hf_folder, refuse_missing_weights
from llmfoundry_lite.errors import RecipeError, first_line
from llmfoundry_lite.models.configs import BertConfig, pad_vocab

# Published MosaicBERT name -> ours ({i}: layer index; "head." names go to the MLM head, the rest to the encoder).
MOSAIC_BERT_NAMES: dict[str, str] = {
    "bert.embeddings.word_embeddings.weight": "embeddings.word.weight",
    "bert.embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
    "bert.embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "bert.embeddings.LayerNorm.bias": "embeddings.norm.bias",
    "bert.encoder.layer.{i}.attention.self.Wqkv.weight": "layers.{i}.attn.Wqkv.weight",  # [q | k | v] rows
    "bert.encoder.layer.{i}.attention.self.Wqkv.bias": "layers.{i}.attn.Wqkv.bias",
    "bert.encoder.layer.{i}.attention.output.dense.weight": "layers.{i}.attn.out.weight",
    "bert.encoder.layer.{i}.attention.output.dense.bias": "layers.{i}.attn.out.bias",
    "bert.encoder.layer.{i}.attention.output.LayerNorm.weight": "layers.{i}.norm1.weight",
    "bert.encoder.layer.{i}.attention.output.LayerNorm.bias": "layers.{i}.norm1.bias",
    "bert.encoder.layer.{i}.mlp.gated_layers.weight": "layers.{i}.ffn.up.weight",  # [gate | value], no bias
    "bert.encoder.layer.{i}.mlp.wo.weight": "layers.{i}.ffn.down.weight",
    "bert.encoder.layer.{i}.mlp.wo.bias": "layers.{i}.ffn.down.bias",
    "bert.encoder.layer.{i}.mlp.layernorm.weight": "layers.{i}.norm2.weight",
    "bert.encoder.layer.{i}.mlp.layernorm.bias": "layers.{i}.norm2.bias",
    "cls.predictions.transform.dense.weight": "head.transform.weight",
    "cls.predictions.transform.dense.bias": "head.transform.bias",
    "cls.predictions.transform.LayerNorm.weight": "head.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "head.norm.bias",
    "cls.predictions.decoder.bias": "head.bias",
}
# Published names that are known and deliberately not loaded, and why (said in one line when a checkpoint has them):
# the decoder weight is the word embedding (tied; checked equal); a sequence-classification checkpoint's pooler and
# classifier are task heads (GLUE trains fresh ones); the reference code before early 2023 saved its ALiBi table.
DECODER_WEIGHT = "cls.predictions.decoder.weight"
LEGACY_ALIBI = "bert.encoder.alibi"
MOSAIC_BERT_NOT_LOADED: dict[str, str] = {
    DECODER_WEIGHT: "tied: equal to the word embedding",
    "bert.pooler.": "task head: GLUE trains a fresh pooler",
    "classifier.": "task head: GLUE trains a fresh classifier",
    LEGACY_ALIBI: "legacy ALiBi buffer: recomputed from n_heads",
}
# The same for transformers' BERT checkpoints (BertModel, BertForPreTraining, BertForSequenceClassification).
CLASSIC_NOT_LOADED: dict[str, str] = {
    "bert.pooler.": "task head: GLUE trains a fresh pooler",
    "classifier.": "task head: GLUE trains a fresh classifier",
    "cls.seq_relationship.": "next-sentence-prediction head: not part of the MLM model",
}
_MOSAIC_MARKERS = (".attention.self.Wqkv.", ".mlp.gated_layers.")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
log = logging.getLogger(__name__)
_RULES = [
    (re.compile("^" + re.escape(src).replace(re.escape("{i}"), r"(\d+)") + "$"), dst)
    for src, dst in MOSAIC_BERT_NAMES.items()
]


def _resolve(path_or_name: str, filename: str) -> Optional[str]:
    """Local path of ``filename`` in a checkpoint folder or (cached) hub repo; None when it has none."""
    if os.path.isdir(path_or_name):
        path = os.path.join(path_or_name, filename)
        return path if os.path.isfile(path) else None
    from transformers.utils import cached_file

    try:
        return cached_file(
            path_or_name,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except (OSError, ValueError):
        return None


def _load_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def read_checkpoint(path_or_name: str) -> Optional[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """(config.json, full state dict) of a checkpoint folder or cached hub repo; None if its files are not here.

    Reads one file or a sharded ``*.index.json``, preferring safetensors, as transformers saves them.
    """
    config_path = _resolve(path_or_name, "config.json")
    if config_path is None:
        return None
    for name in _WEIGHT_FILES:
        index = _resolve(path_or_name, name + ".index.json")
        if index is not None:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(_load_file(os.path.join(os.path.dirname(index), shard)))
            break
        single = _resolve(path_or_name, name)
        if single is not None:
            sd = _load_file(single)
            break
    else:
        return None
    with open(config_path) as f:
        return json.load(f), sd


def is_mosaic_bert(state_dict: dict[str, Any]) -> bool:
    """True when the weight names are those of MosaicBERT as published (fused ``Wqkv``, ``gated_layers``)."""
    return any(m in k for k in state_dict for m in _MOSAIC_MARKERS)


def mosaic_bert_state_dicts(
    sd: dict[str, torch.Tensor], source: str, key: str = "init_from_hf", n_layers: Optional[int] = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder, MLM head) state dicts from a published-layout MosaicBERT state dict, renamed by the map.

    A name neither in :data:`MOSAIC_BERT_NAMES` nor in :data:`MOSAIC_BERT_NOT_LOADED` is a RecipeError listing them;
    with ``n_layers``, so is a weight of those layers (or of an MLM head present in part) that is missing.
    """
    if sd and all(k.startswith("model.") for k in sd):  # saved through Composer's HuggingFaceModel wrapper
        sd = {k[len("model.") :]: v for k, v in sd.items()}
    enc: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    unmatched = []
    dropped: dict[str, int] = {}
    for name, tensor in sd.items():
        for rule, dst in _RULES:
            m = rule.match(name)
            if m:
                ours = dst.replace("{i}", m.group(1)) if m.groups() else dst
                target, ours = (head, ours[5:]) if ours.startswith("head.") else (enc, ours)
                target[ours] = tensor
                break
        else:
            known = next((p for p in MOSAIC_BERT_NOT_LOADED if name.startswith(p)), None)
            if known is None:
                unmatched.append(name)
            else:
                dropped[known] = dropped.get(known, 0) + 1
    if unmatched:
        shown = ", ".join(unmatched[:8]) + (f" and {len(unmatched) - 8} more" if len(unmatched) > 8 else "")
        raise RecipeError(
            f"{source}: {len(unmatched)} weight name(s) match no MosaicBERT layer: {shown}; this loader reads "
            "checkpoints written by mosaicml/examples' bert_layers.py (names in models/bert/hf_adapter.py)",
            key=key,
        )
    decoder, embedding = sd.get(DECODER_WEIGHT), enc.get("embeddings.word.weight")
    if decoder is not None and embedding is not None and not torch.equal(decoder, embedding):
        raise RecipeError(
            f"{source}: {DECODER_WEIGHT} differs from the word embedding; MosaicBERT ties them and this loader "
            "reads only the embedding (an untied decoder cannot be loaded)",
            key=key,
        )
    # Every layer's weights, and the whole MLM head when there is one: a missing weight is one line, not a traceback.
    missing = []
    for src, dst in MOSAIC_BERT_NAMES.items() if n_layers else ():
        part, name = (head, dst[len("head.") :]) if dst.startswith("head.") else (enc, dst)
        if part is head and not head:
            continue  # no MLM head at all: a sequence-classification checkpoint
        layers = range(n_layers) if "{i}" in src else (0,)
        missing += [src.replace("{i}", str(i)) for i in layers if name.replace("{i}", str(i)) not in part]
    refuse_missing_weights(source, missing, key)
    if dropped:
        say_not_loaded(source, dropped, MOSAIC_BERT_NOT_LOADED)
    return enc, head


def say_not_loaded(source: str, dropped: dict[str, int], why: dict[str, str]) -> None:
    """One warning line: the weights (name or prefix -> count) a checkpoint has that are not loaded, and why."""
    parts = [
        f"{prefix}{'*' if prefix.endswith('.') else ''} ({n} tensor{'s' if n > 1 else ''}; "
        f"{why.get(prefix, 'not a weight of this model')})"
        for prefix, n in dropped.items()
    ]
    log.warning("%s: not loaded: %s", source, ", ".join(parts))


def mosaic_bert_config(
    hc: dict[str, Any], source: str, key: str = "init_from_hf", **overrides: Any
) -> BertConfig:
    """Our MosaicBERT config from a published ``config.json`` (ALiBi, GLU; dropouts and eps as saved)."""
    act = hc.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_python"):
        raise RecipeError(f"{source}: hidden_act {act!r} is not supported (need 'gelu')", key=key)
    try:
        kw = dict(
            vocab_size=pad_vocab(hc["vocab_size"]),
            d_model=hc["hidden_size"],
            n_layers=hc["num_hidden_layers"],
            n_heads=hc["num_attention_heads"],
            intermediate_size=hc["intermediate_size"],
            type_vocab_size=hc.get("type_vocab_size", 2),
            attention_dropout=hc.get("attention_probs_dropout_prob", 0.0),
            hidden_dropout=hc.get("hidden_dropout_prob", 0.1),
            layer_norm_eps=hc.get("layer_norm_eps", 1e-12),
            init_std=hc.get("initializer_range", 0.02),
            pad_token_id=hc.get("pad_token_id") or 0,
        )
    except KeyError as e:
        raise RecipeError(f"{source}: config.json lacks {e.args[0]!r}", key=key) from None
    if "max_position_embeddings" in hc:  # unused by ALiBi; kept so the config reads like the checkpoint's
        kw["max_position_embeddings"] = hc["max_position_embeddings"]
    return BertConfig(**{**kw, **overrides})


def load_mosaic_bert(
    hc: dict[str, Any], sd: dict[str, torch.Tensor], source: str, key: str = "init_from_hf", **overrides: Any
) -> tuple[BertConfig, dict, Optional[dict]]:
    """(config, encoder state dict, MLM-head state dict or None) from a published MosaicBERT checkpoint."""
    cfg = mosaic_bert_config(hc, source, key, **overrides)
    enc, head = mosaic_bert_state_dicts(sd, source, key, n_layers=cfg.n_layers)
    extra = cfg.vocab_size - hc["vocab_size"]
    if extra > 0:  # zero rows up to a multiple of 64, as for classic checkpoints
        for part, name in ((enc, "embeddings.word.weight"), (head, "bias")):
            if name in part:
                part[name] = _pad_rows(part[name], extra)
    return cfg, {k: v.detach().clone() for k, v in enc.items()}, head or None


def _pad_rows(t: torch.Tensor, extra: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(extra, *t.shape[1:])])


def load_hf_bert(
    path_or_name: str, key: str = "init_from_hf", **overrides: Any
) -> tuple[BertConfig, dict, Optional[dict]]:
    """(config, encoder state dict, MLM-head state dict or None) from a HF BERT or published MosaicBERT checkpoint.

    A MosaicBERT checkpoint gives an ALiBi/GLU config (``position: alibi``, ``ffn: geglu``); a transformers BERT
    checkpoint the classic one. ``overrides`` set execution/regularisation fields of either.
    """
    check_hf_folder(path_or_name, key)
    try:
        found = read_checkpoint(path_or_name)
    except Exception as e:  # a truncated or corrupt weights file: the user's
        raise RecipeError(
            f"cannot read the weights of {path_or_name!r}: {type(e).__name__}: {first_line(e)}", key=key
        ) from None
    if found is not None and is_mosaic_bert(found[1]):
        return load_mosaic_bert(*found, source=path_or_name, key=key, **overrides)
    from transformers import AutoConfig, BertForMaskedLM

    try:
        model_type = AutoConfig.from_pretrained(path_or_name).model_type
        if model_type != "bert":
            raise RecipeError(f"{path_or_name!r} is a {model_type!r} checkpoint, not BERT", key=key)
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its multi-line "weights not used" warning: we say it in one line below
        try:
            hf, info = BertForMaskedLM.from_pretrained(path_or_name, output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise RecipeError(
            f"cannot load a Hugging Face BERT checkpoint from {path_or_name!r} ({first}); use a local folder "
            "saved by transformers (hub names need internet)",
            key=key,
        ) from None
    # No MLM head at all is a BertModel checkpoint (GLUE needs none); any other missing weight would be random.
    missing = sorted(info.get("missing_keys", []))
    if "cls.predictions.transform.dense.weight" in missing:
        missing = [k for k in missing if not k.startswith("cls.")]
    refuse_missing_weights(path_or_name, missing, key)
    dropped: dict[str, int] = {}
    for name in info.get("unexpected_keys", []):
        prefix = next((p for p in CLASSIC_NOT_LOADED if name.startswith(p)), name)
        dropped[prefix] = dropped.get(prefix, 0) + 1
    if dropped:
        say_not_loaded(path_or_name, dropped, CLASSIC_NOT_LOADED)
    hc = hf.config
    if getattr(hc, "position_embedding_type", "absolute") != "absolute":
        raise RecipeError(f"{path_or_name}: only absolute position embeddings are supported", key=key)
    if hc.hidden_act not in ("gelu", "gelu_python"):
        raise RecipeError(
            f"{path_or_name}: hidden_act {hc.hidden_act!r} is not supported (need 'gelu')", key=key
        )
    vocab = pad_vocab(hc.vocab_size)
    kw = dict(
        vocab_size=vocab,
        d_model=hc.hidden_size,
        n_layers=hc.num_hidden_layers,
        n_heads=hc.num_attention_heads,
        intermediate_size=hc.intermediate_size,
        max_position_embeddings=hc.max_position_embeddings,
        type_vocab_size=hc.type_vocab_size,
        attention_dropout=hc.attention_probs_dropout_prob,
        hidden_dropout=hc.hidden_dropout_prob,
        layer_norm_eps=hc.layer_norm_eps,
        init_std=hc.initializer_range,
        pad_token_id=hc.pad_token_id if hc.pad_token_id is not None else 0,
    )
    cfg = BertConfig.classic(**{**kw, **overrides})
    sd = hf.state_dict()
    extra = vocab - hc.vocab_size

    def padrows(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(extra, *t.shape[1:])]) if extra else t

    e = "bert.embeddings."
    enc = {
        "embeddings.word.weight": padrows(sd[e + "word_embeddings.weight"]),
        "embeddings.position.weight": sd[e + "position_embeddings.weight"],
        "embeddings.token_type.weight": sd[e + "token_type_embeddings.weight"],
        "embeddings.norm.weight": sd[e + "LayerNorm.weight"],
        "embeddings.norm.bias": sd[e + "LayerNorm.bias"],
    }
    for i in range(hc.num_hidden_layers):
        p, q = f"bert.encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            enc[q + f"attn.Wqkv.{kind}"] = torch.cat(
                [sd[p + f"attention.self.{n}.{kind}"] for n in ("query", "key", "value")]
            )
            enc[q + f"attn.out.{kind}"] = sd[p + f"attention.output.dense.{kind}"]
            enc[q + f"norm1.{kind}"] = sd[p + f"attention.output.LayerNorm.{kind}"]
            enc[q + f"ffn.up.{kind}"] = sd[p + f"intermediate.dense.{kind}"]
            enc[q + f"ffn.down.{kind}"] = sd[p + f"output.dense.{kind}"]
            enc[q + f"norm2.{kind}"] = sd[p + f"output.LayerNorm.{kind}"]
    head = None
    if "cls.predictions.transform.dense.weight" not in set(info.get("missing_keys", [])):
        c = "cls.predictions."
        head = {
            "transform.weight": sd[c + "transform.dense.weight"],
            "transform.bias": sd[c + "transform.dense.bias"],
            "norm.weight": sd[c + "transform.LayerNorm.weight"],
            "norm.bias": sd[c + "transform.LayerNorm.bias"],
            "bias": padrows(sd[c + "bias"]),
        }
    return cfg, {k: v.detach().clone() for k, v in enc.items()}, head


# ---------------------------------------------------------------------------------------------------------
# Export: our weights -> the published MosaicBERT layout, or transformers' BertForMaskedLM
# ---------------------------------------------------------------------------------------------------------


def mosaic_bert_to_hf(enc: dict[str, torch.Tensor], head: Optional[dict[str, torch.Tensor]]) -> dict:
    """Our encoder (and MLM head) state dicts under the published MosaicBERT names (the inverse of the map).

    The tied decoder weight is written as its own copy of the word embedding, as the published checkpoints have it.
    """
    rules = [
        (re.compile("^" + re.escape(dst).replace(re.escape("{i}"), r"(\d+)") + "$"), src)
        for src, dst in MOSAIC_BERT_NAMES.items()
    ]
    ours = {**enc, **{"head." + k: v for k, v in (head or {}).items()}}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in ours.items():
        for rule, src in rules:
            m = rule.match(name)
            if m:
                out[src.replace("{i}", m.group(1)) if m.groups() else src] = tensor
                break
        else:
            raise KeyError(name)
    if head:
        out[DECODER_WEIGHT] = enc["embeddings.word.weight"]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _bert_shape_keys(cfg: BertConfig) -> dict[str, Any]:
    """The config.json keys both BERT layouts (MosaicBERT's and transformers') spell the same way."""
    return {
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": cfg.pad_token_id,
    }


def mosaic_bert_hf_config(cfg: BertConfig, valid_vocab_size: Optional[int] = None) -> dict[str, Any]:
    """config.json keys of the published MosaicBERT (``alibi_starting_size``, padded ``vocab_size``...)."""
    return {
        "model_type": "mosaic_bert",
        "vocab_size": cfg.vocab_size,
        "valid_vocab_size": valid_vocab_size,
        **_bert_shape_keys(cfg),
        "alibi_starting_size": cfg.max_position_embeddings,
        "position_embedding_type": "alibi",
        "classifier_dropout": None,
    }


def classic_bert_to_hf(
    enc: dict[str, torch.Tensor], head: Optional[dict[str, torch.Tensor]], cfg: BertConfig, vocab: int
) -> dict[str, torch.Tensor]:
    """Our classic-BERT state dicts under transformers' BertForMaskedLM names; vocabulary rows cut to ``vocab``.

    The inverse of :func:`load_hf_bert`'s classic mapping (fused ``Wqkv`` split into query/key/value).
    """
    e = "bert.embeddings."
    out = {
        e + "word_embeddings.weight": enc["embeddings.word.weight"][:vocab],
        e + "position_embeddings.weight": enc["embeddings.position.weight"],
        e + "token_type_embeddings.weight": enc["embeddings.token_type.weight"],
        e + "LayerNorm.weight": enc["embeddings.norm.weight"],
        e + "LayerNorm.bias": enc["embeddings.norm.bias"],
    }
    for i in range(cfg.n_layers):
        p, q = f"bert.encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            for n, part in zip(("query", "key", "value"), enc[q + f"attn.Wqkv.{kind}"].chunk(3)):
                out[p + f"attention.self.{n}.{kind}"] = part
            out[p + f"attention.output.dense.{kind}"] = enc[q + f"attn.out.{kind}"]
            out[p + f"attention.output.LayerNorm.{kind}"] = enc[q + f"norm1.{kind}"]
            out[p + f"intermediate.dense.{kind}"] = enc[q + f"ffn.up.{kind}"]
            out[p + f"output.dense.{kind}"] = enc[q + f"ffn.down.{kind}"]
            out[p + f"output.LayerNorm.{kind}"] = enc[q + f"norm2.{kind}"]
    if head:
        c = "cls.predictions."
        out.update({
            c + "transform.dense.weight": head["transform.weight"], c + "transform.dense.bias": head["transform.bias"],
            c + "transform.LayerNorm.weight": head["norm.weight"], c + "transform.LayerNorm.bias": head["norm.bias"],
            c + "bias": head["bias"][:vocab], c + "decoder.bias": head["bias"][:vocab],
            c + "decoder.weight": enc["embeddings.word.weight"][:vocab],
        })  # fmt: skip
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def classic_bert_hf_config(cfg: BertConfig, vocab: int) -> dict[str, Any]:
    """config.json of transformers' BertForMaskedLM with our shape (learned positions, GELU MLP)."""
    return {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "vocab_size": vocab,
        **_bert_shape_keys(cfg),
        "position_embedding_type": "absolute",
    }
