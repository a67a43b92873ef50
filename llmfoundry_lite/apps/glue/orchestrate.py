"""Running a GLUE recipe: plan the jobs, run them in rounds (MNLI first: RTE, MRPC and STS-B start from its
checkpoint), serially on CPU or one GPU, or one job per GPU in worker processes; then score and write results."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmfoundry_lite.apps.glue.config import TASK_ORDER, GlueConfig, Job, load_glue_recipe, plan_jobs
from llmfoundry_lite.apps.glue.data import prepare_task_data
from llmfoundry_lite.apps.glue.job import device_and_precision, run_job
from llmfoundry_lite.apps.glue.model import check_starting_weights
from llmfoundry_lite.apps.glue.results import results_markdown, summarize
from llmfoundry_lite.checkpoints import find_checkpoint
from llmfoundry_lite.procs import Processes

# What a worker process runs: `python -m llmfoundry_lite.apps.glue SPEC.json` (see __main__.py).
WORKER_MODULE = "llmfoundry_lite.apps.glue"


def _ready(spec: dict, mnli_checkpoint: str | None) -> dict | None:
    """The spec with its starting checkpoint filled in, or None while it still waits for the MNLI job."""
    if not spec.get("wait_for_mnli"):
        return spec
    return (
        None
        if mnli_checkpoint is None
        else {**spec, "init_checkpoint": mnli_checkpoint, "wait_for_mnli": False}
    )


def _run_serial(cfg: Any, glue: GlueConfig, specs: list[dict]) -> list[dict]:
    """Run job specs one after another in this process (CPU, or a single GPU)."""
    results, mnli_ckpt = [], None
    for spec in specs:  # the MNLI job that saves a checkpoint comes first
        spec = _ready(spec, mnli_ckpt)
        if spec is None:
            raise RuntimeError("a job waits for the MNLI checkpoint but no MNLI job produced one")
        job = Job(**spec["job"])
        result = run_job(
            cfg, glue, job, spec["job_dir"], spec["init_checkpoint"], save_checkpoint=spec["save_checkpoint"]
        )
        mnli_ckpt = result["checkpoint"] if spec["save_checkpoint"] else mnli_ckpt
        results.append(result)
    return results


def _run_parallel(recipe: str, overrides: Sequence[str], specs: list[dict], n_gpus: int) -> list[dict]:
    """Run job specs as worker processes (``python -m llmfoundry_lite.apps.glue SPEC.json``), one per GPU.

    A job that starts from the MNLI checkpoint is launched as soon as the MNLI job ends (not after the whole
    first round), so GPUs do not idle while long first-round tasks such as QQP finish. When a job fails, the
    others are stopped (a signal to this process stops them too) and the error shows the end of its log.
    """
    pending = list(specs)
    free = list(range(n_gpus))
    results: list[dict] = []
    mnli_ckpt: str | None = None
    with Processes() as procs:
        while pending or procs.running:
            while free:
                ready = next(
                    ((i, r) for i, sp in enumerate(pending) if (r := _ready(sp, mnli_ckpt)) is not None), None
                )
                if ready is None:
                    break
                spec = ready[1]
                del pending[ready[0]]
                gpu = free.pop(0)
                job_dir = Path(spec["job_dir"])
                job_dir.mkdir(parents=True, exist_ok=True)
                spec_file = job_dir / "job.json"
                spec_file.write_text(json.dumps({**spec, "recipe": recipe, "overrides": list(overrides)}))
                procs.start(
                    [sys.executable, "-m", WORKER_MODULE, str(spec_file)],
                    job_dir / "log.txt",
                    env={**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)},
                    tag=(gpu, spec),
                )
                print(
                    f"[glue {Job(**spec['job']).name}] started on GPU {gpu}; log {job_dir}/log.txt",
                    flush=True,
                )
            if not procs.running:
                raise RuntimeError("jobs wait for the MNLI checkpoint but no MNLI job produced one")
            for child in procs.wait_any():
                gpu, spec = child.tag
                free.append(gpu)
                result_file = Path(spec["job_dir"]) / "result.json"
                if child.returncode != 0 or not result_file.exists():
                    raise RuntimeError(
                        f"GLUE job {spec['job']['task']} seed {spec['job']['seed']} failed (exit "
                        f"{child.returncode}); log {child.log_path} ends with:\n{child.log_tail()}"
                    )
                result = json.loads(result_file.read_text())
                print(
                    f"[glue {Job(**spec['job']).name}] done in {result['seconds']:.0f} s: score {result['score']:.2f}",
                    flush=True,
                )
                if spec["save_checkpoint"]:
                    mnli_ckpt = result["checkpoint"]
                results.append(result)
    return results


def worker_main(spec_file: str) -> None:
    """Worker process entry: run one job spec written by _run_parallel."""
    spec = json.loads(Path(spec_file).read_text())
    cfg, glue = load_glue_recipe(spec["recipe"], spec["overrides"])
    run_job(
        cfg,
        glue,
        Job(**spec["job"]),
        spec["job_dir"],
        spec.get("init_checkpoint"),
        save_checkpoint=spec.get("save_checkpoint", False),
    )


def _job_specs(glue: GlueConfig, jobs: list[Job], out_dir: Path) -> list[dict]:
    """One spec per job, in the order to start them: MNLI first (others wait for it), then the rest of the first
    round, then the jobs that start from MNLI."""
    runs_mnli = any(j.task == "mnli" for j in jobs)
    first_mnli = next((j for j in jobs if j.task == "mnli"), None)
    specs = []
    for job in jobs:
        from_mnli = job.task in glue.start_from_mnli and job.task != "mnli"
        specs.append(
            {
                "job": dataclasses.asdict(job),
                "job_dir": str(out_dir / job.name),
                # Without an MNLI job in this run, an earlier run's MNLI checkpoint may be named instead.
                "init_checkpoint": glue.mnli_checkpoint if from_mnli and not runs_mnli else None,
                "wait_for_mnli": from_mnli and runs_mnli,
                "save_checkpoint": job is first_mnli and any(s for s in glue.start_from_mnli if s != "mnli"),
            }
        )
    specs.sort(key=lambda sp: (not sp["save_checkpoint"], sp["wait_for_mnli"]))
    return specs


def run_glue(
    recipe: str | os.PathLike,
    overrides: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    num_seeds: int | None = None,
    out: str | None = None,
    checkpoint: str | None = None,
    parallel: bool | None = None,
) -> dict[str, Any]:
    """Finetune and score a recipe's GLUE tasks; writes results.json and results.md into the output folder."""
    overrides = list(overrides or [])
    if checkpoint is not None:
        overrides.append(f"glue.checkpoint={checkpoint}")
    if out is not None:
        overrides.append(f"glue.output_dir={out}")
    cfg, glue = load_glue_recipe(recipe, overrides)
    jobs = plan_jobs(glue, tasks, num_seeds)
    check_starting_weights(cfg, glue)  # fail before any training
    if glue.mnli_checkpoint:
        glue.mnli_checkpoint = str(find_checkpoint(glue.mnli_checkpoint, key="glue.mnli_checkpoint"))
    prepare_task_data(glue, [j.task for j in jobs])
    out_dir = Path(glue.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    device, _ = device_and_precision(glue)
    n_gpus = torch.cuda.device_count() if device == "gpu" else 0
    specs = _job_specs(glue, jobs, out_dir)
    if (glue.parallel if parallel is None else parallel) and n_gpus > 1:
        runs = _run_parallel(str(recipe), overrides, specs, n_gpus)
    else:
        runs = _run_serial(cfg, glue, specs)
    runs.sort(key=lambda r: (TASK_ORDER.index(r["task"]), r["seed"]))
    summary = summarize(runs)
    summary["runs"] = runs
    summary["output_dir"] = str(out_dir)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "results.md").write_text(results_markdown(summary, runs))
    return summary
