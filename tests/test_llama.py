"""LLaMA decoder: HF equality (import), loss/metrics, document masking, bad input, parameter counts, training."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.accounting import parameter_counts
from llmfoundry_lite.models.llama import ComposerLlama, LlamaBlock, LlamaConfig, LlamaOutput

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=96, max_seq_len=64)


@pytest.fixture(scope="module")
def tokenizer(llama_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_tokenizer_dir)


def build(tokenizer, **kw):
    """Build through the registry exactly like a recipe's `model:` block."""
    return registry.build("models", {"name": "llama", **kw}, "model", tokenizer=tokenizer)


def save_tiny_hf(path, vocab_size: int, tie: bool, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = HFLlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        rope_theta=50000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).eval()
    # Random norms so a mis-mapped norm weight cannot hide behind the all-ones init.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("tie,kv_heads", [(False, 2), (True, 4)])
def test_init_from_hf_logits_match_transformers(tmp_path, tokenizer, tie, kv_heads):
    hf = save_tiny_hf(tmp_path / "hf", len(tokenizer) + 5, tie, kv_heads)
    model = build(tokenizer, init_from_hf=str(tmp_path / "hf")).eval()
    assert model.cfg.vocab_size == len(tokenizer) + 5 and model.cfg.tie_embeddings is tie
    ids = torch.randint(0, len(tokenizer), (2, 40))
    with torch.no_grad():
        ours = model({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        ref = hf(ids).logits
    logits = ours if isinstance(ours, torch.Tensor) else ours.logits
    assert logits.shape == (2, 40, len(tokenizer) + 5)
    assert (logits - ref).abs().max().item() <= 1e-4


def test_loss_shift_padding_and_lazy_logits_match_transformers(tmp_path, tokenizer):
    hf = save_tiny_hf(tmp_path / "hf", len(tokenizer), tie=False)
    model = build(tokenizer, init_from_hf=str(tmp_path / "hf"))
    ids = torch.randint(0, len(tokenizer), (3, 24))
    labels = ids.clone()
    labels[1, 15:] = -100  # right padding
    mask = (labels != -100).long()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    out = model(batch)
    loss = model.loss(out, batch)
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    assert abs(loss.item() - ref.loss.item()) < 1e-5
    # The loss from full logits (the generic API path) agrees with the fused labelled-positions path.
    assert abs(model.loss(out.logits, batch).item() - loss.item()) < 1e-5
    assert out.logits.shape == (3, 24, len(tokenizer))
    # Real positions of the padded row match HF's logits.
    assert (out.logits[1, :15] - ref.logits[1, :15]).abs().max().item() < 1e-4
    loss.backward()
    assert model.model.embed.weight.grad is not None


def test_metrics_and_flops(tokenizer):
    model = build(tokenizer, **TINY)
    ids = torch.randint(0, len(tokenizer), (2, 16))
    labels = ids.clone()
    labels[0, 10:] = -100
    batch = {"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}
    out = model.eval_forward(batch)
    metrics = model.get_metrics(is_train=False)
    assert set(metrics) == {"LanguageCrossEntropy", "LanguagePerplexity", "TokenAccuracy"}
    for m in metrics.values():
        model.update_metric(batch, out, m)
    ce = metrics["LanguageCrossEntropy"].compute().item()
    assert abs(ce - model.loss(out, batch).item()) < 1e-4
    assert abs(metrics["LanguagePerplexity"].compute().item() - torch.tensor(ce).exp().item()) < 1e-2
    assert metrics["TokenAccuracy"].total.item() == 9 + 15  # labelled next-token positions only
    # 6 x (non-embedding params + LM head) per real token, plus 12 x L x d x seq for attention; row 0 has 10
    # real tokens, row 1 all 16: padding is not useful work (as for the BERT family and the HF baselines).
    total, non_emb = parameter_counts(model)
    n = non_emb + model.cfg.vocab_size * model.cfg.d_model
    expected = 6 * n * (10 + 16) + 12 * 2 * 64 * (10 * 10 + 16 * 16)
    assert model.flops_per_batch(batch) == expected
    full = {**batch, "attention_mask": torch.ones_like(ids)}
    assert model.flops_per_batch(full) == 6 * n * 32 + 12 * 2 * 64 * 16 * 16 * 2


def test_document_masking_isolates_packed_documents(tokenizer):
    model = build(tokenizer, **TINY).eval()
    torch.manual_seed(1)
    a, b = torch.randint(4, len(tokenizer), (1, 10)), torch.randint(4, len(tokenizer), (1, 14))
    packed = torch.cat([a, b], dim=1)
    seq_id = torch.tensor([[0] * 10 + [1] * 14])
    with torch.no_grad():
        masked = model.model(packed, sequence_id=seq_id)
        alone = model.model(b)
        plain = model.model(packed)
    # RoPE is relative, so document b sees exactly what it would see on its own.
    assert (masked[0, 10:] - alone[0]).abs().max().item() < 1e-4
    assert (plain[0, 10:] - alone[0]).abs().max().item() > 1e-3  # without masking, b attends to a


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(d_model=60, n_heads=8), "model.n_heads"),
        (dict(n_heads=4, n_kv_heads=3), "model.n_kv_heads"),
        (dict(d_model=36, n_heads=4), "model.n_heads"),  # head dim 9: odd, no RoPE
        (dict(vocab_size=100), "model.vocab_size"),
    ],
)
def test_bad_shapes_raise_recipe_error_naming_key(tokenizer, kw, key):
    with pytest.raises(RecipeError) as e:
        build(tokenizer, **{**TINY, "n_kv_heads": None, **kw})
    assert e.value.key == key
    assert key in str(e.value)


def test_sequence_longer_than_max_seq_len(tokenizer):
    model = build(tokenizer, **TINY)
    ids = torch.zeros(1, 65, dtype=torch.long)
    # From forward a model error (no recipe key: the batch, not the block, is what is known there).
    with pytest.raises(ValueError, match="65 exceeds max_seq_len=64") as e:
        model({"input_ids": ids})
    assert not isinstance(e.value, RecipeError)


def test_init_from_hf_missing_folder(tokenizer, tmp_path):
    with pytest.raises(RecipeError) as e:
        build(tokenizer, init_from_hf=str(tmp_path / "nope"))
    assert e.value.key == "model.init_from_hf"


def test_vocab_defaults_to_tokenizer_and_ffn_rule(tokenizer):
    model = build(tokenizer, d_model=64, n_layers=1, n_heads=4, multiple_of=32)
    assert model.cfg.vocab_size == len(tokenizer)
    assert model.cfg.ffn_dim == 192  # int(2 * 4 * 64 / 3) = 170 -> rounded up to a multiple of 32
    assert LlamaConfig(d_model=512, multiple_of=32).ffn_dim == 1376  # BENCHMARKS shape
    assert LlamaConfig(d_model=4096, multiple_of=256).ffn_dim == 11008  # LLaMA-7B


def test_param_counts_match_real_parameters(tokenizer):
    for tie in (False, True):
        model = build(tokenizer, **TINY, tie_embeddings=tie)
        total, non_emb = parameter_counts(model)
        assert total == sum(p.numel() for p in model.parameters())
        head = 0 if tie else model.model.lm_head.weight.numel()
        assert non_emb == total - model.model.embed.weight.numel() - head
    # LLaMA-7B shape: 6.74B parameters, counted on the meta device.
    with torch.device("meta"):
        big = ComposerLlama(LlamaConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32))
    assert parameter_counts(big)[0] == 6_738_415_616


def test_scaled_residual_init_and_meta_device(tokenizer):
    model = build(tokenizer, **TINY, init_std=0.02)
    wo = model.model.blocks[0].attn.wo.weight.std().item()
    wqkv = model.model.blocks[0].attn.wqkv.weight.std().item()
    assert wo < wqkv * 0.7  # 1/sqrt(2 * n_layers) = 0.5
    meta = build(tokenizer, **TINY, init_device="meta")
    assert all(p.is_meta for p in meta.parameters())
    # The hooks Composer's FSDP uses to wrap, checkpoint and materialise blocks.
    dec = meta.model
    assert dec.fsdp_wrap_fn(dec.blocks[0]) and not dec.fsdp_wrap_fn(dec.embed)
    assert dec.activation_checkpointing_fn(dec.blocks[1])
    dec.to_empty(device="cpu")
    for m in dec.modules():
        dec.param_init_fn(m)
    assert torch.isfinite(dec(torch.zeros(1, 4, dtype=torch.long))).all()


def test_activation_checkpointing_same_gradients(tokenizer):
    torch.manual_seed(0)
    model = build(tokenizer, **TINY)
    ids = torch.randint(0, len(tokenizer), (2, 16))
    batch = {"input_ids": ids, "labels": ids}
    model.loss(model(batch), batch).backward()
    ref = model.model.blocks[0].ffn.w13.weight.grad.clone()
    model.zero_grad()
    # What Composer does with the decoder's hook when a recipe turns activation checkpointing on.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    apply_activation_checkpointing(
        model.model,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=model.model.activation_checkpointing_fn,
    )
    assert not any(type(m) is LlamaBlock for m in model.model.blocks)  # wrapped
    model.loss(model(batch), batch).backward()
    assert torch.allclose(
        model.model.blocks[0]._checkpoint_wrapped_module.ffn.w13.weight.grad, ref, atol=1e-6
    )


def test_registered_and_outputs_contract(tokenizer):
    assert "llama" in registry.names("models")
    model = build(tokenizer, **TINY)
    assert isinstance(model, ComposerLlama)
    ids = torch.randint(0, len(tokenizer), (2, 8))
    logits = model({"input_ids": ids})  # no labels: plain logits tensor
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 8, len(tokenizer))
    out = model({"input_ids": ids, "labels": ids})
    assert isinstance(out, LlamaOutput) and out.logits.shape == (2, 8, len(tokenizer))
    gen = model.generate(ids[:1, :3], max_new_tokens=5, temperature=0.0)
    assert gen.shape == (1, 8) and torch.equal(gen[:, :3], ids[:1, :3])


def test_trains_with_composer_loss_falls(tokenizer):
    from composer import Trainer
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = build(tokenizer, **TINY)
    ids = torch.randint(4, 40, (8, 32))  # a small, learnable token distribution
    rows = [{"input_ids": r, "labels": r, "attention_mask": torch.ones_like(r)} for r in ids]
    loader = DataLoader(rows, batch_size=4)
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration="12ba",
        optimizers=torch.optim.AdamW(model.parameters(), lr=3e-3),
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        loggers=[],
    )
    batch = {k: torch.stack([r[k] for r in rows[:4]]) for k in rows[0]}
    with torch.no_grad():
        before = model.loss(model(batch), batch).item()
    trainer.fit()
    with torch.no_grad():
        after = model.loss(model(batch), batch).item()
    assert after < before - 1.0
    trainer.close()


@pytest.mark.skipif(not os.path.isdir(REPO / "recipes" / "llama"), reason="recipes not present")
@pytest.mark.parametrize(
    "name,low,high",
    [("125m", 110e6, 140e6), ("350m", 330e6, 380e6), ("1b", 1.0e9, 1.2e9), ("7b", 6.6e9, 6.9e9)],
)
def test_recipe_param_counts(name, low, high):
    from llmfoundry_lite.recipe import load_recipe
    from llmfoundry_lite.train.meta import count_parameters

    total, non_emb = count_parameters(load_recipe(str(REPO / "recipes" / "llama" / f"{name}.yaml")))
    assert low <= total <= high and non_emb < total


def test_recipe_keys_are_the_config_fields(tokenizer, monkeypatch):
    """`llama` takes LlamaConfig's fields (types, defaults) plus its own keys; the config is validated once."""
    import dataclasses

    args, supplied, _ = registry.entry_args("models", registry.lookup("models", "llama"))
    shown = {a.name: (a.type, a.default) for a in args}
    for f in dataclasses.fields(LlamaConfig):
        if f.name != "vocab_size":  # the tokenizer's unless set: the builder's own optional key
            assert shown[f.name][1] == registry.format_value(f.default), f.name
    assert shown["vocab_size"] == ("int | null", "null") and shown["init_device"][0] == "one of 'cpu', 'meta'"
    assert shown["attn_impl"] == ("one of 'auto', 'flash', 'sdpa'", "auto") and supplied == ["tokenizer"]
    calls = []
    real = LlamaConfig.validate
    monkeypatch.setattr(LlamaConfig, "validate", lambda self, *a: calls.append(1) or real(self, *a))
    build(tokenizer, **TINY)
    assert len(calls) == 1


@pytest.mark.gpu
def test_flash_attn_runs_under_autocast_and_matches_sdpa(tokenizer):
    # Under amp_bf16 (no FSDP) the block input stays fp32 while q/k/v are bf16: `flash` must run, not refuse.
    pytest.importorskip("flash_attn")
    model = build(tokenizer, **TINY, attn_impl="flash").cuda().eval()
    ids = torch.randint(0, len(tokenizer), (2, 64), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        flash = model.model(ids).float()
        for block in model.model.blocks:
            block.attn.attn_impl = "sdpa"
        sdpa = model.model(ids).float()
    assert (flash - sdpa).abs().max() < 5e-2
