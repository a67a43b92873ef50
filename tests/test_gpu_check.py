"""The GPU check runs end to end on CPU (`--cpu-dry-run`: same code paths, tiny shapes), and its wheel list holds.

On a GPU it is `make gpu-check`; here the dry run proves every step's code runs: doctor, the measured peak, the
ours-vs-transformers pairs of scripts/benchmark.py, the Makefile's data commands, and Trainer runs of the
quickstart recipes with a checkpoint and a resume (FSDP validated, then skipped: it needs CUDA).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
WHEELS_SH = ROOT / "scripts" / "gpu_wheels.sh"


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One `--cpu-dry-run` of the whole check in a subprocess: (completed process, report, JSON path)."""
    cwd = tmp_path_factory.mktemp("gpu-check")
    out = cwd / "tmp" / "gpu_check.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(out)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report, out


def test_dry_run_exits_0_and_prints_the_table(dry_run):
    proc, report, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report is not None and report["ok"] is True and report["mode"] == "cpu-dry-run"
    assert "| step | status | seconds | result |" in proc.stdout
    for step in report["steps"]:
        assert re.search(rf"^\| {re.escape(step['name'])} \| {step['status']} \|", proc.stdout, re.M), step[
            "name"
        ]
    assert Path(report["log"]).is_file() and Path(report["log"]).parent == out.parent


def test_every_step_is_reported_ok_or_skipped_with_a_reason(dry_run):
    _, report, _ = dry_run
    steps = {s["name"]: s for s in report["steps"]}
    expected = {
        "doctor", "peak", "data",
        "throughput bert flash", "throughput bert sdpa", "throughput llama flash", "throughput llama sdpa",
        "train llama-tiny", "train llama-tiny fsdp", "train mosaicbert-tiny", "train mosaicbert-tiny fsdp",
        "train llama-tiny fsdp compiled", "train mosaicbert-tiny fsdp compiled",
    }  # fmt: skip
    assert set(steps) == expected
    for name, s in steps.items():
        assert s["status"] in ("ok", "skipped"), (name, s["summary"])
        assert s["summary"] and "\n" not in s["summary"]
    # On CPU, exactly the CUDA-only pieces are skipped, each saying so.
    skipped = {n for n, s in steps.items() if s["status"] == "skipped"}
    assert skipped == {n for n in expected if "flash" in n or "fsdp" in n}
    assert all("needs CUDA" in steps[n]["summary"] for n in skipped)
    assert steps["doctor"]["details"]["versions"]["mosaicml"]
    assert steps["peak"]["details"]["peak_flops"] > 0


def test_ours_vs_transformers_ratios_are_numbers(dry_run):
    _, report, _ = dry_run
    steps = {s["name"]: s for s in report["steps"]}
    for name in ("throughput bert sdpa", "throughput llama sdpa"):
        d = steps[name]["details"]
        assert isinstance(d["ratio"], float) and d["ratio"] > 0
        assert len(d["per_round_ratios"]) >= 2 and all(r > 0 for r in d["per_round_ratios"])
        assert len(d["models"]) == 2 and all(m["tokens_per_s"] > 0 for m in d["models"].values())
    llama = steps["throughput llama sdpa"]["details"]
    assert 0 < llama["mfu"] and 0 < llama["hf_mfu"]  # against the peak measured in the same run


def test_trainer_runs_checkpoint_and_resume(dry_run):
    _, report, _ = dry_run
    steps = {s["name"]: s for s in report["steps"]}
    for recipe in ("llama-tiny", "mosaicbert-tiny"):
        d = steps[f"train {recipe}"]["details"]
        assert d["resumed"].startswith("resuming ") and d["checkpoint"] in d["resumed"]
        assert d["batches"] == 4 and d["checkpoint"] == "ep0-ba2-rank0.pt"
        assert "precision=amp_bf16" in d["overrides"]
    data = steps["data"]["details"]["commands"]
    assert any(" data tokenizer " in c and "--kind wordpiece" in c for c in data)
    assert any(" data convert " in c and "--concat-tokens" in c for c in data)


def test_a_failing_step_is_reported_and_the_others_still_run(tmp_path, capsys):
    gc = _load_gpu_check()
    check = gc.Check(gc.cpu_dry_mode(), tmp_path / "r.json", tmp_path / "r.log")

    def broken():
        raise RuntimeError("'weight' must be 2-D\nsecond line of the message")

    def optional_missing():
        raise gc.Skip("flash-attn is not installed")

    check.run("broken", broken)
    check.run("optional", optional_missing)
    check.run("fine", lambda: ("all good", {"x": 1}))
    check.log.close()
    rows = {r.name: r for r in check.results}
    assert (
        rows["broken"].status == "failed" and rows["broken"].summary == "RuntimeError: 'weight' must be 2-D"
    )
    assert rows["optional"].status == "skipped" and rows["fine"].status == "ok"
    assert not check.ok()
    report = json.loads((tmp_path / "r.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["failed", "skipped", "ok"] and report["ok"] is False
    assert "Traceback" in (tmp_path / "r.log").read_text()  # the full traceback goes to the log only
    assert "| broken | failed |" in check.table()
    assert "Traceback" not in capsys.readouterr().out


def test_usage_errors_exit_2_with_one_line(tmp_path, capsys):
    import torch

    gc = _load_gpu_check()
    assert gc.main(["--cpu-dry-run", "--only", "bogus", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown step group(s) bogus" in capsys.readouterr().err
    if torch.cuda.is_available():
        return
    assert gc.main(["--out", str(tmp_path / "x.json")]) == 2  # the real check needs a GPU
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--cpu-dry-run" in err and len(err.strip().splitlines()) == 1


def test_gpu_shapes_come_from_the_shipped_recipes():
    gc = _load_gpu_check()
    mode = gc.gpu_mode(llama_batch=4)
    assert (mode.bert["L"], mode.bert["d"], mode.bert["heads"], mode.bert["ffn"], mode.bert["seq"]) == (
        12, 768, 12, 3072, 128,
    )  # fmt: skip
    assert (mode.llama["d"], mode.llama["L"], mode.llama["seq"], mode.llama["vocab"]) == (
        2048,
        22,
        2048,
        32000,
    )
    assert mode.device == "cuda" and mode.batches_half * 2 == 30  # 30 batches per quickstart recipe


def test_data_commands_come_from_the_makefile_quickstart_targets():
    gc = _load_gpu_check()
    targets = gc.makefile_data_commands()
    assert set(targets) == {"quickstart-data", "quickstart-llama"}
    for cmds in targets.values():
        assert [c[:3] for c in cmds] == [
            ["llmfoundry-lite", "data", "tokenizer"],
            ["llmfoundry-lite", "data", "convert"],
        ]
        assert all(any("$(DATA)" in a for a in c) for c in cmds)


# ---------------------------------------------------------------------------------------------------------
# scripts/gpu_wheels.txt, as scripts/gpu_wheels.sh reads it (no network: --list only)
# ---------------------------------------------------------------------------------------------------------


def _listed(*flags: str) -> list[str]:
    out = subprocess.run(
        ["bash", str(WHEELS_SH), "--list", *flags], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def _name(spec: str) -> str:
    return re.sub(r"[-_.]+", "-", spec.split("==")[0]).lower()


def test_wheel_list_is_exact_pins_without_duplicates():
    required, everything = _listed(), _listed("--with-optional")
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][0-9A-Za-z.]*", s) for s in everything), everything
    assert len({_name(s) for s in everything}) == len(everything)
    assert set(required) < set(everything)
    for spec in (
        "mosaicml==0.32.1",
        "mosaicml-streaming==0.13.0",
        "transformers==4.53.3",
        "mosaicml-cli==0.7.5",
    ):
        assert spec in required
    versions = {_name(s): s.split("==")[1] for s in everything}
    assert versions["tokenizers"].startswith("0.21.") and versions["huggingface-hub"].startswith("0.36.")
    # The image's own compiled stack must never be replaced, and wandb is optional.
    assert not {"torch", "numpy", "torchmetrics", "torchvision", "triton"} & set(versions)
    assert "wandb" in versions and "wandb" not in {_name(s) for s in required}


def test_wheel_pins_satisfy_pyproject():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    constraints = {_name(r.name): r.specifier for r in map(Requirement, deps)}
    pinned = {_name(s): s.split("==")[1] for s in _listed("--with-optional")}
    for name, version in pinned.items():
        if name in constraints:
            assert constraints[name].contains(version, prereleases=True), (name, version, constraints[name])
    # What our own code imports must be in the list (the image has the rest).
    for name in (
        "mosaicml",
        "mosaicml-streaming",
        "omegaconf",
        "catalogue",
        "transformers",
        "tokenizers",
        "typer",
    ):
        assert name in pinned, name


def test_wheels_script_rejects_bad_usage():
    out = subprocess.run(["bash", str(WHEELS_SH)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "usage" in out.stderr
    out = subprocess.run(["bash", str(WHEELS_SH), "--bogus", "x"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown option --bogus" in out.stderr
