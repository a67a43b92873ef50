"""`llmfoundry-lite estimate`: FLOPs against layer shapes, the published MosaicBERT cost, options and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmfoundry_lite import hardware
from llmfoundry_lite.apps.estimate import estimate
from llmfoundry_lite.cli import main
from llmfoundry_lite.recipe import load_recipe
from llmfoundry_lite.train.meta import build_meta_model

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "recipes" / "mosaicbert" / "base.yaml")
LLAMA_7B = str(ROOT / "recipes" / "llama" / "7b.yaml")
QUICKSTART = str(ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")
# bert-base-uncased's vocabulary: the hub tokenizer is not available offline, so the count is given.
BERT_VOCAB = ["model.vocab_size=30522"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process (imports are paid once per session)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def independent_bert_flops_per_token(model, seq: int, mlm_p: float) -> float:
    """Training FLOPs per token from the module shapes: 2 x (in x out) per Linear per token, x3 for fwd+bwd.

    Attention adds QK^T and AV: 2 x 2 x seq x d per token per layer. The MLM head (transform d x d and the
    decoder tied to the d x vocab embedding) runs only on the masked fraction of tokens.
    """
    trunk = 0
    for layer in model.encoder.layers:
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                trunk += 2 * m.in_features * m.out_features
        trunk += 2 * 2 * seq * model.cfg.d_model
    head_w = model.head.transform
    vocab, d = model.encoder.embeddings.word.weight.shape
    head = 2 * head_w.in_features * head_w.out_features + 2 * d * vocab
    return 3 * (trunk + mlm_p * head)


def test_mosaicbert_base_flops_match_layer_shapes():
    cfg = load_recipe(BASE, BERT_VOCAB)
    model = build_meta_model(cfg)
    assert next(model.parameters()).device.type == "meta"
    est = estimate(cfg, BASE, gpu="a100-80gb", gpus=8, mfu=0.4)
    seq, p = cfg.max_seq_len, cfg.train_loader.collator.mlm_probability
    assert (seq, p) == (128, 0.3)
    expected = independent_bert_flops_per_token(model, seq, p)
    assert est.flops_per_token == pytest.approx(expected, rel=1e-9)
    # The same in closed form for BERT-Base with GeGLU (d=768, L=12, FFN 3072, vocab padded to 30528):
    d, L, ffn, V = 768, 12, 3072, 30528
    closed = 6 * L * (4 * d * d + 3 * d * ffn) + 12 * L * d * seq + p * 6 * (d * d + d * V)
    assert est.flops_per_token == pytest.approx(closed, rel=1e-9)
    assert est.tokens == 286_720_000 * 128  # 70,000 batches of 4096 sequences of 128 tokens
    assert est.total_flops == pytest.approx(closed * est.tokens, rel=1e-9)
    assert est.params == sum(p.numel() for p in model.parameters())
    assert 136e6 < est.params < 139e6  # ~137M with GeGLU
    assert est.non_embedding_params == est.params - sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)
    )
    # Wall time is the FLOPs over the cluster's effective FLOP/s.
    assert est.hours * 3600 == pytest.approx(est.total_flops / (8 * 312e12 * 0.4), rel=1e-9)
    assert est.usd == pytest.approx(est.hours * 8 * 2.2, rel=1e-9)


def test_published_mosaicbert_run_costs_about_20_dollars(capsys):
    """The paper: GLUE 79.6 after 1.13 h on 8 x A100-80GB at ~$2.20/GPU-hour, "about $20".

    What is checked: the cost arithmetic on the published wall time and price, through the CLI
    ($19.89), and that the A100-80GB default price is that same $2.20. The 1.13 h is an early point
    of the paper's accuracy-vs-time curve, not the recipe's full 70,000 steps: the implied MFU for the full
    recipe is far above 100%, i.e. the full recipe costs several times $20 at any real MFU, and the
    estimate says so (see the second assertion block).
    """
    code, out, err = run_cli(
        capsys,
        "estimate",
        BASE,
        *BERT_VOCAB,
        "--gpu",
        "a100-80gb",
        "--gpus",
        "8",
        "--hours",
        "1.13",
        "--json",
    )
    assert code == 0, err
    est = json.loads(out)
    assert est["gpu_hours"] == pytest.approx(9.04)
    assert est["usd"] == pytest.approx(19.888, abs=0.01)
    assert 18 < est["usd"] < 22
    assert est["usd_per_gpu_hour"] == 2.2  # default A100-80GB price
    assert est["mfu"] > 1.0  # the whole 70k-step recipe does not fit in 1.13 h
    # A run that does fit: the batches 8 x A100 at 40% MFU do in 1.13 h, estimated, cost the same ~$20.
    per_batch = est["flops_per_token"] * 4096 * 128
    batches = int(1.13 * 3600 * 8 * 312e12 * 0.4 / per_batch)
    code, out, err = run_cli(
        capsys,
        "estimate",
        BASE,
        *BERT_VOCAB,
        f"max_duration={batches}ba",
        "--gpus",
        "8",
        "--mfu",
        "0.4",
        "--json",
    )
    assert code == 0, err
    short = json.loads(out)
    assert short["hours"] == pytest.approx(1.13, rel=1e-3)
    assert short["usd"] == pytest.approx(19.89, rel=1e-3)


def test_text_report_and_json_keys(capsys):
    code, out, err = run_cli(
        capsys, "estimate", BASE, *BERT_VOCAB, "--gpu", "h100", "--gpus", "16", "--mfu", "0.5"
    )
    assert code == 0, err
    for word in (
        "parameters",
        "FLOPs/token",
        "tokens",
        "total FLOPs",
        "16 x h100-sxm",
        "MFU",
        "GPU-hours",
        "$",
    ):
        assert word in out
    code, out, _ = run_cli(capsys, "estimate", BASE, *BERT_VOCAB, "--json")
    data = json.loads(out)
    for key in ("params", "non_embedding_params", "flops_per_token", "tokens", "total_flops", "hours",
                "gpu_hours", "usd"):  # fmt: skip
        assert isinstance(data[key], (int, float)), key
    assert data["gpu"] == "a100-80gb" and data["gpus"] == 8 and data["mfu"] == 0.4  # documented defaults
    assert data["hours"] > 1.13  # the full recipe at 40% MFU


def test_llama_7b_builds_on_meta_without_allocating():
    """The 7B recipe's model is never materialised: the estimate process stays far below 7B x 4 bytes."""
    code = (
        "import json, resource; from llmfoundry_lite.recipe import load_recipe; "
        "from llmfoundry_lite.apps.estimate import estimate; "
        f"e = estimate(load_recipe({LLAMA_7B!r}), gpu='h100-sxm', gpus=64, mfu=0.45); "
        "print(json.dumps({'params': e.params, 'fpt': e.flops_per_token, 'non': e.non_embedding_params, "
        "'rss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout.strip().splitlines()[-1])
    assert 6.7e9 < data["params"] < 6.8e9
    assert data["rss_kb"] < 2_500_000  # < 2.5 GB peak; the weights alone would be 27 GB in fp32
    # 6 x (blocks + LM head) + attention, with the 7B shape (d=4096, L=32, SwiGLU 11008, vocab 32000, seq 2048)
    d, L, ffn, V, S = 4096, 32, 11008, 32000, 2048
    blocks = L * (4 * d * d + 3 * d * ffn + 2 * d) + d
    assert data["non"] == blocks
    assert data["fpt"] == pytest.approx(6 * (blocks + V * d) + 12 * L * d * S, rel=1e-9)


def test_hub_tokenizer_without_vocab_size_is_a_clear_error(capsys):
    code, out, err = run_cli(capsys, "estimate", BASE, "model.vocab_size=null")
    assert code == 2
    assert "model.vocab_size" in err and "bert-base-uncased" in err and "Traceback" not in err


def test_epoch_duration_needs_the_dataset_size(capsys):
    code, _, err = run_cli(capsys, "estimate", BASE, *BERT_VOCAB, "max_duration=2ep")
    assert code == 2 and "--samples-per-epoch" in err and "max_duration" in err
    code, out, err = run_cli(
        capsys, "estimate", BASE, *BERT_VOCAB, "max_duration=2ep", "--samples-per-epoch", "1000", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["tokens"] == 2 * 1000 * 128


def test_token_and_batch_durations(capsys):
    code, out, _ = run_cli(capsys, "estimate", BASE, *BERT_VOCAB, "max_duration=1000000tok", "--json")
    assert json.loads(out)["tokens"] == 1_000_000
    code, out, _ = run_cli(capsys, "estimate", BASE, *BERT_VOCAB, "max_duration=10ba", "--json")
    assert json.loads(out)["tokens"] == 10 * 4096 * 128


def test_recipe_cost_block_extends_table_and_cli_wins(capsys):
    block = [
        "cost.gpu=my-gpu",
        "cost.gpus=2",
        "cost.mfu=0.5",
        "cost.hardware.my-gpu.peak_flops=1.0e14",
        "cost.hardware.my-gpu.usd_per_gpu_hour=1.5",
    ]
    code, out, err = run_cli(capsys, "estimate", BASE, *BERT_VOCAB, *block, "max_duration=100ba", "--json")
    assert code == 0, err
    e = json.loads(out)
    assert (e["gpu"], e["gpus"], e["peak_flops_per_gpu"], e["usd_per_gpu_hour"]) == ("my-gpu", 2, 1e14, 1.5)
    assert e["hours"] * 3600 == pytest.approx(e["total_flops"] / (2 * 1e14 * 0.5))
    code, out, _ = run_cli(
        capsys, "estimate", BASE, *BERT_VOCAB, *block, "max_duration=100ba", "--gpu", "l4", "--json"
    )
    e = json.loads(out)  # the recipe's peak/price belong to its own gpu, not to the one the CLI chose
    assert (e["gpu"], e["peak_flops_per_gpu"], e["usd_per_gpu_hour"]) == ("l4", 121e12, 0.8)
    code, _, err = run_cli(capsys, "estimate", BASE, *BERT_VOCAB, "cost.gpux=a100")
    assert code == 2 and "cost.gpux" in err and "gpu" in err


def test_bad_options_are_clear_errors(capsys):
    code, _, err = run_cli(capsys, "estimate", BASE, *BERT_VOCAB, "--gpu", "a1000")
    assert code == 2 and "unknown accelerator 'a1000'" in err and "a100" in err
    code, _, err = run_cli(capsys, "estimate", BASE, *BERT_VOCAB, "--mfu", "0.4", "--hours", "2")
    assert code == 2 and "at most one" in err
    code, _, err = run_cli(capsys, "estimate", BASE, *BERT_VOCAB, "--mfu", "40")
    assert code == 2 and "(0, 1]" in err


def test_detect_kind_maps_cuda_device_names():
    names = {
        "NVIDIA A100-SXM4-80GB": "a100-80gb",
        "NVIDIA A100-SXM4-40GB": "a100-40gb",
        "NVIDIA A100-PCIE-40GB": "a100-40gb",
        "NVIDIA H100 80GB HBM3": "h100-sxm",
        "NVIDIA H100 PCIe": "h100-pcie",
        "NVIDIA H100 NVL": "h100-nvl",
        "NVIDIA H200": "h200",
        "NVIDIA L4": "l4",
        "NVIDIA L40S": "l40s",
        "NVIDIA A10G": "a10g",
        "NVIDIA A10": "a10",
        "Tesla V100-SXM2-16GB": "v100",
        "Tesla T4": "t4",
    }
    for name, kind in names.items():
        assert hardware.detect_kind(name) == kind, name
    assert hardware.HARDWARE["a100-40gb"].peak_flops == hardware.HARDWARE["a100-80gb"].peak_flops == 312e12
    assert hardware.HARDWARE["h100-sxm"].peak_flops == 989e12


def test_measure_runs_real_steps_here(tiny_bert, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(
        capsys,
        "estimate",
        QUICKSTART,
        *tiny_bert(),
        "--measure",
        "--measure-steps",
        "2",
        "--gpu",
        "cpu",
        "--json",
    )
    assert code == 0, err
    e = json.loads(out)
    m = e["measured"]
    assert m["steps"] == 2 and m["tokens_per_s"] > 0 and m["flops_per_s"] > 0 and m["peak_flops"] > 0
    assert e["mfu_source"].startswith("measured") and e["mfu"] == pytest.approx(
        m["flops_per_s"] / m["peak_flops"]
    )
    assert e["hours"] * 3600 == pytest.approx(e["total_flops"] / m["flops_per_s"], rel=1e-6)
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")  # leaves nothing behind


def test_model_without_flops_per_batch_is_counted_from_its_shapes():
    """A plugin model that does not count its FLOPs: 6 x non-embedding parameters + 12 x L x d x seq per token."""
    from transformers import BertConfig, BertModel

    from llmfoundry_lite.apps.estimate import flops_per_token

    class Plugin(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=64))  # fmt: skip

    model = Plugin()
    tables = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    non_emb = sum(p.numel() for p in model.parameters()) - tables
    fpt, source = flops_per_token(model, 128, None)
    assert source.startswith("shapes") and fpt == 6 * non_emb + 12 * 2 * 32 * 128
