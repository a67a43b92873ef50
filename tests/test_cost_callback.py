"""The `cost_monitor` callback: MFU, tokens/s, GPU-hours and dollars logged during a real (tiny) run."""

from __future__ import annotations

from pathlib import Path

import pytest
from composer.loggers import InMemoryLogger
from omegaconf import OmegaConf

from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.recipe import load_recipe
from llmfoundry_lite.train import train
from llmfoundry_lite.train.callbacks.cost import METRICS, CostMonitor, apply_recipe_cost

QUICKSTART = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")


def series(mem: InMemoryLogger, key: str) -> list[float]:
    """Logged values of one metric, in order."""
    return [float(v) for _, v in mem.data.get(key, [])]


def test_cost_monitor_logs_mfu_throughput_and_dollars(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run folder (resolved recipe) lands here, not in the checkout
    overrides = tiny_bert(run_name="cost", max_duration="5ba", save_folder="null") + [
        "callbacks.cost_monitor.window_size=2",
        "callbacks.cost_monitor.usd_per_gpu_hour=3.6",
        "callbacks.cost_monitor.peak_flops=1.0e9",  # a given peak: no matmul measurement, exact MFU check
        "loggers.inmemory={}",
    ]
    trainer = train(load_recipe(QUICKSTART, overrides))
    mem = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    for key in METRICS:
        assert len(series(mem, key)) == 5, key  # every batch, to every logger
    hp = mem.hyperparameters
    assert (
        hp["cost/device"] == "cpu"
        and hp["cost/peak_flops_per_device"] == 1e9
        and hp["cost/peak_source"] == "given"
    )
    mfu, fps, tps = (
        series(mem, "cost/mfu"),
        series(mem, "cost/flops_per_sec"),
        series(mem, "cost/tokens_per_sec"),
    )
    assert all(t > 0 for t in tps) and all(f > 0 for f in fps)
    assert mfu == pytest.approx([f / 1e9 for f in fps])
    # Model FLOPs per token are those of the model's own flops_per_batch: about 6 x trunk params per token.
    assert 1e3 < fps[-1] / tps[-1] < 1e8
    gpu_hours, usd = series(mem, "cost/gpu_hours"), series(mem, "cost/usd")
    assert gpu_hours == sorted(gpu_hours) and gpu_hours[0] > 0
    assert usd == pytest.approx([h * 3.6 for h in gpu_hours])
    projected, hours_projected = series(mem, "cost/usd_projected"), series(mem, "cost/hours_projected")
    assert projected == pytest.approx([h * 3.6 for h in hours_projected])
    # At the last batch the run is done: the projection equals what was spent (within the eval bookkeeping).
    assert projected[-1] == pytest.approx(usd[-1], rel=0.35)
    assert all(p >= u * 0.99 for p, u in zip(projected, usd))


def test_recipe_cost_block_fills_unset_callback_arguments():
    cfg = OmegaConf.create(
        {"cost": {"gpu": "my-gpu", "usd_per_gpu_hour": 1.25, "hardware": {"my-gpu": {"peak_flops": 5.0e14}}}}
    )
    explicit, default = CostMonitor(usd_per_gpu_hour=9.0), CostMonitor()
    apply_recipe_cost(cfg, [explicit, default, object()])
    assert (default.gpu, default.usd_per_gpu_hour) == ("my-gpu", 1.25)
    assert default.hardware == {"my-gpu": {"peak_flops": 5.0e14}}
    assert explicit.usd_per_gpu_hour == 9.0  # the callback's own argument wins
    added: list = []
    apply_recipe_cost(cfg, added)  # a cost: block alone adds the monitor
    assert len(added) == 1 and isinstance(added[0], CostMonitor) and added[0].usd_per_gpu_hour == 1.25
    none: list = []
    apply_recipe_cost(OmegaConf.create({"seed": 1}), none)
    assert none == []
    with pytest.raises(RecipeError, match="cost.hardware.x.peak_flop: unknown key .*peak_flops"):
        apply_recipe_cost(OmegaConf.create({"cost": {"hardware": {"x": {"peak_flop": 1}}}}), [default])


def test_cost_monitor_arguments_are_validated(tiny_bert):
    with pytest.raises(RecipeError, match="callbacks.cost_monitor.usd_per_hour"):
        load_recipe(QUICKSTART, tiny_bert() + ["callbacks.cost_monitor.usd_per_hour=2"])
    with pytest.raises(RecipeError, match="window_size"):
        CostMonitor(window_size=0)


def test_cpu_run_of_a_gpu_recipe_measures_the_cpu_and_bills_nothing(tiny_bert, tmp_path, capsys):
    """A recipe priced for 8 A100s (its cost: block), trained on this CPU: MFU against the CPU's measured peak,
    tokens/s, and no dollars (the A100's price does not bill a CPU run)."""
    overrides = tiny_bert(run_name="cpu-cost", max_duration="3ba", save_folder="null") + [
        "cost.gpu=a100-80gb",
        "cost.usd_per_gpu_hour=4.0",
        "loggers.inmemory={}",
    ]
    trainer = train(load_recipe(QUICKSTART, overrides))
    mem = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    hp = mem.hyperparameters
    assert (
        hp["cost/device"] == "cpu"
        and hp["cost/peak_source"] != "table"
        and hp["cost/usd_per_device_hour"] == 0
    )
    assert series(mem, "cost/tokens_per_sec") and 0 < series(mem, "cost/mfu")[-1] < 1
    assert not series(mem, "cost/usd") and not series(mem, "cost/usd_projected")
    progress = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[batch ")]
    assert progress and all("MFU" in ln and "$" not in ln for ln in progress), progress
