"""Issue 17's speed paths keep the numbers: chunked LM head + loss equals the plain computation, metrics from the
forward's statistics equal Composer's from logits, and a training step materialises no (tokens, vocab) tensor,
recomputes no loss for metrics, and computes train metrics only when asked (``use_train_metrics``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity, MaskedAccuracy
from torch.utils._python_dispatch import TorchDispatchMode

from llmfoundry_lite import registry
from llmfoundry_lite.models import lm_loss
from llmfoundry_lite.models.attention import unpad
from llmfoundry_lite.models.lm_loss import linear_cross_entropy

LLAMA = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=96, max_seq_len=64)
BERT = dict(d_model=32, n_layers=2, n_heads=4, intermediate_size=48, hidden_dropout=0.0)
VOCAB = 3000  # large next to every other tensor of these models, so a (tokens, vocab) tensor stands out


class OpLog(TorchDispatchMode):
    """Records every aten op called and the most rows of any (rows, VOCAB) tensor an op returned."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.vocab_rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.calls.append(name)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # Contiguous only: a transposed view of the head's weight (d_model, VOCAB) is not logits.
            if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[-1] == VOCAB and t.is_contiguous():
                self.vocab_rows = max(self.vocab_rows, t.numel() // VOCAB)
        return out


# block 64: several vocabulary blocks (online softmax, argmax across them); 512: one
@pytest.mark.parametrize("block", [64, 512])
@pytest.mark.parametrize("n,chunk_rows", [(37, 8), (37, 1000), (0, 8)])
def test_linear_cross_entropy_equals_plain_loss_and_gradients(n, chunk_rows, block, monkeypatch):
    monkeypatch.setattr(lm_loss, "CPU_VOCAB_BLOCK", block)
    torch.manual_seed(0)
    V, d = 301, 24
    h0, w0, t = torch.randn(n, d), torch.randn(V, d) * 0.3, torch.randint(0, V, (n,))
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss, stats = linear_cross_entropy(h, w, t, with_correct=True, chunk_bytes=chunk_rows * V * 4)
    (3.0 * loss).backward()  # a non-unit upstream gradient is applied in backward
    hr, wr = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    logits = F.linear(hr, wr)
    ref = F.cross_entropy(logits, t) if n else logits.sum() * 0.0
    (3.0 * ref).backward()
    assert abs(loss.item() - ref.item()) <= 1e-5
    assert torch.allclose(h.grad, hr.grad, atol=1e-6) and torch.allclose(w.grad, wr.grad, atol=1e-6)
    assert int(stats.count) == n and int(stats.correct) == int((logits.argmax(-1) == t).sum())
    assert abs(stats.loss_sum.item() - ref.item() * n) <= 1e-4 and not stats.loss_sum.requires_grad
    with torch.no_grad():  # evaluation: the same chunked pass without gradients
        ev, ev_stats = linear_cross_entropy(h0, w0, t, with_correct=True, chunk_bytes=chunk_rows * V * 4)
    assert abs(ev.item() - ref.item()) <= 1e-5 and int(ev_stats.correct) == int(stats.correct)


@pytest.mark.parametrize("block", [50, 512])
@pytest.mark.parametrize("chunk_rows", [8, 1000])
def test_linear_cross_entropy_with_bias_and_padded_vocabulary_equals_plain_slice(
    chunk_rows, block, monkeypatch
):
    monkeypatch.setattr(lm_loss, "CPU_VOCAB_BLOCK", block)
    # MosaicBERT's tied decoder: weight and bias padded past the vocabulary; the plain path slices the logits.
    torch.manual_seed(1)
    V, padded, d, n = 301, 320, 24, 37
    h0, w0, b0 = torch.randn(n, d), torch.randn(padded, d) * 0.3, torch.randn(padded) * 0.5
    t = torch.randint(0, V, (n,))
    t[0] = V - 1  # the last real vocabulary row is reachable
    h, w, b = (x.clone().requires_grad_() for x in (h0, w0, b0))
    loss, stats = linear_cross_entropy(
        h, w, t, bias=b, n_valid=V, with_correct=True, chunk_bytes=chunk_rows * V * 4
    )
    (2.0 * loss).backward()
    hr, wr, br = (x.clone().requires_grad_() for x in (h0, w0, b0))
    logits = F.linear(hr, wr, br)[:, :V]
    ref = F.cross_entropy(logits.float(), t)
    (2.0 * ref).backward()
    assert abs(loss.item() - ref.item()) <= 1e-5
    for ours, theirs in ((h, hr), (w, wr), (b, br)):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-5), ours.shape
    assert not w.grad[V:].any() and not b.grad[V:].any()  # padding rows never enter the softmax
    assert int(stats.correct) == int((logits.argmax(-1) == t).sum())
    # A padding row that would win the argmax if it were scored does not change the loss or the hits.
    with torch.no_grad():
        w_big, b_big = w0.clone(), b0.clone()
        b_big[V:] = 1e4
        ev, ev_stats = linear_cross_entropy(h0, w_big, t, bias=b_big, n_valid=V, with_correct=True)
    assert abs(ev.item() - ref.item()) <= 1e-5 and int(ev_stats.correct) == int(stats.correct)


def test_linear_cross_entropy_under_bf16_autocast_matches_autocast_linear(monkeypatch):
    monkeypatch.setattr(lm_loss, "CPU_VOCAB_BLOCK", 128)  # blocks, the last one partial
    torch.manual_seed(0)
    h0, w0, t = torch.randn(50, 32), torch.randn(500, 32) * 0.2, torch.randint(0, 500, (50,))
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    hr, wr = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(h, w, t, chunk_bytes=16 * 500 * 4)
        ref = F.cross_entropy(F.linear(hr, wr).float(), t)
    loss.backward()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-3
    assert h.grad.dtype == w.grad.dtype == torch.float32
    assert torch.allclose(h.grad, hr.grad, atol=2e-3) and torch.allclose(w.grad, wr.grad, atol=2e-3)


def _llama(tokenizer, **kw):
    return registry.build(
        "models", {"name": "llama", "vocab_size": VOCAB, **LLAMA, **kw}, "model", tokenizer=tokenizer
    )


def _llama_batch(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (8, 32), generator=g)
    labels = ids.clone()
    labels[1, 20:] = -100  # right padding
    return {"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}


def test_llama_loss_and_gradients_equal_the_full_logits_computation(llama_tok, monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 16 * VOCAB * 4)  # several chunks
    torch.manual_seed(0)
    model = _llama(llama_tok)
    batch = _llama_batch(len(llama_tok))
    out = model(batch)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    plain = model.loss(model.model(batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
    plain.backward()
    assert abs(out.loss.item() - plain.item()) <= 1e-5
    for k, p in model.named_parameters():
        assert torch.allclose(grads[k], p.grad, atol=1e-6, rtol=1e-4), k


def test_llama_metrics_from_stats_equal_composer_metrics_from_logits(llama_tok):
    model = _llama(llama_tok).eval()
    batch = _llama_batch(len(llama_tok), seed=1)
    with torch.no_grad():
        out = model.eval_forward(batch)
        ours = model.get_metrics(is_train=False)
        for m in ours.values():
            model.update_metric(batch, out, m)
        ref = {
            "LanguageCrossEntropy": LanguageCrossEntropy(),
            "LanguagePerplexity": LanguagePerplexity(),
            "TokenAccuracy": MaskedAccuracy(),
        }
        for m in ref.values():
            m.update(out.label_logits, out.label_targets)  # lazily materialised, for the reference only
    for k in ref:
        assert math.isclose(float(ours[k].compute()), float(ref[k].compute()), rel_tol=1e-5), k
    assert int(ours["TokenAccuracy"].total) == 7 * 31 + 19


def _fit_one_batch(model, batch: dict) -> tuple[OpLog, object]:
    from composer import Trainer
    from torch.utils.data import DataLoader

    rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(rows, batch_size=len(rows)),
        max_duration="1ba",
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        loggers=[],
    )
    with OpLog() as log:
        trainer.fit()
    trainer.close()
    return log, trainer


@pytest.mark.parametrize("use_train_metrics", [False, True])
def test_llama_train_step_holds_no_full_vocabulary_logits(llama_tok, monkeypatch, use_train_metrics):
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 16 * VOCAB * 4)
    model = _llama(llama_tok, use_train_metrics=use_train_metrics)
    assert bool(model.get_metrics(is_train=True)) is use_train_metrics
    batch = _llama_batch(len(llama_tok))
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    log, trainer = _fit_one_batch(model, batch)
    # Logits of one chunk (16 rows) at a time, never of all labelled rows.
    assert log.vocab_rows <= 16 < labelled
    assert "_log_softmax" not in log.calls and "nll_loss_forward" not in log.calls
    # Accuracy's argmax runs per chunk, only when train metrics are on; nothing else recomputes the head.
    assert log.calls.count("argmax") == (math.ceil(labelled / 16) if use_train_metrics else 0)
    train = {k.split("/")[-1] for k in trainer.state.train_metric_values}
    assert train == (
        {"LanguageCrossEntropy", "LanguagePerplexity", "TokenAccuracy"} if use_train_metrics else set()
    )


def _bert(tokenizer, **kw):
    return registry.build(
        "models", {"name": "mosaic_bert", "vocab_size": VOCAB, **BERT, **kw}, "model", tokenizer=tokenizer
    )


def _bert_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 16:] = 0
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    labels[mask == 0] = -100
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def _bert_plain_loss(model, batch: dict) -> torch.Tensor:
    """The unfused computation: tied decoder + bias over the padded vocabulary, sliced, then cross-entropy."""
    h, info = model.encoder(batch["input_ids"], batch["attention_mask"], unpadded=True)
    labels = unpad(batch["labels"], info)
    sel = labels != -100
    logits = model.head(h[sel], tied_to=model.encoder.embeddings.word)[:, : model.vocab_size]
    return F.cross_entropy(logits.float(), labels[sel])


def test_bert_fused_head_loss_and_gradients_equal_the_plain_computation(bert_tok, monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 8 * VOCAB * 4)  # several chunks
    torch.manual_seed(0)
    model = _bert(bert_tok)
    assert model.cfg.vocab_size > model.vocab_size  # the decoder carries padding rows
    with torch.no_grad():
        model.head.bias.normal_(std=0.5)  # a non-zero bias, so its part of the sum is tested
        model.head.bias[model.vocab_size :] = 1e4  # padding rows would win every argmax if they were scored
    batch = _bert_batch()
    out = model(batch)
    model.loss(out, batch).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    plain = _bert_plain_loss(model, batch)
    plain.backward()
    assert abs(out.loss.item() - plain.item()) <= 1e-5
    for k, p in model.named_parameters():
        assert torch.allclose(grads[k], p.grad, atol=1e-5, rtol=1e-4), k
    assert not grads["head.bias"][model.vocab_size :].any()
    assert out.masked_logits.shape == (int((batch["labels"] != -100).sum()), model.vocab_size)


@pytest.mark.parametrize("use_train_metrics", [False, True])
def test_bert_train_step_holds_no_vocabulary_logits_and_reuses_the_loss(
    bert_tok, monkeypatch, use_train_metrics
):
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 8 * VOCAB * 4)
    torch.manual_seed(0)
    model = _bert(bert_tok, use_train_metrics=use_train_metrics)
    assert bool(model.get_metrics(is_train=True)) is use_train_metrics
    batch = _bert_batch()
    masked = int((batch["labels"] != -100).sum())
    log, trainer = _fit_one_batch(model, batch)
    # The fused head: one chunk of (8, vocab) logits at a time, no log-softmax, no slice of the padded vocabulary.
    assert log.vocab_rows <= 8 < masked
    assert "_log_softmax" not in log.calls and "nll_loss_forward" not in log.calls
    assert log.calls.count("argmax") == (math.ceil(masked / 8) if use_train_metrics else 0)
    values = trainer.state.train_metric_values
    if use_train_metrics:
        # The logged train cross-entropy is the batch's loss.
        assert math.isclose(values["LanguageCrossEntropy"], trainer.state.loss.item(), rel_tol=1e-5)
    else:
        assert not values


def test_bert_metrics_from_stats_equal_composer_metrics_from_logits(bert_tok):
    model = _bert(bert_tok).eval()
    batch = _bert_batch(seed=2)
    with torch.no_grad():
        out = model.eval_forward(batch)
        ours = model.get_metrics(is_train=False)
        for m in ours.values():
            model.update_metric(batch, out, m)
        ref = {"LanguageCrossEntropy": LanguageCrossEntropy(), "MaskedAccuracy": MaskedAccuracy()}
        for m in ref.values():
            m.update(out.masked_logits, out.masked_labels)
    for k in ref:
        assert math.isclose(float(ours[k].compute()), float(ref[k].compute()), rel_tol=1e-5), k
