"""Recipes as published: LLaMA's warm-up and norm eps, GLUE's unshuffled order, the "$20" MosaicBERT point and the
``data convert`` subset options it is documented with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmfoundry_lite.errors import RecipeError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


# ---------------------------------------------------------------------------------------------------------
# LLaMA
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["125m", "350m", "1b", "7b"])
def test_llama_recipes_follow_the_paper(size):
    from llmfoundry_lite.recipe import load_recipe

    cfg = load_recipe(RECIPES / "llama" / f"{size}.yaml")
    assert cfg.scheduler.t_warmup == "2000ba"  # LLaMA: 2,000 warm-up steps, at every size
    assert cfg.model.norm_eps == pytest.approx(1e-6)  # the LLaMA-1 release's params.json
    # Composer's decoupled weight decay is not multiplied by lr: LLaMA's 0.1 is written as 0.1 x peak lr.
    assert cfg.optimizer.weight_decay == pytest.approx(0.1 * cfg.optimizer.lr)
    text = (RECIPES / "llama" / "base.yaml").read_text()
    assert "0.1 x peak lr" in text and "LLaMA-1" in text


# ---------------------------------------------------------------------------------------------------------
# GLUE: the reference's data order
# ---------------------------------------------------------------------------------------------------------


def test_glue_train_order_is_the_datasets_unless_shuffle_is_set():
    from llmfoundry_lite.apps.glue.config import GlueConfig, parse_glue_section
    from llmfoundry_lite.apps.glue.job import make_train_loader

    assert GlueConfig().shuffle is False
    assert parse_glue_section({}).shuffle is False
    assert parse_glue_section({"shuffle": True}).shuffle is True
    with pytest.raises(RecipeError, match="shuffle"):
        parse_glue_section({"shuffle": "sometimes"})

    rows = list(range(40))

    def order(shuffle: bool, seed: int = 19) -> list[int]:
        loader = make_train_loader(rows, 8, lambda b: b, shuffle, seed)
        return [i for epoch in range(2) for batch in loader for i in batch]

    assert order(False) == rows + rows  # every epoch in the dataset's order, as finetuning_jobs.py does
    shuffled = order(True)
    assert shuffled != rows + rows and sorted(shuffled[:40]) == rows
    assert shuffled[:40] != shuffled[40:]  # a new order each epoch
    assert order(True) == shuffled and order(True, seed=8364) != shuffled  # seeded by the job's seed


# ---------------------------------------------------------------------------------------------------------
# The "$20" point
# ---------------------------------------------------------------------------------------------------------


def test_20usd_recipe_is_the_published_point_of_the_base_schedule():
    from llmfoundry_lite.apps.estimate import estimate
    from llmfoundry_lite.recipe import load_recipe

    full = load_recipe(RECIPES / "mosaicbert" / "base.yaml")
    point = load_recipe(RECIPES / "mosaicbert" / "base-20usd.yaml")
    assert full.max_duration == "286720000sp"  # base.yaml stays the full 70,000 x 4096 run
    assert point.max_duration == "43008000sp"  # 10,500 x 4096
    for key in ("model", "optimizer", "scheduler", "train_loader", "global_train_batch_size", "max_seq_len"):
        assert point[key] == full[key], key  # same recipe, same schedule shape (fractions of the run)
    assert point.scheduler.t_warmup.endswith("dur")

    e = estimate(point, "base-20usd.yaml")
    # Published: 1.13 h on 8 x A100-80GB, "roughly $20". Within 5% of both at the recipe's 40% MFU.
    assert (e.gpu, e.gpus, e.mfu) == ("a100-80gb", 8, pytest.approx(0.40))
    assert e.hours == pytest.approx(1.13, rel=0.05)
    assert e.usd == pytest.approx(20.0, rel=0.05)


# ---------------------------------------------------------------------------------------------------------
# data convert --max-docs / --max-tokens
# ---------------------------------------------------------------------------------------------------------


def _samples(split_dir: Path) -> int:
    index = json.loads((split_dir / "index.json").read_text())
    return sum(s["samples"] for s in index["shards"])


def test_convert_max_docs_takes_a_subset_split_by_val_fraction(tmp_path):
    from llmfoundry_lite.data.convert import convert

    whole = convert("embedded", tmp_path / "whole")
    s = convert("embedded", tmp_path / "sub", max_docs=200, val_fraction=0.05)
    assert whole.documents > 400
    assert (s.splits["train"].documents, s.splits["val"].documents) == (190, 10)
    assert _samples(tmp_path / "sub" / "train") == 190 and _samples(tmp_path / "sub" / "val") == 10
    one = convert("embedded", tmp_path / "train-only", splits="train", max_docs=7)
    assert one.splits["train"].documents == 7 and not (tmp_path / "train-only" / "val").exists()


def test_convert_max_tokens_stops_at_the_budget(tmp_path, llama_tokenizer_dir):
    from llmfoundry_lite.data.convert import convert

    packed = convert(
        "embedded",
        tmp_path / "packed",
        tokenizer=llama_tokenizer_dir,
        concat_tokens=64,
        max_tokens=5000,
        num_workers=0,
    )
    # 5% of 5,000 tokens for val (250 -> 4 rows of 64), the rest for train (4,750 -> 75 rows).
    assert (packed.splits["train"].samples, packed.splits["val"].samples) == (75, 4)
    assert _samples(tmp_path / "packed" / "train") == 75

    raw = convert("embedded", tmp_path / "raw", tokenizer=llama_tokenizer_dir, max_tokens=5000)
    whole = convert("embedded", tmp_path / "raw-whole", splits="train")
    # Raw text keeps documents whole: the split stops at the first document that reaches its budget.
    assert 4750 <= raw.splits["train"].tokens and raw.splits["train"].documents < whole.documents
    assert 250 <= raw.splits["val"].tokens


def test_convert_subset_mistakes_are_one_line_errors(tmp_path):
    from llmfoundry_lite.data.convert import convert

    with pytest.raises(RecipeError, match="needs --tokenizer") as e:
        convert("embedded", tmp_path / "x", max_tokens=1000)
    assert e.value.key == "--max-tokens"
    with pytest.raises(RecipeError, match="at least 2") as e:
        convert("embedded", tmp_path / "x", max_docs=1)
    assert e.value.key == "--max-docs"


def test_data_convert_cli_takes_max_docs(tmp_path):
    import typer
    from typer.testing import CliRunner

    from llmfoundry_lite.data.cli import register_cli

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    register_cli(app)
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        ["data", "convert", "--source", "embedded", "--out", str(out), "--max-docs", "40", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    assert _samples(out / "train") + _samples(out / "val") == 40
