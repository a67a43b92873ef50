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
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
WHEELS_SH = ROOT / "scripts" / "gpu_wheels.sh"
DOC = ROOT / "docs" / "gpu-check.md"


def doc_commands() -> list[str]:
    """The commands of docs/gpu-check.md's bash blocks, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return [ln.strip() for block in blocks for ln in block.splitlines() if ln.strip()]


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# The whole dry run, once per test run: ~3-4 min on an idle 2-core box, several times that under load. Its
# subprocess has this budget; the tests that read it are timed on their own bodies (timeout_func_only).
DRY_RUN_BUDGET = 1500


@pytest.fixture(scope="session")
def dry_run(tmp_path_factory):
    """One `--cpu-dry-run` of the whole check in a subprocess: (completed process, report, JSON path).

    Never raises: a dry run over its budget is returned as a process with returncode None and what it printed,
    so every test that uses it fails at once with the reason instead of running it again.
    """
    cwd = tmp_path_factory.mktemp("gpu-check")
    (doc_cmd,) = [c for c in doc_commands() if "--cpu-dry-run" in c]  # the documented command, as written
    argv = [sys.executable if a == "python" else a for a in shlex.split(doc_cmd)]
    argv = [str(SCRIPT) if a == "scripts/gpu_check.py" else a for a in argv]
    out = cwd / argv[argv.index("--out") + 1]
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=DRY_RUN_BUDGET)
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        proc = subprocess.CompletedProcess(argv, None, text + f"\n(over its {DRY_RUN_BUDGET} s budget)", "")
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
    proc, report, _ = dry_run
    assert report is not None, proc.stdout[-3000:]
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
    proc, report, _ = dry_run
    assert report is not None, proc.stdout[-3000:]
    steps = {s["name"]: s for s in report["steps"]}
    for name in ("throughput bert sdpa", "throughput llama sdpa"):
        d = steps[name]["details"]
        assert isinstance(d["ratio"], float) and d["ratio"] > 0
        assert len(d["per_round_ratios"]) >= 2 and all(r > 0 for r in d["per_round_ratios"])
        assert len(d["models"]) == 2 and all(m["tokens_per_s"] > 0 for m in d["models"].values())
    llama = steps["throughput llama sdpa"]["details"]
    assert 0 < llama["mfu"] and 0 < llama["hf_mfu"]  # against the peak measured in the same run


def test_trainer_runs_checkpoint_and_resume(dry_run):
    proc, report, _ = dry_run
    assert report is not None, proc.stdout[-3000:]
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


STEPS_FILE = """
import os, time


def hang(check):
    time.sleep(3600)


def crash(check):
    os._exit(3)


def remember(check, value):
    check.context["value"] = value
    return f"remembered {value}", {"pid": os.getpid()}


def recall(check):
    return f"recalled {check.context['value']}", {"pid": os.getpid()}
"""


@pytest.mark.timeout(300)
def test_a_hung_or_crashed_step_becomes_a_failed_row_and_the_next_step_runs(tmp_path):
    """Steps run in a worker process under a time limit: a hang is stopped, a crash is reported, and the next
    step gets a fresh worker that still has what earlier steps left in the context."""
    gc = _load_gpu_check()
    steps = tmp_path / "steps.py"
    steps.write_text(STEPS_FILE)
    mode = gc.cpu_dry_mode()
    mode.limits = {"hang": 3, "crash": 120, "remember": 120, "recall": 120}
    check = gc.Check(mode, tmp_path / "r.json", tmp_path / "r.log", tmp_path)
    try:
        check.run_isolated("remember", f"{steps}:remember", 7)
        check.run_isolated("hang", f"{steps}:hang")
        check.run_isolated("recall", f"{steps}:recall")
        check.run_isolated("crash", f"{steps}:crash")
        check.run_isolated("recall again", f"{steps}:recall")
    finally:
        check.close()
    rows = {r.name: r for r in check.results}
    assert [r.status for r in check.results] == ["ok", "failed", "ok", "failed", "ok"]
    assert rows["hang"].summary.startswith("timed out after 3 s") and rows["hang"].seconds < 60
    assert rows["crash"].summary.startswith("its process exited with code 3")
    assert rows["recall"].summary == "recalled 7" and rows["recall again"].summary == "recalled 7"
    pids = [rows[n].details["pid"] for n in ("remember", "recall", "recall again")]
    assert len(set(pids)) == 3 and os.getpid() not in pids  # a fresh worker after each hang or crash
    assert "| hang | failed |" in check.table()
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is False


def _broken_site(tmp_path: Path) -> Path:
    """A site folder like the GPU image's carried one, but whose Composer fails to import and whose
    llmfoundry_lite is a stale wheel copy that must never be used."""
    site = tmp_path / "site"
    (site / "composer").mkdir(parents=True)
    (site / "composer" / "__init__.py").write_text("raise ImportError('composer is broken on purpose')\n")
    (site / "llmfoundry_lite").mkdir()
    (site / "llmfoundry_lite" / "__init__.py").write_text(
        "raise ImportError('the wheel copy was imported')\n"
    )
    return site


@pytest.mark.timeout(600)
def test_doctor_fails_when_composer_fails_to_import_and_the_checkout_comes_first(tmp_path):
    site = _broken_site(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ["PYTHONPATH"]])}
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-dry-run", "--only", "doctor", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    (doctor,) = json.loads(out.read_text())["steps"]
    assert doctor["status"] == "failed", doctor
    assert "mosaicml fails to import" in doctor["summary"] and "(import FAILED)" in doctor["summary"]
    assert "wheel copy" not in doctor["summary"] and "wheel copy" not in out.with_suffix(".log").read_text()
    assert re.search(r"^\| doctor \| failed \|", proc.stdout, re.M)


@pytest.mark.timeout(300)
def test_bert_flash_step_is_skipped_without_flash_attn_before_composer_is_imported(tmp_path):
    """With flash-attn missing the flash step is "skipped", even where Composer itself cannot be imported."""
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    site = _broken_site(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ["PYTHONPATH"]])}
    code = (
        "import sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('gpu_check', {str(SCRIPT)!r})\n"
        "gc = importlib.util.module_from_spec(spec); sys.modules['gpu_check'] = gc; spec.loader.exec_module(gc)\n"
        "mode = gc.cpu_dry_mode(); mode.device = 'cuda'  # as on a GPU: only flash-attn decides\n"
        "check = gc.Check(mode, gc.Path('r.json'), gc.Path('r.log'))\n"
        "r = check.run('throughput bert flash', lambda: gc.step_bert(check, 'flash'))\n"
        "print('ROW', r.status, r.summary, 'composer' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    row = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ROW "))
    assert row.startswith("ROW skipped flash-attn is not installed") and row.endswith(" False"), proc.stdout


def test_goals_table_prints_mfu_in_percent_and_ratios_with_x(tmp_path):
    gc = _load_gpu_check()
    check = gc.Check(gc.gpu_mode(llama_batch=4), tmp_path / "r.json", tmp_path / "r.log")
    check.results += [
        gc.StepResult("throughput llama sdpa", "ok", 1.0, "", {"mfu": 0.4213, "ratio": 1.31}),
        gc.StepResult("throughput bert sdpa", "ok", 1.0, "", {"ratio": 2.6}),
    ]
    check.log.close()
    table = check.table()
    assert "| LLaMA-1B MFU (measured bf16 peak) | >= 50% | 42.1% | NO |" in table
    assert "| LLaMA-1B / LlamaForCausalLM tokens/s | >= 1.2x | 1.31x | yes |" in table
    assert "| MosaicBERT-Base / BertForMaskedLM real tokens/s | >= 2.5x | 2.60x | yes |" in table


def test_test_subprocesses_import_the_checkout_from_any_directory(tmp_path):
    """conftest puts the checkout first on PYTHONPATH: a subprocess started elsewhere imports it, not a wheel."""
    site = _broken_site(tmp_path)
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", "import llmfoundry_lite; print(llmfoundry_lite.__file__)"],
        cwd=tmp_path,  # not the checkout: only PYTHONPATH can find it
        env={
            **os.environ,
            "PYTHONPATH": os.environ["PYTHONPATH"] + os.pathsep + str(site),
        },  # a wheel site too
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and Path(out.stdout.strip()).parent.parent == ROOT, out.stderr


def test_the_docs_commands_are_the_tested_ones():
    """docs/gpu-check.md: the dry run is the `dry_run` fixture's command; make's lines install and run as said."""
    assert doc_commands() == [
        "make gpu-check",
        "scripts/gpu_wheels.sh gpu-wheels",
        "make gpu-check WHEELS=gpu-wheels",
        "python scripts/gpu_check.py --cpu-dry-run --out tmp/gpu_check.json",
    ]

    def make_n(*args: str) -> str:  # what make would run, without running it
        out = subprocess.run(
            ["make", "-n", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "scripts/gpu_check.py --out gpu_check.json" in make_n("gpu-check")
    with_wheels = make_n("gpu-check", "WHEELS=gpu-wheels")
    assert (
        "install --no-index --no-deps --no-compile --upgrade --target build/gpu-site gpu-wheels/*.whl"
        in with_wheels
    )
    assert f'PYTHONPATH="{ROOT}:{ROOT / "build" / "gpu-site"}' in with_wheels  # the checkout first
    assert "--cpu-dry-run" in make_n("gpu-check", "GPU_CHECK_ARGS=--cpu-dry-run")
    usage = subprocess.run(["bash", str(WHEELS_SH)], capture_output=True, text=True, timeout=60).stderr
    assert "OUT_DIR" in usage  # gpu_wheels.sh takes the folder as its one argument
    helptext = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    options = re.findall(r"^\| `(--[a-z-]+)", DOC.read_text(), re.M)
    assert len(options) == 5 and all(o in helptext for o in options), options
    gc = _load_gpu_check()
    assert "(`doctor`, `peak`, `throughput`, `train`)" in DOC.read_text()
    assert gc.STEP_GROUPS == ("doctor", "peak", "throughput", "train")
    assert "doctor and peak 300 s, throughput, data and train 900 s each" in " ".join(DOC.read_text().split())
    assert gc.STEP_LIMITS == {"doctor": 300, "peak": 300, "throughput": 900, "data": 900, "train": 900}


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
