"""Distributed runs on CPU (gloo): 2 processes match 1 process step for step, and checkpoints move between them.

One `llmfoundry-lite train --nproc 2` run covers four behaviours: it starts from a 1-process checkpoint
(elastic 1 -> 2), its per-step loss equals a 1-process run's at the same global batch, SIGTERM sent to it reaches
the ranks through Composer's launcher and they checkpoint and exit 143; a 1-process rerun then continues from
that checkpoint (elastic 2 -> 1).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from composer.core import Callback

from llmfoundry_lite import load_recipe
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.train import build_trainer
from llmfoundry_lite.train.checks import parallelism_config, validate_fsdp

RTOL = 1e-5

# A test-only callback that records the all-reduced loss of every batch at full precision (FileLogger rounds),
# installed in the launched ranks as a plugin (an entry point of a throwaway distribution on PYTHONPATH).
PLUGIN = textwrap.dedent(
    """
    import json
    from composer.core import Callback
    from composer.utils import dist

    class RecordLosses(Callback):
        def __init__(self, path: str):
            self.path = path

        def batch_end(self, state, logger):
            if dist.get_global_rank() == 0:
                with open(self.path, "a") as f:
                    loss = state.total_loss_dict["loss/train/total"]
                    f.write(json.dumps([int(state.timestamp.batch), loss]) + "\\n")
    """
)


def install_plugin(folder: Path) -> str:
    """A PYTHONPATH folder whose distribution registers the ``record_losses`` callback."""
    folder.mkdir()
    (folder / "lfl_test_plugin.py").write_text(PLUGIN)
    info = folder / "lfl_test_plugin-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lfl-test-plugin\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(
        "[llmfoundry_lite_callbacks]\nrecord_losses = lfl_test_plugin:RecordLosses\n"
    )
    return str(folder)


def causal_recipe(tmp_path: Path, tokenizer_dir: str, data_dir: str) -> str:
    """A tiny LLaMA on unshuffled token rows, constant LR (the loss of a step does not depend on max_duration)."""
    text = textwrap.dedent(
        f"""
        seed: 17
        max_seq_len: 32
        device: cpu
        precision: fp32
        tokenizer: {{name: hf, path: {tokenizer_dir}}}
        model: {{name: llama, d_model: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, multiple_of: 16, max_seq_len: 32}}
        train_loader:
          name: text
          local: {data_dir}
          split: train
          max_seq_len: 32
          shuffle: false
          num_canonical_nodes: 1
        optimizer: {{name: decoupled_adamw, lr: 3.0e-3}}
        global_train_batch_size: 4
        max_duration: 2ba
        save_interval: 2ba
        console_log_interval: 1ba
        """
    )
    path = tmp_path / "causal-tiny.yaml"
    path.write_text(text)
    return str(path)


class Losses(Callback):
    """In-process twin of the driver's recorder."""

    def __init__(self):
        self.by_batch: dict[int, float] = {}

    def batch_end(self, state, logger):
        self.by_batch[int(state.timestamp.batch)] = state.total_loss_dict["loss/train/total"]


def fit_in_process(recipe: str, overrides: list[str]) -> dict[int, float]:
    trainer = build_trainer(load_recipe(recipe, overrides), recipe)
    rec = Losses()
    trainer.state.callbacks.append(rec)
    trainer.fit()
    trainer.close()
    return rec.by_batch


# What a stopped multi-process run used to print besides its one line (launcher traceback, our own forwarded
# signal taken as a second one, Composer's clean-up wait, shared memory left by a rank killed mid-close).
NOT_ON_A_CLEAN_STOP = ("Traceback", "SystemExit", "second SIG", "Waiting up to", "leaked", "exited with code")


def assert_clean_stop(text: str) -> None:
    for bad in NOT_ON_A_CLEAN_STOP:
        assert bad not in text, (bad, text[-3000:])


def nproc2_command(recipe: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "llmfoundry_lite.cli", "train", recipe, "--nproc", "2", *overrides]


def plugin_env(plugin_dir: str) -> dict[str, str]:
    # Prepend, not replace: packages installed with --target live on PYTHONPATH.
    path = os.pathsep.join(filter(None, (plugin_dir, os.environ.get("PYTHONPATH"))))
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": path}


def read_losses(path: Path) -> dict[int, float]:
    return {b: v for b, v in (json.loads(ln) for ln in path.read_text().splitlines())}


def assert_close(got: dict[int, float], want: dict[int, float], batches: list[int]) -> float:
    worst = 0.0
    for b in batches:
        rel = abs(got[b] - want[b]) / abs(want[b])
        worst = max(worst, rel)
        assert rel <= RTOL, f"batch {b}: {got[b]} vs {want[b]} (rel {rel:.2e})"
    return worst


def test_two_processes_match_one_and_checkpoints_move_between_them(
    tmp_path, llama_tokenizer_dir, causal_mds_dir
):
    recipe = causal_recipe(tmp_path, llama_tokenizer_dir, causal_mds_dir)
    plugin_dir = install_plugin(tmp_path / "plugin")

    # 1 process, 2 batches: the checkpoint the 2-process run resumes from.
    f1 = tmp_path / "one"
    fit_in_process(recipe, ["run_name=elastic", f"save_folder={f1}"])
    assert (f1 / "ep0-ba2-rank0.pt").exists()
    f2 = tmp_path / "two"
    shutil.copytree(f1, f2, symlinks=True)

    # `llmfoundry-lite train --nproc 2`, same global batch, until SIGTERM (forwarded to the ranks).
    losses2 = tmp_path / "losses2.jsonl"
    cmd = [
        sys.executable, "-m", "llmfoundry_lite.cli", "train", recipe, "--nproc", "2",
        "run_name=elastic", f"save_folder={f2}", "max_duration=1000ba", "save_interval=1000ba",
        f"callbacks.record_losses.path={losses2}",
    ]  # fmt: skip
    # Prepend, not replace: packages installed with --target live on PYTHONPATH.
    path = os.pathsep.join(filter(None, (str(plugin_dir), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": path}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out, deadline, signalled = [], time.time() + 240, False
    for line in proc.stdout:
        out.append(line)
        if not signalled and "[batch 5/" in line:
            proc.send_signal(signal.SIGTERM)
            signalled = True
        if time.time() > deadline:
            proc.kill()
            break
    rc = proc.wait(timeout=120)
    text = "".join(out)
    assert signalled, text[-3000:]
    assert rc == 143, text[-3000:]
    assert_clean_stop(text)
    stop = [ln for ln in out if ln.startswith("preempted at batch ")]
    assert len(stop) == 1 and stop[0].strip().endswith("; rerun the same command to resume"), text[-3000:]
    n = int(stop[0].split()[3].rstrip(";"))
    assert n >= 5 and (f2 / f"ep0-ba{n}-rank0.pt").exists()
    got2 = {b: v for b, v in (json.loads(ln) for ln in losses2.read_text().splitlines())}
    assert sorted(got2) == list(range(3, n + 1))  # resumed after batch 2, nothing repeated

    # The 1-process reference over the same data order.
    ref = fit_in_process(recipe, ["run_name=ref", "save_folder=null", f"max_duration={n + 2}ba"])
    worst = assert_close(got2, ref, list(range(3, n + 1)))

    # Elastic 2 -> 1: the same command with one process continues through the same remaining samples.
    f3 = tmp_path / "three"
    shutil.copytree(f2, f3, symlinks=True)
    got1 = fit_in_process(recipe, ["run_name=elastic", f"save_folder={f3}", f"max_duration={n + 2}ba"])
    assert sorted(got1) == [n + 1, n + 2]
    worst = max(worst, assert_close(got1, ref, [n + 1, n + 2]))
    print(f"max relative loss difference 1 vs 2 processes: {worst:.2e}")


def test_fsdp_block_checked_against_composer_and_dropped_on_cpu(
    bert_tokenizer_dir, mlm_mds_dir, tmp_path, capsys
):
    with pytest.raises(RecipeError) as e:
        validate_fsdp({"sharding_strategy": "FULL_SHARD", "mixed_precison": "PURE"})
    assert e.value.key == "fsdp.mixed_precison" and "did you mean 'mixed_precision'" in str(e.value)
    block = {
        "sharding_strategy": "FULL_SHARD",
        "mixed_precision": "PURE",
        "activation_checkpointing": True,
        "limit_all_gathers": True,
        "state_dict_type": "sharded",
    }
    assert validate_fsdp(block) == block
    cfg = load_recipe(
        str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart" / "mosaicbert-tiny.yaml"),
        [f"fsdp.{k}={v}" for k, v in block.items()],
    )
    assert parallelism_config(cfg, world=1, device_name="cpu") is None
    assert parallelism_config(cfg, world=8, device_name="gpu") == {"fsdp": block}
    err = capsys.readouterr()
    warnings = [ln for ln in (err.out + err.err).splitlines() if "fsdp" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning:")


@pytest.mark.timeout(900)
def test_ctrl_c_under_nproc_2_checkpoints_once_and_rerun_resumes_bit_identically(
    tmp_path, llama_tokenizer_dir, causal_mds_dir
):
    """Ctrl-C in the terminal (SIGINT to the whole process group: command, launcher, ranks) during a 2-process run:
    every rank finishes its batch, one checkpoint, one line, exit 130; the same command then resumes from that
    batch and its losses equal an uninterrupted 2-process run's bit for bit."""
    recipe = causal_recipe(tmp_path, llama_tokenizer_dir, causal_mds_dir)
    env = plugin_env(install_plugin(tmp_path / "plugin"))
    folder = tmp_path / "run"
    first = tmp_path / "first.jsonl"
    same = ("run_name=ctrlc", f"save_folder={folder}", "save_interval=1000ba")
    cmd = nproc2_command(recipe, *same, "max_duration=1000ba", f"callbacks.record_losses.path={first}")
    # A new session stands for the terminal's foreground process group.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    out, deadline, signalled = [], time.time() + 400, False
    for line in proc.stdout:
        out.append(line)
        if not signalled and "[batch 3/" in line:
            os.killpg(proc.pid, signal.SIGINT)
            signalled = True
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    rc = proc.wait(timeout=120)
    text = "".join(out)
    assert signalled and rc == 130, text[-3000:]
    assert_clean_stop(text)
    stop = [ln.strip() for ln in out if ln.startswith("interrupted at batch ")]
    assert len(stop) == 1, text[-3000:]
    n = int(stop[0].split()[3].rstrip(";"))
    assert stop[0] == f"interrupted at batch {n}; rerun the same command to resume"
    assert n >= 3 and sorted(p.name for p in folder.glob("ep*.pt")) == [f"ep0-ba{n}-rank0.pt"]
    got = read_losses(first)
    assert sorted(got) == list(range(1, n + 1))

    # The same command (run shortened so the test ends) resumes after batch n.
    second = tmp_path / "second.jsonl"
    cmd = nproc2_command(recipe, *same, f"max_duration={n + 2}ba", f"callbacks.record_losses.path={second}")
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert f"resuming run ctrlc from batch {n} (" in rerun.stdout
    resumed = read_losses(second)
    assert sorted(resumed) == [n + 1, n + 2]
    got.update(resumed)

    # An uninterrupted 2-process run over the same batches.
    ref_path = tmp_path / "ref.jsonl"
    cmd = nproc2_command(
        recipe, "run_name=ref", f"save_folder={tmp_path / 'ref'}", f"max_duration={n + 2}ba",
        f"callbacks.record_losses.path={ref_path}",
    )  # fmt: skip
    ref = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert ref.returncode == 0, (ref.stdout + ref.stderr)[-3000:]
    assert got == read_losses(ref_path)  # exact equality: the same floats
