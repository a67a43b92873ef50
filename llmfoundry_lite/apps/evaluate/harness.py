"""Scoring decoders on lm-evaluation-harness tasks: models in, lm-eval's results out, tables and files.

A Composer checkpoint of a ``llama`` run is rebuilt from the config it carries (as ``export`` does) and scored
through :class:`~llmfoundry_lite.apps.evaluate.adapter.DecoderLM`; a Hugging Face folder through lm-eval's own
``hf`` model (``HFLM``). Tasks are lm-eval's (its task manager knows the names), plus any task YAMLs in
``include_path``. Imports lm-eval only when called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from llmfoundry_lite import registry
from llmfoundry_lite.checkpoints import check_hf_folder
from llmfoundry_lite.errors import RecipeError, first_line, suggest

INSTALL_HINT = 'pip install -e ".[eval]"'
RESULTS_JSON = "eval.json"
RESULTS_MD = "eval.md"


def require_lm_eval(key: str = "lm_eval") -> None:
    """RecipeError naming the install command when lm-evaluation-harness is not installed (or cannot import)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        missing = "is not installed" if e.name == "lm_eval" else f"cannot be imported ({e})"
        raise RecipeError(f"lm-evaluation-harness {missing}; run: {INSTALL_HINT}", key=key) from None


def quiet_lm_eval() -> None:
    """lm-eval logs every task's setup at INFO and warns for each default it fills in: keep warnings only."""
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------


def split_tasks(tasks: str | Sequence[str], key: str = "--tasks") -> list[str]:
    """Task names from ``a,b`` or a list, empty entries dropped; RecipeError when none is left."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [str(t).strip() for t in names if str(t).strip()]
    if not names:
        raise RecipeError("give at least one task, e.g. hellaswag,arc_easy,piqa,lambada_openai", key=key)
    return names


def task_manager(
    tasks: Sequence[str],
    include_path: Optional[str] = None,
    key: str = "--tasks",
    include_key: str = "--include-path",
) -> Any:
    """lm-eval's TaskManager knowing every name in ``tasks``; RecipeError naming an unknown one.

    Indexing lm-eval's own ~15k task files takes seconds; tasks that all live in ``include_path`` skip it.
    """
    require_lm_eval(key)
    quiet_lm_eval()
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise RecipeError(f"no such folder {include_path!r} (task YAMLs to add)", key=include_key)
        local = _task_manager(str(Path(include_path).resolve()), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = _task_manager(
        str(Path(include_path).resolve()) if include_path else None, include_defaults=True
    )
    for t in tasks:
        if t not in manager.all_tasks and not Path(t).is_file():
            raise RecipeError(
                f"unknown lm-eval task {t!r}{suggest(t, manager.all_tasks)}; `lm-eval ls tasks` lists them, "
                f"and task YAMLs of your own go in a folder given as {include_key}",
                key=key,
            )
    return manager


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: Optional[str], include_defaults: bool) -> Any:
    """One TaskManager per folder set and process: indexing reads every task YAML (lm-eval's own: seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


def resolve_device(device: Optional[str], key: str = "--device") -> str:
    """``cpu`` or ``cuda`` (the default when a GPU is present)."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise RecipeError(f"unknown device {device!r}; choose cpu or cuda", key=key)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError("cuda requested but no GPU is visible; use --device cpu", key=key)
    return device


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face model folder (has a config.json) rather than a run's checkpoints."""
    return (Path(path) / "config.json").is_file()


def _refuse_encoder(model_state: Mapping[str, Any], recipe: Optional[Mapping[str, Any]], source: str) -> None:
    name = ((recipe or {}).get("model") or {}).get("name")
    keys = list(model_state)
    if getattr(registry.model_family(name), "encoder", False) or any(
        k.startswith("encoder.") or ".bert." in f".{k}" for k in keys
    ):
        raise RecipeError(
            f"{source} is a BERT encoder ({name or 'encoder weights'}), not a decoder: lm-eval's tasks score "
            "next-token likelihoods; evaluate an encoder with `llmfoundry-lite glue`",
            key="CHECKPOINT",
        )


def load_checkpoint_model(
    checkpoint: str | os.PathLike, tokenizer: Optional[str] = None, device: str = "cpu"
) -> tuple[Any, Any]:
    """(ComposerLlama in eval mode on ``device``, its tokenizer) rebuilt from a Composer checkpoint of a llama run."""
    import torch

    from llmfoundry_lite.apps.export import read_llama_checkpoint
    from llmfoundry_lite.models.llama import ComposerLlama

    ckpt = read_llama_checkpoint(
        checkpoint, tokenizer, check=lambda state, recipe: _refuse_encoder(state, recipe, str(checkpoint))
    )
    # attn_impl is an execution choice: the run's (flash on a GPU, say) may not serve fp32 scoring here.
    cfg, decoder_sd, tok = dataclasses.replace(ckpt.config, attn_impl="auto"), ckpt.weights, ckpt.tokenizer
    model = ComposerLlama(cfg, tok)
    try:
        model.model.load_state_dict(decoder_sd, strict=True)
    except RuntimeError as e:
        raise RecipeError(
            f"checkpoint weights do not match its llama config: {first_line(e)}", key="CHECKPOINT"
        ) from None
    return model.to(torch.device(device)).eval(), tok


def build_lm(
    path: str | os.PathLike, tokenizer: Optional[str] = None, device: str = "cpu", batch_size: int = 8
) -> Any:
    """The lm-eval ``LM`` for a Composer checkpoint (our adapter) or a Hugging Face folder (lm-eval's HFLM)."""
    require_lm_eval("CHECKPOINT")
    quiet_lm_eval()
    if not is_hf_folder(path):
        from llmfoundry_lite.apps.evaluate.adapter import DecoderLM

        model, tok = load_checkpoint_model(path, tokenizer, device)
        return DecoderLM(model, tok, batch_size=batch_size, device=device)
    config = (
        check_hf_folder(str(path), "CHECKPOINT") or {}
    )  # no weights, a bad index: one line, not a traceback
    if config.get("model_type") == "bert" or any("Bert" in a for a in config.get("architectures") or []):
        raise RecipeError(
            f"{str(path)!r} is a BERT encoder, not a decoder; evaluate an encoder with `llmfoundry-lite glue`",
            key="CHECKPOINT",
        )
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:  # lm-eval's `hf` model needs accelerate (our eval extra has it)
        raise RecipeError(
            f'lm-eval\'s hf model cannot load ({e}); run: pip install -e ".[eval]" (or pip install accelerate)',
            key="CHECKPOINT",
        ) from None
    try:
        return HFLM(
            pretrained=str(path), tokenizer=tokenizer, device=device, batch_size=batch_size, dtype="float32"
        )
    except Exception as e:  # a truncated weights file, a config transformers cannot build: the user's folder
        raise RecipeError(
            f"cannot load the Hugging Face folder {str(path)!r}: {type(e).__name__}: {first_line(e)}",
            key="CHECKPOINT",
        ) from None


# ---------------------------------------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------------------------------------


def run_tasks(
    lm: Any,
    tasks: Sequence[str],
    manager: Any,
    num_fewshot: Optional[int] = None,
    limit: Optional[int | float] = None,
    bootstrap_iters: int = 100_000,
    seed: bool = True,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` results dict (``results``, ``n-samples``, ``config`` ...), samples left out.

    ``seed=False`` leaves Python's, numpy's and torch's global random state as it was (lm-eval reseeds all three,
    and draws task ids from Python's), as a training run needs; few-shot sampling has its own seeded generator.
    """
    from lm_eval import simple_evaluate

    seeds = {} if seed else {"random_seed": None, "numpy_random_seed": None, "torch_random_seed": None}
    try:
        with contextlib.nullcontext() if seed else _random_state_kept():
            results = simple_evaluate(
                model=lm,
                tasks=list(tasks),
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=bootstrap_iters,
                **seeds,
            )
    except (ConnectionError, FileNotFoundError) as e:  # a task's data: not downloadable offline, or missing
        raise RecipeError(
            f"cannot load the data of {', '.join(tasks)}: {type(e).__name__}: {first_line(str(e))}; lm-eval "
            "downloads its tasks' data from the Hugging Face Hub (run once with internet to cache it), and a "
            "local task's data_files are relative to the working directory",
            key="--tasks",
        ) from None
    return results or {}


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """Restore Python's, numpy's and torch's (CPU and, when in use, CUDA) random state on exit."""
    import random

    import numpy as np
    import torch

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def metric_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric): ``{task, metric, value, stderr, n}`` from lm-eval's results dict."""
    rows = []
    n_samples = results.get("n-samples") or {}
    for task, metrics in (results.get("results") or {}).items():
        n = (n_samples.get(task) or {}).get("effective")
        for name, value in metrics.items():
            if "," not in name or "_stderr" in name or not isinstance(value, (int, float)):
                continue
            metric, _, filt = name.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(
                {
                    "task": task,
                    "metric": metric if filt == "none" else f"{metric} ({filt})",
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                    "n": n,
                }
            )
    return rows


def log_name(row: Mapping[str, Any]) -> str:
    """``eval/<task>/<metric>``: the metric name the training callback logs; ``eval/k4/<task>/<metric>`` for a
    row scored at a chosen SMoE-Dropout k (as training's ``eval_k`` names its evaluators)."""
    k = f"k{row['k']}/" if row.get("k") is not None else ""
    return f"eval/{k}{row['task']}/{row['metric'].replace(' ', '')}"


def _fmt(x: Optional[float]) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def results_markdown(summary: Mapping[str, Any]) -> str:
    """The results as a markdown table (task, metric, value, stderr, n), with what was scored and how."""
    shots, limit, ks = summary.get("num_fewshot"), summary.get("limit"), summary.get("k")
    per_k = f" · SMoE-Dropout k: {', '.join(map(str, ks))}" if ks else ""
    lines = [
        f"# lm-eval results: {summary['model']}",
        "",
        f"num_fewshot: {'task default' if shots is None else shots} · "
        f"limit: {'none' if limit is None else f'{limit} per task'}{per_k} · "
        f"lm-eval {summary.get('lm_eval_version')}",
        "",
        ("| k " if ks else "") + "| task | metric | value | ± stderr | n |",
        ("|---:" if ks else "") + "|---|---|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        lines.append(
            (f"| {r['k']} " if ks else "")
            + f"| {r['task']} | {r['metric']} | {_fmt(r['value'])} | {_fmt(r['stderr'])} | {r['n'] or ''} |"
        )
    return "\n".join(lines) + "\n"


def default_out_dir(path: str | os.PathLike) -> Path:
    """Where results go without --out: next to the checkpoint (its folder), or ``./eval`` for a HF folder."""
    p = Path(path)
    if is_hf_folder(p):
        return Path("eval")
    return p if p.is_dir() else p.parent


def _chosen_k(path: str | os.PathLike, k: Optional[str | Sequence[int]]) -> Optional[list[int]]:
    """``--k`` as a list (None when not given); a Hugging Face folder cannot take it (it has no experts)."""
    if k is None:
        return None
    from llmfoundry_lite.models.ffn import parse_k_list

    ks = parse_k_list(k) if isinstance(k, str) else list(dict.fromkeys(int(x) for x in k))
    if is_hf_folder(path):
        raise RecipeError(
            f"{str(path)!r} is a Hugging Face folder, whose FFNs are dense (export refuses SMoE-Dropout models); "
            "give the run's Composer checkpoint to choose its experts per token",
            key="--k",
        )
    return ks


def evaluate(
    path: str | os.PathLike,
    tasks: str | Sequence[str],
    num_fewshot: Optional[int] = None,
    limit: Optional[int] = None,
    batch_size: int = 8,
    device: Optional[str] = None,
    tokenizer: Optional[str] = None,
    include_path: Optional[str] = None,
    out: Optional[str | os.PathLike] = None,
    k: Optional[str | Sequence[int]] = None,
) -> dict[str, Any]:
    """Score a checkpoint or HF folder on lm-eval tasks; write eval.json and eval.md; return the summary.

    ``k`` (``"1,4,16"`` or a list): score an SMoE-Dropout checkpoint once per k; each row then carries its ``k``,
    and ``results`` / ``n-samples`` are lm-eval's per ``k<k>`` label. None: the checkpoint's ``model.ffn.k``.
    """
    require_lm_eval("CHECKPOINT")
    if not Path(path).exists():
        raise RecipeError(
            f"no such checkpoint or model folder {str(path)!r}; give a Composer checkpoint (.pt), a run's "
            "checkpoint folder, or an exported Hugging Face folder",
            key="CHECKPOINT",
        )
    if batch_size < 1:
        raise RecipeError(f"must be >= 1, got {batch_size}", key="--batch-size")
    if limit is not None and limit < 1:
        raise RecipeError(f"must be >= 1 (examples per task), got {limit}", key="--limit")
    if num_fewshot is not None and num_fewshot < 0:
        raise RecipeError(f"must be >= 0, got {num_fewshot}", key="--num-fewshot")
    ks = _chosen_k(path, k)
    names = split_tasks(tasks)
    manager = task_manager(names, include_path)  # before loading any model: a typo fails in seconds
    lm = build_lm(path, tokenizer, resolve_device(device), batch_size)
    if ks:
        from llmfoundry_lite.models.ffn import choose_active_experts

        for one in ks:  # every k checked before the first is scored
            choose_active_experts(lm.model, one, str(path))
        runs = {}
        for one in ks:
            choose_active_experts(lm.model, one, str(path))
            runs[one] = run_tasks(lm, names, manager, num_fewshot, limit)
        rows = [{"k": one, **row} for one, r in runs.items() for row in metric_rows(r)]
        results = {
            key: {f"k{one}": r.get(key, {}) for one, r in runs.items()} for key in ("results", "n-samples")
        }
        results |= {key: runs[ks[-1]].get(key, {}) for key in ("versions", "n-shot")}  # the same for every k
    else:
        results = run_tasks(lm, names, manager, num_fewshot, limit)
        rows = metric_rows(results)
    import lm_eval

    summary = {
        "model": str(path),
        "kind": "hf" if is_hf_folder(path) else "checkpoint",
        "tasks": names,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "k": ks,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "rows": rows,
        "results": results.get("results", {}),
        "n-samples": results.get("n-samples", {}),
        "versions": results.get("versions", {}),
        "n-shot": results.get("n-shot", {}),
    }
    out_dir = Path(out) if out is not None else default_out_dir(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_JSON).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out_dir / RESULTS_MD).write_text(results_markdown(summary))
    summary["output_dir"] = str(out_dir)
    return summary
