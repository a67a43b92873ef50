"""Hugging Face baselines: hf_bert (with the encoder adapter and Composer's Mosaic algorithms) and hf_causal_lm."""

from __future__ import annotations

import pytest
import torch

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError

TINY_BERT = dict(d_model=32, n_layers=2, n_heads=4, intermediate_size=64, max_position_embeddings=64)


def _mlm_batch(V: int, B: int = 3, S: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 9:] = 0
    labels = torch.where(torch.rand(B, S, generator=g) < 0.3, ids, -100)
    labels[0, 0] = ids[0, 0]
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels.masked_fill(mask == 0, -100)}


def test_hf_bert_builds_from_config_and_exposes_encoder(bert_tok):
    model = registry.build("models", {"name": "hf_bert", **TINY_BERT}, "model", tokenizer=bert_tok)
    assert model.model.config.vocab_size == len(bert_tok)
    b = _mlm_batch(len(bert_tok))
    out = model(b)
    assert out.logits.shape == (3, 16, len(bert_tok))
    loss = model.loss(out, b)
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        hidden = model.encoder(b["input_ids"], b["attention_mask"])
        ref = model.model.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    assert hidden.shape == (3, 16, 32) and torch.equal(hidden, ref)
    assert not any(k.startswith("encoder.") for k in model.state_dict())  # adapter adds no duplicate weights
    with torch.no_grad():
        outputs = model.eval_forward(dict(b))  # Composer pops labels from the batch it is given
    for metric in model.get_metrics(is_train=False).values():
        model.update_metric(b, outputs, metric)
    assert model.flops_per_batch(b) > 0


def test_hf_bert_init_from_hf_loads_weights(bert_tok, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    src = BertForMaskedLM(BertConfig(vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64))  # fmt: skip
    src.save_pretrained(tmp_path / "ckpt")
    model = registry.build("models", {"name": "hf_bert", "init_from_hf": str(tmp_path / "ckpt")}, "model",
                           tokenizer=bert_tok)  # fmt: skip
    w = "bert.encoder.layer.1.output.dense.weight"
    assert torch.equal(model.model.state_dict()[w], src.state_dict()[w])
    with pytest.raises(RecipeError) as e:
        registry.build("models", {"name": "hf_bert", "init_from_hf": str(tmp_path / "missing")}, "model",
                       tokenizer=bert_tok)  # fmt: skip
    assert e.value.key == "model.init_from_hf"


def test_composer_mosaic_algorithms_apply_to_hf_bert(bert_tok):
    """The hf-bert-mosaic-algorithms recipe: ALiBi + GLU + low-precision LayerNorm surgery on HF BERT."""
    from composer.algorithms.alibi import apply_alibi
    from composer.algorithms.gated_linear_units import apply_gated_linear_units
    from composer.algorithms.low_precision_layernorm import apply_low_precision_layernorm

    model = registry.build("models", {"name": "hf_bert", **TINY_BERT}, "model", tokenizer=bert_tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    apply_alibi(model, max_sequence_length=128)
    apply_gated_linear_units(model, optimizers=opt)
    apply_low_precision_layernorm(model, precision="amp_bf16", optimizers=opt)
    b = _mlm_batch(len(bert_tok), S=96)  # beyond max_position_embeddings=64: ALiBi extrapolates
    b["token_type_ids"] = torch.zeros_like(b["input_ids"])  # HF's buffered default stops at 64
    loss = model.loss(model(b), b)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "model_type,config",
    [
        ("llama", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)),
        ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    ],
)
def test_hf_causal_lm_from_config(llama_tok, model_type, config):
    model = registry.build("models", {"name": "hf_causal_lm", "model_type": model_type, "config": config},
                           "model", tokenizer=llama_tok)  # fmt: skip
    V = len(llama_tok)
    ids = torch.randint(5, V, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    b = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    out = model(b)
    assert out.logits.shape == (2, 12, V)
    loss = model.loss(out, b)
    # Labels are unshifted; the model shifts them: loss equals next-token CE computed by hand.
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), b["labels"][:, 1:].reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-5)
    assert model.flops_per_batch(b) > 0


def test_hf_causal_lm_bad_model_type_is_recipe_error(llama_tok):
    with pytest.raises(RecipeError) as e:
        registry.build(
            "models", {"name": "hf_causal_lm", "model_type": "not_a_model"}, "model", tokenizer=llama_tok
        )
    assert e.value.key == "model.model_type"


def test_baselines_count_flops_like_our_models(bert_tok, llama_tok):
    """One FLOPs definition: at the same shape and batch a baseline counts exactly what our model counts."""
    hf = registry.build("models", {"name": "hf_bert", **TINY_BERT}, "model", tokenizer=bert_tok)
    ours = (
        registry.build(  # classic BERT is HF BERT's architecture; vocab_multiple 1 keeps the vocabulary equal
            "models", {"name": "bert", **TINY_BERT, "vocab_multiple": 1}, "model", tokenizer=bert_tok
        )
    )
    b = _mlm_batch(len(bert_tok))
    assert hf.flops_per_batch(b) == ours.flops_per_batch(b) > 0
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    hf = registry.build(
        "models",
        {"name": "hf_causal_lm", "model_type": "llama", "config": shape},
        "model",
        tokenizer=llama_tok,
    )
    ours = registry.build(
        "models",
        {"name": "llama", "d_model": 32, "n_layers": 2, "n_heads": 4, "ffn_hidden_size": 64},
        "model",
        tokenizer=llama_tok,
    )
    ids = torch.randint(5, len(llama_tok), (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    b = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    assert hf.flops_per_batch(b) == ours.flops_per_batch(b) > 0
