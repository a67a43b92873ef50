"""One command that checks a GPU: the stack, a measured bf16 peak, our models vs transformers, real Trainer runs.

    python scripts/gpu_check.py --out gpu_check.json              # one H100/H200-class GPU, offline, <= 8 min
    python scripts/gpu_check.py --cpu-dry-run --out tmp/gc.json   # the same code paths, tiny shapes, on CPU

Steps (each isolated: a failing step is reported with a one-line reason and the others still run; a step that
needs something optional which is missing, such as flash-attn, is "skipped" with the reason):

1. ``doctor``: torch, CUDA, flash-attn, composer, streaming, transformers versions and the GPU (apps/doctor.py);
   ``peak``: the bf16 matmul peak measured now (bench.matmul_peak), the denominator of every MFU here.
2. ``throughput``: training-step throughput under bf16 autocast, ours vs transformers at the same shape, same
   batches, interleaved rounds (scripts/benchmark.py): MosaicBERT-Base vs ``BertForMaskedLM`` at seq 128 on
   real padded text (real tokens/s), and the LLaMA-1B shape of recipes/llama/1b.yaml vs ``LlamaForCausalLM``
   at seq 2048 (tokens/s, MFU), each with flash-attn (when importable) and with SDPA.
3. ``data``: the quickstart tokenizers and MDS shards, built into a temporary folder by the very
   ``llmfoundry-lite data`` commands of the Makefile's quickstart-data and quickstart-llama targets.
   ``train``: each quickstart recipe through ``load_recipe`` + ``train`` (our real entry) with amp_bf16, with and
   without an ``fsdp:`` block (FSDP on one GPU): a checkpoint at half time, then the same command resumes from
   it to 30 batches. FSDP runs must wrap at least one unit per transformer block.

Prints a markdown table (stdout) and writes the JSON (``--out``; rewritten after every step, so an interrupted run
leaves what it measured); each step's own output goes to the log next to it. Exit code 0 when every step that
was not skipped ran, 1 otherwise, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
# The checkout first on the import path, always: the GPU image runs it without `pip install -e .`, and a wheel of
# this package in the carried site folder (scripts/gpu_wheels.sh builds one) must not shadow the code checked.
sys.path[:] = [str(ROOT), *(p for p in sys.path if p != str(ROOT))]

# Offline by construction: nothing here may reach a hub or a tracking server.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}

# Goals of issue 11 / shared/BENCHMARKS.md, reported (not enforced: the exit code says whether the check ran).
GOAL_BERT_RATIO = 2.5
GOAL_LLAMA_MFU = 0.50
GOAL_LLAMA_RATIO = 1.2

# Makefile targets whose `llmfoundry-lite data ...` lines build what the quickstart recipes read.
DATA_TARGETS = ("quickstart-data", "quickstart-llama")
MAKE_DATA_VAR = "$(DATA)"
RECIPE_DATA_PREFIX = "data/quickstart"  # the Makefile's DATA default, as the recipes' variables spell it


STEP_LIMITS = {"doctor": 300, "peak": 300, "throughput": 900, "data": 900, "train": 900}


@dataclass
class Mode:
    """Shapes and lengths of one kind of run: the real check on a GPU, or the CPU dry run."""

    name: str
    device: str  # torch device of the benchmarks ("cuda" / "cpu")
    recipe_device: str  # the recipes' `device:` ("gpu" / "cpu")
    peak: dict  # matmul_peak arguments
    bert: dict
    llama: dict
    rounds: int
    steps: int
    llama_steps: int
    batches_half: int  # train to this, checkpoint, then resume to twice this
    eval_batches: int
    # Seconds each step may take before it counts as hung (stopped, a failed row), by step group: generous
    # bounds for a hang (NCCL, a data loader), not speed targets; --step-timeout overrides them all.
    limits: dict = field(default_factory=lambda: dict(STEP_LIMITS))

    def limit(self, step: str) -> float:
        """The time limit of ``step`` (its group is its first word: "train llama-tiny" -> "train")."""
        return float(self.limits.get(step.split()[0], max(self.limits.values())))


def gpu_mode(llama_batch: int) -> Mode:
    """MosaicBERT-Base and the LLaMA-1B recipe shape on one GPU."""
    return Mode(
        name="gpu",
        device="cuda",
        recipe_device="gpu",
        peak={"n": 8192, "repeats": 5, "inner": 10},
        bert={**bert_base_shape(), "batch": 256},
        llama={**llama_1b_shape(), "batch": llama_batch},
        rounds=5,
        steps=5,
        llama_steps=3,
        batches_half=15,
        eval_batches=4,
    )


def cpu_dry_mode() -> Mode:
    """The same code paths with tiny shapes: finishes in a minute or two on a small CPU."""
    return Mode(
        name="cpu-dry-run",
        device="cpu",
        recipe_device="cpu",
        peak={"n": 256, "repeats": 3, "inner": 2},
        bert={"L": 2, "d": 64, "heads": 2, "ffn": 128, "seq": 128, "batch": 8, "vocab": 2048},
        llama={"d": 64, "L": 2, "heads": 4, "kv_heads": 2, "ffn": 128, "seq": 128, "batch": 2, "vocab": 512},
        rounds=2,
        steps=1,
        llama_steps=1,
        batches_half=2,
        eval_batches=1,
    )


def bert_base_shape() -> dict:
    """MosaicBERT-Base as recipes/mosaicbert/base.yaml defines it; transformers' BERT vocabulary."""
    m = _recipe_model("recipes/mosaicbert/base.yaml")
    return {
        "L": m["n_layers"],
        "d": m["d_model"],
        "heads": m["n_heads"],
        "ffn": m["intermediate_size"],
        "seq": 128,
        "vocab": 30522,
    }


def llama_1b_shape() -> dict:
    """The LLaMA-1B shape of recipes/llama/1b.yaml at its 2048-token context."""
    m = _recipe_model("recipes/llama/1b.yaml")
    return {
        "d": m["d_model"],
        "L": m["n_layers"],
        "heads": m["n_heads"],
        "kv_heads": m.get("n_kv_heads") or m["n_heads"],
        "ffn": m["ffn_hidden_size"],
        "seq": m["max_seq_len"],
        "vocab": m["vocab_size"],
    }


def _recipe_model(rel: str) -> dict:
    """The resolved ``model:`` block of a shipped recipe (its base chain composed; no data needed)."""
    from omegaconf import OmegaConf

    from llmfoundry_lite.recipe import compose

    data, _ = compose(ROOT / rel)
    return OmegaConf.to_container(OmegaConf.create(data), resolve=True)["model"]


# ---------------------------------------------------------------------------------------------------------
# Steps: isolated, reported
# ---------------------------------------------------------------------------------------------------------


class Skip(Exception):
    """The step cannot run here because something optional is missing; the message says what."""


class Failed(Exception):
    """The step ran and found a problem; the message is the one-line reason, ``details`` go to the JSON."""

    def __init__(self, message: str, details: Optional[dict] = None):
        super().__init__(message)
        self.details = details or {}


@dataclass
class StepResult:
    """One row of the table and of the JSON."""

    name: str
    status: str  # ok | failed | skipped
    seconds: float
    summary: str
    details: dict = field(default_factory=dict)


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message, cut at 300 characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, (Skip, Failed)):
        return text[:300]
    return f"{type(e).__name__}: {text}"[:300]


class Tee(io.TextIOBase):
    """Writes to a log file and keeps a copy (a step's output, searched for what it printed)."""

    def __init__(self, log: io.TextIOBase):
        self.log = log
        self.buffer_ = io.StringIO()

    def write(self, s: str) -> int:  # noqa: D102
        self.log.write(s)
        self.buffer_.write(s)
        return len(s)

    def flush(self) -> None:  # noqa: D102
        self.log.flush()

    def getvalue(self) -> str:
        """Everything written so far."""
        return self.buffer_.getvalue()


class Check:
    """Runs steps in isolation, prints progress and the table, keeps the JSON up to date.

    ``run_isolated`` runs a step in a worker process under the step's time limit (main uses it for every step);
    ``run`` runs a callable in this process (the worker's own loop, and tests).
    """

    def __init__(self, mode: Mode, out: Optional[Path], log: Path, workdir: Optional[Path] = None):
        """``out`` None: a worker's Check, which keeps no report and whose stdout already is the log."""
        self.mode = mode
        self.out = out
        self.log_path = log
        self.workdir = workdir
        if out is None:
            self.log = sys.stdout
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("", encoding="utf-8")  # appended to, by this process and its worker
            self.log = open(log, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (open for the whole run)
        self.results: list[StepResult] = []
        self.started = time.time()
        self.context: dict[str, Any] = {}
        self.machine: dict[str, Any] = {}
        self._worker: Optional[_Worker] = None

    def run_isolated(self, name: str, target: str, *args: Any) -> StepResult:
        """Run the step function ``target`` ("file.py:function", called as ``function(check, *args)``) in the
        worker process, under ``mode.limit(name)`` seconds. A hang or a crash of the worker becomes a failed row
        (the worker is stopped; the next step starts a fresh one). Never raises."""
        limit = self.mode.limit(name)
        print(f"[gpu-check] {name} ...", flush=True)
        t0 = time.perf_counter()
        if self._worker is None:
            self._worker = _Worker(self)
        reply = self._worker.call(
            {"name": name, "target": target, "args": list(args), "context": _jsonable(self.context)}, limit
        )
        seconds = round(time.perf_counter() - t0, 1)
        if isinstance(reply, dict):
            r = StepResult(**reply["result"])
            self.context.update(reply["context"])
            self.machine.update(reply["machine"])
        else:  # no answer: the worker hung (stopped now) or died
            self._worker.stop(grace=0)
            self._worker = None
            if reply is None:
                why = f"timed out after {limit:.0f} s (hung? stopped; the log has its last output)"
            else:
                why = f"its process exited with code {reply} (crashed? the log has its last output)"
            self.log.write(f"\n===== {name}: {why} =====\n")
            r = StepResult(name, "failed", seconds, why)
        return self._record(r)

    def close(self) -> None:
        """Stop the worker process and close the log."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        self.log.close()

    def run(self, name: str, fn: Callable[[], tuple[str, dict]]) -> StepResult:
        """Run one step; any exception becomes a failed (or, for Skip, skipped) row. Never raises."""
        print(f"[gpu-check] {name} ...", flush=True)
        self.log.write(f"\n===== {name} =====\n")
        t0 = time.perf_counter()
        details: dict = {}
        try:
            with contextlib.redirect_stdout(self.log), contextlib.redirect_stderr(self.log):
                summary, details = fn()
            status = "ok"
        except Skip as e:
            status, summary = "skipped", one_line(e)
        except (Exception, SystemExit) as e:  # noqa: BLE001 (a failing step must not stop the others)
            status, summary, details = "failed", one_line(e), getattr(e, "details", {})
            traceback.print_exc(file=self.log)
        finally:
            _free_memory()
        return self._record(StepResult(name, status, round(time.perf_counter() - t0, 1), summary, details))

    def _record(self, r: StepResult) -> StepResult:
        self.results.append(r)
        print(f"[gpu-check] {r.name}: {r.status} ({r.seconds:.0f} s) {r.summary}", flush=True)
        self.write_json()
        return r

    def ok(self) -> bool:
        """True when no step failed (skipped steps do not count against the run)."""
        return all(r.status != "failed" for r in self.results)

    def write_json(self) -> None:
        """The report so far, as JSON at ``--out`` (none in a worker)."""
        if self.out is None:
            return
        report = {
            "mode": self.mode.name,
            "ok": self.ok(),
            "seconds": round(time.time() - self.started, 1),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "log": str(self.log_path),
            "machine": self.machine,
            "goals": goals(self.results) if self.mode.name == "gpu" else {},
            "steps": [asdict(r) for r in self.results],
        }
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        tmp.replace(self.out)

    def table(self) -> str:
        """The results as a markdown table, then the goals (GPU mode)."""
        lines = [
            f"### GPU check ({self.mode.name}): {self.machine.get('gpu') or self.machine.get('cpu', '')}",
            "",
            "| step | status | seconds | result |",
            "|---|---|---|---|",
        ]
        for r in self.results:
            lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.summary.replace('|', '/')} |")
        if self.mode.name == "gpu":
            lines += ["", "| goal | target | measured | met |", "|---|---|---|---|"]
            for name, g in goals(self.results).items():
                measured = _measured(g["measured"], g["unit"])
                met = "n/a" if g["met"] is None else ("yes" if g["met"] else "NO")
                lines.append(f"| {name} | {g['target']} | {measured} | {met} |")
        total = time.time() - self.started
        failed = sum(r.status == "failed" for r in self.results)
        skipped = sum(r.status == "skipped" for r in self.results)
        lines += [
            "",
            f"{len(self.results)} steps, {failed} failed, {skipped} skipped, {total:.0f} s; "
            f"JSON: {self.out}; log: {self.log_path}",
        ]
        return "\n".join(lines)


class _Worker:
    """A ``gpu_check.py --worker`` process that runs the steps it is sent, one JSON line each way.

    Its own stdout and stderr (file descriptors 1 and 2, so what C code prints too) go to the check's log; its
    answers come back on a pipe of their own. It is a process group leader, so stopping it stops what it started.
    """

    def __init__(self, check: Check):
        import queue
        import threading

        check.log.flush()
        read_fd, write_fd = os.pipe()
        mode = check.mode
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            str(write_fd),
            "--log",
            str(check.log_path),
        ]
        argv += ["--cpu-dry-run"] if mode.name == "cpu-dry-run" else []
        argv += ["--llama-batch", str(mode.llama["batch"])] if mode.name == "gpu" else []
        argv += ["--workdir", str(check.workdir)] if check.workdir else []
        with open(check.log_path, "a", encoding="utf-8") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=log,
                pass_fds=(write_fd,),
                start_new_session=True,
                text=True,
                env=_subprocess_env(),
            )
        os.close(write_fd)
        self.answers: queue.Queue = queue.Queue()
        replies = os.fdopen(read_fd, encoding="utf-8")

        def read() -> None:  # a thread, so the wait for an answer can time out
            for line in replies:
                self.answers.put(json.loads(line))
            self.answers.put(EOFError())

        threading.Thread(target=read, daemon=True).start()

    def call(self, request: dict, limit: float) -> Any:
        """The worker's answer (a dict), None after ``limit`` seconds, or its exit code when it died."""
        import queue

        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it died already: the reader reports EOF
        try:
            answer = self.answers.get(timeout=limit)
        except queue.Empty:
            return None
        if isinstance(answer, EOFError):
            return self.proc.wait()
        return answer

    def stop(self, grace: float = 30) -> None:
        """End the worker and everything it started: an idle one exits when its input ends; after ``grace``
        seconds (at once for a hung one) its process group is killed."""
        import signal

        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # what it started, even if it is gone
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def worker_main(answer_fd: int, mode: Mode, log: Path, workdir: Optional[Path]) -> int:
    """The worker's loop: read a step request per line on stdin, run it (``Check.run``), answer on ``answer_fd``."""
    answers = os.fdopen(answer_fd, "w", encoding="utf-8", buffering=1)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    check = Check(mode, None, log, workdir)
    steps: dict[str, Any] = {}
    for line in sys.stdin:
        req = json.loads(line)
        check.context.update(req["context"])
        target = req["target"]
        if target not in steps:
            path, func = target.rsplit(":", 1)
            steps[target] = getattr(_module_at(Path(path)), func)
        r = check.run(req["name"], lambda fn=steps[target], a=req["args"]: fn(check, *a))
        answers.write(json.dumps({"result": asdict(r), "context": _jsonable(check.context), "machine": check.machine},
                                 default=str) + "\n")  # fmt: skip
    return 0


def _module_at(path: Path) -> Any:
    """The module of a step file (this script itself once, as the module running)."""
    if path.resolve() == Path(__file__).resolve():
        return sys.modules[__name__]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _jsonable(context: dict) -> dict:
    """The entries of a step context that travel between processes (numbers, strings, paths as strings)."""
    out = {}
    for key, value in context.items():
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
    return out


def _measured(value: Optional[float], unit: str) -> str:
    """A goal's measured value as the table prints it: a ratio as "2.61x", a fraction as "42.0%"."""
    if value is None:
        return "n/a"
    return f"{value:.1%}" if unit == "%" else f"{value:.2f}x"


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def goals(results: list[StepResult]) -> dict[str, dict]:
    """The issue's performance goals against this run's numbers (None where a step did not measure them)."""
    by_name = {r.name: r for r in results}

    def best(prefix: str, key: str) -> Optional[float]:
        values = [
            r.details.get(key)
            for n, r in by_name.items()
            if n.startswith(prefix) and r.status == "ok" and r.details.get(key) is not None
        ]
        return max(values) if values else None

    def goal(target: float, measured: Optional[float], text: str, unit: str = "x") -> dict:
        met = None if measured is None else measured >= target
        return {"target": text, "measured": measured, "unit": unit, "met": met}

    return {
        "MosaicBERT-Base / BertForMaskedLM real tokens/s": goal(
            GOAL_BERT_RATIO, best("throughput bert", "ratio"), f">= {GOAL_BERT_RATIO}x"
        ),
        "LLaMA-1B MFU (measured bf16 peak)": goal(
            GOAL_LLAMA_MFU, best("throughput llama", "mfu"), f">= {GOAL_LLAMA_MFU:.0%}", unit="%"
        ),
        "LLaMA-1B / LlamaForCausalLM tokens/s": goal(
            GOAL_LLAMA_RATIO, best("throughput llama", "ratio"), f">= {GOAL_LLAMA_RATIO}x"
        ),
    }


# ---------------------------------------------------------------------------------------------------------
# 1. doctor and peak
# ---------------------------------------------------------------------------------------------------------


def step_doctor(check: Check) -> tuple[str, dict]:
    """Versions and GPU from apps/doctor.py."""
    from llmfoundry_lite.apps import doctor

    report = doctor.diagnose()
    info = dict(report.lines)
    gpu = info.get("gpu0") or info.get("gpu", "none")
    check.machine.update(_machine(gpu))

    def short(key: str, default: str = "?") -> str:  # "not installed (optional; ...)" -> "not installed"
        value = info.get(key, default)
        return value if "FAILED" in value else value.split(" (")[0]  # "2.1 (import FAILED)" stays whole

    parts = [
        f"torch {info.get('torch', '?')}",
        f"CUDA runtime {info.get('cuda runtime', 'none')}",
        f"flash-attn {short('flash-attn')}",
        f"composer {short('mosaicml')}",
        f"streaming {short('mosaicml-streaming')}",
        f"transformers {short('transformers')}",
        f"GPU {gpu.split(' (')[0]}",
    ]
    problems = [msg for _, msg in report.problems]
    details = {"versions": info, "problems": problems}
    fatal = [msg for is_fatal, msg in report.problems if is_fatal]
    if fatal:  # e.g. Composer fails to import: nothing after this can run
        raise Failed(f"{fatal[0]}; " + "; ".join(parts), details)
    if problems:
        parts.append(f"{len(problems)} doctor finding(s), see JSON")
    return "; ".join(parts), details


def _machine(gpu: str) -> dict:
    import torch

    from llmfoundry_lite.bench import cpu_model

    return {
        "gpu": gpu if torch.cuda.is_available() else None,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def step_peak(check: Check) -> tuple[str, dict]:
    """The bf16 matmul peak of this device, measured now."""
    import torch

    from llmfoundry_lite import bench

    p = check.mode.peak
    peak = bench.matmul_peak(p["n"], p["repeats"], torch.bfloat16, check.mode.device, p["inner"])
    check.context["peak"] = peak
    how = f"best of {p['repeats']} x {p['inner']} bf16 {p['n']}x{p['n']} matmuls on {check.mode.device}"
    return f"{_flops(peak)} ({how})", {"peak_flops": peak, "how": how}


def _flops(x: float) -> str:
    return f"{x / 1e12:,.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:,.1f} GFLOP/s"


# ---------------------------------------------------------------------------------------------------------
# 2. throughput: ours vs transformers (scripts/benchmark.py)
# ---------------------------------------------------------------------------------------------------------


def _benchmark_module() -> Any:
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def flash_status(device: str) -> tuple[bool, str]:
    """(usable, why not / version) of flash-attn for this run."""
    if device != "cuda":
        return False, "needs CUDA (flash-attn kernels run only on the GPU)"
    try:
        import flash_attn
    except ImportError:
        return False, "flash-attn is not installed (optional: pip install flash-attn --no-build-isolation)"
    except Exception as e:  # noqa: BLE001 (a broken binary is a finding, reported as the reason)
        import torch

        from llmfoundry_lite.apps.doctor import explain_import_error

        return False, explain_import_error("flash-attn", e, torch.__version__)
    return True, getattr(flash_attn, "__version__", "installed")


def _hf_attn(model_cls: Any, impl: str) -> str:
    """transformers' attn_implementation for our ``impl``: flash-attn 2 where that model supports it."""
    if impl == "flash" and getattr(model_cls, "_supports_flash_attn_2", False):
        return "flash_attention_2"
    return "sdpa"


def _bert_attn_option() -> bool:
    import inspect

    from llmfoundry_lite.models.bert import build_mosaic_bert

    return "attn_impl" in inspect.signature(build_mosaic_bert).parameters


def _pair_result(pair: Any, info: dict, flops_per_token: Optional[float], peak: Optional[float]) -> dict:
    ours, hf = info["ours"], info["hf"]
    ratios = pair.per_round_ratio(ours, hf)
    models = {}
    for name in (ours, hf):
        tps = pair.tokens_per_s(name)
        mfu = tps * flops_per_token / peak if flops_per_token and peak else None
        models[name] = {"tokens_per_s": tps, "mfu": mfu}
    return {
        "shape": info["shape"],
        "models": models,
        "ratio": statistics.median(ratios),
        "per_round_ratios": ratios,
        "mfu": models[ours]["mfu"],
        "hf_mfu": models[hf]["mfu"],
    }


def step_bert(check: Check, impl: str) -> tuple[str, dict]:
    """MosaicBERT vs BertForMaskedLM, bf16 autocast, real tokens/s on real padded text."""
    mode = check.mode
    usable, why = flash_status(mode.device)
    if (
        impl == "flash" and not usable
    ):  # before our models import Composer: no flash-attn is a skip, not a failure
        raise Skip(why)
    import torch
    from transformers import BertForMaskedLM

    has_option = _bert_attn_option()
    if impl == "sdpa" and usable and not has_option:
        raise Skip(
            "mosaic_bert has no attn_impl option, so with flash-attn importable it cannot be forced to SDPA"
        )
    bm = _benchmark_module()
    if "bert_batches" not in check.context:
        check.context["bert_batches"] = bm.bert_batches(mode.bert, mode.rounds * mode.steps + 1)
    batches, pad_id = check.context["bert_batches"]
    pair, _, info = bm.bert_pair(
        mode.bert,
        batches,
        pad_id,
        device=mode.device,
        autocast=torch.bfloat16,
        attn_impl=impl if has_option else None,
        hf_attn=_hf_attn(BertForMaskedLM, impl),
    )
    pair.run(mode.rounds, mode.steps)
    res = _pair_result(pair, info, None, None)
    res["attn_impl"] = impl if has_option else f"auto ({'flash' if usable else 'sdpa'})"
    o, h = (res["models"][info[k]]["tokens_per_s"] for k in ("ours", "hf"))
    summary = (
        f"ours {o:,.0f} vs {info['hf']} {h:,.0f} real tok/s: {res['ratio']:.2f}x "
        f"(padding {info['padding']:.0%}, {mode.rounds} rounds)"
    )
    return summary, res


def step_llama(check: Check, impl: str) -> tuple[str, dict]:
    """Our LLaMA vs LlamaForCausalLM at the 1B shape, bf16 autocast: tokens/s and MFU."""
    mode = check.mode
    usable, why = flash_status(mode.device)
    if impl == "flash" and not usable:
        raise Skip(why)
    import torch
    from transformers import LlamaForCausalLM

    bm = _benchmark_module()
    pair, _, info = bm.llama_pair(
        mode.llama,
        n_batches=2,
        device=mode.device,
        autocast=torch.bfloat16,
        attn_impl=impl,
        hf_attn=_hf_attn(LlamaForCausalLM, impl),
    )
    pair.run(mode.rounds, mode.llama_steps)
    peak = check.context.get("peak")
    res = _pair_result(pair, info, info["flops_per_token"], peak)
    res["attn_impl"] = impl
    res["flops_per_token"] = info["flops_per_token"]
    o, h = (res["models"][info[k]]["tokens_per_s"] for k in ("ours", "hf"))
    mfu = (
        f"MFU {res['mfu']:.1%} vs {res['hf_mfu']:.1%}"
        if res["mfu"] is not None
        else "MFU n/a (no peak measured)"
    )
    summary = f"ours {o:,.0f} vs {info['hf']} {h:,.0f} tok/s: {res['ratio']:.2f}x; {mfu}"
    return summary, res


# ---------------------------------------------------------------------------------------------------------
# 3. quickstart data and Trainer runs
# ---------------------------------------------------------------------------------------------------------


def makefile_data_commands(makefile: Path = ROOT / "Makefile") -> dict[str, list[list[str]]]:
    """The ``llmfoundry-lite data ...`` lines of each quickstart target of the Makefile, as argument lists."""
    targets: dict[str, list[list[str]]] = {}
    current = None
    for line in makefile.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("\t"):
            head = line.split(":", 1)[0].strip()
            current = head if ":" in line and head in DATA_TARGETS else None
            continue
        if current and line.strip().startswith("llmfoundry-lite data "):
            targets.setdefault(current, []).append(shlex.split(line.strip()))
    if not targets:
        raise Failed(
            f"{makefile}: no `llmfoundry-lite data` lines under the targets {', '.join(DATA_TARGETS)}"
        )
    return targets


def _subprocess_env() -> dict:
    env = dict(os.environ)
    # Prepend: a --target site folder already on PYTHONPATH (the GPU image's wheels) must stay visible.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def step_data(check: Check, workdir: str) -> tuple[str, dict]:
    """Build the quickstart tokenizers and shards with the Makefile's commands, into ``workdir/data``.

    Each target's commands run in order (a conversion reads the tokenizer trained before it); the targets run
    side by side. ``llmfoundry-lite`` is run as ``python -m llmfoundry_lite.cli`` (the GPU image has the package
    on PYTHONPATH, not installed).
    """
    data = Path(workdir) / "data"
    procs = []
    for target, cmds in makefile_data_commands().items():
        argvs = [[sys.executable, "-m", "llmfoundry_lite.cli", *(a.replace(MAKE_DATA_VAR, str(data)) for a in c[1:])]
                 for c in cmds]  # fmt: skip
        script = " && ".join(shlex.join(a) for a in argvs)
        proc = subprocess.Popen(
            ["bash", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_subprocess_env(),
        )
        procs.append((target, cmds, proc))
    failures = []
    for target, _cmds, proc in procs:
        try:
            out, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        print(f"--- make {target} (data commands) ---\n{out}")
        if proc.returncode != 0:
            last = (out.strip().splitlines() or ["no output"])[-1]
            failures.append(f"the data commands of `make {target}` exited {proc.returncode}: {last}")
    if failures:
        raise Failed("; ".join(failures))
    check.context["data"] = str(data)
    commands = [shlex.join(c) for _, cmds, _ in procs for c in cmds]
    summary = (
        f"{len(commands)} `llmfoundry-lite data` commands of `make {' '.join(DATA_TARGETS)}` into {data}"
    )
    return summary, {"commands": commands, "folder": str(data)}


def quickstart_recipes() -> list[Path]:
    """The quickstart recipes, sorted."""
    return sorted((ROOT / "recipes" / "quickstart").glob("*.yaml"))


def recipe_overrides(
    recipe: Path, data: Path, workdir: Path, mode: Mode, fsdp: bool, compiled: bool = False
) -> list[str]:
    """Overrides that point a quickstart recipe at this check's data and folders, amp_bf16, FSDP, compile."""
    from llmfoundry_lite.recipe import compose

    raw, _ = compose(recipe)
    run_name = f"gpu-check-{recipe.stem}{'-fsdp' if fsdp else ''}{'-compiled' if compiled else ''}"
    out = []
    for key, value in (raw.get("variables") or {}).items():
        if isinstance(value, str) and value.startswith(RECIPE_DATA_PREFIX + "/"):
            out.append(f"variables.{key}={data / Path(value).relative_to(RECIPE_DATA_PREFIX)}")
    out += [
        f"run_name={run_name}",
        f"save_folder={workdir / 'runs' / '{run_name}' / 'checkpoints'}",
        f"save_interval={mode.batches_half}ba",
        f"eval_interval={mode.batches_half}ba",
        f"eval_subset_num_batches={mode.eval_batches}",
        "precision=amp_bf16",
        f"device={mode.recipe_device}",
        "autoresume=true",
        "console_log_interval=5ba",
    ]
    if fsdp:
        # As the shipped multi-GPU recipes set it (recipes/llama/1b.yaml), plus per-block activation checkpointing.
        out += [
            "fsdp.sharding_strategy=FULL_SHARD",
            "fsdp.mixed_precision=PURE",
            "fsdp.activation_checkpointing=true",
            "fsdp.state_dict_type=full",
        ]
    if compiled:  # torch.compile per block, inside the FSDP units and activation checkpointing
        out.append("compile=true")
    return out


def _fsdp_units(model: Any) -> tuple[int, int]:
    """(FSDP units, activation-checkpointed modules) inside a trained model."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    except ImportError:  # moved or removed in a future torch: count what can be counted
        CheckpointWrapper = ()  # noqa: N806
    units = sum(isinstance(m, FullyShardedDataParallel) for m in model.modules())
    ckpt = sum(isinstance(m, CheckpointWrapper) for m in model.modules()) if CheckpointWrapper else 0
    return units, ckpt


def step_train(
    check: Check, recipe_path: str, fsdp: bool, workdir_path: str, compiled: bool = False
) -> tuple[str, dict]:
    """Train half, checkpoint, resume to the full length through load_recipe + train, as `train` runs it."""

    from llmfoundry_lite import load_recipe
    from llmfoundry_lite.train import train

    mode = check.mode
    recipe, workdir = Path(recipe_path), Path(workdir_path)
    if check.context.get("data") is None:
        raise Failed("needs the quickstart data, whose step did not run")
    data = Path(check.context["data"])
    overrides = recipe_overrides(recipe, data, workdir, mode, fsdp, compiled)
    half, full = mode.batches_half, 2 * mode.batches_half
    cfg = load_recipe(str(recipe), [*overrides, f"max_duration={half}ba"])  # the fsdp block is validated too
    if fsdp and mode.device != "cuda":
        raise Skip("needs CUDA (FSDP shards across GPUs); the recipe with its fsdp block validated")

    trainer = train(cfg, str(recipe))
    first = _finite_loss(trainer, "first run")
    trainer.close()
    ckpt = Path(str(cfg.save_folder).replace("{run_name}", cfg.run_name))
    saved = sorted(p.name for p in ckpt.glob("ep*-ba*-rank0.pt"))
    if not saved:
        raise Failed(f"no checkpoint in {ckpt} after {half} batches with save_interval={half}ba")
    del trainer
    _free_memory()

    cfg2 = load_recipe(str(recipe), [*overrides, f"max_duration={full}ba"])
    tee = Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        trainer = train(cfg2, str(recipe))
    resumed = next((ln for ln in tee.getvalue().splitlines() if ln.startswith("resuming ")), None)
    batch = int(trainer.state.timestamp.batch)
    last = _finite_loss(trainer, "resumed run")
    details: dict[str, Any] = {
        "recipe": str(recipe.relative_to(ROOT)),
        "overrides": overrides,
        "checkpoint": saved[-1],
        "resumed": resumed,
        "batches": batch,
        "loss_after_half": first,
        "loss_at_end": last,
        "precision": str(trainer.state.precision.value),
        "device": str(trainer.state.device.name),
    }
    problems = []
    if resumed is None:
        problems.append(f"the second run did not resume from {saved[-1]} (no 'resuming' line)")
    if batch != full:
        problems.append(f"stopped at batch {batch}, expected {full}")
    if compiled:  # compile seconds, graphs, recompiles and graph breaks of the resumed run
        monitor = next((c for c in trainer.state.callbacks if type(c).__name__ == "CompileMonitor"), None)
        details["compile"] = monitor.stats() if monitor is not None else None
    if fsdp:
        n_layers = int(cfg2.model.n_layers)
        details["fsdp_enabled"] = bool(trainer.state.fsdp_enabled)
        details["fsdp_units"], details["checkpointed_modules"] = _fsdp_units(trainer.state.model)
        if not details["fsdp_enabled"]:
            problems.append("FSDP was not applied (the fsdp block was ignored on one GPU)")
        elif details["fsdp_units"] < n_layers:
            problems.append(
                f"FSDP wrapped {details['fsdp_units']} units for {n_layers} blocks (want one per block)"
            )
        elif details["checkpointed_modules"] < n_layers:
            problems.append(
                f"activation checkpointing wrapped {details['checkpointed_modules']} modules for {n_layers} blocks"
            )
    trainer.close()
    if problems:
        raise Failed("; ".join(problems))
    fsdp_text = (
        f", FSDP {details['fsdp_units']} units / {details['checkpointed_modules']} checkpointed"
        if fsdp
        else ""
    )
    summary = (
        f"{full} batches amp_bf16 on {details['device']}{fsdp_text}: checkpoint {saved[-1]}, resumed to batch "
        f"{batch}; loss {first:.3f} -> {last:.3f}"
    )
    return summary, details


def _finite_loss(trainer: Any, which: str) -> float:
    import math

    loss = trainer.state.loss
    value = float(loss.item() if hasattr(loss, "item") else loss)
    if not math.isfinite(value):
        raise Failed(f"the {which} ended with a non-finite loss ({value})")
    return value


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------

STEP_GROUPS = ("doctor", "peak", "throughput", "train")


def main(argv: Optional[list[str]] = None) -> int:
    """Parse arguments, run every step, print the table, write the JSON; return the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json", help="JSON report path (default: gpu_check.json)")
    ap.add_argument("--log", default=None, help="Log of every step's output (default: next to --out, .log)")
    ap.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="Tiny shapes on the CPU: the same code paths, in a minute or two",
    )
    ap.add_argument(
        "--only",
        default=None,
        help=f"Comma-separated step groups to run ({', '.join(STEP_GROUPS)}); default all",
    )
    ap.add_argument(
        "--llama-batch", type=int, default=4, help="Sequences of 2048 tokens per LLaMA-1B step (GPU)"
    )
    ap.add_argument(
        "--workdir", default=None, help="Keep data, checkpoints and runs here (default: a temp dir)"
    )
    ap.add_argument(
        "--step-timeout",
        type=float,
        default=None,
        help=f"Seconds any one step may run before it is stopped as hung (default by step: {STEP_LIMITS})",
    )
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # internal: answer pipe fd
    args = ap.parse_args(argv)

    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    groups = set(STEP_GROUPS if not args.only else (g.strip() for g in args.only.split(",") if g.strip()))
    unknown = groups - set(STEP_GROUPS)
    if unknown:
        print(f"error: --only: unknown step group(s) {', '.join(sorted(unknown))}; choose from {', '.join(STEP_GROUPS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        import torch
    except ImportError as e:
        print(
            f"error: torch is not importable ({e}); run with the interpreter that has torch", file=sys.stderr
        )
        return 2
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(
            "error: no CUDA device is visible (torch.cuda.is_available() is False); run on a GPU machine, "
            "or pass --cpu-dry-run for the CPU rehearsal",
            file=sys.stderr,
        )
        return 2
    if args.llama_batch <= 0:
        print(f"error: --llama-batch must be positive, got {args.llama_batch}", file=sys.stderr)
        return 2
    if args.step_timeout is not None and args.step_timeout <= 0:
        print(f"error: --step-timeout must be positive, got {args.step_timeout}", file=sys.stderr)
        return 2
    mode = cpu_dry_mode() if args.cpu_dry_run else gpu_mode(args.llama_batch)
    if args.step_timeout is not None:
        mode.limits = dict.fromkeys(mode.limits, args.step_timeout)
    out = Path(args.out).resolve()
    log = Path(args.log).resolve() if args.log else out.with_suffix(".log")
    if args.worker is not None:
        return worker_main(args.worker, mode, log, Path(args.workdir) if args.workdir else None)
    print(f"[gpu-check] {mode.name}: JSON -> {out}, step output -> {log}", flush=True)

    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        check = Check(mode, out, log, workdir)
        stack.callback(check.close)
        me = f"{Path(__file__).resolve()}:"
        if "doctor" in groups:
            check.run_isolated("doctor", me + "step_doctor")
        if not check.machine:
            check.machine.update(
                _machine(torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
            )
        if "peak" in groups or "throughput" in groups:  # MFU needs the peak
            check.run_isolated("peak", me + "step_peak")
        if "throughput" in groups:
            for impl in ("flash", "sdpa"):
                check.run_isolated(f"throughput bert {impl}", me + "step_bert", impl)
            for impl in ("flash", "sdpa"):
                check.run_isolated(f"throughput llama {impl}", me + "step_llama", impl)
        if "train" in groups:
            check.run_isolated("data", me + "step_data", str(workdir))
            for recipe in quickstart_recipes():
                for fsdp, compiled in ((False, False), (True, False), (True, True)):
                    name = f"train {recipe.stem}{' fsdp' if fsdp else ''}{' compiled' if compiled else ''}"
                    check.run_isolated(name, me + "step_train", str(recipe), fsdp, str(workdir), compiled)
        check.write_json()
        print("\n" + check.table(), flush=True)
    return 0 if check.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
