"""`generate` callback: samples text at an interval during a real Composer run and logs it."""

from __future__ import annotations

import pytest
import torch

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError


def test_generate_callback_logs_at_interval(llama_tokenizer_dir, capsys):
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    model = registry.build(
        "models",
        {"name": "llama", "d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64},
        "model",
        tokenizer=tok,
    )
    cb = registry.build(
        "callbacks",
        {"prompts": ["The meaning of", "Python is"], "interval": "2ba", "max_new_tokens": 6, "top_k": 10},
        "callbacks.generate",
        default_name="generate",
    )
    ids = torch.randint(4, len(tok), (8, 16))
    rows = [{"input_ids": r, "labels": r, "attention_mask": torch.ones_like(r)} for r in ids]
    mem = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(rows, batch_size=2),
        max_duration="4ba",
        callbacks=[cb],
        loggers=[mem],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
    )
    trainer.fit()
    trainer.close()
    assert [step for step, _, _ in cb.history] == [2, 2, 4, 4]
    assert all(text for _, _, text in cb.history)  # something was sampled and decoded
    out = capsys.readouterr().out
    assert "[generate] ba 2: 'The meaning of' ->" in out
    table = mem.tables["generations"]
    assert "Python is" in table and "generation" in table
    assert model.training  # restored after sampling


def test_generate_callback_bad_interval():
    with pytest.raises(RecipeError) as e:
        registry.build(
            "callbacks",
            {"prompts": ["x"], "interval": "often"},
            "callbacks.generate",
            default_name="generate",
        )
    assert e.value.key == "callbacks.generate.interval"
