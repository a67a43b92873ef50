"""A new user's first hour: a table of mistakes, each answered with one line naming the key or flag, exit code 2.

Every row runs the real command line (``llmfoundry_lite.cli.main``) on the quickstart recipes with real data and
tokenizers built by the session fixtures. For each: exit code 2, exactly one line on stderr, no traceback, the key
or flag (and, where it matters, the fix) named, and no network wait (each row answers in seconds).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmfoundry_lite.cli import main
from llmfoundry_lite.train.runlock import RunLock

ROOT = Path(__file__).resolve().parents[1]
BERT = str(ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")
LLAMA = str(ROOT / "recipes" / "quickstart" / "llama-tiny.yaml")


@pytest.fixture
def env(bert_tokenizer_dir, llama_tokenizer_dir, mlm_mds_dir, causal_mds_dir, tmp_path):
    """Paths the rows refer to: real data and tokenizers, a few broken recipe files, a run folder held by another
    run and one whose only checkpoint is cut short."""
    (tmp_path / "bad.yaml").write_text("model: {name: mosaic_bert\n  d_model: [\n")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    (tmp_path / "nomodel.yaml").write_text(
        Path(BERT).read_text().replace("model:\n  name: mosaic_bert", "modle:\n  name: mosaic_bert")
    )
    broken = tmp_path / "runs" / "broken"
    broken.mkdir(parents=True)
    (broken / "ep0-ba2-rank0.pt").write_bytes(b"PK\x03\x04 cut short")
    (broken / "latest-rank0.pt").symlink_to("ep0-ba2-rank0.pt")
    (tmp_path / "hf-short").mkdir()  # a Hugging Face Llama folder's config: 16 positions
    (tmp_path / "hf-short" / "config.json").write_text(
        '{"model_type": "llama", "max_position_embeddings": 16}'
    )
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    (tmp_path / "empty").mkdir()
    (tmp_path / "hf-no-weights").mkdir()  # a Hugging Face folder's config.json, its weights not copied
    (tmp_path / "hf-no-weights" / "config.json").write_text('{"model_type": "llama"}')
    # The run folder's lock held as a running `train` holds it (flock: another open file conflicts even here;
    # tests/test_run_safety.py uses two processes).
    holder = RunLock(tmp_path / "runs" / "locked").acquire()
    yield {
        "bert_tok": bert_tokenizer_dir,
        "llama_tok": llama_tokenizer_dir,
        "mlm": mlm_mds_dir,
        "causal": causal_mds_dir,
        "tmp": str(tmp_path),
    }
    holder.release()


def bert(env, *extra: str) -> list[str]:
    """The MosaicBERT quickstart recipe pointed at the test data, plus ``extra`` overrides."""
    return [
        BERT,
        f"variables.tokenizer_path={env['bert_tok']}",
        f"variables.data_local={env['mlm']}",
        f"save_folder={env['tmp']}/runs/{{run_name}}",
        *extra,
    ]


def llama(env, *extra: str) -> list[str]:
    """The LLaMA quickstart recipe pointed at the test data, plus ``extra`` overrides."""
    return [
        LLAMA,
        f"variables.tokenizer_path={env['llama_tok']}",
        f"variables.data_local={env['causal']}",
        f"save_folder={env['tmp']}/runs/{{run_name}}",
        *extra,
    ]


# (id, argv builder, extra environment, substrings the one line must contain)
ROWS = [
    # -- the command line itself
    ("typo-verb", lambda e: ["trian", BERT], {}, ["trian", "train"]),
    ("verb-without-recipe", lambda e: ["train"], {}, ["RECIPE"]),
    ("nproc-not-int", lambda e: ["train", BERT, "--nproc", "abc"], {}, ["--nproc", "abc"]),
    ("override-as-flag", lambda e: ["train", BERT, "--optimizer.lr=3e-4"], {}, ["optimizer.lr=3e-4"]),
    ("override-as-option", lambda e: ["validate", BERT, "--lr", "3e-4"], {}, ["--lr"]),
    ("list-extra-args", lambda e: ["list", "optimizers", "decoupled_adamw", "extra"], {}, ["extra"]),
    ("list-unknown-registry", lambda e: ["list", "optimisers"], {}, ["optimisers", "optimizers"]),
    ("list-unknown-entry", lambda e: ["list", "optimizers", "adamw_decoupled"], {}, ["adamw_decoupled"]),
    ("unknown-option", lambda e: ["validate", BERT, "--frobnicate"], {}, ["--frobnicate"]),
    ("unknown-data-subverb", lambda e: ["data", "convrt"], {}, ["convrt"]),
    ("nnodes-negative", lambda e: ["train", BERT, "--nnodes", "x"], {}, ["--nnodes"]),
    # -- the recipe file
    ("missing-recipe", lambda e: ["validate", f"{e['tmp']}/nope.yaml"], {}, ["nope.yaml"]),
    ("invalid-yaml", lambda e: ["validate", f"{e['tmp']}/bad.yaml"], {}, ["bad.yaml"]),
    ("base-cycle", lambda e: ["validate", f"{e['tmp']}/a.yaml"], {}, ["a.yaml", "cycle"]),
    ("unknown-top-key", lambda e: ["validate", f"{e['tmp']}/nomodel.yaml"], {}, ["modle", "model"]),
    (
        "unknown-nested-key",
        lambda e: ["validate", *bert(e, "optimizer.lrr=0.1")],
        {},
        ["optimizer.lrr", "lr"],
    ),
    (
        "unknown-model",
        lambda e: ["validate", *bert(e, "model.name=mosiac_bert")],
        {},
        ["model.name", "mosaic_bert"],
    ),
    (
        "wrong-type",
        lambda e: ["validate", *bert(e, "global_train_batch_size=abc")],
        {},
        ["global_train_batch_size"],
    ),
    ("seed-not-int", lambda e: ["validate", *bert(e, "seed=abc")], {}, ["seed"]),
    ("seed-negative", lambda e: ["train", *llama(e, "seed=-5")], {}, ["seed", "2^32 - 1", "-5"]),
    (
        "warmup-malformed",
        lambda e: ["validate", *llama(e, "scheduler.t_warmup=5x")],
        {},
        ["scheduler.t_warmup", "'5x'"],
    ),
    (
        "warmup-bare-number",
        lambda e: ["validate", *llama(e, "scheduler.t_warmup=100")],
        {},
        ["scheduler.t_warmup", "'100ba'"],
    ),
    (
        "warmup-outlasts-the-run",
        lambda e: ["train", *llama(e, "scheduler.t_warmup=500ba")],
        {},
        ["scheduler.t_warmup", "'500ba'", "max_duration '200ba'", "never reaches"],
    ),
    (
        "eval-subset-zero",  # Composer evaluates no batch and logs NaN metrics
        lambda e: ["validate", *llama(e, "eval_subset_num_batches=0")],
        {},
        ["eval_subset_num_batches", "-1"],
    ),
    (
        "loader-workers-negative",
        lambda e: ["train", *llama(e, "train_loader.num_workers=-1")],
        {},
        ["train_loader.num_workers", ">= 0"],
    ),
    (
        "clipping-negative",  # torch would scale every gradient by a negative factor
        lambda e: ["validate", *llama(e, "algorithms.gradient_clipping.clipping_threshold=-1")],
        {},
        ["algorithms.gradient_clipping.clipping_threshold", "> 0"],
    ),
    (
        "speed-window-zero",
        lambda e: ["validate", *llama(e, "callbacks.speed_monitor.window_size=0")],
        {},
        ["callbacks.speed_monitor.window_size"],
    ),
    (
        "generate-negative-temperature",
        lambda e: ["generate", f"{e['tmp']}/runs/x", "--prompt", "Hi", "--temperature", "-1"],
        {},
        ["--temperature", "greedy"],
    ),
    (
        "generate-negative-top-k",
        lambda e: ["generate", f"{e['tmp']}/runs/x", "--prompt", "Hi", "--top-k", "-2"],
        {},
        ["--top-k"],
    ),
    (
        "alpha-f-negative",
        lambda e: ["validate", *llama(e, "scheduler.alpha_f=-0.1")],
        {},
        ["scheduler.alpha_f", ">= 0"],
    ),
    ("bad-duration-unit", lambda e: ["validate", *bert(e, "max_duration=10xx")], {}, ["max_duration"]),
    (
        "bare-number-duration",
        lambda e: ["validate", *bert(e, "max_duration=100")],
        {},
        ["max_duration", "100ba"],
    ),
    ("bad-precision", lambda e: ["validate", *bert(e, "precision=fp64")], {}, ["precision", "fp64"]),
    (
        "init-from-hf-shorter-than-the-data",
        lambda e: ["validate", *llama(e, f"model.init_from_hf={e['tmp']}/hf-short")],
        {},
        ["train_loader.max_seq_len", "max_position_embeddings 16", "max_seq_len to 16"],
    ),
    ("unknown-callback", lambda e: ["validate", *bert(e, "callbacks.speed_monitr={}")], {}, ["speed_monitr"]),
    (
        "fsdp-typo",
        lambda e: ["validate", *bert(e, "fsdp.sharding_stratgy=FULL_SHARD")],
        {},
        ["fsdp.sharding_stratgy"],
    ),
    (
        "microbatch-zero",
        lambda e: ["validate", *bert(e, "device_train_microbatch_size=0")],
        {},
        ["device_train_microbatch_size"],
    ),
    ("heads-not-dividing", lambda e: ["validate", *bert(e, "model.n_heads=3")], {}, ["n_heads=3"]),
    ("negative-lr", lambda e: ["validate", *bert(e, "optimizer.lr=-1e-3")], {}, ["optimizer.lr"]),
    (
        "beta-above-one",
        lambda e: ["validate", *bert(e, "optimizer.betas=[0.9,1.5]")],
        {},
        ["optimizer.betas"],
    ),
    ("zero-eps", lambda e: ["validate", *bert(e, "optimizer.eps=0")], {}, ["optimizer.eps"]),
    (
        "negative-wd",
        lambda e: ["validate", *bert(e, "optimizer.weight_decay=-1")],
        {},
        ["optimizer.weight_decay"],
    ),
    (
        "batch-not-divisible",
        lambda e: ["train", *bert(e, "global_train_batch_size=32"), "--nproc", "3"],
        {},
        ["global_train_batch_size"],
    ),
    # -- data and tokenizer
    (
        "data-folder-missing",
        lambda e: ["validate", *bert(e, f"variables.data_local={e['tmp']}/nodata")],
        {},
        ["train_loader", "nodata"],
    ),
    (
        "split-missing",
        lambda e: ["validate", *bert(e, "train_loader.split=trian")],
        {},
        ["train_loader", "trian"],
    ),
    (
        "tokenizer-relative-missing",
        lambda e: ["validate", *bert(e, "variables.tokenizer_path=data/nope")],
        {},
        ["tokenizer", "data/nope"],
    ),
    (
        "tokenizer-dot-missing",
        lambda e: ["validate", *bert(e, "variables.tokenizer_path=./tok")],
        {},
        ["tokenizer", "tok"],
    ),
    (
        "tokenizer-is-mds",
        lambda e: ["validate", *bert(e, f"variables.tokenizer_path={e['mlm']}/train")],
        {},
        ["tokenizer", "MDS"],
    ),
    (
        "hub-tokenizer-offline",
        lambda e: ["validate", *bert(e, "variables.tokenizer_path=someorg/no-such-model")],
        {"HF_HUB_OFFLINE": "1"},
        ["tokenizer", "someorg/no-such-model"],
    ),
    (
        "mlm-on-token-rows",
        lambda e: ["validate", *bert(e, f"variables.data_local={e['causal']}")],
        {},
        ["train_loader"],
    ),
    (
        "vocab-smaller-than-tokenizer",
        lambda e: ["validate", *llama(e, "model.vocab_size=100")],
        {},
        ["model.vocab_size"],
    ),
    (
        "wandb-without-login",
        lambda e: ["validate", *bert(e, "loggers.wandb.project=p")],
        {"WANDB_MODE": "", "WANDB_API_KEY": "", "NETRC": "/nonexistent"},
        ["wandb", "WANDB_MODE"],
    ),
    # -- at the start of a run
    ("fp16-on-cpu", lambda e: ["train", *bert(e, "precision=amp_fp16")], {}, ["precision"]),
    ("gpu-on-cpu", lambda e: ["train", *bert(e, "device=gpu")], {}, ["device"]),
    (
        "flash-on-cpu",
        lambda e: ["train", *llama(e, "model.attn_impl=flash", "max_duration=1ba")],
        {},
        ["attn_impl", "flash"],
    ),
    (
        "zero-batch-run",
        lambda e: ["train", *bert(e, "global_train_batch_size=1024", "max_duration=2ba")],
        {},
        ["train_loader", "1024"],
    ),
    (
        "zero-batch-validate",
        lambda e: ["validate", *bert(e, "global_train_batch_size=1024")],
        {},
        ["train_loader", "1024", "fewer than one batch"],
    ),
    (
        "data-from-another-tokenizer",
        lambda e: ["validate", *llama(e, f"variables.tokenizer_path={e['bert_tok']}")],
        {},
        ["tokenizer.path", "made with tokenizer", "reconvert"],
    ),
    (
        "run-folder-in-use",
        lambda e: ["train", *bert(e, "run_name=locked")],
        {},
        ["in use by another run", "pid"],
    ),
    (
        "checkpoints-all-unreadable",
        lambda e: ["train", *bert(e, "run_name=broken")],
        {},
        ["save_folder", "unreadable", "to start over"],
    ),
    (
        "load-path-missing",
        lambda e: ["train", *llama(e, f"load_path={e['tmp']}/base.pt", "max_duration=1ba")],
        {},
        ["load_path", "base.pt", "does not exist"],
    ),
    (
        "load-path-not-a-checkpoint",
        lambda e: ["validate", *llama(e, f"load_path={e['tmp']}/notes.pt")],
        {},
        ["load_path", "notes.pt", "not a whole Composer checkpoint"],
    ),
    (
        "load-path-cut-short",
        lambda e: [
            "train",
            *llama(e, f"load_path={e['tmp']}/runs/broken/ep0-ba2-rank0.pt", "max_duration=1ba"),
        ],
        {},
        ["load_path", "ep0-ba2-rank0.pt", "not a whole Composer checkpoint"],
    ),
    (
        "load-path-folder-cut-short",
        lambda e: ["validate", *llama(e, f"load_path={e['tmp']}/runs/broken")],
        {},
        ["load_path", "every checkpoint in", "cut short", "ep0-ba2-rank0.pt"],
    ),
    (
        "load-path-empty-folder",
        lambda e: ["validate", *llama(e, f"load_path={e['tmp']}/empty")],
        {},
        ["load_path", "no Composer checkpoint"],
    ),
    (
        "load-path-hf-folder",
        lambda e: ["validate", *llama(e, f"load_path={e['tmp']}/hf-short")],
        {},
        ["load_path", "Hugging Face model folder", "init_from_hf"],
    ),
    (
        "init-from-hf-no-config",
        lambda e: ["validate", *llama(e, f"model.init_from_hf={e['tmp']}/empty")],
        {},
        ["model.init_from_hf", "no config.json"],
    ),
    (
        "init-from-hf-no-weights",
        lambda e: ["validate", *llama(e, f"model.init_from_hf={e['tmp']}/hf-no-weights")],
        {},
        ["model.init_from_hf", "no weights", "copy the weights"],
    ),
    (
        "init-from-hf-missing",
        lambda e: ["validate", *llama(e, f"model.init_from_hf={e['tmp']}/hf-gone")],
        {},
        ["model.init_from_hf", "no such Hugging Face model folder"],
    ),
    (
        "glue-recipe-to-train",
        lambda e: ["train", str(ROOT / "recipes" / "glue" / "tiny.yaml")],
        {},
        ["this is a GLUE recipe: llmfoundry-lite glue"],
    ),
    (
        "pretraining-recipe-to-glue",
        lambda e: ["glue", BERT],
        {},
        ["pretraining recipe: llmfoundry-lite train"],
    ),
    # -- other verbs
    ("export-missing", lambda e: ["export", f"{e['tmp']}/missing.pt", f"{e['tmp']}/out"], {}, ["missing.pt"]),
    ("estimate-unknown-gpu", lambda e: ["estimate", *bert(e), "--gpu", "a100-800gb"], {}, ["a100-800gb"]),
    (
        "convert-missing-source",
        lambda e: ["data", "convert", "--source", f"{e['tmp']}/none.txt", "--out", f"{e['tmp']}/o"],
        {},
        ["none.txt"],
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_user_mistake_is_one_line_and_exit_2(row, env, capsys, monkeypatch, network_attempts):
    _, argv, extra_env, expect = row
    for k, v in extra_env.items():
        monkeypatch.setenv(k, v)
    if extra_env.get("WANDB_MODE") == "":
        monkeypatch.delenv("WANDB_MODE")
    code = main(argv(env))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for part in expect:
        assert part in lines[0], (part, lines[0])
    assert not network_attempts  # no retries against a hub (a hang is the per-test timeout's)


def test_enough_mistakes_are_covered():
    assert len(ROWS) >= 46


def test_debug_shows_the_traceback(env, capsys):
    assert main(["--debug", "validate", *bert(env, "optimizer.lrr=0.1")]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["validate", *bert(env, "optimizer.lrr=0.1"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_zero_batch_run_exits_2_as_a_user_runs_it(env, tmp_path):
    """The console script on a split smaller than one global batch: exit 2, one line, no hang."""
    cmd = [sys.executable, "-m", "llmfoundry_lite.cli", "train", *bert(env, "global_train_batch_size=1024")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # a hang guard
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
