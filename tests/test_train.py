"""End-to-end training from a recipe: a real tiny run, its checkpoint and resolved recipe, autoresume, loggers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from composer.core import Callback

from llmfoundry_lite import load_recipe
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.train import build_trainer
from llmfoundry_lite.train.run import RECIPE_FILENAME

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
    """Composer logs the CPU name at Trainer init; make_trainer answers from /proc/cpuinfo (py-cpuinfo takes ~1 s)."""
    from composer.utils import collect_env

    from llmfoundry_lite.bench import cpu_model
    from llmfoundry_lite.train.trainer import make_trainer

    make_trainer(*_classifier_and_loader(), device="cpu", max_duration="1ba").close()
    assert collect_env.get_cpu_model is cpu_model
    name = collect_env.get_composer_env_dict()["cpu_model"]
    assert isinstance(name, str) and name
    if Path("/proc/cpuinfo").exists():
        assert name in Path("/proc/cpuinfo").read_text()


def test_a_run_refused_by_the_trainer_leaves_no_recipe_or_log(tiny_bert, tmp_path):
    cfg = load_recipe(QUICKSTART, tiny_bert(run_name="refused", precision="amp_fp16"))
    with pytest.raises(RecipeError, match="needs a GPU") as e:
        build_trainer(cfg)
    assert e.value.key == "precision"
    assert not list(tmp_path.rglob(RECIPE_FILENAME)) and not list(tmp_path.rglob("train.log"))


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


# ---------------------------------------------------------------------------------------------------------
# Saying what happens: first and last lines, train.log, metrics.jsonl, progress in any unit
# ---------------------------------------------------------------------------------------------------------


def _cli(args: list[str], capsys) -> tuple[int, list[str]]:
    from llmfoundry_lite.cli import main

    rc = main(["train", QUICKSTART, *args])
    return rc, capsys.readouterr().out.splitlines()


def _first_line(lines: list[str]) -> tuple[str, str, str]:
    """(verb, run name, the rest) of a run's first line: ``starting|resuming run NAME ...``."""
    first = next(ln for ln in lines if ln.startswith(("starting run ", "resuming run ")))
    verb, _, name, rest = first.split(" ", 3)
    return verb, name, rest


def test_every_run_says_name_folder_fresh_or_resumed_and_how_it_ended(tiny_bert, tmp_path, capsys):
    """The default run name hashes the recipe: raising max_duration makes a new run unless run_name is kept."""
    overrides = [o for o in tiny_bert(max_duration="2ba") if not o.startswith("run_name=")]
    rc, lines = _cli(overrides, capsys)
    assert rc == 0, lines
    verb, name, rest = _first_line(lines)
    folder = tmp_path / "runs" / name
    assert (verb, rest) == ("starting", f"fresh in {folder}; training to 2ba"), lines
    assert lines[-1].startswith(f"finished run {name} at batch 2/2 in {folder}; final loss "), lines
    float(lines[-1].rsplit(" ", 1)[1])

    # Both files are in the run folder: the console lines, and one JSON object per logged step.
    log = (folder / "train.log").read_text().splitlines()
    assert log[0].startswith("===== ") and log[1:] == lines, log
    records = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "step" in r]
    assert steps == sorted(set(steps)) and {0, 1} <= set(steps), steps
    assert all("loss/train/total" in r for r in records if r.get("step") in (0, 1))
    assert [r["event"] for r in records if "event" in r] == ["fit_end"]

    rc, lines = _cli(overrides, capsys)  # the same command: nothing to do
    assert rc == 0 and lines[-1].startswith(
        f"run {name} is already complete (batch 2) in {folder}; to train further, raise max_duration and keep "
        f"run_name={name}"
    ), lines

    longer = [o.replace("max_duration=2ba", "max_duration=4ba") for o in overrides]
    rc, lines = _cli(longer, capsys)  # another recipe, so another default name: a new run
    assert rc == 0 and _first_line(lines)[:2] != ("starting", name) and _first_line(lines)[0] == "starting"

    rc, lines = _cli([*longer, f"run_name={name}"], capsys)  # extending the finished run
    assert rc == 0, lines
    checkpoint = folder / "ep0-ba2-rank0.pt"
    assert _first_line(lines) == (
        "resuming",
        name,
        f"from batch 2 ({checkpoint}) in {folder}; training to 4ba",
    )
    assert "[batch 3/4]" in "\n".join(lines) and "[batch 1/" not in "\n".join(lines)
    assert lines[-1].startswith(f"finished run {name} at batch 4/4 in {folder}; final loss "), lines
    assert (folder / "train.log").read_text().count("===== ") == 3  # appended, one header per start
    steps = [json.loads(ln).get("step") for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    assert {2, 3} <= set(steps)


def test_logs_go_next_to_a_configured_metrics_file(tiny_bert, tmp_path):
    """A sweep trial names its metrics file; its train.log goes beside it (one of each per run)."""
    target = tmp_path / "trial" / "metrics.jsonl"
    cfg = load_recipe(
        QUICKSTART,
        tiny_bert(run_name="named", max_duration="1ba") + [f"loggers.jsonl_metrics.filename={target}"],
    )
    trainer = build_trainer(cfg, QUICKSTART)
    trainer.fit()
    trainer.close()
    assert target.exists() and (tmp_path / "trial" / "train.log").exists()
    run_dir = tmp_path / "runs" / "named"
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "train.log").exists()


@pytest.mark.parametrize(
    "duration, interval, first, total, later",
    [
        ("16sp", "1ba", "[batch 1, sample 4/16]", "[batch 4, sample 16/16]", "[batch 2, sample 8/16]"),
        ("300tok", "100tok", "[batch 1, token ", "/300]", None),
        ("2ep", "1ba", "[batch 1, epoch 1/2]", "[batch 8, epoch 2/2]", "[batch 5, epoch 2/2]"),
        ("4ba", "0.5dur", "[batch 1/4]", "[batch 4/4]", "[batch 2/4]"),
    ],
)
def test_progress_line_has_a_total_and_eta_in_any_unit(
    tiny_bert, capsys, duration, interval, first, total, later
):
    from composer.core import Time

    from llmfoundry_lite.train.callbacks.progress import ProgressLine

    extra = {"train_loader.epoch_size": 16} if duration.endswith("ep") else {}
    cfg = load_recipe(
        QUICKSTART,
        tiny_bert(
            run_name=f"u-{duration}", max_duration=duration, console_log_interval=interval,
            save_folder="null", eval_interval="1000ba", **extra,
        ),
    )  # fmt: skip
    trainer = build_trainer(cfg, QUICKSTART)
    line = next(d for d in trainer.logger.destinations if isinstance(d, ProgressLine))
    assert line.interval == Time.from_input(interval)
    trainer.fit()
    trainer.close()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[batch")]
    assert lines[0].startswith(first) and "ETA" in lines[0], lines
    assert total in lines[-1] and "ETA" not in lines[-1], lines
    if later:
        assert any(ln.startswith(later) for ln in lines), lines
    if interval == "100tok":  # a line each time the run crosses a multiple of 100 tokens: not every batch
        assert 3 <= len(lines) < int(trainer.state.timestamp.batch) + 1, lines
    if interval == "0.5dur":
        assert [ln.split("]")[0] for ln in lines] == ["[batch 1/4", "[batch 2/4", "[batch 4/4"], lines


# ---------------------------------------------------------------------------------------------------------
# Splits smaller than one batch; FSDP on one GPU
# ---------------------------------------------------------------------------------------------------------


def test_eval_split_smaller_than_a_batch(tiny_bert, mlm_mds_dir, mlm_samples):
    """Fewer validation samples than the eval batch: fine without drop_last, an error with it."""
    n = mlm_samples["val"]
    assert 0 < n < 64
    cfg = load_recipe(QUICKSTART, tiny_bert(run_name="ev-ok", max_duration="1ba", device_eval_batch_size=64))
    build_trainer(cfg, QUICKSTART).close()
    cfg = load_recipe(
        QUICKSTART,
        tiny_bert(run_name="ev-bad", device_eval_batch_size=64) + ["eval_loader.drop_last=true"],
    )
    with pytest.raises(RecipeError) as e:
        build_trainer(cfg, QUICKSTART)
    assert e.value.key == "eval_loader"
    assert str(e.value) == (
        f"eval_loader: split 'val' of {mlm_mds_dir!r} has {n} samples, fewer than one batch (device_eval_batch_size "
        f"64, drop_last: true), so nothing would be evaluated; set device_eval_batch_size to at most {n}, or "
        "eval_loader.drop_last: false"
    )


def test_remote_dataset_smaller_than_a_batch_is_caught_after_it_is_built(
    tiny_bert, mlm_mds_dir, mlm_samples, tmp_path
):
    """A dataset streamed from `remote` (here a plain folder streaming copies from) has no index to read first."""
    cfg = load_recipe(
        QUICKSTART,
        tiny_bert(run_name="remote", global_train_batch_size=1024, device_train_microbatch_size=32)
        + [f"train_loader.remote={mlm_mds_dir}", f"train_loader.local={tmp_path / 'cache'}"],
    )
    n = mlm_samples["train"]
    with pytest.raises(RecipeError, match=rf"^train_loader: .* has {n} samples, fewer than one batch"):
        build_trainer(cfg, QUICKSTART)


def test_check_loader_batches_counts_per_rank():
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from llmfoundry_lite.train.build import check_loader_batches

    cfg = OmegaConf.create(
        {"global_train_batch_size": 16, "train_loader": {"local": "/data", "split": "train"}}
    )
    data = list(range(10))
    ok = DataLoader(data, batch_size=4, drop_last=True, sampler=DistributedSampler(data, 2, 0, shuffle=False))
    check_loader_batches(cfg, "train_loader", ok, world=2)
    big = DataLoader(
        data, batch_size=8, drop_last=True, sampler=DistributedSampler(data, 2, 0, shuffle=False)
    )
    with pytest.raises(RecipeError) as e:
        check_loader_batches(cfg, "train_loader", big, world=2)
    assert (
        "has 10 samples, 5 per rank on 2 ranks, fewer than one batch (global_train_batch_size 16 = 8 per "
        "rank x 2 ranks, drop_last: true)"
        in str(e.value)
        and "at most 10" in str(e.value)
    )
    check_loader_batches(cfg, "train_loader", DataLoader(data, batch_size=64, drop_last=False), world=1)


def test_fsdp_block_applies_on_one_gpu_and_is_ignored_on_cpu(capsys):
    from omegaconf import OmegaConf

    from llmfoundry_lite.train.checks import parallelism_config

    cfg = OmegaConf.create({"fsdp": {"sharding_strategy": "FULL_SHARD"}})
    assert parallelism_config(cfg, world=1, device_name="gpu") == {
        "fsdp": {"sharding_strategy": "FULL_SHARD"}
    }
    assert parallelism_config(cfg, world=8, device_name="gpu") == {
        "fsdp": {"sharding_strategy": "FULL_SHARD"}
    }
    assert parallelism_config(cfg, world=1, device_name="cpu") is None
    assert "fsdp block is ignored on CPU" in capsys.readouterr().out


def test_a_dataloader_that_yields_nothing_stops_instead_of_looping_forever(tiny_bert, monkeypatch):
    """An iterable dataset cannot say its size before training: two empty epochs in a row stop the run."""
    import catalogue
    from torch.utils.data import DataLoader, IterableDataset

    class Nothing(IterableDataset):
        def __iter__(self):
            return iter(())

    def empty_loader(tokenizer, device_batch_size):
        return DataLoader(Nothing(), batch_size=device_batch_size)

    # Registered for this test only (the built-in index test compares the registries with the shipped entries).
    monkeypatch.setitem(
        catalogue.REGISTRY, ("llmfoundry_lite", "dataloaders", "test_empty_iterable"), empty_loader
    )
    cfg = load_recipe(QUICKSTART, tiny_bert(run_name="empty", save_folder="null"))
    cfg.train_loader = {"name": "test_empty_iterable"}
    trainer = build_trainer(cfg, QUICKSTART)
    with pytest.raises(RecipeError) as e:
        trainer.fit()
    trainer.close()
    assert e.value.key == "train_loader" and "yields no batch" in str(e.value)


def _classifier_and_loader():
    from composer.models import ComposerClassifier
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    return ComposerClassifier(torch.nn.Linear(4, 2), num_classes=2), DataLoader(data, batch_size=4)


def test_make_trainer_is_the_one_place_device_and_precision_are_decided():
    """bf16 on CPU runs under autocast (pretraining and GLUE alike); the model's runtime check runs first."""
    from composer.core import Precision

    from llmfoundry_lite.apps.glue.config import GlueConfig
    from llmfoundry_lite.apps.glue.job import device_and_precision
    from llmfoundry_lite.train.trainer import CPUAutocast, make_trainer

    model, loader = _classifier_and_loader()
    seen = []
    model.check_runtime = lambda device, precision: seen.append((device, precision))
    trainer = make_trainer(model, loader, device="cpu", precision="amp_bf16", max_duration="1ba")
    assert seen == [("cpu", "amp_bf16")]
    assert trainer.state.precision == Precision.FP32
    assert any(isinstance(cb, CPUAutocast) for cb in trainer.state.callbacks)
    trainer.fit()  # the autocast context opens and closes around each forward
    trainer.close()

    def refuse(device, precision):
        raise RecipeError("flash attention needs a GPU", key="model.attn_impl")

    model, loader = _classifier_and_loader()
    model.check_runtime = refuse
    with pytest.raises(RecipeError, match="needs a GPU") as e:
        make_trainer(model, loader, device="cpu", max_duration="1ba")
    assert e.value.key == "model.attn_impl"
    with pytest.raises(RecipeError) as e:
        make_trainer(*_classifier_and_loader(), device="cpu", precision="amp_fp16", key_prefix="glue.")
    assert e.value.key == "glue.precision"
    # GLUE decides as training does: bf16 stays bf16 on CPU (autocast), nothing is dropped silently.
    assert device_and_precision(GlueConfig(device="cpu", precision="amp_bf16")) == ("cpu", "amp_bf16")
    assert device_and_precision(GlueConfig(device="cpu")) == ("cpu", "fp32")


@pytest.mark.parametrize("hook", ["eval_start", "batch_end"])
def test_progress_throughput_is_over_recent_batches_not_since_start(tiny_bert, capsys, monkeypatch, hook):
    """A slow evaluation, or slow work at a batch's end (lm_eval scoring, generation), does not drag the tok/s.

    The slow part is a jump of the progress logger's clock by 1,000 s (no sleep): counted, it would cut the
    windowed rate after it a thousandfold; a loaded machine moves batch times by a few times at most. So the
    test holds however fast or busy the machine is.
    """
    import re
    import statistics
    import time as _time
    import types

    from composer.core import Callback

    from llmfoundry_lite.train.callbacks import progress

    clock = types.SimpleNamespace(offset=0.0)
    fake_time = types.SimpleNamespace(**{k: getattr(_time, k) for k in dir(_time) if not k.startswith("_")})
    fake_time.perf_counter = lambda: _time.perf_counter() + clock.offset
    monkeypatch.setattr(progress, "time", fake_time)

    class SlowEval(Callback):
        def run_event(self, event, state, logger):
            if event.value == hook and (hook == "eval_start" or int(state.timestamp.batch) == 6):
                clock.offset += 1000.0

    cfg = load_recipe(
        QUICKSTART,
        tiny_bert(
            run_name="window", max_duration="12ba", console_log_interval="1ba", save_folder="null",
            eval_interval="6ba", eval_subset_num_batches=1,
        ),
    )  # fmt: skip
    trainer = build_trainer(cfg, QUICKSTART)
    trainer.state.callbacks.insert(0, SlowEval())  # ahead of the progress logger: order must not matter
    trainer.fit()
    trainer.close()
    assert clock.offset > 0  # the slow part happened
    rates = {
        int(m.group(1)): float(m.group(2).replace(",", ""))
        for m in re.finditer(r"\[batch (\d+)/12\][^\n]*? ([\d,]+) tok/s", capsys.readouterr().out)
    }
    before = statistics.median(rates[b] for b in range(2, 7))
    assert min(rates[b] for b in range(7, 13)) > 0.05 * before, rates


def test_default_run_name_ignores_unset_sections():
    """An optional top-level section left unset (as every new one is for old recipes) does not rename a run."""
    from omegaconf import OmegaConf

    from llmfoundry_lite.train.run import default_run_name

    cfg = OmegaConf.create({"model": {"name": "llama"}, "max_duration": "10ba"})
    name = default_run_name("recipes/x.yaml", cfg)
    assert name.startswith("x-")
    assert default_run_name("recipes/x.yaml", OmegaConf.merge(cfg, {"compile": None})) == name
    assert default_run_name("recipes/x.yaml", OmegaConf.merge(cfg, {"max_duration": "20ba"})) != name
