"""Attention kernel choice: the pure selection function on its whole table, and the models feeding it.

flash-attn cannot run here, so the models are checked by what they hand to the selection function (device and
dtype of the tensors that reach the kernel, the mask) and by explicit ``flash`` stopping instead of falling
back. What the run's device and precision decide is a recipe error before the first batch
(``model.check_runtime``); what only a batch shows is a model error (AttentionKernelError) from ``forward``.
The flash kernels themselves are exercised by the ``gpu``-marked tests in test_bert.py/test_llama.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models import attention
from llmfoundry_lite.models.attention import AttentionKernelError, check_attn_impl, select_attention_kernel

REQUESTS = ("auto", "flash", "sdpa")
DEVICES = ("cuda", "cpu")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
IMPORTABLE = (True, False)
MASKS = (None, "a padding mask")
TABLE = list(itertools.product(REQUESTS, DEVICES, DTYPES, IMPORTABLE, MASKS))


@pytest.mark.parametrize("requested,device,dtype,importable,mask", TABLE)
def test_every_case_of_the_table(requested, device, dtype, importable, mask):
    flash_can_run = (
        importable and device == "cuda" and dtype in (torch.bfloat16, torch.float16) and mask is None
    )
    if requested == "sdpa":
        expected = "sdpa"
    elif flash_can_run:
        expected = "flash"
    elif requested == "auto":
        expected = "sdpa"  # auto falls back silently
    else:
        expected = None  # explicit flash that cannot run: an error, never a silent fallback
    if expected is None:
        with pytest.raises(AttentionKernelError) as e:
            select_attention_kernel(requested, device, dtype, importable, mask)
        assert not isinstance(e.value, RecipeError)  # raised from forward: a model error, not a recipe key's
        assert "\n" not in str(e.value) and "auto" in str(e.value) and "sdpa" in str(e.value)
        assert "attn_impl" in str(e.value)
    else:
        assert select_attention_kernel(requested, device, dtype, importable, mask) == expected


@pytest.mark.parametrize(
    "device,dtype,importable,mask,reason",
    [
        ("cuda", torch.bfloat16, False, None, "not installed"),
        ("cpu", torch.bfloat16, True, None, "runs on cpu"),
        ("cuda", torch.float32, True, None, "torch.float32"),
        ("cuda", torch.bfloat16, True, "a document (sequence_id) mask", "sequence_id"),
    ],
)
def test_explicit_flash_says_why_it_cannot_run(device, dtype, importable, mask, reason):
    with pytest.raises(AttentionKernelError, match="flash") as e:
        select_attention_kernel("flash", device, dtype, importable, mask)
    assert reason in str(e.value), str(e.value)


def test_unknown_request_is_a_value_error():
    with pytest.raises(ValueError) as e:
        select_attention_kernel("xformers", "cuda", torch.bfloat16, True)
    assert "'auto'" in str(e.value) and "xformers" in str(e.value)


@pytest.mark.parametrize(
    "requested,device,precision,importable,reason",
    [
        ("flash", "cpu", "amp_bf16", True, "runs on cpu"),
        ("flash", "gpu", "amp_bf16", False, "not installed"),
        ("flash", "gpu", "fp32", True, "torch.float32"),
        ("flash", "gpu", "amp_bf16", True, None),
        ("flash", "cuda", "amp_fp16", True, None),
        ("auto", "cpu", "fp32", False, None),
        ("sdpa", "cpu", "fp32", True, None),
    ],
)
def test_run_settings_flash_cannot_serve_are_a_recipe_error(
    monkeypatch, requested, device, precision, importable, reason
):
    # Whether flash-attn imports is this machine's fact; the table is about what the run asks for.
    monkeypatch.setattr(attention, "flash_attn_function", lambda name: object() if importable else None)
    if reason is None:
        check_attn_impl(requested, device, precision)
        return
    with pytest.raises(RecipeError) as e:
        check_attn_impl(requested, device, precision)
    assert e.value.key == "model.attn_impl" and reason in str(e.value) and "\n" not in str(e.value)


# ---- the models choose from the tensors that reach the kernel ------------------------------------------


@pytest.fixture
def spy(monkeypatch):
    """Record every (requested, device, dtype, importable, mask) the models ask about; answer truthfully."""
    calls = []

    def recording(*args):
        calls.append(args)
        return select_attention_kernel(*args)

    monkeypatch.setattr(attention, "select_attention_kernel", recording)
    return calls


def _llama(**kw):
    from llmfoundry_lite.models.llama import LlamaConfig, LlamaDecoder

    torch.manual_seed(0)
    return LlamaDecoder(LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, **kw))


def _bert(**kw):
    from llmfoundry_lite.models.bert import BertConfig, BertEncoder

    torch.manual_seed(0)
    return BertEncoder(
        BertConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, intermediate_size=48, **kw)
    )


def test_llama_under_autocast_asks_with_the_bf16_dtype_of_q_not_the_fp32_block_input(spy):
    # The bug: the choice looked at x, the block input, which autocast leaves fp32 while q/k/v are bf16.
    model = _llama()
    ids = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.embed(ids).dtype == torch.float32  # what the old check saw
        model(ids)
    assert len(spy) == 2 and all(c[2] == torch.bfloat16 and c[1] == "cpu" for c in spy), spy
    assert all(c[4] is None for c in spy)  # plain causal: nothing flash cannot take
    spy.clear()
    model(ids)
    assert all(c[2] == torch.float32 for c in spy)


def test_llama_reports_masks_flash_cannot_take(spy):
    model = _llama()
    ids = torch.randint(0, 64, (2, 16))
    model(ids, attention_mask=torch.ones_like(ids))  # an all-ones mask is plain causal attention
    assert all(c[4] is None for c in spy)
    spy.clear()
    model(ids, sequence_id=torch.arange(16).div(8, rounding_mode="floor").expand(2, 16))
    assert spy and all(c[4] is not None for c in spy)


def test_bert_under_autocast_asks_with_the_bf16_dtype_of_qkv(spy):
    enc = _bert()
    ids = torch.randint(1, 64, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        enc(ids, mask)
    assert len(spy) == 2 and all(c[2] == torch.bfloat16 and c[4] is None for c in spy), spy
    spy.clear()
    _bert(unpad=False)(
        ids, mask
    )  # padding kept in the stream: a key-padding mask the varlen kernel cannot take
    assert spy and all(c[4] is not None for c in spy)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_explicit_flash_never_falls_back_silently(family):
    ids = torch.randint(1, 64, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding: the old LLaMA code took SDPA silently whenever a mask was present
    model = _llama(attn_impl="flash") if family == "llama" else _bert(attn_impl="flash")
    with pytest.raises(AttentionKernelError) as e:
        model(ids, attention_mask=mask)
    assert "attn_impl" in str(e.value) and "\n" not in str(e.value)
    for impl in ("auto", "sdpa"):  # the same batch runs with the other settings
        model = _llama(attn_impl=impl) if family == "llama" else _bert(attn_impl=impl)
        model(ids, attention_mask=mask)


def test_attn_impl_is_a_checked_recipe_key_of_both_families():
    from llmfoundry_lite.models.bert import build_mosaic_bert
    from llmfoundry_lite.models.llama import build_llama

    with pytest.raises(RecipeError) as e:
        build_mosaic_bert(
            vocab_size=64, d_model=32, n_layers=1, n_heads=4, intermediate_size=48, attn_impl="fa3"
        )
    assert e.value.key == "model.attn_impl"
    with pytest.raises(RecipeError) as e:
        build_llama(vocab_size=64, d_model=32, n_layers=1, n_heads=4, attn_impl="fa3")
    assert e.value.key == "model.attn_impl"


@pytest.mark.parametrize("name", ["llama", "mosaic_bert", "bert"])
def test_built_models_check_the_run_before_the_first_batch(name):
    """``check_runtime``: flash on a CPU run is the recipe key's error before any batch; auto is always fine."""
    from llmfoundry_lite import registry

    block = {"name": name, "vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 4}
    model = registry.build("models", {**block, "attn_impl": "flash"}, "model")
    with pytest.raises(RecipeError) as e:
        model.check_runtime("cpu", "amp_bf16")
    assert e.value.key == "model.attn_impl" and "cpu" in str(e.value)
    registry.build("models", {**block, "attn_impl": "auto"}, "model").check_runtime("cpu", "fp32")
