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


def test_locked_folder_under_nproc_is_one_line_from_the_launched_job(tiny_bert, tmp_path):
    """`train --nproc 2` into a held run folder: rank 0's one line, exit 2, none of the launcher's "crash" lines."""
    from llmfoundry_lite.train.runlock import RunLock

    overrides = tiny_bert(run_name="held", max_duration="2ba")
    holder = RunLock(tmp_path / "runs" / "held").acquire()  # another open file conflicts even in this process
    try:
        cmd = [sys.executable, "-m", "llmfoundry_lite.cli", "train", QUICKSTART, "--nproc", "2", *overrides]
        r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    finally:
        holder.release()
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stdout + r.stderr
    assert lines[0].startswith("error: ") and "in use by another run" in lines[0]


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


# The hub unreachable, as on a machine without network: nothing listens on port 9 of this machine.
UNREACHABLE = {
    **{
        k: v
        for k, v in ENV.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    },
    "HF_ENDPOINT": "http://127.0.0.1:9",
}


@pytest.mark.parametrize(
    "argv, expect",
    [
        (
            ["data", "convert", "--source", "hf:someorg/no-such-dataset", "--out", "out"],
            "hf:someorg/no-such-dataset",
        ),
        (
            [
                "glue",
                str(ROOT / "recipes" / "glue" / "tiny.yaml"),
                "glue.data_dir=null",
                "glue.make_toy_data=false",
                "--tasks",
                "rte",
            ],
            "cannot load GLUE task 'rte'",
        ),
    ],
    ids=["hf-source", "glue-datasets"],
)
def test_hub_unreachable_fails_at_once_with_one_line(argv, expect, bert_tokenizer_dir, tmp_path):
    """Without network (and HF_HUB_OFFLINE unset) hub datasets fail with one line, without the hub libraries'
    retries (five, seconds apart) and their multi-line warnings."""
    cmd = [
        sys.executable,
        "-m",
        "llmfoundry_lite.cli",
        *argv,
        f"variables.tokenizer_path={bert_tokenizer_dir}",
    ]
    if argv[0] == "data":
        cmd = cmd[:-1]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=UNREACHABLE, cwd=tmp_path)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert expect in lines[0] and "Retry" not in out.stderr + out.stdout


def test_doctor_grades_findings_a_cuda_build_without_gpu_is_a_note(monkeypatch):
    import torch

    from llmfoundry_lite.apps.doctor import diagnose, format_report

    monkeypatch.setattr(torch.version, "cuda", "12.6")  # what `pip install torch` gives on Linux
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report = diagnose()
    text = format_report(report)
    assert not any("CUDA build" in msg for _, msg in report.problems), text
    assert any("CUDA build and no GPU is visible" in n for n in report.notes)
    assert "notes:\n  - torch is a CUDA build" in text


def test_microbatch_of_a_recipe_fits_any_process_count(tiny_bert):
    """The quickstart's microbatch (32 = its whole batch) with --nproc 2 (16 per process): valid, capped at 16."""
    from llmfoundry_lite.recipe import load_recipe
    from llmfoundry_lite.train.run import _microbatch

    cfg = load_recipe(
        QUICKSTART, tiny_bert(global_train_batch_size=32, device_train_microbatch_size=32), nproc=2
    )
    assert _microbatch(cfg.device_train_microbatch_size, cfg.global_train_batch_size // 2) == 16
    assert _microbatch(8, 16) == 8 and _microbatch("auto", 16) == "auto" and _microbatch(None, 16) is None


def test_docs_faults_commands_are_valid(capsys):
    """Every command in docs/faults.md names a real recipe and valid overrides (`show` resolves it)."""
    import re
    import shlex

    doc = (ROOT / "docs" / "faults.md").read_text()
    commands = [
        ln.strip()
        for block in re.findall(r"```bash\n(.*?)```", doc, re.S)
        for ln in block.splitlines()
        if ln.strip()
    ]
    assert len(commands) >= 3
    for cmd in commands:
        argv = shlex.split(cmd)
        assert argv[:2] == ["llmfoundry-lite", "train"], cmd
        args = [a for a in argv[2:] if a not in ("--nproc", "2")]
        assert main(["show", str(ROOT / args[0]), *args[1:]]) == 0, capsys.readouterr().err


def test_load_path_of_another_model_is_one_line_before_any_folder(
    llama_tokenizer_dir, causal_mds_dir, tiny_bert, tmp_path, capsys
):
    """A real checkpoint of another shape (or family) given as load_path: one line naming the first mismatching
    tensor and both shapes, exit 2, and no run folder made; the advice (load_strict_model_weights=false) works."""

    def llama(run_name: str, *extra: str) -> list[str]:
        return [
            "train",
            LLAMA,
            f"variables.tokenizer_path={llama_tokenizer_dir}",
            f"variables.data_local={causal_mds_dir}",
            f"save_folder={tmp_path}/runs/{{run_name}}",
            f"run_name={run_name}",
            "model.n_layers=1",
            "max_duration=1ba",
            "global_train_batch_size=2",
            "device_train_microbatch_size=2",
            "eval_loader=null",
            "callbacks=null",
            *extra,
        ]

    assert main(llama("small", "model.d_model=64")) == 0
    assert main(["train", QUICKSTART, *tiny_bert(run_name="bert", max_duration="1ba")]) == 0
    small = tmp_path / "runs" / "small" / "latest-rank0.pt"
    bert = tmp_path / "runs" / "bert" / "latest-rank0.pt"
    capsys.readouterr()
    for extra in ([], ["load_weights_only=true"], ["load_strict_model_weights=false"]):
        assert main(llama("wide", f"load_path={small}", *extra)) == 2
        line = one_error_line(capsys)
        assert f"load_path: {str(small)!r} holds a model of another shape" in line
        assert "(model.embed.weight: [2000, 64] in the checkpoint, [2000, 128] in this recipe)" in line
        assert "change the model block to match it" in line
    assert main(llama("fromsbert", f"load_path={bert}", "load_weights_only=true")) == 2
    assert "holds another model: no weight in common" in one_error_line(capsys)
    deeper = ["model.d_model=64", "model.n_layers=2", f"load_path={small}", "load_weights_only=true"]
    assert main(llama("deeper", *deeper)) == 2
    line = one_error_line(capsys)
    assert "lacks 6 of this recipe's model weights (e.g. 'model.blocks.1." in line
    assert "load_strict_model_weights=false" in line
    assert not any((tmp_path / "runs" / name).exists() for name in ("wide", "fromsbert", "deeper"))
    # With an algorithm that replaces modules inside the Trainer, the model is checked as the algorithm left it.
    assert main(llama("alibi", f"load_path={small}", "algorithms.alibi.max_sequence_length=128")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "holds a model of another shape" in err.strip().splitlines()[-1], err
    # The advice works, and a run's save folder is a load_path (its latest checkpoint).
    assert main(llama("deeper", *deeper, "load_strict_model_weights=false")) == 0
    assert main(llama("same", "model.d_model=64", f"load_path={small.parent}", "load_weights_only=true")) == 0
    assert f"from the weights of {small.parent}" in capsys.readouterr().out


def test_hub_name_as_init_from_hf_validates_offline(llama_tokenizer_dir, causal_mds_dir, network_attempts):
    """A hub name (not on disk) passes validate: only local folders are checked, without the network."""
    argv = [
        "validate",
        LLAMA,
        f"variables.tokenizer_path={llama_tokenizer_dir}",
        f"variables.data_local={causal_mds_dir}",
        "model.init_from_hf=someorg/some-llama",
    ]
    assert main(argv) == 0
    assert not network_attempts
