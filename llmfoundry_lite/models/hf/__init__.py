"""Hugging Face models as baselines, built from a config (no download) and wrapped by Composer.

``hf_bert``: ``BertForMaskedLM`` from ``BertConfig`` kwargs (the MosaicBERT paper's baseline; Composer's
``alibi`` / ``gated_linear_units`` / ``low_precision_layernorm`` algorithms can rewrite it).
``hf_causal_lm``: any ``AutoModelForCausalLM`` architecture (``llama``, ``gpt2``...) from a ``model_type``
and config kwargs. Both accept ``init_from_hf`` (a local folder or hub name) to start from weights.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Literal, Optional

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity, MaskedAccuracy
from composer.models import HuggingFaceModel
from torch import nn

from llmfoundry_lite.batch import IGNORE_INDEX
from llmfoundry_lite.checkpoints import check_hf_folder, refuse_missing_weights
from llmfoundry_lite.compat import no_split_module_names
from llmfoundry_lite.errors import RecipeError, first_line
from llmfoundry_lite.models.accounting import TransformerFlops, count_params, layer_shape, parameter_counts
from llmfoundry_lite.models.schema import vocab_size_from
from llmfoundry_lite.models.spec import FamilySpec, register_family

# Composer 0.32.1's ALiBi surgery on transformers' BERT fails from transformers 4.54 (its replacement forward is
# called with `past_key_values`); the project pins transformers<4.54, and a newer install is reported, not patched.
ALIBI_HF_BERT_BREAKS_AT = "4.54"


def alibi_hf_bert_problem(transformers_version: str) -> Optional[str]:
    """Why Composer's ``alibi`` cannot rewrite an HF BERT under this transformers version; None when it can."""
    from packaging.version import Version

    if Version(transformers_version.split("+")[0]) < Version(ALIBI_HF_BERT_BREAKS_AT):
        return None
    return (
        f"Composer 0.32.1's alibi surgery on Hugging Face BERT fails with transformers {transformers_version} "
        f"(>= {ALIBI_HF_BERT_BREAKS_AT}: \"forward() got an unexpected keyword argument 'past_key_values'\"); "
        f"pip install 'transformers<{ALIBI_HF_BERT_BREAKS_AT}' (the pinned range), or use model.name=mosaic_bert "
        "(ALiBi built in)"
    )


def check_alibi_on_hf_bert(recipe: Mapping[str, Any], transformers_version: Optional[str] = None) -> None:
    """RecipeError (``algorithms.alibi``) when Composer's ``alibi`` meets ``hf_bert`` under a breaking transformers.

    ``transformers_version`` defaults to the installed one. For recipe validation (a whole-recipe check).
    """
    model = recipe.get("model")
    if not isinstance(model, Mapping) or model.get("name") != "hf_bert":
        return
    algorithms = recipe.get("algorithms") or {}
    if isinstance(algorithms, Mapping):
        names = [
            (b.get("name") if isinstance(b, Mapping) and b.get("name") else k) for k, b in algorithms.items()
        ]
    else:
        names = [b.get("name") for b in algorithms if isinstance(b, Mapping)]
    if "alibi" not in names:
        return
    if transformers_version is None:
        import importlib.metadata as md

        try:
            transformers_version = md.version("transformers")
        except md.PackageNotFoundError:
            return
    why = alibi_hf_bert_problem(transformers_version)
    if why is not None:
        raise RecipeError(why, key="algorithms.alibi")


class HFEncoderAdapter(nn.Module):
    """``forward(input_ids, attention_mask, token_type_ids=None) -> (B, S, hidden)`` over an HF ``BertModel``."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Last hidden states of the wrapped encoder."""
        return self.base(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state  # fmt: skip


def _is_block(classes: tuple[type, ...], module: nn.Module) -> bool:
    return isinstance(module, classes)


def declare_fsdp_blocks(model: nn.Module) -> nn.Module:
    """Give an HF model the ``fsdp_wrap_fn`` / ``activation_checkpointing_fn`` Composer's FSDP asks it for.

    Composer wraps the HF model (the ComposerModel's child) as one FSDP root and asks it which submodules get
    their own unit; HF models define neither hook, so without this the whole model is one unit and activation
    checkpointing does nothing. The blocks are the classes in ``_no_split_modules``, or (BERT declares none)
    the repeated layers: the ModuleList holding ``num_hidden_layers`` modules of one class. Embeddings and the
    (tied) LM head stay in the root unit together.
    """
    names = no_split_module_names(model)
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for m in model.modules():
        if classes:
            break
        if isinstance(m, nn.ModuleList) and len(m) == n_layers and len({type(c) for c in m}) == 1:
            classes.add(type(m[0]))
    if classes:
        # a partial, not a lambda: the model stays picklable
        check = functools.partial(_is_block, tuple(classes))
        model.fsdp_wrap_fn = check
        model.activation_checkpointing_fn = check
    return model


class HFMaskedLM(HuggingFaceModel):
    """Composer-wrapped HF masked LM; ``.encoder`` adapts its trunk to the BERT-family encoder contract."""

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any):
        super().__init__(model, *args, **kwargs)
        # Counted as for MosaicBERT, for a fair MFU: the layers' matrices per real token, the MLM head
        # (transform + tied decoder) per masked token. Counted now, before FSDP shards the parameters.
        n_layers, d_model = layer_shape(self)
        self.flops = TransformerFlops(
            matmul_params=count_params(model.base_model.encoder.layer, matrices_only=True),
            n_layers=n_layers,
            d_model=d_model,
            head_params=count_params(model.cls, matrices_only=True),
        )

    @property
    def encoder(self) -> HFEncoderAdapter:
        """The trunk (``model.bert``) as an encoder returning last hidden states; not a registered submodule."""
        return HFEncoderAdapter(self.model.base_model)

    def flops_per_batch(self, batch: dict) -> int:
        """Useful training FLOPs, counted as for MosaicBERT (real tokens; head on masked tokens) for fair MFU."""
        return self.flops.per_batch(batch)


class HFCausalLM(HuggingFaceModel):
    """Composer-wrapped HF causal LM (labels unshifted; the HF model shifts them)."""

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any):
        super().__init__(model, *args, **kwargs)
        # Counted as for our LLaMA: non-embedding weights plus the LM head's matmul, before FSDP shards them.
        n_layers, d_model = layer_shape(self)
        self.flops = TransformerFlops(
            matmul_params=parameter_counts(self)[1] + model.config.vocab_size * d_model,
            n_layers=n_layers,
            d_model=d_model,
        )

    def flops_per_batch(self, batch: dict) -> int:
        """6 x (non-embedding params + LM head) per real token plus attention (accounting.py)."""
        return self.flops.per_batch(batch)


def _from_pretrained(cls: Any, path: str, optional: tuple[str, ...] = (), **kw: Any) -> Any:
    """``cls.from_pretrained(path)`` with every weight present (transformers would fill a missing one with random
    values and only warn) but those under the ``optional`` prefixes (a head trained fresh); one-line errors."""
    from transformers.utils import logging as hf_logging

    key = "model.init_from_hf"
    check_hf_folder(path, key)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its multi-line "newly initialized" warning: said in one line below
    # Any failure here is in the user's files (a truncated weights file, a shape unlike the config's) or name.
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, **kw)
    except Exception as e:
        raise RecipeError(
            f"cannot load a Hugging Face checkpoint from {path!r}: {type(e).__name__}: {first_line(e)}",
            key=key,
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    refuse_missing_weights(path, [k for k in info.get("missing_keys", []) if not k.startswith(optional)], key)
    return model


def build_hf_bert(
    tokenizer: Any = None,
    *,
    d_model: int = 768,
    n_layers: int = 12,
    n_heads: int = 12,
    intermediate_size: int = 3072,
    max_position_embeddings: int = 512,
    attention_dropout: float = 0.1,
    hidden_dropout: float = 0.1,
    layer_norm_eps: float = 1e-12,
    init_std: float = 0.02,
    vocab_size: Optional[int] = None,
    attn_implementation: Literal["sdpa", "eager"] = "sdpa",
    config_overrides: Optional[dict[str, Any]] = None,
    init_from_hf: Optional[str] = None,
) -> HFMaskedLM:
    """Hugging Face BertForMaskedLM built from a BertConfig (the MosaicBERT paper's baseline)."""
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    if d_model % n_heads:
        raise RecipeError(f"d_model={d_model} is not divisible by n_heads={n_heads}", key="model.d_model")
    if init_from_hf is not None:
        model = _from_pretrained(
            BertForMaskedLM,
            init_from_hf,
            optional=("cls.",),  # a BertModel checkpoint: the MLM head starts fresh
            attn_implementation=attn_implementation,
            attention_probs_dropout_prob=attention_dropout,
            hidden_dropout_prob=hidden_dropout,
        )
    else:
        cfg = BertConfig(
            vocab_size=vocab_size_from(tokenizer, vocab_size), hidden_size=d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings, attention_probs_dropout_prob=attention_dropout,
            hidden_dropout_prob=hidden_dropout, layer_norm_eps=layer_norm_eps, initializer_range=init_std,
            pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0, **(config_overrides or {}),
        )  # fmt: skip
        model = AutoModelForMaskedLM.from_config(cfg, attn_implementation=attn_implementation)
    metrics = [LanguageCrossEntropy(), MaskedAccuracy(ignore_index=IGNORE_INDEX)]
    return HFMaskedLM(declare_fsdp_blocks(model), tokenizer=tokenizer, use_logits=True, metrics=metrics)


def build_hf_causal_lm(
    tokenizer: Any = None,
    *,
    model_type: str = "llama",
    config: Optional[dict[str, Any]] = None,
    vocab_size: Optional[int] = None,
    attn_implementation: Literal["sdpa", "eager"] = "sdpa",
    init_from_hf: Optional[str] = None,
) -> HFCausalLM:
    """Any Hugging Face causal LM (model_type llama, gpt2, ...) built from config kwargs, as a baseline."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if init_from_hf is not None:
        model = _from_pretrained(AutoModelForCausalLM, init_from_hf, attn_implementation=attn_implementation)
    else:
        kw = dict(config or {})
        kw.setdefault("vocab_size", vocab_size_from(tokenizer, vocab_size))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if tokenizer is not None and getattr(tokenizer, name, None) is not None:
                kw.setdefault(name, getattr(tokenizer, name))
        try:
            cfg = AutoConfig.for_model(model_type, **kw)
        except ValueError as e:
            raise RecipeError(
                f"unknown Hugging Face model_type {model_type!r}: {e}", key="model.model_type"
            ) from None
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    metrics = [LanguageCrossEntropy(), LanguagePerplexity()]
    return HFCausalLM(
        declare_fsdp_blocks(model), tokenizer=tokenizer, use_logits=True, metrics=metrics, shift_labels=True
    )


# Blocks are the wrapped architecture's own (declare_fsdp_blocks finds them per model).
HF_BERT = register_family(FamilySpec(name="hf_bert", objective="mlm", builders={"hf_bert": build_hf_bert}))
HF_CAUSAL_LM = register_family(
    FamilySpec(name="hf_causal_lm", objective="causal_lm", builders={"hf_causal_lm": build_hf_causal_lm})
)
