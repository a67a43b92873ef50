"""Silent wrong runs made loud, through the command line: one writer per run folder (two real processes), a folder of
unreadable checkpoints, token rows from another tokenizer, `validate` refusing what `train` refuses (same code)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llmfoundry_lite.cli import main
from llmfoundry_lite.data.provenance import PROVENANCE_FILENAME, tokenizer_record

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")
LLAMA = str(ROOT / "recipes" / "quickstart" / "llama-tiny.yaml")
ENV = {**os.environ, "WANDB_MODE": "offline"}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_second_run_in_the_same_folder_is_refused_and_a_killed_run_leaves_no_lock(
    tiny_bert, tmp_path, capsys
):
    overrides = tiny_bert(
        run_name="lock", max_duration="1000ba", save_interval="1000ba", eval_interval="1000ba"
    )
    cmd = [sys.executable, "-m", "llmfoundry_lite.cli", "train", QUICKSTART, *overrides]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
    try:
        for line in first.stdout:
            if line.startswith("[batch 1/"):
                break
        assert first.poll() is None
        # The same command in a second process (this one): refused before it touches the folder.
        assert main(["train", QUICKSTART, *overrides]) == 2
        line = one_error_line(capsys)
        assert "in use by another run" in line and f"pid {first.pid} on host {socket.gethostname()}" in line
        assert "another run_name" in line
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: nothing removes the lock file
        first.wait()
    assert (tmp_path / "runs" / "lock" / "run.lock").exists()
    # The kernel released the lock with the process: the same folder trains again.
    assert main(["train", QUICKSTART, *tiny_bert(run_name="lock", max_duration="2ba")]) == 0


def test_folder_of_unreadable_checkpoints_says_how_to_start_over(tiny_bert, tmp_path, capsys):
    assert main(["train", QUICKSTART, *tiny_bert(run_name="cut", max_duration="2ba")]) == 0
    ckpt = tmp_path / "runs" / "cut" / "ep0-ba2-rank0.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a kill mid-write
    capsys.readouterr()
    assert main(["train", QUICKSTART, *tiny_bert(run_name="cut", max_duration="4ba")]) == 2
    line = one_error_line(capsys)
    assert "every checkpoint in" in line and "ep0-ba2-rank0.pt" in line and "to start over" in line
    # The advice works.
    again = tiny_bert(run_name="cut", max_duration="2ba", autoresume="false", save_overwrite="true")
    assert main(["train", QUICKSTART, *again]) == 0


def test_convert_records_the_tokenizer_and_a_run_with_another_refuses(
    llama_tokenizer_dir, bert_tokenizer_dir, tmp_path, capsys
):
    out = tmp_path / "rows"
    argv = ["data", "convert", "--source", "embedded", "--out", str(out), "--splits", "train,val"]
    assert (
        main([*argv, "--tokenizer", llama_tokenizer_dir, "--concat-tokens", "64", "--num-workers", "0"]) == 0
    )
    record = json.loads((out / "train" / PROVENANCE_FILENAME).read_text())["tokenizer"]
    assert record == tokenizer_record(llama_tokenizer_dir, folder=llama_tokenizer_dir)
    assert (
        record["name"] == llama_tokenizer_dir
        and record["vocab_size"] >= 1000
        and len(record["vocab_sha256"]) == 64
    )

    recipe = [LLAMA, f"variables.data_local={out}", "max_seq_len=64", "model.max_seq_len=64"]
    assert main(["validate", *recipe, f"variables.tokenizer_path={llama_tokenizer_dir}"]) == 0
    capsys.readouterr()
    for verb in ("validate", "train"):  # train refuses before its first batch, with the same line
        assert main([verb, *recipe, f"variables.tokenizer_path={bert_tokenizer_dir}"]) == 2
        line = one_error_line(capsys)
        assert f"made with tokenizer {llama_tokenizer_dir!r}" in line and repr(bert_tokenizer_dir) in line
    # Data converted before the record existed is not checked.
    for split in ("train", "val"):
        (out / split / PROVENANCE_FILENAME).unlink()
    assert main(["validate", *recipe, f"variables.tokenizer_path={bert_tokenizer_dir}"]) == 0


@pytest.mark.parametrize(
    "overrides",
    [
        ["global_train_batch_size=1024"],  # the split holds fewer samples than one batch
        ["global_train_batch_size=4", "device_eval_batch_size=4096"],  # the eval split, likewise
    ],
)
def test_validate_refuses_what_train_refuses_with_the_same_line(tiny_bert, overrides, capsys):
    args = [QUICKSTART, *tiny_bert(run_name="small"), *overrides, "eval_loader.drop_last=true"]
    assert main(["validate", *args]) == 2
    validated = one_error_line(capsys)
    assert main(["train", *args]) == 2
    assert one_error_line(capsys) == validated
    assert "fewer than one batch" in validated


@pytest.mark.parametrize("debug", ["", "1"])
def test_third_party_warnings_hidden_unless_debug(monkeypatch, debug):
    """torch's 'more workers than CPUs' and lm-eval's divide-by-zero (pooled stderr of one sample) are hidden where
    those packages warn; the same words from anyone else's code still show, and --debug shows everything."""
    import warnings

    from llmfoundry_lite.quiet import DEBUG_ENV, quiet_dependency_warnings

    monkeypatch.setenv(DEBUG_ENV, debug)
    torch_msg = (
        "This DataLoader will create 8 worker processes in total. Our suggested max number of worker is 2"
    )
    cases = [
        (torch_msg, UserWarning, "torch.utils.data.dataloader"),
        ("divide by zero encountered in scalar divide", RuntimeWarning, "lm_eval.api.metrics"),
        ("invalid value encountered in scalar divide", RuntimeWarning, "lm_eval.api.metrics"),
        ("divide by zero encountered in scalar divide", RuntimeWarning, "my_plugin"),
    ]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_dependency_warnings()
        for i, (msg, cat, module) in enumerate(cases):
            warnings.warn_explicit(msg, cat, f"{module.replace('.', '/')}.py", i + 1, module=module)
    shown = [(str(w.message), w.filename) for w in seen]
    assert shown == (
        [(m, f"{mod.replace('.', '/')}.py") for m, _, mod in cases]
        if debug
        else [(cases[3][0], "my_plugin.py")]
    )
