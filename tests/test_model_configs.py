"""The built-in families' configs (models/configs.py) stand in for the built model where no model is needed: their
parameter counts equal the meta-built model's for every recipe and for the options the recipes leave out, their
checks refuse what building refuses with the same message, and ``show``/``validate`` of the quickstart recipes
import neither torch nor Composer, even with remembering off."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _cli_probe import heavy_imported, run_cli

from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.configs import ENTRIES, entry_parameters
from llmfoundry_lite.recipe import compose

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml"))
ODD_VOCAB = 1001  # not a multiple of 64: BERT's padding is counted too


def _built_counts(block: dict) -> tuple[int, int]:
    from llmfoundry_lite.models.accounting import parameter_counts
    from llmfoundry_lite.train.meta import meta_model

    return parameter_counts(meta_model(block))


def _model_block(recipe: str) -> dict:
    block = dict(compose(ROOT / recipe)[0].get("model") or {})
    block.pop("init_from_hf", None)  # both ways count the block's shape keys
    return block


@pytest.mark.parametrize("recipe", RECIPES)
def test_counts_equal_the_built_models_for_every_recipe(recipe):
    block = _model_block(recipe)
    counts = entry_parameters(block, ODD_VOCAB)
    if block.get("name") not in ENTRIES:
        assert counts is None  # plugin and Hugging Face entries are built
        return
    block.setdefault("vocab_size", ODD_VOCAB)
    assert counts == _built_counts(block)


TINY = {"d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": ODD_VOCAB}
SMOE = {"name": "smoe_dropout", "n_experts": 4}


OPTIONS = {
    "llama-untied-gqa": {"name": "llama", **TINY, "tie_embeddings": False, "n_kv_heads": 1, "ffn_hidden_size": 96},
    "llama-tied-multiplier": {"name": "llama", **TINY, "ffn_dim_multiplier": 1.3, "multiple_of": 16},
    "llama-smoe": {"name": "llama", **TINY, "ffn": SMOE},
    "mosaic-smoe": {"name": "mosaic_bert", **TINY, "intermediate_size": 128, "ffn": SMOE, "vocab_multiple": 8},
    "mosaic-learned": {"name": "mosaic_bert", **TINY, "intermediate_size": 128, "position": "learned", "type_vocab_size": 3},
    "bert": {"name": "bert", **TINY, "intermediate_size": 96, "max_position_embeddings": 77},
    "bert-geglu": {"name": "bert", **TINY, "intermediate_size": 96, "ffn": "geglu"},
}  # fmt: skip


def test_every_counted_entry_is_a_builtin_model_compared_here():
    from llmfoundry_lite.registry_index import BUILTINS

    assert set(ENTRIES) <= set(BUILTINS["models"])
    compared = {_model_block(r).get("name") for r in RECIPES} | {b["name"] for b in OPTIONS.values()}
    assert set(ENTRIES) <= compared


@pytest.mark.parametrize("option", OPTIONS)
def test_counts_equal_the_built_models_for_each_option(option):
    block = OPTIONS[option]
    assert entry_parameters(block, None) == _built_counts(block)


@pytest.mark.parametrize(
    "block",
    [
        {"name": "llama", **TINY, "n_heads": 3},
        {"name": "llama", **TINY, "n_kv_heads": 3},
        {"name": "llama", **TINY, "n_heads": 64},  # odd head dimension
        {"name": "llama", **TINY, "ffn": {**SMOE, "n_experts": 7}},
        {"name": "mosaic_bert", **TINY, "n_heads": 3},
        {"name": "mosaic_bert", **TINY, "hidden_dropout": 1.5},
        {"name": "mosaic_bert", **TINY, "vocab_multiple": 0},
        {"name": "bert", **TINY, "n_layers": 0},
    ],
)
def test_the_configs_refuse_what_building_refuses_with_the_same_message(block):
    with pytest.raises(RecipeError) as built:
        _built_counts(block)
    with pytest.raises(RecipeError) as checked:
        entry_parameters(block, None)
    assert (str(checked.value), checked.value.key) == (str(built.value), built.value.key)


def test_no_vocabulary_no_count():
    assert (
        entry_parameters({"name": "llama", **{k: v for k, v in TINY.items() if k != "vocab_size"}}, None)
        is None
    )


@pytest.mark.parametrize("fixture", ["bert_tokenizer_dir", "llama_tokenizer_dir"])
def test_tokenizer_length_is_len_of_the_loaded_tokenizer(fixture, request, tmp_path):
    from transformers import AutoTokenizer

    from llmfoundry_lite.data.checks import tokenizer_length

    folder = request.getfixturevalue(fixture)
    assert tokenizer_length(folder) == len(AutoTokenizer.from_pretrained(folder))
    assert tokenizer_length(str(tmp_path)) is None  # no tokenizer.json: the caller builds the model instead


def test_cold_show_and_validate_import_no_heavy_stack(
    bert_tokenizer_dir, llama_tokenizer_dir, mlm_mds_dir, causal_mds_dir
):
    env = {**os.environ, "LLMFOUNDRY_LITE_CACHE": "off"}
    recipes = {
        "mosaicbert-tiny": (bert_tokenizer_dir, mlm_mds_dir),
        "llama-tiny": (llama_tokenizer_dir, causal_mds_dir),
    }
    for name, (tok, data) in recipes.items():
        recipe = [
            str(ROOT / "recipes" / "quickstart" / f"{name}.yaml"),
            f"variables.tokenizer_path={tok}",
            f"variables.data_local={data}",
        ]
        shown = run_cli(["show", *recipe], env)
        assert shown.returncode == 0 and heavy_imported(shown) == [], shown.stderr
        valid = run_cli(["validate", *recipe], env)
        assert valid.returncode == 0 and heavy_imported(valid) == [], valid.stderr
        bad = run_cli(["validate", *recipe, "model.n_heads=3"], env)
        assert bad.returncode == 2 and "n_heads=3" in bad.stderr and heavy_imported(bad) == [], bad.stderr
    # The count is the built model's (the parameter line of `show`).
    from llmfoundry_lite.recipe import load_recipe
    from llmfoundry_lite.train.meta import count_parameters

    cfg = load_recipe(recipe[0], recipe[1:])
    total, non_emb = count_parameters(cfg)
    assert f"# parameters: {total:,} " in shown.stdout and f"non-embedding {non_emb:,})" in shown.stdout
