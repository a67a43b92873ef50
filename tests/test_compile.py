"""``compile:`` in a recipe: validated, applied per block from outside the model, numerically the run eager mode
trains, resumable bit-exactly after a kill -9, and reporting compile time, recompiles and graph breaks.

Inductor compiles C++ on this CPU (tens of seconds per graph on a busy box; its cache makes later compiles of the
same graph fast), so the compiled runs are tiny and their timeouts stated per test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmfoundry_lite import load_recipe
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.recipe import CompileConfig, compile_settings
from llmfoundry_lite.train import train
from llmfoundry_lite.train.compile import apply_compile, compile_units

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")
KILL_DRIVER = Path(__file__).resolve().parent / "_kill_driver.py"
ENV = {**os.environ, "WANDB_MODE": "offline"}


def test_compile_key_is_validated(tiny_bert):
    assert compile_settings(None) is None and compile_settings(False) is None
    assert compile_settings(True) == CompileConfig()
    cfg = load_recipe(QUICKSTART, tiny_bert(**{"compile.mode": "max-autotune", "compile.dynamic": "true"}))
    assert cfg.compile.mode == "max-autotune" and cfg.compile.dynamic is True
    for override, key, words in [
        ("compile.mode=fast", "compile.mode", "max-autotune"),
        ("compile.dynamc=true", "compile.dynamc", "did you mean 'dynamic'"),
        ("compile=3", "compile", "true, false or a mapping"),
        ("compile.warn_recompiles=-1", "compile.warn_recompiles", ">= 0"),
    ]:
        with pytest.raises(RecipeError) as e:
            load_recipe(QUICKSTART, [*tiny_bert(), override])
        assert e.value.key == key and words in str(e.value), str(e.value)


def test_the_blocks_are_compiled_and_nothing_else():
    from llmfoundry_lite.models.bert import build_mosaic_bert
    from llmfoundry_lite.models.llama import ComposerLlama, LlamaConfig

    bert = build_mosaic_bert(None, vocab_size=64, d_model=16, n_layers=2, n_heads=2, intermediate_size=32)
    llama = ComposerLlama(LlamaConfig(vocab_size=64, d_model=16, n_layers=3, n_heads=2, max_seq_len=16))
    assert [type(m).__name__ for m in compile_units(bert)] == ["BertLayer"] * 2
    assert [type(m).__name__ for m in compile_units(llama)] == ["LlamaBlock"] * 3
    names = list(llama.state_dict())
    assert apply_compile(llama, True) == 3
    assert list(llama.state_dict()) == names  # checkpoints are the same with and without compile
    with pytest.raises(RecipeError) as e:
        apply_compile(torch.nn.Linear(2, 2), True, "hf_bert")
    assert e.value.key == "compile" and "hf_bert" in str(e.value)


def _bert_batches(n: int, seed: int = 1) -> list[dict]:
    """``n`` tiny MLM batches, a different real-token count each (~40% padding)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(5, 96, (4, 24), generator=g)
        lengths = torch.randint(6, 25, (4,), generator=g)
        mask = (torch.arange(24)[None] < lengths[:, None]).long()
        labels = torch.where((torch.rand(4, 24, generator=g) < 0.3) & mask.bool(), ids, -100)
        batches.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return batches


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_each_block_is_one_graph_without_breaks_or_recompiles(family):
    """``fullgraph``: a graph break anywhere in a block (a ``bool(tensor)``, the flash-attn import on CPU, complex
    RoPE) is an error; over batches of different unpadded lengths the block compiles once, never again. The
    ``aot_eager`` backend: dynamo decides breaks and recompiles, inductor's C++ build is not needed for that."""
    from llmfoundry_lite.models.bert import build_mosaic_bert
    from llmfoundry_lite.models.llama import ComposerLlama, LlamaConfig
    from llmfoundry_lite.train.compile import CompileMonitor

    torch.manual_seed(0)
    if family == "bert":
        model = build_mosaic_bert(
            None, vocab_size=96, d_model=32, n_layers=2, n_heads=2, intermediate_size=64
        )
        batches = _bert_batches(6)
    else:
        model = ComposerLlama(LlamaConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, max_seq_len=32))
        ids = torch.randint(0, 96, (3, 2, 32))
        batches = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]
    monitor = CompileMonitor()
    monitor.start()
    apply_compile(model, CompileConfig(backend="aot_eager", fullgraph=True))
    for b in batches:
        model.loss(model(b), b).backward()
    stats = monitor.stats()
    assert (stats["graphs"], stats["graph_breaks"], stats["recompiles"]) == (1, 0, 0), stats


def test_compiled_rotary_is_the_eager_rotation():
    """Under torch.compile RoPE runs in real arithmetic (inductor has no complex codegen); eager multiplies
    complex numbers. Both rotate alike, here on q/k as the attention hands them over (a strided slice)."""
    from llmfoundry_lite.models.llama import RotaryEmbedding, apply_rotary

    rotation = RotaryEmbedding(16, 10000.0)(12, torch.device("cpu"))
    qkv = torch.randn(2, 12, 6, 16)
    qk = qkv.split([4, 2], dim=2)[0]
    compiled = torch.compile(apply_rotary, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(qk, rotation), apply_rotary(qk, rotation), rtol=0, atol=1e-6)
    # a rotation: norms of each pair kept, position 0 unchanged
    out = apply_rotary(qk, rotation)
    torch.testing.assert_close(out[:, 0], qk[:, 0])
    pairs = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pairs(out), pairs(qk))


def _train_pair(
    eager: torch.nn.Module, compiled: torch.nn.Module, batches: list[dict]
) -> dict[str, list[float]]:
    """20 AdamW steps of each model on the same batches; the losses."""
    losses: dict[str, list[float]] = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[name] = []
        for b in batches:
            loss = model.loss(model(b), b)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(float(loss))
    return losses


@pytest.mark.timeout(1200)
def test_llama_compiled_with_inductor_trains_as_eager_does():
    """Tiny LLaMA, 20 training steps: compiled (inductor) and eager losses agree within 1e-4."""
    from llmfoundry_lite.models.llama import ComposerLlama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
    eager = ComposerLlama(cfg)
    compiled = ComposerLlama(cfg)
    compiled.load_state_dict(eager.state_dict())
    apply_compile(compiled, True)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(20):
        ids = torch.randint(0, 96, (4, 32), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    losses = _train_pair(eager, compiled, batches)
    assert max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"])) < 1e-4, losses
    assert losses["compiled"][-1] < losses["compiled"][0]


@pytest.mark.timeout(1200)
def test_unpadded_mosaicbert_compiled_with_inductor_trains_as_eager_does_without_recompiling():
    """Tiny MosaicBERT, 20 steps, a different real-token count every batch: compiled (inductor) and eager losses
    agree within 1e-4, and the compiler never recompiles."""
    from llmfoundry_lite.models.bert import build_mosaic_bert
    from llmfoundry_lite.train.compile import CompileMonitor

    torch.manual_seed(0)
    shape = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=2, intermediate_size=64, hidden_dropout=0.0)
    eager, compiled = build_mosaic_bert(None, **shape), build_mosaic_bert(None, **shape)
    compiled.load_state_dict(eager.state_dict())
    monitor = CompileMonitor()
    monitor.start()
    apply_compile(compiled, True)
    batches = _bert_batches(20)
    losses = _train_pair(eager, compiled, batches)
    assert max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"])) < 1e-4, losses
    assert monitor.stats()["recompiles"] == 0, monitor.stats()


def _losses(metrics: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {r["step"]: r["loss/train/total"] for r in rows if "loss/train/total" in r}


@pytest.mark.timeout(1200)
def test_compiled_run_reports_compile_and_resumes_bit_exact_after_kill(tiny_bert, tmp_path, capsys):
    """A compiled MosaicBERT run through `train`, 20 batches: losses equal the eager run's within 1e-4, compile time
    and counters reach the progress line and metrics.jsonl (no recompile, no graph break, so no warning; static
    shapes warn once, naming the cause), and a compiled run killed with SIGKILL and rerun ends with exactly the
    weights of the uninterrupted compiled run. The ``aot_eager`` backend (dynamo and AOTAutograd
    without inductor's C++ build) keeps it to seconds of compiling; inductor's numerics are the tests above."""
    common = dict(
        max_duration="20ba",
        save_interval="2ba",
        save_num_checkpoints_to_keep=-1,
        deterministic=True,
        eval_loader="null",
        console_log_interval="5ba",
    )
    # warn_recompiles 0: any graph break or recompile would warn.
    compiled = ["compile.backend=aot_eager", "compile.warn_recompiles=0"]
    train(load_recipe(QUICKSTART, tiny_bert(run_name="eager", **common)), QUICKSTART)
    capsys.readouterr()
    train(load_recipe(QUICKSTART, [*tiny_bert(run_name="whole", **common), *compiled]), QUICKSTART)
    out = capsys.readouterr().out
    runs = tmp_path / "runs"
    eager, whole = _losses(runs / "eager" / "metrics.jsonl"), _losses(runs / "whole" / "metrics.jsonl")
    assert len(eager) == 20 and eager.keys() == whole.keys()
    assert max(abs(eager[k] - whole[k]) for k in eager) < 1e-4, (eager, whole)

    rows = [json.loads(line) for line in (runs / "whole" / "metrics.jsonl").read_text().splitlines()]
    stats = [r for r in rows if "compile/seconds" in r]
    assert stats and stats[-1]["compile/seconds"] > 0
    assert "warning: torch.compile" not in out, out
    assert stats[-1]["compile/recompiles"] == 0 and stats[-1]["compile/graph_breaks"] == 0, stats[-1]
    assert "compile 0:" in out  # the progress line states compile time apart from tokens/s

    # Static shapes (dynamic: false) recompile for every new unpadded token count: one line names the cause.
    # 20 batches, not fewer: the first batches may have no padding (one token count), and how many depends on the
    # embedded corpus, which differs between Python releases (3.12's first 8 are all full).
    short = {**common, "max_duration": "20ba", "save_interval": "20ba"}
    train(load_recipe(QUICKSTART, [*tiny_bert(run_name="static", **short), *compiled, "compile.dynamic=false"]), QUICKSTART)  # fmt: skip
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning: torch.compile")]
    assert len(warnings) == 1 and "recompiled" in warnings[0] and "cause" in warnings[0], warnings

    marker = tmp_path / "killed-once"
    cmd = [
        sys.executable, str(KILL_DRIVER), QUICKSTART, *tiny_bert(run_name="crashy", **common), *compiled,
        "callbacks.kill_once.batch=3", f"callbacks.kill_once.marker={marker}",
    ]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming run crashy from batch 2" in second.stdout
    load = lambda p: torch.load(p, map_location="cpu", weights_only=False)["state"]["model"]  # noqa: E731
    reference, resumed = (
        load(runs / "whole" / "ep0-ba20-rank0.pt"),
        load(runs / "crashy" / "ep0-ba20-rank0.pt"),
    )
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k


def test_docs_commands_run(tiny_bert, capsys):
    """The commands docs/compile.md shows answer as it says (pointed at the test data)."""
    import re

    from llmfoundry_lite.cli import main

    text = (ROOT / "docs" / "compile.md").read_text()
    commands = re.findall(r"`llmfoundry-lite ((?:validate|show) [^`]+)`", text)
    assert len(commands) == 2
    for command in commands:
        argv = command.replace("recipes/", f"{ROOT}/recipes/").split()  # tests run in their own folder
        assert main([*argv, *tiny_bert()]) == 0, command
    assert "mode: max-autotune" in capsys.readouterr().out
    assert main(["validate", QUICKSTART, *tiny_bert(), "compile.dynamc=true"]) == 2
    assert "compile.dynamc" in capsys.readouterr().err
    for script in ("benchmark.py", "benchmark_startup.py"):
        out = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / script), "--help"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0 and ("--compile" in out.stdout or "--compare" in out.stdout), out.stderr
