"""End-to-end training from a recipe: a real tiny run, its checkpoint and resolved recipe, autoresume, loggers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from composer.core import Callback

from llmfoundry_lite import load_recipe
from llmfoundry_lite.train import RECIPE_FILENAME, build_trainer

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")


class BatchCounter(Callback):
    """Counts the batches this process actually trained."""

    def __init__(self):
        self.batches = 0

    def batch_end(self, state, logger):
        self.batches += 1


def fit(overrides: list[str]) -> tuple:
    cfg = load_recipe(QUICKSTART, overrides)
    trainer = build_trainer(cfg, QUICKSTART)
    counter = BatchCounter()
    trainer.state.callbacks.append(counter)
    trainer.fit()
    return trainer, counter


def test_tiny_run_writes_checkpoint_and_recipe_then_autoresumes(tiny_bert, tmp_path):
    trainer, counter = fit(tiny_bert(run_name="resume-me"))
    assert counter.batches == 4
    run_dir = tmp_path / "runs" / "resume-me"
    assert (run_dir / "latest-rank0.pt").exists()
    saved = load_recipe(str(run_dir / RECIPE_FILENAME))  # the saved recipe is itself a valid recipe
    assert saved.run_name == "resume-me" and saved.model.d_model == 32
    first_loss = trainer.state.loss.item()
    assert torch.isfinite(torch.tensor(first_loss))
    trainer.close()

    # The same command with a longer duration continues from batch 4 (autoresume is on by default).
    trainer2, counter2 = fit(tiny_bert(run_name="resume-me", max_duration="6ba"))
    assert int(trainer2.state.timestamp.batch) == 6
    assert counter2.batches == 2
    trainer2.close()


def test_autoresume_off_starts_over(tiny_bert):
    trainer, _ = fit(tiny_bert(run_name="fresh", max_duration="2ba"))
    trainer.close()
    trainer2, counter2 = fit(
        tiny_bert(run_name="fresh", max_duration="2ba", autoresume=False, save_overwrite=True)
    )
    assert counter2.batches == 2
    trainer2.close()


def test_resolved_recipe_goes_to_loggers(tiny_bert):
    cfg = load_recipe(QUICKSTART, tiny_bert(run_name="logged", max_duration="1ba") + ["loggers.inmemory={}"])
    trainer = build_trainer(cfg, QUICKSTART)
    mem = next(d for d in trainer.logger.destinations if type(d).__name__ == "InMemoryLogger")
    assert mem.hyperparameters["model"]["d_model"] == 32
    assert mem.hyperparameters["optimizer"]["name"] == "decoupled_adamw"
    trainer.fit()
    assert any(k.startswith("loss/train") for k in mem.data)
    trainer.close()


def test_wandb_offline_gets_recipe_as_config(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_recipe(
        QUICKSTART, tiny_bert(run_name="wb", max_duration="1ba") + ["loggers.wandb.project=lfl-test"]
    )
    trainer = build_trainer(cfg, QUICKSTART)
    trainer.fit()
    trainer.close()
    # Offline runs keep the config inside the run's protobuf log; its strings are stored verbatim.
    # The wandb service flushes its log asynchronously after close: poll briefly.
    data = b""
    for _ in range(60):
        run_files = list(Path(tmp_path).glob("wandb/offline-run-*/run-*.wandb"))
        data = run_files[0].read_bytes() if run_files else b""
        if b"decoupled_adamw" in data:
            break
        time.sleep(0.5)
    assert b"decoupled_adamw" in data and b"mosaic_bert" in data


def test_eval_metrics_logged(tiny_bert):
    cfg = load_recipe(QUICKSTART, tiny_bert(run_name="ev", max_duration="2ba") + ["loggers.inmemory={}"])
    trainer = build_trainer(cfg, QUICKSTART)
    trainer.fit()
    mem = next(d for d in trainer.logger.destinations if type(d).__name__ == "InMemoryLogger")
    assert any(k.startswith("metrics/eval/") for k in mem.data), sorted(mem.data)
    trainer.close()


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
def test_precision_on_cpu(tiny_bert, precision):
    cfg = load_recipe(
        QUICKSTART,
        tiny_bert(run_name=f"p-{precision}", max_duration="1ba", precision=precision, save_folder="null"),
    )
    trainer = build_trainer(cfg, QUICKSTART)
    seen = []
    trainer.state.model.register_forward_hook(lambda *a: seen.append(torch.is_autocast_enabled("cpu")))
    trainer.fit()
    assert seen and all(s == (precision == "amp_bf16") for s in seen)
    assert not torch.is_autocast_enabled("cpu")  # the context is left after each step
    trainer.close()


def test_microbatching_accumulates(tiny_bert):
    trainer, counter = fit(
        tiny_bert(run_name="mb", max_duration="1ba", device_train_microbatch_size=2, save_folder="null")
    )
    assert trainer.state.device_train_microbatch_size == 2 and counter.batches == 1
    json.dumps(trainer.state.timestamp.state_dict(), default=str)
    trainer.close()


def test_cpu_model_for_composer_env_comes_from_proc_cpuinfo():
    """Composer logs the CPU name at Trainer init; train.py answers from /proc/cpuinfo (py-cpuinfo takes ~1 s)."""
    from composer.utils import collect_env

    import llmfoundry_lite.train  # noqa: F401  (installs the fast lookup)

    name = collect_env.get_composer_env_dict()["cpu_model"]
    assert isinstance(name, str) and name
    if Path("/proc/cpuinfo").exists():
        assert name in Path("/proc/cpuinfo").read_text()


@pytest.mark.parametrize(
    "duration, check",
    [
        ("8sp", lambda ts: int(ts.sample) == 8 and int(ts.batch) == 2),
        ("150tok", lambda ts: int(ts.token) >= 150),
    ],
)
def test_durations_in_samples_and_tokens(tiny_bert, duration, check):
    trainer, _ = fit(tiny_bert(run_name=f"d-{duration}", max_duration=duration, save_folder="null"))
    assert check(trainer.state.timestamp), trainer.state.timestamp
    trainer.close()


def test_load_path_weights_only_starts_a_new_run_from_a_checkpoint(tiny_bert, tmp_path):
    trainer, _ = fit(tiny_bert(run_name="source", max_duration="2ba"))
    saved = {k: v.clone() for k, v in trainer.state.model.state_dict().items()}
    trainer.close()
    ckpt = tmp_path / "runs" / "source" / "latest-rank0.pt"
    cfg = load_recipe(QUICKSTART, tiny_bert(run_name="finetune", load_path=str(ckpt), load_weights_only=True))
    trainer2 = build_trainer(cfg, QUICKSTART)
    assert int(trainer2.state.timestamp.batch) == 0  # weights only: a fresh schedule and data order
    loaded = trainer2.state.model.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    trainer2.close()
