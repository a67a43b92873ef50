"""`llmfoundry-lite export`: Composer checkpoint of a llama run -> HF folder with logits equal to ours."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llmfoundry_lite import registry
from llmfoundry_lite.apps.export import export_checkpoint
from llmfoundry_lite.errors import RecipeError

TINY = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=96, max_seq_len=64)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, llama_tokenizer_dir):
    """A few Composer training steps of a tiny llama, saved as a Composer checkpoint."""
    from composer import Trainer
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    torch.manual_seed(0)
    model = registry.build(
        "models", {"name": "llama", **TINY, "tie_embeddings": False}, "model", tokenizer=tok
    )
    ids = torch.randint(4, len(tok), (8, 32))
    rows = [{"input_ids": r, "labels": r, "attention_mask": torch.ones_like(r)} for r in ids]
    folder = tmp_path_factory.mktemp("run") / "checkpoints"
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(rows, batch_size=4),
        max_duration="3ba",
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        device="cpu",
        save_folder=str(folder),
        save_interval="3ba",
        progress_bar=False,
        log_to_console=False,
        loggers=[],
    )
    trainer.fit()
    trainer.close()
    ckpts = sorted(folder.glob("ep*-ba3-rank0.pt"))
    assert ckpts, list(folder.iterdir())
    return ckpts[0], model.eval()


def test_export_roundtrip_logits_equal(trained_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    ckpt, model = trained_checkpoint
    out = export_checkpoint(ckpt, tmp_path / "hf")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert isinstance(hf, LlamaForCausalLM)
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        ours = model({"input_ids": ids})
        ref = hf(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4


def test_export_works_with_standard_hf_calls(trained_checkpoint, tmp_path, bert_tokenizer_dir):
    """``model.generate(**tok(text, return_tensors="pt"))`` works, even with a WordPiece tokenizer that returns
    token_type_ids by default; the tokenizer's model_max_length is the model's context."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, _ = trained_checkpoint
    for name, tok_dir in (("bpe", None), ("wordpiece", bert_tokenizer_dir)):
        out = tmp_path / name
        if tok_dir is None:
            export_checkpoint(ckpt, out)
        else:  # a BERT tokenizer over the same ids range is enough to exercise the call
            export_checkpoint(ckpt, out, tokenizer=tok_dir)
        tok = AutoTokenizer.from_pretrained(out)
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        inputs = tok("The quick brown fox", return_tensors="pt")
        assert "token_type_ids" not in inputs, name
        assert tok.model_max_length == TINY["max_seq_len"] == hf.config.max_position_embeddings
        gen = hf.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert gen.shape[1] == inputs["input_ids"].shape[1] + 4


def test_export_tied_embeddings(tmp_path, llama_tokenizer_dir):
    """Tied models export without a separate lm_head (transformers re-ties it) and still match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    model = registry.build(
        "models", {"name": "llama", **TINY, "tie_embeddings": True}, "model", tokenizer=tok
    )
    # Composer's on-disk format is {"state": {"model": state_dict, ...}}; write it directly
    ckpt = tmp_path / "tied.pt"
    torch.save({"state": {"model": model.state_dict()}}, ckpt)
    out = export_checkpoint(ckpt, tmp_path / "hf", tokenizer=llama_tokenizer_dir)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, len(tok), (1, 20))
    with torch.no_grad():
        assert (model.eval()({"input_ids": ids}) - hf(ids).logits).abs().max().item() <= 1e-4


def test_export_cli(trained_checkpoint, tmp_path):
    ckpt, _ = trained_checkpoint
    ok = subprocess.run(
        [sys.executable, "-m", "llmfoundry_lite.cli", "export", str(ckpt.parent), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmfoundry_lite.cli",
            "export",
            str(tmp_path / "missing.pt"),
            str(tmp_path / "o2"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "missing.pt" in bad.stderr and "Traceback" not in bad.stderr


def test_export_bad_inputs(tmp_path):
    with pytest.raises(RecipeError, match="no such checkpoint"):
        export_checkpoint(tmp_path / "nope.pt", tmp_path / "out")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(RecipeError, match="cannot read"):
        export_checkpoint(junk, tmp_path / "out")
    other = tmp_path / "other.pt"
    torch.save({"state": {"model": {"model.encoder.weight": torch.zeros(2)}}}, other)
    with pytest.raises(RecipeError, match="not a llama checkpoint"):
        export_checkpoint(other, tmp_path / "out")
    assert not (tmp_path / "out").exists()
