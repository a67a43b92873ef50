"""`validate` catches what would only fail at train time: missing data/tokenizers, data that does not fit the
recipe, logins, and values torch or Composer reject after "valid". Real data and tokenizers (session fixtures)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmfoundry_lite.cli import main
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.recipe import load_recipe
from llmfoundry_lite.train.checks import check_auto_microbatching

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")
LLAMA_TINY = str(ROOT / "recipes" / "quickstart" / "llama-tiny.yaml")


def error_of(recipe: str, overrides: list[str]) -> RecipeError:
    with pytest.raises(RecipeError) as ei:
        load_recipe(recipe, overrides, check_resources=True)
    return ei.value


@pytest.fixture
def bert(bert_tokenizer_dir, mlm_mds_dir):
    """Overrides pointing the quickstart recipe at the real test tokenizer and raw-text shards."""
    return [f"variables.tokenizer_path={bert_tokenizer_dir}", f"variables.data_local={mlm_mds_dir}"]


@pytest.fixture
def llama(llama_tokenizer_dir, causal_mds_dir):
    """Overrides pointing the tiny LLaMA recipe at the real BPE tokenizer and 128-token rows."""
    return [f"variables.tokenizer_path={llama_tokenizer_dir}", f"variables.data_local={causal_mds_dir}"]


def test_recipes_with_their_data_are_valid(bert, llama):
    assert load_recipe(QUICKSTART, bert, check_resources=True).model.name == "mosaic_bert"
    assert load_recipe(LLAMA_TINY, llama, check_resources=True).model.name == "llama"


# ---------------------------------------------------------------------------------------------------------
# Data folders and splits
# ---------------------------------------------------------------------------------------------------------


def test_missing_data_folder_names_the_resolved_path_and_what_it_is_relative_to(bert, tmp_path):
    err = error_of(QUICKSTART, [*bert, "variables.data_local=data/nope"])
    assert err.key == "train_loader.local"
    assert str(tmp_path / "data" / "nope") in str(err)  # tests run in tmp_path: the working directory
    assert "relative to the working directory" in str(err) and "data convert" in str(err)
    assert err.file == QUICKSTART and "\n" not in str(err)


def test_missing_split_lists_the_available_ones(bert):
    err = error_of(QUICKSTART, [*bert, "train_loader.split=tain"])
    assert err.key == "train_loader.split" and "available splits: train, val" in str(err)


def test_eval_split_is_checked_too(bert):
    err = error_of(QUICKSTART, [*bert, "eval_loader.split=test"])
    assert err.key == "eval_loader.split"


def test_folder_without_index_json(bert, tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    err = error_of(QUICKSTART, [*bert, f"variables.data_local={tmp_path / 'empty'}"])
    assert err.key == "train_loader.local" and str(tmp_path / "empty" / "train") in str(err)


def test_truncated_shard_is_caught_at_validation(bert, mlm_mds_dir, tmp_path):
    copy = tmp_path / "mds"
    shutil.copytree(mlm_mds_dir, copy)
    shard = sorted((copy / "train").glob("shard.*.mds"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    err = error_of(QUICKSTART, [*bert, f"variables.data_local={copy}"])
    assert err.key == "train_loader.local" and str(shard) in str(err) and "truncated" in str(err)


def test_remote_with_a_scheme_is_not_checked(bert, tmp_path):
    remote = ["train_loader.remote=s3://bucket/c4", "eval_loader.remote=s3://bucket/c4"]
    cfg = load_recipe(
        QUICKSTART, [*bert, f"variables.data_local={tmp_path / 'cache'}", *remote], check_resources=True
    )
    assert cfg.train_loader.remote == "s3://bucket/c4"


def test_data_key_pointed_at_a_tokenizer_folder(bert, bert_tokenizer_dir):
    err = error_of(
        QUICKSTART, [*bert, f"variables.data_local={bert_tokenizer_dir}", "train_loader.split=null"]
    )
    assert err.key == "train_loader.local" and "is a tokenizer folder" in str(err)


def test_show_does_not_need_the_data(bert):
    # `show`/`estimate` describe a recipe; only validate/train need the data to exist.
    cfg = load_recipe(QUICKSTART, [*bert, "variables.data_local=data/nope"])
    assert cfg.train_loader.local == "data/nope"


# ---------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["data/nope", "./tok", "/abs/x", "~/no-such-tok-xyz", "a/b/c"])
def test_local_looking_tokenizer_that_does_not_exist(bert, path, tmp_path):
    (tmp_path / "data").mkdir()  # `data/nope`: `data/` is a local folder, so this is a path, not a hub id
    err = error_of(QUICKSTART, [*bert, f"variables.tokenizer_path={path}"])
    assert err.key == "tokenizer.path" and "does not exist" in str(err)
    resolved = os.path.abspath(os.path.expanduser(path))
    assert repr(resolved) in str(err) and "data tokenizer --train" in str(err)


@pytest.mark.parametrize("name", ["bert-base-uncased", "google-bert/bert-base-uncased", "data/nope"])
def test_hub_name_fails_at_once_offline(bert, name, network_attempts):
    # conftest sets HF_HUB_OFFLINE=1; `data/nope` without a local `data/` may be a hub id: both are said.
    err = error_of(QUICKSTART, [*bert, f"variables.tokenizer_path={name}"])
    assert not network_attempts  # no minute of hub retries: not one attempt
    assert err.key == "tokenizer.path" and "HF_HUB_OFFLINE=1" in str(err) and name in str(err)


def test_tokenizer_key_pointed_at_an_mds_folder(bert, mlm_mds_dir):
    for folder in (mlm_mds_dir, os.path.join(mlm_mds_dir, "train")):
        err = error_of(QUICKSTART, [*bert, f"variables.tokenizer_path={folder}"])
        assert err.key == "tokenizer.path" and "is an MDS dataset folder" in str(err) and folder in str(err)
        assert len(str(err)) < 400  # not transformers' list of every model type


def test_tokenizer_path_that_is_a_file(bert, bert_tokenizer_dir):
    file = os.path.join(bert_tokenizer_dir, "tokenizer.json")
    err = error_of(QUICKSTART, [*bert, f"variables.tokenizer_path={file}"])
    assert err.key == "tokenizer.path" and "is a file" in str(err)


def test_model_vocab_smaller_than_the_tokenizer(bert):
    err = error_of(QUICKSTART, [*bert, "model.vocab_size=1000"])
    assert err.key == "model.vocab_size" and "2000" in str(err) and "1000" in str(err)
    assert load_recipe(QUICKSTART, [*bert, "model.vocab_size=2000"], check_resources=True)


# ---------------------------------------------------------------------------------------------------------
# Data that does not fit the recipe
# ---------------------------------------------------------------------------------------------------------


def test_mlm_recipe_on_token_rows(bert_tokenizer_dir, causal_mds_dir):
    base = [f"variables.tokenizer_path={bert_tokenizer_dir}", f"variables.data_local={causal_mds_dir}"]
    err = error_of(QUICKSTART, base)
    assert err.key == "train_loader.collator.name" and "masked LM on token rows" in str(err)
    assert os.path.join(causal_mds_dir, "train") in str(err)
    # Without an explicit collator the loader would pick causal LM for token rows: still an MLM model.
    err = error_of(QUICKSTART, [*base, "train_loader.collator=null"])
    assert err.key == "train_loader.local" and "masked LM on token rows" in str(err)


def test_causal_recipe_on_raw_text(llama_tokenizer_dir, mlm_mds_dir):
    err = error_of(
        LLAMA_TINY, [f"variables.tokenizer_path={llama_tokenizer_dir}", f"variables.data_local={mlm_mds_dir}"]
    )
    assert err.key == "train_loader.collator.name" and "causal LM on raw text" in str(err)
    assert "--concat-tokens" in str(err) and os.path.join(mlm_mds_dir, "train") in str(err)


def test_decoder_without_collator_on_raw_text(llama_tokenizer_dir, mlm_mds_dir):
    # The loader would pick causal LM for a tokenizer without [MASK] and train on document starts only.
    ov = [f"variables.tokenizer_path={llama_tokenizer_dir}", f"variables.data_local={mlm_mds_dir}"]
    err = error_of(LLAMA_TINY, [*ov, "train_loader.collator=null", "eval_loader.collator=null"])
    assert err.key == "train_loader.local" and "causal LM on raw text" in str(err)


def test_collator_that_does_not_fit_the_model(llama):
    err = error_of(LLAMA_TINY, [*llama, "train_loader.collator.name=mlm"])
    assert err.key == "train_loader.collator.name" and "does not fit model 'llama'" in str(err)


def test_train_checks_the_same_without_validate(bert_tokenizer_dir, causal_mds_dir, tiny_bert):
    """`train` builds through train/build.py, which refuses the same mistakes even when validation was skipped."""
    from llmfoundry_lite.train import build as builders

    cfg = load_recipe(QUICKSTART, [*tiny_bert(), f"variables.data_local={causal_mds_dir}"])
    tok = builders.build_tokenizer(cfg)
    with pytest.raises(RecipeError, match="masked LM on token rows"):
        builders.build_dataloader(cfg, "train_loader", tok, 4)
    cfg = load_recipe(QUICKSTART, [*tiny_bert(), "model.vocab_size=100"])
    with pytest.raises(RecipeError, match="smaller than the vocabulary of the tokenizer") as ei:
        builders.build_model(cfg, tok)
    assert ei.value.key == "model.vocab_size"


# ---------------------------------------------------------------------------------------------------------
# Loggers, FSDP microbatching
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_wandb_login(monkeypatch, tmp_path):
    """An environment where wandb has no API key, no netrc and no offline mode."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED", "NETRC", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_wandb_without_login_says_how_to_fix(bert, no_wandb_login, tmp_path, monkeypatch):
    err = error_of(QUICKSTART, [*bert, "loggers.wandb.project=demo"])
    assert err.key == "loggers.wandb" and "wandb login" in str(err) and "WANDB_MODE=offline" in str(err)
    (tmp_path / "home").mkdir(exist_ok=True)  # validation may have made it (the checks cache in ~/.cache)
    (tmp_path / "home" / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    assert load_recipe(QUICKSTART, [*bert, "loggers.wandb.project=demo"], check_resources=True)
    (tmp_path / "home" / ".netrc").unlink()
    assert load_recipe(QUICKSTART, [*bert, "loggers.wandb.init_kwargs={mode: offline}"], check_resources=True)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert load_recipe(QUICKSTART, [*bert, "loggers.wandb.project=demo"], check_resources=True)


def test_wandb_failing_at_train_time_is_one_line(tiny_bert, tmp_path):
    """A run that skipped validation: wandb's own UsageError becomes one line with the fix, exit 2."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "NETRC")}
    env["HOME"] = str(tmp_path / "home")
    argv = ["train", QUICKSTART, *tiny_bert(max_duration="1ba"), "loggers.wandb.project=demo"]
    out = subprocess.run(
        [sys.executable, "-m", "llmfoundry_lite.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "loggers.wandb" in out.stderr and "wandb login" in out.stderr


def test_fsdp_auto_microbatching_rejected_on_torch_2_7_1():
    data = {"fsdp": {"sharding_strategy": "FULL_SHARD"}, "device_train_microbatch_size": "auto"}
    with pytest.raises(RecipeError, match="patch_unshard_for_automicrobatching") as ei:
        check_auto_microbatching(data, torch_version="2.7.1", composer_version="0.32.1")
    assert ei.value.key == "device_train_microbatch_size" and "2.7.1" in str(ei.value)
    check_auto_microbatching(data, torch_version="2.7.0", composer_version="0.32.1")
    check_auto_microbatching({**data, "device_train_microbatch_size": 8}, "2.8.0", "0.32.1")
    check_auto_microbatching({**data, "fsdp": None}, "2.8.0", "0.32.1")


def test_fsdp_auto_microbatching_on_the_installed_torch_and_composer():
    """Accepted or rejected as the installed versions say (pyproject pins torch 2.7.0; GPU images have newer)."""
    from importlib.metadata import version

    from packaging.version import Version

    torch_version, composer_version = version("torch"), version("mosaicml")
    overrides = ["fsdp={sharding_strategy: FULL_SHARD}", "device_train_microbatch_size=auto"]
    if Version(torch_version) >= Version("2.7.1") and Version(composer_version) < Version("0.33"):
        with pytest.raises(RecipeError, match="patch_unshard_for_automicrobatching") as ei:
            load_recipe(QUICKSTART, overrides)
        assert ei.value.key == "device_train_microbatch_size" and torch_version in str(ei.value)
    else:
        assert load_recipe(QUICKSTART, overrides).device_train_microbatch_size == "auto"


# ---------------------------------------------------------------------------------------------------------
# Through the command line: exit 2, one line naming the key, no traceback
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("max_duration=100", "max_duration", "'100ba'"),
        ("eval_interval=50", "eval_interval", "'50ba'"),
        ("save_interval=2", "save_interval", "'2ep'"),
        ("console_log_interval=10", "console_log_interval", "'10ba'"),
        ("optimizer.lr=-1e-3", "optimizer.lr", "must be > 0"),
        ("optimizer.betas=[0.9,1.0]", "optimizer.betas", "[0, 1)"),
        ("optimizer.eps=0", "optimizer.eps", "must be > 0"),
        ("optimizer.weight_decay=-0.1", "optimizer.weight_decay", ">= 0"),
    ],
)
def test_cli_validate_rejects_values_that_fail_after_valid(capsys, override, key, fragment):
    assert main(["validate", QUICKSTART, override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{key}:" in err and fragment in err and "Traceback" not in err
