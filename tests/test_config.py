"""Recipe loading: base chain, interpolation, overrides, and one clear error per kind of mistake."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from llmfoundry_lite import load_recipe
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.recipe import OVERRIDE_ORIGIN

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def child(tmp_path):
    """A recipe that inherits the quickstart recipe; tests append keys to it."""

    def make(extra: str = "", name: str = "child.yaml") -> Path:
        return write(tmp_path / name, f"base: {QUICKSTART}\n" + textwrap.dedent(extra))

    return make


def error_of(path, overrides=None, nproc=None) -> RecipeError:
    with pytest.raises(RecipeError) as ei:
        from llmfoundry_lite.recipe import load_recipe as load

        load(path, overrides or [], nproc=nproc)
    return ei.value


def test_quickstart_recipe_is_valid():
    cfg = load_recipe(str(QUICKSTART))
    assert cfg.model.name == "mosaic_bert"
    assert "base" not in cfg


def test_base_chain_later_wins_and_relative_paths(tmp_path):
    write(tmp_path / "a" / "root.yaml", f"base: {QUICKSTART}\nseed: 1\nmax_duration: 5ba\n")
    write(tmp_path / "a" / "mid.yaml", "seed: 2\n")
    top = write(tmp_path / "a" / "top.yaml", "base: [root.yaml, mid.yaml]\nmax_duration: 7ba\n")
    cfg = load_recipe(str(top))
    assert cfg.seed == 2  # mid.yaml is later in the list than root.yaml
    assert cfg.max_duration == "7ba"  # the file itself wins over its bases


def test_interpolation_and_variables(child):
    path = child("variables:\n  lr: 0.00123\noptimizer:\n  lr: ${variables.lr}\n")
    cfg = load_recipe(str(path))
    assert cfg.optimizer.lr == pytest.approx(0.00123)
    assert cfg.variables.lr == pytest.approx(0.00123)


def test_overrides_scalars_and_lists(child):
    cfg = load_recipe(str(child()), ["optimizer.lr=3e-4", "max_duration=10ba", "optimizer.betas=[0.8,0.9]"])
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.max_duration == "10ba"
    assert list(cfg.optimizer.betas) == [0.8, 0.9]


@pytest.mark.parametrize(
    "extra, key, fragment",
    [
        ("optimizer:\n  lrr: 0.1\n", "optimizer.lrr", "did you mean 'lr'"),
        ("model:\n  n_layrs: 2\n", "model.n_layrs", "did you mean"),
        (
            "train_loader:\n  collator:\n    mlm_probabilty: 0.2\n",
            "train_loader.collator.mlm_probabilty",
            "did you mean 'mlm_probability'",
        ),
        ("callbacks:\n  speed_monitor:\n    window: 3\n", "callbacks.speed_monitor.window", "did you mean"),
        ("optimzer_x: 1\n", "optimzer_x", "unknown top-level key"),
        ("optimizer:\n  name: decoupled_adamm\n", "optimizer.name", "did you mean 'decoupled_adamw'"),
        (
            "algorithms:\n  gradient_cliping: {}\n",
            "algorithms.gradient_cliping",
            "did you mean 'gradient_clipping'",
        ),
        ("optimizer:\n  lr: fast\n", "optimizer.lr", "expected a number"),
        ("max_duration: 10 batches\n", "max_duration", "malformed duration"),
        ("seed: abc\n", "seed", "expected an integer"),
        (
            "algorithms:\n  gradient_clipping: {clipping_threshold: 1.0}\n",
            "algorithms.gradient_clipping.clipping_type",
            "missing required key",
        ),
        ("global_train_batch_size: 0\n", "global_train_batch_size", "positive"),
        ("max_duration: -5ba\n", "max_duration", "must be positive"),
        ("precision: fp16\n", "precision", "one of 'fp32'"),
        ("model: 5\n", "model", "expected a mapping"),
        ("callbacks: [{name: lr_monitor}, speed_monitor]\n", "callbacks[1]", "expected a mapping"),
        # A bare number would be epochs in Composer: every duration key asks for a unit instead.
        ("max_duration: 100\n", "max_duration", "add a unit: '100ba'"),
        ("max_duration: '100'\n", "max_duration", "bare number"),
        ("eval_interval: 2\n", "eval_interval", "'2ep'"),
        ("save_interval: 1000\n", "save_interval", "'1000ba'"),
        ("console_log_interval: 10\n", "console_log_interval", "'10ba'"),
        ("max_duration: 0.5dur\n", "max_duration", "unit 'dur' is not allowed"),
        ("max_duration: 60sec\n", "max_duration", "wall-clock"),
        ("eval_interval: 1.5dur\n", "eval_interval", "in (0, 1]"),
        ("console_log_interval: 1.5dur\n", "console_log_interval", "in (0, 1]"),
        # Optimizer values torch rejects only after "valid".
        ("optimizer:\n  lr: -1.0e-3\n", "optimizer.lr", "must be > 0"),
        ("optimizer:\n  lr: 0\n", "optimizer.lr", "must be > 0"),
        ("optimizer:\n  betas: [0.9, 1.0]\n", "optimizer.betas", "beta2 must be in [0, 1)"),
        ("optimizer:\n  betas: [-0.1, 0.9]\n", "optimizer.betas", "beta1 must be in [0, 1)"),
        ("optimizer:\n  betas: [0.9]\n", "optimizer.betas", "expected two numbers"),
        ("optimizer:\n  eps: 0\n", "optimizer.eps", "must be > 0"),
        ("optimizer:\n  weight_decay: -1.0e-5\n", "optimizer.weight_decay", "must be >= 0"),
    ],
)
def test_errors_name_file_and_key(child, extra, key, fragment):
    path = child(extra)
    err = error_of(str(path))
    assert err.key == key, str(err)
    assert fragment in str(err)
    assert str(path) in str(err)


def test_error_in_base_file_names_the_base(tmp_path):
    base = write(tmp_path / "base.yaml", f"base: {QUICKSTART}\noptimizer:\n  lrr: 0.1\n")
    top = write(tmp_path / "top.yaml", "base: base.yaml\nseed: 3\n")
    err = error_of(str(top))
    assert err.file == str(base)
    assert err.key == "optimizer.lrr"


def test_override_errors_are_validated_like_file_keys(child):
    err = error_of(str(child()), ["optimizer.lrr=0.1"])
    assert err.file == OVERRIDE_ORIGIN and err.key == "optimizer.lrr"
    err = error_of(str(child()), ["max_duration=10 batches"])
    assert err.key == "max_duration"
    err = error_of(str(child()), ["optimizer.lr"])
    assert "malformed override" in str(err)


def test_missing_recipe_and_missing_base(tmp_path, child):
    err = error_of(str(tmp_path / "nope.yaml"))
    assert "does not exist" in str(err)
    path = write(tmp_path / "r.yaml", "base: missing.yaml\n")
    err = error_of(str(path))
    assert err.key == "base" and "missing.yaml" in str(err) and str(path) in str(err)


def test_base_cycle(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    err = error_of(str(tmp_path / "a.yaml"))
    assert "base cycle" in str(err)


def test_invalid_yaml_reports_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "seed: 1\nmodel:\n  name: [unclosed\nfoo: bar\n")
    err = error_of(str(path))
    assert "invalid YAML" in str(err) and "line " in str(err)


def test_missing_required_key(tmp_path):
    path = write(tmp_path / "r.yaml", "seed: 1\n")
    err = error_of(str(path))
    assert "missing required key" in str(err)


def test_unresolvable_interpolation(child):
    err = error_of(str(child("seed: ${variables.nope}\n")))
    assert "interpolation" in str(err)


def test_batch_not_divisible_by_processes(child):
    err = error_of(str(child("global_train_batch_size: 6\ndevice_train_microbatch_size: 3\n")), nproc=4)
    assert err.key == "global_train_batch_size" and "not divisible" in str(err)


def test_model_shape_errors_caught_at_validation(child):
    err = error_of(str(child()), ["model.n_heads=3"])  # d_model 128 is not divisible by 3
    assert err.key.startswith("model.") and "divisible" in str(err)


def test_every_shipped_recipe_validates():
    for recipe in sorted((ROOT / "recipes").rglob("*.yaml")):
        cfg = load_recipe(str(recipe))
        assert cfg.model.name, recipe


def test_sgd_momentum_checked(tmp_path):
    import yaml

    data = yaml.safe_load(QUICKSTART.read_text())
    data["optimizer"] = {"name": "sgd", "lr": 0.1, "momentum": -0.9}
    path = write(tmp_path / "sgd.yaml", yaml.safe_dump(data))
    err = error_of(str(path))
    assert err.key == "optimizer.momentum" and "must be >= 0" in str(err)


def test_fractional_intervals_stay_allowed(child):
    cfg = load_recipe(str(child("eval_interval: 0.5dur\nsave_interval: 0.25dur\n")))
    assert (cfg.eval_interval, cfg.save_interval) == ("0.5dur", "0.25dur")


def test_child_list_replaces_base_mapping(child):
    cfg = load_recipe(str(child("callbacks:\n  - name: lr_monitor\n")))
    assert list(cfg.callbacks) == [{"name": "lr_monitor"}]


# ---------------------------------------------------------------------------------------------------------
# Sequence length: stated once, read from one place, no longer than the model takes
# ---------------------------------------------------------------------------------------------------------

LLAMA_TINY = ROOT / "recipes" / "quickstart" / "llama-tiny.yaml"


def test_loaders_take_the_recipe_sequence_length(tmp_path):
    import yaml

    from llmfoundry_lite.recipe import compose, sequence_length

    # The recipe states max_seq_len once, at the top; its loader blocks leave it out and read it from there.
    data, _ = compose(LLAMA_TINY, ["max_seq_len=64"])
    for loader in ("train_loader", "eval_loader"):
        del data[loader]["max_seq_len"]
    path = write(tmp_path / "once.yaml", yaml.safe_dump(data))
    cfg = load_recipe(str(path))
    assert cfg.train_loader.max_seq_len == cfg.eval_loader.max_seq_len == 64
    assert sequence_length(cfg) == 64
    # What training reads wins over the top-level key, and a dict works as well as a DictConfig.
    assert sequence_length({"max_seq_len": 128, "train_loader": {"max_seq_len": 32}}) == 32
    assert sequence_length({"model": {"max_seq_len": 16}}) == 16
    assert sequence_length({}) is None
    # An error about a loader's inherited length names where max_seq_len was set (here: the command line).
    e = error_of(path, ["max_seq_len=256"])  # the dumped model block says max_seq_len: 64
    assert (e.key, e.file) == ("train_loader.max_seq_len", OVERRIDE_ORIGIN)


def test_a_loader_sequence_length_that_contradicts_the_recipe_is_an_error():
    e = error_of(str(LLAMA_TINY), ["train_loader.max_seq_len=64"])
    assert e.key == "train_loader.max_seq_len"
    assert "differs from the recipe's max_seq_len 128" in e.detail
    assert e.file == OVERRIDE_ORIGIN


def test_sequences_longer_than_the_model_takes_are_a_recipe_error():
    e = error_of(str(LLAMA_TINY), ["max_seq_len=256", "model.max_seq_len=128"])
    assert e.key == "train_loader.max_seq_len"
    assert "longer than the model takes (model.max_seq_len 128)" in e.detail
    # Learned positions (classic BERT) limit the length too; ALiBi does not.
    e = error_of(str(QUICKSTART), ["model.name=bert", "model.max_position_embeddings=64"])
    assert "(model.max_position_embeddings 64)" in e.detail
    load_recipe(str(QUICKSTART), ["model.max_position_embeddings=64"])  # mosaic_bert: ALiBi


def test_section_checks_are_registered_by_their_owners():
    from llmfoundry_lite.recipe import sections

    checks = sections.registered()
    assert checks["model"] and checks["fsdp"] and checks["*resources"]
    assert any(name.startswith("llmfoundry_lite.train.checks.") for name in checks["fsdp"])
    for provider in sections.PROVIDERS:  # each provider registers something
        assert any(name.startswith(provider + ".") for names in checks.values() for name in names), provider


def test_the_glue_section_is_checked_by_its_provider(child):
    from llmfoundry_lite.recipe import sections

    assert "glue" in sections.registered()
    e = error_of(child("glue:\n  tasks: [not_a_task]\n"))
    assert e.key.startswith("glue")


def test_every_registered_check_runs_on_validation(child):
    e = error_of(child("fsdp:\n  sharding_strategyy: FULL_SHARD\n"))
    assert e.key.startswith("fsdp")
    e = error_of(child("model:\n  n_heads: 3\n"))  # the model shape check (built on the meta device)
    assert e.key.startswith("model")
