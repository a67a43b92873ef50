"""`import-recipe`: llm-foundry and mosaicml/examples YAMLs (written here in those projects' formats) become recipes
that validate, with every key that has no equivalent listed with its reason."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from llmfoundry_lite.apps.import_recipe import import_recipe, register_cli, translate
from llmfoundry_lite.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]

# llm-foundry scripts/train/yamls/pretrain/mpt-125m.yaml, with the ALiBi/QK-clip/sequence-id settings of its
# "realistic" variant and a foundry-only callback, top-level free variables as in the older format.
MPT_125M = """\
data_local: {data}
data_remote:  # If blank, files must be present in data_local
max_seq_len: 128
global_seed: 17
eos_token_id: 0
num_canonical_nodes: 128
run_name: mpt-125m-import

model:
  name: mpt_causal_lm
  init_device: meta
  d_model: 64
  n_heads: 4
  n_layers: 2
  expansion_ratio: 4
  max_seq_len: ${{max_seq_len}}
  vocab_size: 2000
  no_bias: true
  attn_config:
    alibi: true
    attn_impl: triton
    clip_qkv: 6
    attn_uses_sequence_id: true

tokenizer:
  name: {tokenizer}
  kwargs:
    model_max_length: ${{max_seq_len}}

train_loader:
  name: text
  dataset:
    eos_token_id: ${{eos_token_id}}
    local: ${{data_local}}
    remote: ${{data_remote}}
    split: train
    shuffle: true
    max_seq_len: ${{max_seq_len}}
    shuffle_seed: ${{global_seed}}
  drop_last: true
  num_workers: 0

eval_loader:
  name: text
  dataset:
    local: ${{data_local}}
    remote: ${{data_remote}}
    split: val
    shuffle: false
    max_seq_len: ${{max_seq_len}}
    shuffle_seed: ${{global_seed}}
  drop_last: false
  num_workers: 0

scheduler:
  name: cosine_with_warmup
  t_warmup: 100ba
  alpha_f: 0.1

optimizer:
  name: decoupled_lionw
  lr: 6.0e-4
  betas: [0.9, 0.95]
  weight_decay: 0.0

algorithms:
  gradient_clipping:
    clipping_type: norm
    clipping_threshold: 1.0

max_duration: 4800ba
eval_interval: 500ba
eval_first: false
eval_subset_num_batches: -1
global_train_batch_size: 8
seed: ${{global_seed}}
device_eval_batch_size: 4
device_train_microbatch_size: 4
precision: amp_bf16

fsdp_config:
  sharding_strategy: FULL_SHARD
  mixed_precision: PURE
  activation_checkpointing: false
  limit_all_gathers: true
  verbose: false

progress_bar: false
log_to_console: true
console_log_interval: 1ba
save_filename: ep{{epoch}}-ba{{batch}}/rank{{rank}}.pt

callbacks:
  speed_monitor:
    window_size: 10
  lr_monitor: {{}}
  scheduled_gc:
    batch_interval: 2000
  runtime_estimator: {{}}

icl_tasks:
- label: piqa
  dataset_uri: eval/local_data/commonsense_reasoning/piqa.jsonl
  num_fewshot: [0]
  icl_task_type: multiple_choice
"""

# llm-foundry scripts/train/yamls/pretrain/hf-llama-3.1-8B.yaml's format (`variables:`), from a local folder.
HF_LLAMA = """\
variables:
  data_local: {data}
  data_remote:
  max_seq_len: 128
  global_seed: 17
  model_name: {model}
  tokenizer_name: {tokenizer}
  run_name: hf-llama-import

max_seq_len: ${{variables.max_seq_len}}
run_name: ${{variables.run_name}}
save_folder: null

model:
  name: hf_causal_lm
  init_device: meta
  pretrained_model_name_or_path: ${{variables.model_name}}
  pretrained: false
  use_auth_token: true
  use_flash_attention_2: true
  config_overrides:
    torch_dtype: bfloat16

tokenizer:
  name: ${{variables.tokenizer_name}}
  kwargs:
    model_max_length: ${{variables.max_seq_len}}

train_loader:
  name: text
  dataset:
    local: ${{variables.data_local}}
    remote: ${{variables.data_remote}}
    split: train
    shuffle: true
    max_seq_len: ${{variables.max_seq_len}}
    shuffle_seed: ${{variables.global_seed}}
  pin_memory: true
  prefetch_factor: 2
  persistent_workers: true
  drop_last: true
  num_workers: 1

scheduler:
  name: cosine_with_warmup
  t_warmup: 100ba
  alpha_f: 0.1

optimizer:
  name: decoupled_adamw
  lr: 6.0e-4
  betas: [0.9, 0.95]
  eps: 1.0e-08
  weight_decay: 0.0

algorithms:
  gradient_clipping:
    clipping_type: norm
    clipping_threshold: 1.0

max_duration: 500ba
eval_interval: 1
global_train_batch_size: 8

seed: ${{variables.global_seed}}
device_train_microbatch_size: 1
precision: amp_bf16
dist_timeout: 6000
expandable_segments: true

fsdp_config:
  mixed_precision: PURE
  state_dict_type: sharded
  sharding_strategy: FULL_SHARD
  backward_prefetch: BACKWARD_PRE

callbacks:
  speed_monitor:
    window_size: 10
  memory_monitor: {{}}
"""

# mosaicml/examples benchmarks/bert/yamls/main/mosaic-bert-base-uncased.yaml's format.
MOSAIC_BERT = """\
data_local: {data}
data_remote:

max_seq_len: 128
tokenizer_name: {tokenizer}
mlm_probability: 0.3

run_name: mosaic-bert-base-uncased

model:
  name: mosaic_bert
  pretrained_model_name: bert-base-uncased
  tokenizer_name: ${{tokenizer_name}}
  model_config:
    num_attention_heads: 2
    num_hidden_layers: 2
    hidden_size: 64
    intermediate_size: 128
    attention_probs_dropout_prob: 0.0
    alibi_starting_size: 512

train_loader:
  name: text
  dataset:
    local: ${{data_local}}
    remote: ${{data_remote}}
    split: train
    tokenizer_name: ${{tokenizer_name}}
    max_seq_len: ${{max_seq_len}}
    shuffle: true
    mlm_probability: ${{mlm_probability}}
  drop_last: true
  num_workers: 0

eval_loader:
  name: text
  dataset:
    local: ${{data_local}}
    remote: ${{data_remote}}
    split: val
    tokenizer_name: ${{tokenizer_name}}
    max_seq_len: ${{max_seq_len}}
    shuffle: false
    mlm_probability: 0.15
  drop_last: false
  num_workers: 0

scheduler:
  name: linear_decay_with_warmup
  t_warmup: 0.06dur
  alpha_f: 0.02

optimizer:
  name: decoupled_adamw
  lr: 5.0e-4
  betas: [0.9, 0.98]
  eps: 1.0e-06
  weight_decay: 1.0e-5

algorithms:
  fused_layernorm: {{}}

max_duration: 286720000sp
eval_interval: 2000ba
global_train_batch_size: 4096

seed: 17
device_eval_batch_size: 128
device_train_microbatch_size: 128
precision: amp_bf16

progress_bar: false
log_to_console: true
console_log_interval: 1ba

callbacks:
  speed_monitor:
    window_size: 500
  lr_monitor: {{}}
"""


def _write(tmp_path, name, text, **fmt):
    path = tmp_path / name
    path.write_text(text.format(**fmt))
    return path


def _hf_llama_folder(tmp_path):
    """A local folder with a Hugging Face Llama config.json (as a hub download would leave)."""
    from transformers import LlamaConfig

    folder = tmp_path / "tiny-llama"
    LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160,
        vocab_size=2000, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def test_mpt_yaml_becomes_a_llama_recipe_with_the_differences_listed(
    tmp_path, causal_mds_dir, llama_tokenizer_dir
):
    from llmfoundry_lite.recipe import load_recipe

    src = _write(tmp_path, "mpt-125m.yaml", MPT_125M, data=causal_mds_dir, tokenizer=llama_tokenizer_dir)
    out = tmp_path / "ours.yaml"
    t = import_recipe(src, out, check_resources=True)  # the data and tokenizer it names are real here

    cfg = load_recipe(out)
    assert cfg.model.name == "llama"
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (64, 2, 4)
    assert (
        cfg.model.tie_embeddings is True and cfg.model.vocab_size == 2000 and cfg.model.init_device == "meta"
    )
    assert cfg.max_seq_len == 128 and "max_seq_len" not in yaml.safe_load(out.read_text())["train_loader"]
    assert cfg.train_loader.local == causal_mds_dir and cfg.train_loader.shuffle_seed == 17 and cfg.seed == 17
    assert cfg.train_loader.collator == {"name": "causal_lm", "sequence_id": True}  # attn_uses_sequence_id
    assert cfg.tokenizer == {"name": "hf", "path": llama_tokenizer_dir, "model_max_length": 128}
    assert cfg.fsdp.sharding_strategy == "FULL_SHARD" and cfg.scheduler.t_warmup == "100ba"
    assert cfg.max_duration == "4800ba" and cfg.global_train_batch_size == 8
    assert set(cfg.callbacks) == {"speed_monitor", "lr_monitor", "runtime_estimator"}

    # What MPT means differently is said, key by key; what has no equivalent is listed with a reason.
    assert "ALiBi" in t.notes["model.attn_config.alibi"]
    assert "RMSNorm" in t.notes["model.norm_type"] and "SwiGLU" in t.notes["model.ffn_config"]
    assert "decoupled_adamw" in t.notes["optimizer.name"] and cfg.optimizer.name == "decoupled_adamw"
    assert "model.no_bias" not in t.notes  # no_bias: true is what LLaMA has
    for key in (
        "model.attn_config.clip_qkv", "train_loader.dataset.eos_token_id", "callbacks.scheduled_gc", "icl_tasks",
        "save_filename", "num_canonical_nodes",
    ):  # fmt: skip
        assert t.unmapped[key], key
    assert "data_local" in t.inlined and "eos_token_id" in t.inlined
    assert "num_canonical_nodes" not in t.inlined  # nothing uses it: unmapped, not inlined
    written = out.read_text()
    assert "# Not translated" in written and "icl_tasks: in-context-learning" in written


def test_hf_llama_yaml_reads_the_shape_from_a_local_config(tmp_path, causal_mds_dir, llama_tokenizer_dir):
    from llmfoundry_lite.recipe import load_recipe

    folder = _hf_llama_folder(tmp_path)
    src = _write(
        tmp_path, "hf-llama.yaml", HF_LLAMA, data=causal_mds_dir, model=folder, tokenizer=llama_tokenizer_dir
    )
    out = tmp_path / "llama.yaml"
    t = import_recipe(src, out, check_resources=True)
    cfg = load_recipe(out)
    assert cfg.model.name == "llama" and "init_from_hf" not in cfg.model  # pretrained: false
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.n_kv_heads) == (64, 2, 4, 2)
    assert cfg.model.ffn_hidden_size == 160 and cfg.model.rope_theta == 500000.0
    assert cfg.run_name == "hf-llama-import" and cfg.max_seq_len == 128
    assert cfg.train_loader.pin_memory is True and cfg.train_loader.prefetch_factor == 2
    assert (
        cfg.eval_interval == "1ep" and "epochs" in t.notes["eval_interval"]
    )  # a bare 1 is 1 epoch to Composer
    assert cfg.fsdp.state_dict_type == "sharded" and cfg.dist_timeout == 6000
    for key in ("model.use_auth_token", "expandable_segments"):
        assert t.unmapped[key], key
    assert "variables.model_name" in t.inlined

    # pretrained: true starts from the checkpoint (shape and weights), as from_pretrained does.
    src2 = tmp_path / "hf-llama-pretrained.yaml"
    src2.write_text(src.read_text().replace("pretrained: false", "pretrained: true"))
    import_recipe(src2, tmp_path / "llama2.yaml")
    assert load_recipe(tmp_path / "llama2.yaml").model.init_from_hf == str(folder)


def test_mosaic_bert_yaml_becomes_a_mosaic_bert_recipe(tmp_path, mlm_mds_dir, bert_tokenizer_dir):
    from llmfoundry_lite.recipe import load_recipe

    # The published batches (4096 to train, 128 to evaluate) are more than the small test splits hold, which
    # validate (run by check_resources) refuses; the translation is the same at any batch size.
    small = MOSAIC_BERT.replace("global_train_batch_size: 4096", "global_train_batch_size: 64")
    small = small.replace("device_eval_batch_size: 128", "device_eval_batch_size: 8")
    src = _write(tmp_path, "mosaic-bert.yaml", small, data=mlm_mds_dir, tokenizer=bert_tokenizer_dir)
    out = tmp_path / "bert.yaml"
    t = import_recipe(src, out, check_resources=True)
    cfg = load_recipe(out)
    assert cfg.model.name == "mosaic_bert"
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.intermediate_size) == (
        64,
        2,
        2,
        128,
    )
    assert cfg.model.attention_dropout == 0.0 and cfg.model.norm == "low_precision_layernorm"
    assert cfg.tokenizer == {"name": "hf", "path": bert_tokenizer_dir}
    assert cfg.train_loader.collator == {"name": "mlm", "mlm_probability": 0.3}
    assert cfg.eval_loader.collator == {"name": "mlm", "mlm_probability": 0.15}
    assert "algorithms" not in cfg or not cfg.algorithms  # fused_layernorm is the model's norm here
    assert "low_precision_layernorm" in t.notes["algorithms.fused_layernorm"]
    assert t.unmapped["model.model_config.alibi_starting_size"]
    assert {"mlm_probability", "tokenizer_name", "data_local"} <= set(t.inlined)


def test_translate_never_drops_a_key_silently():
    data = yaml.safe_load(MPT_125M.format(data="/data", tokenizer="tok"))
    data["my_own_setting"] = 3
    data["model"]["logit_scale"] = "inv_sqrt_d_model"
    data["train_loader"]["dataset"]["sampling_method"] = "balanced"
    data["eval_loader"] = [{"label": "c4", **data["eval_loader"]}, {"label": "code", **data["eval_loader"]}]
    t = translate(data)
    assert t.recipe["eval_loader"]["split"] == "val" and "'code'" in t.unmapped["eval_loader[1]"]
    assert t.notes["eval_loader[0].label"]
    assert "no ${...} uses it" in t.unmapped["my_own_setting"]
    assert t.unmapped["model.logit_scale"] and t.unmapped["train_loader.dataset.sampling_method"]
    # Every top-level key is accounted for: in the recipe (possibly renamed), inlined, noted or unmapped.
    renamed = {"fsdp_config": "fsdp", "global_seed": "seed"}
    for key in data:
        top = key.split(".")[0]
        assert (
            renamed.get(top, top) in t.recipe or top in t.inlined or top in t.unmapped or data[top] is None
        ), key


def test_import_recipe_errors_are_one_line(tmp_path):
    bad = tmp_path / "finetune.yaml"
    bad.write_text(
        textwrap.dedent("""\
        model: {name: hf_t5, pretrained_model_name_or_path: t5-small}
        optimizer: {name: decoupled_adamw, lr: 1.0e-4}
    """)
    )
    with pytest.raises(RecipeError, match="hf_t5") as e:
        import_recipe(bad, tmp_path / "x.yaml")
    assert e.value.key == "model.name" and e.value.file == str(bad)
    with pytest.raises(RecipeError, match="no such file"):
        import_recipe(tmp_path / "missing.yaml")


def test_cli_writes_validates_and_lists_unmapped_keys(tmp_path, causal_mds_dir, llama_tokenizer_dir):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    register_cli(app)
    src = _write(tmp_path, "mpt-125m.yaml", MPT_125M, data=causal_mds_dir, tokenizer=llama_tokenizer_dir)
    out = tmp_path / "out" / "mpt.yaml"
    result = CliRunner().invoke(app, ["import-recipe", str(src), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    assert "no equivalent, not in the recipe" in result.output
    assert "  icl_tasks: in-context-learning" in result.output
    assert "  callbacks.scheduled_gc: " in result.output
    assert f"valid: llmfoundry-lite train {out}" in result.output
    # Default destination: next to the source.
    result = CliRunner().invoke(app, ["import-recipe", str(src)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mpt-125m.lite.yaml").is_file()


def test_the_verb_through_the_real_cli(tmp_path, monkeypatch, capsys, causal_mds_dir, llama_tokenizer_dir):
    """With the verb in cli.py's table (the line this module asks for), errors are one line and exit 2."""
    from llmfoundry_lite import cli

    verbs = {**cli.PLUGIN_VERBS, "import-recipe": ("llmfoundry_lite.apps.import_recipe", "Translate a YAML.")}
    monkeypatch.setattr(cli, "PLUGIN_VERBS", verbs)
    monkeypatch.setattr(cli, "CLI_MODULES", {v: m for v, (m, _) in verbs.items()})
    src = _write(tmp_path, "mpt-125m.yaml", MPT_125M, data=causal_mds_dir, tokenizer=llama_tokenizer_dir)
    assert cli.main(["import-recipe", str(src), "-o", str(tmp_path / "ok.yaml"), "--check"]) == 0
    assert "callbacks.scheduled_gc" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    bad.write_text(src.read_text().replace("name: mpt_causal_lm", "name: mpt_causal_lmm"))
    assert cli.main(["import-recipe", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.name" in err and str(bad) in err and "Traceback" not in err


def test_streams_become_a_mixture(tmp_path, causal_mds_dir, llama_tokenizer_dir):
    """llm-foundry's `dataset.streams` are streaming Streams, as ours are: kept key for key, the rest listed."""
    from llmfoundry_lite.recipe import load_recipe

    data = yaml.safe_load(MPT_125M.format(data=causal_mds_dir, tokenizer=llama_tokenizer_dir))
    for section, split in (("train_loader", "train"), ("eval_loader", "val")):
        ds = data[section]["dataset"]
        del ds["local"], ds["remote"], ds["split"]
        ds["streams"] = {
            "web": {"local": causal_mds_dir, "split": split, "proportion": 0.75, "download_retry": 3},
            "books": {"local": causal_mds_dir, "split": split, "proportion": 0.25},
        }
    t = translate(data)
    assert t.recipe["train_loader"]["streams"] == {
        "web": {"local": causal_mds_dir, "split": "train", "proportion": 0.75},
        "books": {"local": causal_mds_dir, "split": "train", "proportion": 0.25},
    }
    assert t.recipe["eval_loader"]["streams"]["web"] == {"local": causal_mds_dir, "split": "val"}
    assert t.unmapped["train_loader.dataset.streams.web.download_retry"]
    assert "evaluator" in t.unmapped["eval_loader.dataset.streams.books.proportion"]
    out = tmp_path / "ours.yaml"
    out.write_text(yaml.safe_dump(t.recipe))
    cfg = load_recipe(out, check_resources=True)  # the stream folders and the tokenizer are real here
    assert set(cfg.train_loader.streams) == {"web", "books"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``llmfoundry-lite ARGS`` in a fresh process, the hub offline (nothing may download)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "llmfoundry_lite.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_says_what_it_checked_instead_of_valid(tmp_path, llama_tokenizer_dir):
    """A hub tokenizer and data that is not here: the structure validates, `validate` would not; it says so."""
    src = _write(
        tmp_path, "mpt-125m.yaml", MPT_125M, data=tmp_path / "no-data", tokenizer="EleutherAI/gpt-neox-20b"
    )
    out = tmp_path / "ours.yaml"
    run = _cli("import-recipe", str(src), "-o", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "valid: llmfoundry-lite train" not in run.stdout
    assert "structure valid; not ready to train: " in run.stdout
    assert "not checked here (fetched at run time): hub tokenizer 'EleutherAI/gpt-neox-20b'" in run.stdout
    assert f"when they are in place: llmfoundry-lite validate {out}" in run.stdout
    check = _cli("validate", str(out))  # what the report promised: validate fails on it too
    assert check.returncode == 2

    strict = _cli("import-recipe", str(src), "-o", str(out), "--check")
    assert strict.returncode == 2 and len(strict.stderr.strip().splitlines()) == 1, strict.stderr
    assert "Traceback" not in strict.stderr


def test_cli_says_valid_only_when_validate_passes(tmp_path, causal_mds_dir, llama_tokenizer_dir):
    src = _write(tmp_path, "mpt-125m.yaml", MPT_125M, data=causal_mds_dir, tokenizer=llama_tokenizer_dir)
    out = tmp_path / "ours.yaml"
    run = _cli("import-recipe", str(src), "-o", str(out))
    assert run.returncode == 0 and f"valid: llmfoundry-lite train {out}" in run.stdout, (
        run.stdout + run.stderr
    )
    assert _cli("validate", str(out)).returncode == 0


def test_hub_hf_causal_lm_starts_from_the_checkpoint_not_the_default_shape(tmp_path, llama_tokenizer_dir):
    """`pretrained: false` with a hub name and no local config.json: init_from_hf, never LLaMA's default shape."""
    src = _write(
        tmp_path,
        "hf-llama.yaml",
        HF_LLAMA,
        data=tmp_path / "no-data",
        model="meta-llama/Llama-3.1-8B",
        tokenizer=llama_tokenizer_dir,
    )
    out = tmp_path / "llama.yaml"
    run = _cli("import-recipe", str(src), "-o", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    model = yaml.safe_load(out.read_text())["model"]
    assert model["name"] == "llama" and model["init_from_hf"] == "meta-llama/Llama-3.1-8B"
    assert not {"d_model", "n_layers", "n_heads"} & set(model)  # the shape comes from the checkpoint
    assert "model.pretrained: false (that architecture, fresh weights)" in run.stdout
    assert "hub checkpoint 'meta-llama/Llama-3.1-8B'" in run.stdout


def test_one_of_our_recipes_is_refused_in_one_line(tmp_path):
    ours = ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml"
    out = tmp_path / "x.yaml"
    run = _cli("import-recipe", str(ours), "-o", str(out))
    assert run.returncode == 2 and not out.exists()
    err = run.stderr.strip()
    assert err.count("\n") == 0 and "already a llmfoundry-lite recipe" in err and str(ours) in err, err
