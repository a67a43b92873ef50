"""MosaicBERT / classic BERT encoder: ALiBi, unpadding, HF checkpoint import, masked-only MLM head, Composer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.attention import alibi_bias, alibi_slopes, pad, unpad, unpad_info
from llmfoundry_lite.models.bert import BertConfig, BertEncoder, BertMLM, MLMOutput, build_mosaic_bert
from llmfoundry_lite.models.bert.layers import GeGLU, LowPrecisionLayerNorm

TINY = dict(d_model=32, n_layers=2, n_heads=4, intermediate_size=48)


def _batch(vocab: int = 100, B: int = 4, S: int = 24, seed: int = 0, mlm_p: float = 0.3) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, S), generator=g)
    lengths = torch.tensor([S, S - 7, 5, S - 1])[:B]
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0
    labels = torch.where((torch.rand(B, S, generator=g) < mlm_p) & mask.bool(), ids, -100)
    labels[0, 1] = ids[0, 1]  # at least one label
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "labels": labels,
    }


@pytest.fixture(scope="module")
def tokenizer(bert_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bert_tokenizer_dir)


# ---- layers ---------------------------------------------------------------------------------------------


def test_alibi_slopes_stay_exact_fp32_when_the_model_is_cast():
    # FSDP's mixed precision casts buffers to bf16 (Composer's DEFAULT under amp_bf16), as .to(bf16) does:
    # flash-attn wants fp32 slopes, and rounded ones (2^-0.5 -> 0.70703125) would change the model.
    enc = BertEncoder(BertConfig(vocab_size=128, d_model=48, n_layers=1, n_heads=12, intermediate_size=48))
    enc = enc.to(torch.bfloat16)
    slopes = enc.alibi_slopes(torch.device("cpu"))
    assert slopes.dtype == torch.float32 and torch.equal(slopes, alibi_slopes(12))
    assert not any("slope" in k for k in enc.state_dict())  # derived from n_heads: nothing to checkpoint


def test_alibi_slopes_follow_press_rule_for_any_head_count():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert torch.allclose(alibi_slopes(4), torch.tensor([0.25, 0.0625, 0.015625, 0.00390625]))
    # 12 heads: the 8 power-of-two slopes, then every other slope of the 16-head sequence (2^-0.5, 2^-1.5, ...).
    s12 = alibi_slopes(12)
    expected = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 * (2 * i + 1)) for i in range(4)]
    assert torch.allclose(s12, torch.tensor(expected))
    assert alibi_slopes(6).shape == (6,) and len(set(alibi_slopes(6).tolist())) == 6


def test_alibi_bias_is_symmetric_and_linear_in_distance():
    b = alibi_bias(alibi_slopes(4), 7)
    assert b.shape == (4, 7, 7)
    assert torch.equal(b, b.transpose(1, 2))
    assert torch.allclose(b[1, 2, 6], -alibi_slopes(4)[1] * 4)
    assert torch.all(torch.diagonal(b, dim1=1, dim2=2) == 0)


def test_unpad_pad_roundtrip_and_cu_seqlens():
    x = torch.randn(3, 5, 2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    info = unpad_info(mask)
    assert info.cu_seqlens.tolist() == [0, 3, 8, 9] and info.max_seqlen == 5
    u = unpad(x, info)
    assert u.shape == (9, 2)
    back = pad(u, info)
    assert torch.equal(back, x * mask[..., None])


def test_geglu_is_gelu_gate_times_value_from_one_fused_projection():
    ff = GeGLU(8, 16)
    assert ff.up.weight.shape == (32, 8)
    x = torch.randn(5, 8)
    h = ff.up(x)
    assert torch.allclose(ff(x), ff.down(F.gelu(h[:, :16]) * h[:, 16:]))


def test_low_precision_layernorm_runs_in_bf16_under_autocast():
    ln = LowPrecisionLayerNorm(16)
    x = torch.randn(4, 16)
    assert torch.allclose(ln(x), F.layer_norm(x, (16,)), atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), F.layer_norm(x, (16,)), atol=5e-2)


# ---- encoder ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position,ffn", [("alibi", "geglu"), ("learned", "mlp")])
def test_unpadded_and_padded_execution_agree(position, ffn):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, position=position, ffn=ffn, unpad=True, **TINY)
    enc = BertEncoder(cfg).eval()
    padded = BertEncoder(BertConfig(**{**cfg.__dict__, "unpad": False})).eval()
    padded.load_state_dict(enc.state_dict())
    b = _batch()
    with torch.no_grad():
        a, p = enc(b["input_ids"], b["attention_mask"]), padded(b["input_ids"], b["attention_mask"])
    m = b["attention_mask"].bool()
    assert a.shape == (4, 24, 32)
    assert (a[m] - p[m]).abs().max() < 1e-5
    assert torch.all(a[~m] == 0)  # padding never went through the layers
    # Padding tokens cannot influence real ones: change them, real outputs stay.
    ids2 = b["input_ids"].clone()
    ids2[~m] = 7
    with torch.no_grad():
        a2 = enc(ids2, b["attention_mask"])
    assert torch.allclose(a[m], a2[m], atol=1e-6)


def test_alibi_runs_beyond_trained_length_and_learned_positions_refuse():
    torch.manual_seed(0)
    alibi = BertEncoder(BertConfig(vocab_size=64, max_position_embeddings=16, **TINY)).eval()
    ids = torch.randint(1, 64, (2, 64))
    with torch.no_grad():
        out = alibi(ids, torch.ones_like(ids))
    assert out.shape == (2, 64, 32) and torch.isfinite(out).all()
    # Translation invariance of ALiBi: a sequence's output does not depend on its absolute offset.
    with torch.no_grad():
        short = alibi(ids[:, :16], torch.ones_like(ids[:, :16]))
    assert torch.isfinite(short).all()
    learned = BertEncoder(BertConfig(vocab_size=64, max_position_embeddings=16, position="learned", **TINY))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        learned(ids, torch.ones_like(ids))


# ---- Hugging Face import ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """A tiny random BertForMaskedLM saved as safetensors and as .bin, and its BertModel trunk."""
    from transformers import BertConfig as HFConfig
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    hc = HFConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    model = BertForMaskedLM(hc).eval()
    # Non-trivial LayerNorm/bias values so a wrong mapping cannot hide.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    root = tmp_path_factory.mktemp("hfbert")
    model.save_pretrained(root / "mlm_st")
    model.save_pretrained(root / "mlm_bin", safe_serialization=False)
    model.bert.save_pretrained(root / "trunk_st")
    model.bert.save_pretrained(root / "trunk_bin", safe_serialization=False)
    return model, root


@pytest.mark.parametrize("folder", ["mlm_st", "mlm_bin", "trunk_st", "trunk_bin"])
def test_from_hf_reproduces_transformers_hidden_states(hf_checkpoints, folder):
    model, root = hf_checkpoints
    assert any(p.suffix in (".safetensors", ".bin") for p in (root / folder).iterdir())
    b = _batch(vocab=99, S=20)
    b["token_type_ids"][:, 10:] = 1
    with torch.no_grad():
        ref = model.bert(b["input_ids"], attention_mask=b["attention_mask"],
                         token_type_ids=b["token_type_ids"]).last_hidden_state  # fmt: skip
        enc = BertEncoder.from_hf(str(root / folder)).eval()
        out = enc(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        assert (out - ref).abs().max() <= 1e-4  # every position, padding included, like transformers
        fast = BertEncoder.from_hf(str(root / folder), unpad=True).eval()
        m = b["attention_mask"].bool()
        assert (
            fast(b["input_ids"], b["attention_mask"], b["token_type_ids"])[m] - ref[m]
        ).abs().max() <= 1e-4


@pytest.mark.parametrize("folder", ["mlm_st", "mlm_bin"])
def test_init_from_hf_reproduces_transformers_mlm_logits(hf_checkpoints, folder, tokenizer):
    model, root = hf_checkpoints
    b = _batch(vocab=99, S=20)
    wrapped = build_mosaic_bert(None, position="learned", ffn="mlp", vocab_size=99,
                                init_from_hf=str(root / folder)).eval()  # fmt: skip
    assert wrapped.cfg.vocab_size == 128  # padded to a multiple of 64
    with torch.no_grad():
        ref = model(**b)
        out = wrapped(b)
    m = b["attention_mask"].bool()
    assert out.logits.shape == (4, 20, 99)
    assert (out.logits[m] - ref.logits[m]).abs().max() <= 1e-4
    assert abs(float(wrapped.loss(out, b)) - float(ref.loss)) <= 1e-4


# ---- Composer model -----------------------------------------------------------------------------------


def test_registered_builders_pad_vocab_and_tie_decoder(tokenizer):
    model = registry.build("models", {"name": "mosaic_bert", **TINY}, "model", tokenizer=tokenizer)
    assert isinstance(model, BertMLM) and isinstance(model.encoder, BertEncoder)
    assert model.cfg.vocab_size % 64 == 0 and model.cfg.vocab_size >= len(tokenizer)
    # Tied by calling the encoder's embedding module (never a stored weight): one Parameter, registered once.
    assert model.head.weight is None
    assert sum(p is model.encoder.embeddings.word.weight for p in model.parameters()) == 1
    assert not any(k.startswith("head.word") or k.startswith("head._") for k in model.state_dict())
    classic = registry.build("models", {"name": "bert", **TINY}, "model", tokenizer=tokenizer)
    assert classic.cfg.position == "learned" and classic.cfg.ffn == "mlp" and classic.cfg.norm == "layernorm"
    assert "bert" in registry.names("models") and "mosaic_bert" in registry.names("models")


def test_masked_only_head_loss_equals_full_logits_loss_and_trains(tokenizer):
    torch.manual_seed(0)
    model = build_mosaic_bert(tokenizer, **TINY)
    V = len(tokenizer)
    b = _batch(vocab=V)
    out = model(b)
    assert isinstance(out, MLMOutput)
    n_masked = int((b["labels"] != -100).sum())
    assert out.masked_logits.shape == (n_masked, V)
    loss = model.loss(out, b)
    full = out.logits  # materialised lazily, (B, S, vocab)
    assert full.shape == (4, 24, V)
    ref = F.cross_entropy(full.reshape(-1, V), b["labels"].reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, ref, atol=1e-5)
    assert torch.allclose(model.loss(full, b), ref, atol=1e-5)  # plain-tensor outputs work too
    loss.backward()
    assert model.encoder.embeddings.word.weight.grad is not None
    assert model.head.transform.weight.grad.abs().sum() > 0


def test_metrics_and_flops_count_real_and_masked_tokens(tokenizer):
    model = build_mosaic_bert(tokenizer, **TINY).eval()
    b = _batch(vocab=len(tokenizer))
    with torch.no_grad():
        out = model.eval_forward(b)
    metrics = model.get_metrics(is_train=False)
    for metric in metrics.values():
        model.update_metric(b, out, metric)
    ce = float(metrics["LanguageCrossEntropy"].compute())
    assert math.isclose(ce, float(model.loss(out, b)), rel_tol=1e-4)
    assert 0.0 <= float(metrics["MaskedAccuracy"].compute()) <= 1.0
    c = model.cfg
    lengths = b["attention_mask"].sum(1)
    T, M = int(lengths.sum()), int((b["labels"] != -100).sum())
    fwd = T * 2 * c.n_layers * (4 * 32 * 32 + 3 * 32 * 48) + 4 * c.n_layers * 32 * int((lengths**2).sum())
    fwd += 2 * M * (32 * 32 + 32 * c.vocab_size)
    assert model.flops_per_batch(b) == 3 * fwd
    # More padding with the same real tokens does not change the count.
    wider = {k: F.pad(v, (0, 8), value=-100 if k == "labels" else 0) for k, v in b.items()}
    assert model.flops_per_batch(wider) == model.flops_per_batch(b)


def test_composer_trainer_fits_and_evaluates(tokenizer, tmp_path):
    from composer import Trainer
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = build_mosaic_bert(tokenizer, **TINY)
    V = len(tokenizer)
    rows = [{k: v[i] for k, v in _batch(vocab=V, seed=s).items()} for s in range(4) for i in range(4)]
    train, val = DataLoader(rows, batch_size=4), DataLoader(rows[:8], batch_size=4)
    trainer = Trainer(model=model, train_dataloader=train, eval_dataloader=val, max_duration="4ba",
                      eval_interval="2ba", optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
                      progress_bar=False, log_to_console=False, device="cpu", device_train_microbatch_size=2)  # fmt: skip
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 4
    ce = trainer.state.eval_metric_values["LanguageCrossEntropy"]
    assert math.isfinite(ce) and ce < math.log(V) + 1
    trainer.close()


def test_bad_shapes_raise_recipe_error_naming_the_key(tokenizer):
    with pytest.raises(RecipeError) as e:
        build_mosaic_bert(tokenizer, d_model=30, n_heads=4)
    assert e.value.key == "model.d_model" and "n_heads" in str(e.value)
    with pytest.raises(RecipeError) as e:
        build_mosaic_bert(tokenizer, **{**TINY, "hidden_dropout": 1.5})
    assert e.value.key == "model.hidden_dropout"
    with pytest.raises(RecipeError) as e:
        registry.build("models", {"name": "mosaic_bert", "n_layer": 2}, "model", tokenizer=tokenizer)
    assert e.value.key == "model.n_layer" and "n_layers" in str(e.value)
    with pytest.raises(RecipeError) as e:
        registry.build("models", {"name": "mosaic_bert", "position": "rope"}, "model", tokenizer=tokenizer)
    assert e.value.key == "model.position"
    with pytest.raises(RecipeError) as e:
        build_mosaic_bert(tokenizer, init_from_hf="/nonexistent/folder")  # ALiBi/GeGLU: no HF weights fit
    assert e.value.key == "model.init_from_hf"
    with pytest.raises(RecipeError) as e:
        registry.build(
            "models", {"name": "bert", "init_from_hf": "/nonexistent/folder"}, "model", tokenizer=tokenizer
        )
    assert e.value.key == "model.init_from_hf" and "/nonexistent/folder" in str(e.value)


def test_recipe_keys_are_the_config_fields(tokenizer):
    """`mosaic_bert` and `bert` take BertConfig's fields (types, defaults) plus their own vocabulary/init keys."""
    import dataclasses

    from llmfoundry_lite.models.bert import CLASSIC

    fields = {f.name: f.default for f in dataclasses.fields(BertConfig)}
    own = {"vocab_size": "null", "vocab_multiple": "64", "init_from_hf": "null"}
    for name, defaults in (("mosaic_bert", {}), ("bert", CLASSIC)):
        args, supplied, var_kw = registry.entry_args("models", registry.lookup("models", name))
        shown = {a.name: a.default for a in args}
        expected = {
            k: registry.format_value(defaults.get(k, v)) for k, v in fields.items() if k != "pad_token_id"
        }
        assert shown == {**expected, **own} and supplied == ["tokenizer"] and not var_kw
        norm = next(a for a in args if a.name == "norm")
        assert norm.type == "one of 'layernorm', 'low_precision_layernorm', 'fused_layernorm'"
    # The classic defaults are those of BertConfig.classic, the configuration HF checkpoints load into.
    classic = registry.build("models", {"name": "bert", **TINY}, "model", tokenizer=tokenizer)
    assert classic.cfg == BertConfig.classic(
        **TINY, vocab_size=classic.cfg.vocab_size, pad_token_id=tokenizer.pad_token_id
    )


def test_config_is_checked_once_per_build_and_also_when_built_in_python(tokenizer, monkeypatch):
    calls = []
    real = BertConfig.validate
    monkeypatch.setattr(BertConfig, "validate", lambda self, *a: calls.append(1) or real(self, *a))
    registry.build("models", {"name": "mosaic_bert", **TINY}, "model", tokenizer=tokenizer)
    assert len(calls) == 1
    # Built without the registry, the dataclass's annotations still decide (no second list of choices).
    with pytest.raises(RecipeError) as e:
        BertEncoder(BertConfig(vocab_size=64, norm="rmsnorm", **TINY))
    assert e.value.key == "model.norm" and "'low_precision_layernorm'" in str(e.value)
    with pytest.raises(RecipeError) as e:
        BertEncoder(BertConfig(vocab_size=64, **{**TINY, "n_layers": 2.5}))
    assert e.value.key == "model.n_layers"


@pytest.mark.gpu
@pytest.mark.parametrize("position", ["alibi", "learned"])
def test_flash_attn_and_sdpa_paths_agree_in_bf16(position):
    pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    enc = BertEncoder(BertConfig(vocab_size=128, position=position, attn_impl="flash", **TINY)).cuda().eval()
    b = _batch()
    ids, mask = b["input_ids"].cuda(), b["attention_mask"].cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        flash = enc(ids, mask).float()  # attn_impl: flash raises rather than run anything else
    for layer in enc.layers:
        layer.attn.attn_impl = "sdpa"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        sdpa = enc(ids, mask).float()
    m = mask.bool()
    assert (flash[m] - sdpa[m]).abs().max() < 5e-2
