"""`llmfoundry-lite estimate`: parameters, training FLOPs, wall time, GPU-hours and dollars of a recipe.

Training FLOPs per token come from the model itself (``flops_per_batch`` of a synthetic full-length batch on the
meta device: nothing is allocated, nothing downloaded). For the built-in models that is

    6 * N_matmul  +  12 * n_layers * d_model * seq_len        (forward + backward = 3 x forward)

where N_matmul counts the weights every token multiplies (transformer blocks; for decoders also the LM head),
and the second term is attention's QK^T and AV (not halved for causal masks, as in PaLM and BENCHMARKS.md).
MosaicBERT's MLM head (d*d transform + d*vocab decoder) runs only on masked tokens, so it is weighted by the
recipe's ``mlm_probability``. Every sequence is assumed full-length (an upper bound for padded MLM data).

Wall time = total FLOPs / (GPUs x peak FLOP/s x MFU); the MFU is assumed (``--mfu``, default 0.4), measured
(``--measure``: a few real training steps on this machine), or implied by ``--hours``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from llmfoundry_lite import hardware
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.recipe import section
from llmfoundry_lite.recipe import sequence_length as recipe_sequence_length

DEFAULT_MFU = 0.40
DEFAULT_GPU = "a100-80gb"
DEFAULT_GPUS = 8


@dataclass
class Estimate:
    """Everything `estimate` prints; ``--json`` prints this as one object."""

    recipe: Optional[str]
    model: str
    params: int
    non_embedding_params: int
    flops_per_token: float
    flops_source: str
    seq_len: int
    global_batch_size: int
    mlm_probability: Optional[float]
    tokens: int
    tokens_from: str
    total_flops: float
    gpu: str
    gpus: int
    peak_flops_per_gpu: float
    peak_source: str
    mfu: float
    mfu_source: str
    hours: float
    gpu_hours: float
    usd_per_gpu_hour: float
    usd: float
    measured: Optional[dict] = None
    assumptions: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Model: built on the meta device
# ---------------------------------------------------------------------------------------------------------


def _block(cfg: Any, name: str) -> Any:
    return section(cfg, name)


def mlm_probability(cfg: Any) -> Optional[float]:
    """The train collator's masking rate, or None for non-MLM recipes."""
    loader = _block(cfg, "train_loader") or {}
    collator = loader.get("collator") or {}
    p = collator.get("mlm_probability") if isinstance(collator, dict) else None
    return float(p) if p is not None else None


def sequence_length(cfg: Any) -> int:
    """Training sequence length, read where training reads it (:func:`llmfoundry_lite.recipe.sequence_length`)."""
    seq = recipe_sequence_length(cfg)
    if seq is None:
        raise RecipeError("the recipe sets no sequence length; add max_seq_len", key="max_seq_len")
    return seq


def flops_per_token(model: Any, seq_len: int, mlm_p: Optional[float]) -> tuple[float, str]:
    """Training FLOPs per token of full-length sequences: from ``model.flops_per_batch``, else from shapes."""
    import torch

    from llmfoundry_lite.batch import IGNORE_INDEX
    from llmfoundry_lite.models.accounting import TransformerFlops, layer_shape, model_flops, parameter_counts
    from llmfoundry_lite.models.ffn import mean_k, schedule_average, smoe_config

    ids = torch.zeros((1, seq_len), dtype=torch.long)
    mask = torch.ones_like(ids)
    # SMoE-Dropout: FLOPs follow the experts active at each step's k, averaged over the run's schedule.
    every = schedule_average(
        model, lambda: model_flops(model, {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
    )
    if every is not None:
        if mlm_p is not None:
            # flops_per_batch is affine in the number of labelled (masked) tokens: interpolate exactly.
            none = schedule_average(
                model,
                lambda: model_flops(
                    model,
                    {"input_ids": ids, "attention_mask": mask, "labels": torch.full_like(ids, IGNORE_INDEX)},
                ),
            )
            every = none + mlm_p * (every - none)
        smoe = smoe_config(model)
        if smoe is not None:
            source = (
                f"model.flops_per_batch at the run's mean k {mean_k(smoe):.1f} of {smoe.n_experts} experts"
            )
            return every / seq_len, source
        return every / seq_len, "model.flops_per_batch"
    _, non_emb = parameter_counts(model)
    shape = TransformerFlops(non_emb, *layer_shape(model))
    return shape.per_token(seq_len), "shapes: 6N + 12*L*d*seq"


# ---------------------------------------------------------------------------------------------------------
# Tokens from max_duration
# ---------------------------------------------------------------------------------------------------------


def samples_in_split(cfg: Any) -> Optional[int]:
    """Samples in the train split's local MDS index (``<local>/<split>/index.json``), if present."""
    loader = _block(cfg, "train_loader") or {}
    if loader.get("streams"):  # a mixture: the epoch streaming draws from its streams
        from llmfoundry_lite.data.mixture import stream_blocks

        blocks = stream_blocks(loader["streams"], "train_loader.streams")
        return _mixture_epoch_size(blocks, loader.get("epoch_size"), loader.get("shuffle_seed", 9176))
    local, split = loader.get("local"), loader.get("split")
    if not local:
        return None
    for folder in ([Path(local) / split] if split else []) + [Path(local)]:
        index = folder / "index.json"
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                return sum(int(s.get("samples", 0)) for s in json.load(f).get("shards", []))
    return None


def _mixture_epoch_size(
    blocks: Mapping[str, Mapping[str, Any]], epoch_size: Optional[int] = None, seed: int = 9176
) -> Optional[int]:
    """Samples one epoch of the mixture draws, by streaming's own weighting; None when a stream has no local index."""
    import numpy as np
    from streaming import Stream

    from llmfoundry_lite.data.loaders import read_index, split_dir
    from llmfoundry_lite.data.mixture import make_streams

    counts = []
    for block in blocks.values():
        folder = block.get("remote") or block.get("local")
        if not folder or "://" in str(folder):
            return None
        try:
            index = read_index(split_dir(os.path.expanduser(str(folder)), block.get("split")))
        except RecipeError:
            return None
        counts.append(sum(int(shard.get("samples", 0)) for shard in index.get("shards", [])))
    streams = make_streams(blocks)
    return int(Stream.apply_weights(streams, np.array(counts, np.int64), epoch_size, seed))


def training_tokens(cfg: Any, seq_len: int, samples_per_epoch: Optional[int] = None) -> tuple[int, str]:
    """(tokens, explanation) the run trains on, from ``max_duration``, the global batch and ``seq_len``."""
    from composer.core import Time, TimeUnit

    md = cfg.get("max_duration")
    gbs = int(cfg.get("global_train_batch_size"))
    t = Time.from_input(md, TimeUnit.EPOCH) if not isinstance(md, str) else Time.from_timestring(md)
    v = t.value
    if t.unit == TimeUnit.TOKEN:
        return int(v), f"max_duration {md}"
    if t.unit == TimeUnit.SAMPLE:
        return int(v) * seq_len, f"{int(v):,} samples x {seq_len} (max_duration {md})"
    if t.unit == TimeUnit.BATCH:
        return int(v) * gbs * seq_len, f"{int(v):,} batches x {gbs} x {seq_len} (max_duration {md})"
    if t.unit == TimeUnit.EPOCH:
        n = samples_per_epoch or samples_in_split(cfg)
        if not n:
            raise RecipeError(
                f"max_duration {md!r} is in epochs and the dataset size is unknown here (no local index.json); "
                "pass --samples-per-epoch N or override max_duration with batches/samples/tokens "
                "(e.g. max_duration=70000ba)",
                key="max_duration",
            )
        return int(v * n) * seq_len, f"{v} epochs x {n:,} samples x {seq_len} (max_duration {md})"
    raise RecipeError(
        f"cannot turn max_duration {md!r} into tokens; use ba, sp, tok or ep", key="max_duration"
    )


# ---------------------------------------------------------------------------------------------------------
# Measuring: a few real training steps on this machine
# ---------------------------------------------------------------------------------------------------------


def measure_throughput(cfg: Any, steps: int = 4, peak_flops: Optional[float] = None) -> dict:
    """Train ``steps`` (+1 warm-up) batches of the recipe here; return tokens/s, FLOP/s and MFU of one device."""
    from composer.core import Callback

    from llmfoundry_lite import bench
    from llmfoundry_lite.batch import batch_tokens
    from llmfoundry_lite.models.accounting import model_flops
    from llmfoundry_lite.train import build_trainer

    if steps < 1:
        raise RecipeError(f"--measure-steps must be at least 1, got {steps}", key="--measure-steps")

    class _Timer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.flops: list[float] = []
            self.tokens: list[int] = []

        def batch_end(self, state: Any, logger: Any) -> None:  # noqa: D102
            self.times.append(time.perf_counter())
            self.tokens.append(batch_tokens(state.batch).tokens)
            self.flops.append(model_flops(state.model, state.batch) or 0.0)

    c = cfg.copy()
    run_name = f"estimate-measure-{os.getpid()}-{int(time.time())}"
    for key, value in {
        "max_duration": f"{steps + 1}ba",
        "eval_loader": None,
        "loggers": None,
        "callbacks": None,
        "save_folder": None,
        "load_path": None,
        "autoresume": False,
        "eval_first": False,
        "log_to_console": False,
        "progress_bar": False,
        "run_name": run_name,
    }.items():
        c[key] = value
    run_dir = Path("runs") / run_name
    timer = _Timer()
    try:
        trainer = build_trainer(c)
        trainer.state.callbacks.append(timer)
        trainer.fit()
        device = "gpu" if trainer.state.device.name == "gpu" else "cpu"
        trainer.close()
    finally:
        if run_dir.is_dir():  # build_trainer writes the resolved recipe there; it is not a run to keep
            shutil.rmtree(run_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                run_dir.parent.rmdir()
    if len(timer.times) < 2:
        raise RecipeError("the measurement run ended before two batches finished", key="max_duration")
    seconds = timer.times[-1] - timer.times[0]  # batch 1 is the warm-up
    tokens_per_s = sum(timer.tokens[1:]) / seconds
    flops_per_s = sum(timer.flops[1:]) / seconds
    peak, kind, source = bench.device_peak(device, peak_flops)
    return {
        "device": kind,
        "steps": len(timer.times) - 1,
        "seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "flops_per_s": flops_per_s,
        "peak_flops": peak,
        "peak_source": source,
        "mfu": flops_per_s / peak if peak else None,
    }


# ---------------------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------------------


def estimate(
    cfg: Any,
    recipe: Optional[str] = None,
    *,
    gpu: Optional[str] = None,
    gpus: Optional[int] = None,
    usd_per_gpu_hour: Optional[float] = None,
    mfu: Optional[float] = None,
    hours: Optional[float] = None,
    peak_flops: Optional[float] = None,
    measure: bool = False,
    measure_steps: int = 4,
    samples_per_epoch: Optional[int] = None,
) -> Estimate:
    """Estimate a validated recipe's training cost; CLI arguments win over the recipe's ``cost:`` block."""
    if sum(x is not None and x is not False for x in (mfu, hours, measure or None)) > 1:
        raise RecipeError("give at most one of --mfu, --measure and --hours", key="--mfu")
    if mfu is not None and not 0 < mfu <= 1:
        raise RecipeError(f"--mfu must be in (0, 1], got {mfu}", key="--mfu")
    if gpus is not None and gpus <= 0:
        raise RecipeError(f"--gpus must be positive, got {gpus}", key="--gpus")
    if hours is not None and hours <= 0:
        raise RecipeError(f"--hours must be positive, got {hours}", key="--hours")
    cost = hardware.parse_cost(cfg.get("cost"))
    assumptions: list[str] = []

    from llmfoundry_lite.models.accounting import parameter_counts
    from llmfoundry_lite.train.meta import build_meta_model

    model = build_meta_model(cfg)
    total, non_emb = parameter_counts(model)
    seq = sequence_length(cfg)
    p_mlm = mlm_probability(cfg)
    fpt, fsource = flops_per_token(model, seq, p_mlm)
    tokens, tokens_from = training_tokens(cfg, seq, samples_per_epoch)
    total_flops = fpt * tokens
    if p_mlm is not None:
        assumptions.append(
            f"MLM head on {p_mlm:.0%} of tokens (train collator mlm_probability); sequences full-length"
        )

    measured = measure_throughput(cfg, measure_steps, peak_flops or cost.peak_flops) if measure else None

    # Hardware: CLI > recipe's cost block > (measured device) > A100-80GB.
    from_cli = gpu is not None
    kind = hardware.normalize(gpu or cost.gpu or (measured["device"] if measured else DEFAULT_GPU))
    recipe_applies = not from_cli or (cost.gpu is not None and hardware.normalize(cost.gpu) == kind)
    n = gpus or cost.gpus or (1 if kind == hardware.CPU else DEFAULT_GPUS)
    if gpus is None and cost.gpus is None and kind != hardware.CPU:
        assumptions.append(f"{DEFAULT_GPUS} GPUs (one node); pass --gpus")
    peak_given = peak_flops or (cost.peak_flops if recipe_applies else None)
    if kind == hardware.CPU:
        price = hardware.CPU_USD_PER_HOUR
        if peak_given:
            peak, psource = float(peak_given), "given"
        elif measured and measured["device"] == hardware.CPU:
            peak, psource = measured["peak_flops"], measured["peak_source"]
        else:
            from llmfoundry_lite import bench

            peak, psource = bench.matmul_peak(), "measured (2048x2048 fp32 matmul)"
    else:
        entry = hardware.lookup(kind, cost.hardware, key="--gpu" if from_cli else "cost.gpu")
        peak, psource = (float(peak_given), "given") if peak_given else (entry.peak_flops, "dense bf16 table")
        price = entry.usd_per_gpu_hour
    if usd_per_gpu_hour is not None:
        price = usd_per_gpu_hour
    elif cost.usd_per_gpu_hour is not None and recipe_applies:
        price = cost.usd_per_gpu_hour
    else:
        assumptions.append(f"${price:.2f} per {kind}-hour (default); pass --usd-per-gpu-hour")

    if hours is not None:
        wall = hours * 3600.0
        used_mfu, msource = total_flops / (wall * n * peak), "implied by --hours"
    else:
        if measured is not None:
            if measured["device"] == kind and measured["flops_per_s"] > 0:
                # Same kind of device: measured FLOP/s per device, assumed to scale linearly with devices.
                used_mfu, msource = measured["flops_per_s"] / peak, f"measured on this {kind}"
            elif measured["mfu"]:
                used_mfu, msource = (
                    measured["mfu"],
                    f"measured on this {measured['device']}, applied to {kind}",
                )
            else:
                raise RecipeError(
                    "could not measure FLOP/s here (model has no flops_per_batch)", key="--measure"
                )
        elif mfu is not None:
            used_mfu, msource = mfu, "given"
        elif cost.mfu is not None:
            used_mfu, msource = cost.mfu, "recipe cost.mfu"
        else:
            used_mfu, msource = DEFAULT_MFU, "assumed"
            assumptions.append(f"MFU {DEFAULT_MFU:.0%}; pass --mfu or --measure")
        wall = total_flops / (n * peak * used_mfu)

    h = wall / 3600.0
    return Estimate(
        recipe=recipe,
        model=str((_block(cfg, "model") or {}).get("name")),
        params=int(total),
        non_embedding_params=int(non_emb),
        flops_per_token=float(fpt),
        flops_source=fsource,
        seq_len=seq,
        global_batch_size=int(cfg.get("global_train_batch_size")),
        mlm_probability=p_mlm,
        tokens=int(tokens),
        tokens_from=tokens_from,
        total_flops=float(total_flops),
        gpu=kind,
        gpus=int(n),
        peak_flops_per_gpu=float(peak),
        peak_source=psource,
        mfu=float(used_mfu),
        mfu_source=msource,
        hours=h,
        gpu_hours=h * n,
        usd_per_gpu_hour=float(price),
        usd=h * n * price,
        measured=measured,
        assumptions=assumptions,
    )


# ---------------------------------------------------------------------------------------------------------
# Output and CLI
# ---------------------------------------------------------------------------------------------------------


def _si(x: float, unit: str = "") -> str:
    for div, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.1f} s"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    if hours < 48:
        return f"{hours:.2f} h"
    return f"{hours:.1f} h ({hours / 24:.1f} days)"


def format_text(e: Estimate) -> str:
    """The human-readable report."""
    rows = [
        ("recipe", f"{e.recipe or '-'} (model {e.model})"),
        ("parameters", f"{e.params:,} ({_si(e.params)}); non-embedding {e.non_embedding_params:,}"),
        (
            "FLOPs/token",
            f"{_si(e.flops_per_token)} training (fwd+bwd), seq {e.seq_len}, from {e.flops_source}",
        ),
        ("tokens", f"{_si(e.tokens)} = {e.tokens_from}"),
        ("total FLOPs", f"{e.total_flops:.3e}"),
        (
            "hardware",
            f"{e.gpus} x {e.gpu}, peak {_si(e.peak_flops_per_gpu, 'FLOP/s')} each ({e.peak_source})",
        ),
        ("MFU", f"{e.mfu:.1%} ({e.mfu_source})"),
        ("wall time", _duration(e.hours)),
        ("GPU-hours", f"{e.gpu_hours:,.2f}"),
        ("cost", f"${e.usd:,.2f} at ${e.usd_per_gpu_hour:.2f} per device-hour"),
    ]
    if e.measured:
        m = e.measured
        mfu = f", MFU {m['mfu']:.1%}" if m.get("mfu") else ""
        rows.insert(
            6,
            (
                "measured",
                f"{m['tokens_per_s']:,.0f} tok/s, {_si(m['flops_per_s'], 'FLOP/s')} on {m['device']} over "
                f"{m['steps']} steps{mfu} (peak {_si(m['peak_flops'], 'FLOP/s')}, {m['peak_source']})",
            ),
        )
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"{'assumes'.ljust(width)}  {a}" for a in e.assumptions]
    return "\n".join(lines)


def to_json(e: Estimate) -> str:
    """One JSON object (numbers as numbers; NaN-free)."""
    data = asdict(e)
    return json.dumps(
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}
    )


def register_cli(app: Any) -> None:
    """Add ``llmfoundry-lite estimate``."""
    import typer

    @app.command("estimate")
    def estimate_cmd(
        recipe: str = typer.Argument(..., help="Path to the recipe YAML."),
        overrides: Optional[list[str]] = typer.Argument(None, help="Overrides: max_duration=10000ba ..."),
        gpu: Optional[str] = typer.Option(
            None, "--gpu", help="Accelerator: a100-80gb, h100-sxm, h200, l4, cpu..."
        ),
        gpus: Optional[int] = typer.Option(None, "--gpus", help="Number of devices (default 8; 1 for cpu)."),
        usd_per_gpu_hour: Optional[float] = typer.Option(
            None, "--usd-per-gpu-hour", help="Price per device-hour."
        ),
        mfu: Optional[float] = typer.Option(
            None, "--mfu", help="Assumed model FLOPs utilisation (default 0.4)."
        ),
        measure: bool = typer.Option(False, "--measure", help="Time a few real training steps here instead."),
        measure_steps: int = typer.Option(
            4, "--measure-steps", help="Timed steps for --measure (+1 warm-up)."
        ),
        hours: Optional[float] = typer.Option(
            None, "--hours", help="Known wall time: report cost and implied MFU."
        ),
        peak_flops: Optional[float] = typer.Option(None, "--peak-flops", help="Per-device peak FLOP/s."),
        samples_per_epoch: Optional[int] = typer.Option(
            None, "--samples-per-epoch", help="For max_duration in ep."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """Parameters, training FLOPs, wall time, GPU-hours and dollars of a recipe."""
        from llmfoundry_lite.recipe import load_recipe

        cfg = load_recipe(recipe, list(overrides or []))
        est = estimate(
            cfg,
            recipe,
            gpu=gpu,
            gpus=gpus,
            usd_per_gpu_hour=usd_per_gpu_hour,
            mfu=mfu,
            hours=hours,
            peak_flops=peak_flops,
            measure=measure,
            measure_steps=measure_steps,
            samples_per_epoch=samples_per_epoch,
        )
        typer.echo(to_json(est) if as_json else format_text(est))
