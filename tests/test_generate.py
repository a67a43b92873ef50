"""`llmfoundry-lite generate`: our decoder's tokens equal transformers' on the exported folder; streaming; MLM masks."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from _bert_run import save_mosaicbert_run

from llmfoundry_lite import registry
from llmfoundry_lite.apps.export import export_checkpoint
from llmfoundry_lite.apps.generate import complete, fill_masks, load_generator, read_prompts, run_generate
from llmfoundry_lite.errors import RecipeError

TINY = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=96, max_seq_len=128)
PROMPTS = [
    "The meaning of life is",
    "Python is a programming language that",
    "Once upon a time",
    "In the beginning",
    "The quick brown fox",
    "def main():",
    "Numbers: 1, 2, 3,",
    "She said",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Token-by-token decoding of a tiny model is latency-bound: one thread, no cross-core syncs per matmul."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, llama_tokenizer_dir):
    """(Composer checkpoint, its exported HF folder) of a tiny llama with spread-out logits."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    torch.manual_seed(0)
    model = registry.build("models", {"name": "llama", **TINY}, "model", tokenizer=tok)
    with torch.no_grad():  # larger weights than the init: clear argmax winners, varied text
        for p in model.parameters():
            p.mul_(4.0)
    ckpt = tmp_path_factory.mktemp("run") / "llama.pt"
    torch.save({"state": {"model": model.state_dict()}}, ckpt)
    return ckpt, export_checkpoint(ckpt, tmp_path_factory.mktemp("hf") / "out")


def test_greedy_tokens_equal_transformers_generate(llama):
    from transformers import AutoTokenizer, LlamaForCausalLM

    ckpt, out = llama
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ours_ckpt, ours_hf = load_generator(str(ckpt)), load_generator(str(out))
    full = 0
    for prompt in PROMPTS:
        inputs = tok(prompt, return_tensors="pt")
        n = inputs["input_ids"].shape[1]
        ref = hf.generate(**inputs, max_new_tokens=64, do_sample=False)[0, n:].tolist()
        assert complete(ours_ckpt, prompt, 64, temperature=0.0) == ref, prompt
        assert complete(ours_hf, prompt, 64, temperature=0.0) == ref, prompt  # through our HF importer
        full += len(ref) == 64
    assert full >= 6  # most prompts run the whole 64 tokens (none stops at EOS early)


def test_tokens_stream_as_they_come_and_sampling_is_seeded(llama):
    ckpt, _ = llama
    gen = load_generator(str(ckpt))
    pieces: list[str] = []
    ids = complete(
        gen, "Once upon a time", 24, temperature=0.9, top_k=40, top_p=0.95, seed=3, write=pieces.append
    )
    assert len(ids) == 24 and len(pieces) > 1  # written piece by piece, not once at the end
    assert "".join(pieces) == gen.tokenizer.decode(ids, skip_special_tokens=True)
    assert complete(gen, "Once upon a time", 24, temperature=0.9, top_k=40, top_p=0.95, seed=3) == ids
    assert complete(gen, "Once upon a time", 24, temperature=0.9, top_k=40, top_p=0.95, seed=4) != ids
    # top_p that only the most likely token reaches is greedy decoding
    assert complete(gen, "She said", 16, temperature=1.0, top_p=1e-6, seed=9) == complete(
        gen, "She said", 16, temperature=0.0
    )


def test_generate_verb(llama, tmp_path):
    ckpt, out = llama
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("In the beginning\n\nShe said\n")
    stream = io.StringIO()
    run_generate(str(out), read_prompts(["The quick brown fox"], str(prompts)), 8, 0.0, stream=stream)
    lines = stream.getvalue().splitlines()
    assert [ln.split(" ")[0] for ln in lines] == ["The", "In", "She"] and len(lines) == 3
    cli = [sys.executable, "-m", "llmfoundry_lite.cli", "generate", str(ckpt)]
    ok = subprocess.run([*cli, "--prompt", "She said", "--max-new-tokens", "8", "--temperature", "0"],
                        capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "She said" + lines[2][len("She said") :] + "\n"  # same greedy text as the HF folder's
    bad = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert [ln for ln in bad.stderr.splitlines() if ln.strip()] == [
        "error: --prompt: no prompt given; pass --prompt TEXT (repeatable) or --prompts-file FILE"
    ]


def test_mlm_checkpoint_fills_masks_like_the_fill_mask_pipeline(tmp_path, bert_tokenizer_dir):
    from transformers import pipeline

    block = {"name": "mosaic_bert", "d_model": 32, "n_layers": 1, "n_heads": 4, "intermediate_size": 48}
    run = tmp_path / "run"
    save_mosaicbert_run(block, bert_tokenizer_dir, run)
    out = export_checkpoint(run / "ck.pt", tmp_path / "hf")
    text = "The cat sat on the [MASK] and [MASK] slept."
    for source in (str(run / "ck.pt"), str(out)):
        fillers = fill_masks(load_generator(source), text, top_k=3)
        assert len(fillers) == 2 and all(len(f) == 3 for f in fillers)
        ref = pipeline("fill-mask", model=str(out), trust_remote_code=True)(text, top_k=3)
        assert [[t for t, _ in f] for f in fillers] == [[p["token_str"] for p in m] for m in ref]
        # approx, not round(): two float paths a hair apart can round to different 5th decimals
        assert [[p for _, p in f] for f in fillers] == [
            [pytest.approx(p["score"], abs=1e-5) for p in m] for m in ref
        ]
    with pytest.raises(RecipeError, match=r"no \[MASK\]"):
        fill_masks(load_generator(str(out)), "No mask here.")
    assert json.loads((out / "config.json").read_text())["model_type"] == "mosaic_bert"


def test_benchmark_script_runs_and_the_decoders_agree():
    """scripts/benchmark_generate.py (docs/export-and-generate.md) at toy size: every decoder gives the same tokens."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_generate.py"
    args = [
        "--d-model",
        "64",
        "--layers",
        "1",
        "--heads",
        "2",
        "--vocab",
        "600",
        "--new-tokens",
        "8",
        "--repeats",
        "1",
    ]
    out = subprocess.run([sys.executable, str(script), *args, "--threads", "1"], capture_output=True, text=True,
                         timeout=170)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith(("ours", "transformers"))]
    assert any(r.startswith("transformers generate") for r in rows) and any("no cache" in r for r in rows)
    assert all(r.rstrip().endswith("True") for r in rows if "not in this build" not in r), out.stdout
