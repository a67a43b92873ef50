"""`show` and `validate` without the heavy stack: the generated signature table matches the live registries, its
annotations check values as the live ones do, durations parse as Composer parses them, and a recipe whose model
was checked before is validated (and shown) without importing torch, Composer, transformers or streaming (a
built-in family's needs no build at all: tests/test_model_configs.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _cli_probe import heavy_imported, run_cli

from llmfoundry_lite import registry, registry_index, registry_listing
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.registry import EntrySpec
from llmfoundry_lite.typecheck import annotation_from_source, annotation_source, parse_duration, type_error

ROOT = Path(__file__).resolve().parents[1]
LLAMA_QUICKSTART = str(ROOT / "recipes" / "quickstart" / "llama-tiny.yaml")


def test_signature_table_matches_the_live_registries():
    assert registry_listing.builtin_signatures() == registry_index.SIGNATURES, (
        "built-in registry entries changed: run `python scripts/registry_index.py`"
    )


SAMPLES = [None, True, 0, 3, -1, 2.5, "x", "10ba", "0.5dur", "auto", [1, 2], [0.9, 0.95], ["a"], {"a": 1}]


def test_table_annotations_check_values_as_the_live_ones_do():
    """Every built-in argument: the table's annotation accepts exactly the YAML values the live one accepts."""
    checked = 0
    for reg in registry.REGISTRY_NAMES:
        for name, obj in registry_listing.builtin_entries(reg).items():
            live = EntrySpec.of(obj)
            table = EntrySpec.from_row(registry_index.SIGNATURES[reg][name])
            assert table.params.keys() == live.params.keys() and table.var_kw == live.var_kw, name
            for key, p in live.params.items():
                q = table.params[key]
                assert (q.required, q.default) == (p.required, p.default), (name, key)
                for v in SAMPLES:
                    assert (type_error(v, p.type) is None) == (type_error(v, q.type) is None), (name, key, v)
                checked += 1
    assert checked > 200


@pytest.mark.parametrize(
    "text",
    ["10ba", "1ep", "1000sp", "3e4tok", "0.5dur", "2iter", "30sec", "1h", "1h30m", "45m", "2h3m4s", "60s",
     "10BA", "1.5ba", "ba", "10", "10 ba", "-1ba", "1e-3dur", "99m", "0ba", "abc"],
)  # fmt: skip
def test_durations_parse_as_composer_parses_them(text):
    from composer.core import Time

    try:
        t = Time.from_timestring(text)
        expected = (t.value, t.unit.value)
    except (ValueError, TypeError) as e:
        expected = type(e)
    try:
        got = parse_duration(text)
    except (ValueError, TypeError) as e:
        got = type(e)
    assert got == expected


def test_a_string_or_time_argument_takes_only_a_duration():
    """Composer's schedulers parse ``Union[str, Time]`` strings as durations and fail on a bare number mid-run;
    where the union also takes a number (``drop_warmup: 0.1``), a number stays allowed."""
    from typing import Optional, Union

    from composer.core import Time

    for tp in (Union[str, Time], Optional[Union[str, Time]]):
        assert type_error("10ba", tp) is None and type_error("0.06dur", tp) is None
        assert "malformed duration" in type_error("5x", tp)
        assert "'100ba'" in type_error(100, tp)
    assert type_error(None, Optional[Union[str, Time]]) is None
    assert type_error(0.1, Union[float, Time, str]) is None and type_error(1, Union[int, str, Time]) is None
    assert "malformed duration" in type_error("soon", Union[int, str, Time])


def test_annotation_source_round_trips_the_checked_part():
    from typing import Literal, Optional, Union

    for tp in (int, Optional[float], Union[int, Literal["auto"]], list[str], tuple[float, float], dict, bool):
        assert annotation_from_source(annotation_source(tp)) == tp or annotation_source(
            tp
        ) == annotation_source(annotation_from_source(annotation_source(tp)))
    assert annotation_source(object) == "Any"


def _hf_causal_recipe(tmp_path: Path, tokenizer: str, data: str) -> list[str]:
    """The LLaMA quickstart with a Hugging Face model block: an entry only a meta-device build can check."""
    import yaml

    data_ = yaml.safe_load(Path(LLAMA_QUICKSTART).read_text())
    data_["model"] = {
        "name": "hf_causal_lm",
        "config": {
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
    }
    path = tmp_path / "hf-causal.yaml"
    path.write_text(yaml.safe_dump(data_))
    return [str(path), f"variables.tokenizer_path={tokenizer}", f"variables.data_local={data}"]


@pytest.mark.timeout(900)  # four commands import torch and Composer: minutes on a busy 2-core box
def test_validate_and_show_import_no_heavy_stack_once_the_model_was_checked(
    tmp_path, llama_tokenizer_dir, causal_mds_dir
):
    """Built-in families need no build (tests/test_model_configs.py); any other model is built once, remembered."""
    env = {**os.environ, "LLMFOUNDRY_LITE_CACHE": str(tmp_path / "memo")}
    recipe = _hf_causal_recipe(tmp_path, llama_tokenizer_dir, causal_mds_dir)
    first = run_cli(
        ["show", *recipe], env
    )  # builds the model on the meta device once and remembers the answers
    assert first.returncode == 0, first.stderr
    assert "torch" in heavy_imported(first)
    assert run_cli(["validate", *recipe], env).returncode == 0
    for verb in ("validate", "show"):
        again = run_cli([verb, *recipe], env)
        assert again.returncode == 0, again.stderr
        assert heavy_imported(again) == [], verb
    assert again.stdout == first.stdout  # the remembered parameter count is the one computed
    # Mistakes are never remembered: a bad model block is built and refused (one line, exit 2) every time.
    for _ in range(2):
        bad = run_cli(["validate", *recipe, "model.model_type=no_such_type"], env)
        assert bad.returncode == 2 and "no_such_type" in bad.stderr
    # A mistake in the keys is caught from the table, before any model is built.
    typo = run_cli(["validate", *recipe, "optimizer.lrr=0.1"], env)
    assert typo.returncode == 2 and "did you mean 'lr'" in typo.stderr and heavy_imported(typo) == []
    # Remembering off: the model is built every time (what the first command of a new model block costs).
    off = run_cli(["validate", *recipe], {**env, "LLMFOUNDRY_LITE_CACHE": "off"})
    assert off.returncode == 0 and "torch" in heavy_imported(off)


def test_entry_spec_prefers_live_entries_and_refuses_unknown_names():
    with pytest.raises(RecipeError) as e:
        registry.entry_spec("optimizers", "decoupled_adam", key="optimizer.name")
    assert "did you mean 'decoupled_adamw'" in str(e.value) and e.value.key == "optimizer.name"
    spec = registry.entry_spec("optimizers", "decoupled_adamw")
    assert spec.params["lr"].type is float and not spec.params["lr"].required
