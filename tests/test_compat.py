"""What llmfoundry_lite.compat relies on in Composer, streaming, transformers and click: each test fails, naming
the helper, when an upgrade changes that behaviour (run these first after upgrading a dependency)."""

from __future__ import annotations

import atexit
import inspect
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from llmfoundry_lite import compat

ROOT = Path(__file__).resolve().parents[1]


def _tiny_trainer(tmp_path: Path, **kwargs):
    from composer import Trainer
    from composer.models import ComposerClassifier
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    model = ComposerClassifier(torch.nn.Linear(4, 2), num_classes=2)
    defaults = dict(
        model=model,
        train_dataloader=DataLoader(data, batch_size=4),
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        max_duration="2ba",
        device="cpu",
        save_folder=str(tmp_path / "ckpt"),
        save_interval="100ba",
        progress_bar=False,
        log_to_console=False,
    )
    return Trainer(**{**defaults, **kwargs})


def test_use_cpu_model_lookup_answers_composers_environment_report():
    from composer.trainer import trainer as trainer_module
    from composer.utils import collect_env

    original = collect_env.get_cpu_model
    try:
        compat.use_cpu_model_lookup(lambda: "Test CPU 9000")
        assert collect_env.get_composer_env_dict()["cpu_model"] == "Test CPU 9000", (
            "compat.use_cpu_model_lookup: Composer no longer reads collect_env.get_cpu_model at call time"
        )
    finally:
        collect_env.get_cpu_model = original
    assert "get_composer_env_dict()" in inspect.getsource(trainer_module.Trainer.__init__), (
        "compat.use_cpu_model_lookup: Trainer.__init__ no longer reports the environment (the patch may go)"
    )


def test_save_checkpoint_now_and_restore_checkpoint_rng(tmp_path):
    from composer.callbacks import CheckpointSaver

    trainer = _tiny_trainer(tmp_path)
    trainer.fit()
    saver = next(cb for cb in trainer.state.callbacks if isinstance(cb, CheckpointSaver))
    compat.save_checkpoint_now(saver, trainer.state, trainer.logger)
    latest = tmp_path / "ckpt" / "latest-rank0.pt"
    assert latest.is_symlink() and latest.resolve().name == "ep0-ba2-rank0.pt", (
        "compat.save_checkpoint_now: CheckpointSaver._save_checkpoint no longer writes the batch's checkpoint "
        "and points latest-rank0.pt at it"
    )
    assert int(saver.last_checkpoint_batch) == 2
    trainer.close()

    resumed = _tiny_trainer(tmp_path / "resumed", load_path=str(latest), max_duration="4ba")
    assert compat.restore_checkpoint_rng(resumed), (
        "compat.restore_checkpoint_rng: a Trainer loaded from a checkpoint no longer keeps its RNG state pending in "
        "Trainer._rng_state"
    )
    assert not compat.restore_checkpoint_rng(resumed)  # restored once; Composer will not restore it again
    resumed.close()


def test_hub_offline_switches_transformers_offline_mode():
    import huggingface_hub.constants as hc
    import transformers.utils.hub as th

    before = th.is_offline_mode(), hc.HF_HUB_OFFLINE
    with compat.hub_offline():
        assert th.is_offline_mode() and hc.HF_HUB_OFFLINE, (
            "compat.hub_offline: transformers' is_offline_mode() no longer reads transformers.utils.hub._is_offline_mode"
        )
    assert (th.is_offline_mode(), hc.HF_HUB_OFFLINE) == before


def test_no_split_module_names_are_the_transformer_blocks():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(cfg)
    names = compat.no_split_module_names(model)
    assert names == {"LlamaDecoderLayer"}, (
        "compat.no_split_module_names: transformers' _no_split_modules no longer names the decoder blocks"
    )
    assert {type(m).__name__ for m in model.modules()} >= names


def test_import_mds_writer_defers_the_streaming_package():
    code = (
        "import sys\n"
        "from llmfoundry_lite.compat import import_mds_writer\n"
        "writer = import_mds_writer()\n"
        "assert import_mds_writer() is writer  # a second unit's writer: still no package __init__\n"
        "assert 'transformers' not in sys.modules, 'the deferred import pulled in transformers'\n"
        "import streaming, streaming.base.format.mds.writer as w\n"
        "from streaming import MDSWriter, StreamingDataset\n"
        "assert writer is MDSWriter is w.MDSWriter\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == "ok", (
        f"compat.import_mds_writer: streaming's package layout changed\n{out.stderr[-2000:]}"
    )


def test_click_wording_and_exception_classes():
    import click

    group = click.Group("prog", commands={"run": click.Command("run", callback=lambda: None)})
    with pytest.raises(click.UsageError) as e:
        group.main(["nope"], standalone_mode=False)
    assert compat.NO_SUCH_COMMAND.match(e.value.format_message()), "compat.NO_SUCH_COMMAND: click reworded it"
    with pytest.raises(click.UsageError) as e:
        group.main(["run", "extra"], standalone_mode=False)
    assert compat.UNEXPECTED_EXTRA_ARGS.match(e.value.format_message()), (
        "compat.UNEXPECTED_EXTRA_ARGS: click reworded it"
    )
    assert click.exceptions.ClickException in compat.click_classes("ClickException")
    assert all(issubclass(c, Exception) for c in compat.click_classes("Exit"))


def test_quiet_patterns_match_warnings_the_dependencies_still_emit():
    """Every hidden warning is still worded so in Composer or streaming (a stale pattern hides nothing)."""
    import composer
    import streaming

    from llmfoundry_lite.quiet import NOT_ACTIONABLE

    sources = "\n".join(
        p.read_text(encoding="utf-8", errors="ignore")
        for pkg in (composer, streaming)
        for p in Path(pkg.__file__).parent.rglob("*.py")
    )
    for pattern in NOT_ACTIONABLE:
        literal = re.sub(r"^\.\*", "", pattern)
        assert literal in sources, f"quiet.NOT_ACTIONABLE: no dependency warns {literal!r} any more"


def test_wandb_logger_answers_autoresume_before_init():
    """Composer's autoresume asks every logger for a checkpoint before wandb starts; Composer's WandBLogger then
    raises RuntimeError (not 'not found'), so train/build.py's subclass answers FileNotFoundError."""
    from composer.loggers import WandBLogger as ComposerWandB

    from llmfoundry_lite.train.build import WandBLogger

    assert "can only be called after running init()" in inspect.getsource(ComposerWandB), (
        "train.build.WandBLogger.download_file: Composer's WandBLogger changed how it fails before init; "
        "the override may no longer be needed"
    )
    with pytest.raises(FileNotFoundError):
        WandBLogger(project="p").download_file("ep0-ba1-rank0.pt", "unused.pt")


def test_stop_streaming_threads_ends_an_unfinished_epoch(mlm_mds_dir, tmp_path):
    """streaming keeps an epoch's threads (and executor) alive until the epoch ends; stop_streaming_threads ends them."""
    import threading

    from streaming import StreamingDataset

    ds = StreamingDataset(local=f"{mlm_mds_dir}/train", batch_size=1, shuffle=False)
    before = set(threading.enumerate())
    it = iter(ds)
    next(it), next(it)  # an epoch left unfinished, as when max_duration ends mid-epoch
    started = set(threading.enumerate()) - before
    assert started, (
        "streaming no longer starts background threads per epoch: drop compat.stop_streaming_threads"
    )
    assert hasattr(ds, "_iterator") and hasattr(ds, "_executor"), (
        "streaming's private iteration state changed"
    )
    compat.stop_streaming_threads(ds)
    for t in started:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in started)
    assert not hasattr(ds, "_executor")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts /proc/self/fd")
def test_streaming_prefix_scan_and_release_close_their_shared_memory(mlm_mds_dir):
    """streaming's prefix search attaches to live datasets' memory through prefix.SharedMemory (atexit-registered);
    compat.close_prefix_scan_handles swaps that name, and release_streaming_memory frees a dataset's own handles."""
    from streaming import StreamingDataset
    from streaming.base.shared import prefix

    source = inspect.getsource(prefix._check_and_find)
    assert "SharedMemory(name, False)" in source, (
        "streaming's prefix scan changed: revisit compat.close_prefix_scan_handles"
    )
    compat.close_prefix_scan_handles()
    compat.close_prefix_scan_handles()  # idempotent
    assert prefix.SharedMemory._closes_attachments

    start = _open_fds()
    first = StreamingDataset(local=f"{mlm_mds_dir}/train", batch_size=1)
    fds = _open_fds()
    second = StreamingDataset(local=f"{mlm_mds_dir}/val", batch_size=1)
    # The second dataset opens its own handles only, as the first did: none left on the first one's by the scan.
    assert _open_fds() - fds <= fds - start, (_open_fds() - fds, fds - start)
    next(iter(second))
    assert compat.release_streaming_memory(second) == 6, "streaming's shared-memory attributes changed"
    assert compat.release_streaming_memory(first) == 6
    assert _open_fds() < fds


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts /proc/self/fd")
def test_runs_in_one_process_do_not_pile_up_open_files(tiny_bert):
    """train() closes its Trainer, which frees the datasets' shared memory (Composer's atexit would keep it)."""
    from llmfoundry_lite.recipe import load_recipe
    from llmfoundry_lite.train import train

    recipe = str(ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")
    counts = []
    for i in range(3):
        trainer = train(load_recipe(recipe, tiny_bert(run_name=f"fds{i}", save_folder="null")))
        assert int(trainer.state.timestamp.batch) == 4  # state stays readable after close
        del trainer
        counts.append(_open_fds())
    assert counts[2] <= counts[0] + 2, counts


def test_lean_imports_defer_what_composer_pulls_in_and_keep_it_working():
    # A fresh interpreter, as the CLI starts: compat first, then Composer (scripts/benchmark_cli.py measures it).
    code = """
import sys, types
import llmfoundry_lite.startup as compat
compat.install_lean_imports()  # what the CLI's main does first
import composer, composer.algorithms  # train/build.py imports the algorithms package (transformers' BERT)
heavy = [m for m in ("sklearn", "scipy.signal", "scipy.stats", "scipy.optimize", "pandas", "mcli.api", "matplotlib")
         if m in sys.modules]
assert not heavy, heavy
from torchmetrics.functional.text import bert
assert isinstance(bert.AutoModel, compat._Forward), "torchmetrics no longer imports transformers at import"
from transformers import AutoModel, AutoTokenizer
assert isinstance(AutoModel, type) and isinstance(AutoTokenizer, type)  # the stand-ins are gone
assert bert.AutoModel.from_pretrained == AutoModel.from_pretrained  # and forward to the real classes
import scipy.signal
assert scipy.signal.__file__ and scipy.signal.windows.hamming(4).shape == (4,)  # the real module
from transformers.generation import candidate_generator
import numpy as np
assert isinstance(candidate_generator.roc_curve, compat._Forward)
assert candidate_generator.roc_curve(np.array([0, 1]), np.array([0.2, 0.9]))[0].shape == (3,)  # the real one
from transformers.loss import loss_for_object_detection as detr  # imported by transformers' modeling_utils
assert isinstance(detr.linear_sum_assignment, compat._Forward)
assert detr.linear_sum_assignment(1 - np.eye(3))[1].tolist() == [0, 1, 2]  # the real one, loaded when called
assert "scipy.optimize" in sys.modules and sys.modules["scipy.optimize"].__file__
import torch, torchmetrics  # a metric's plot: the real matplotlib, the type aliases check against its classes
import matplotlib
matplotlib.use("Agg")
from torchmetrics.utilities import plot
metric = torchmetrics.MeanSquaredError()
metric.update(torch.ones(3), torch.zeros(3))
fig, ax = metric.plot()
assert type(fig).__name__ == "Figure" and isinstance(ax, plot._AX_TYPE) and not isinstance(3, plot._AX_TYPE)
import mcli
assert callable(mcli.update_run_metadata) and "mcli.api" in sys.modules  # loaded on first use
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", "install_lean_imports: " + out.stderr[-2000:]


def test_lean_imports_stand_in_loads_the_real_scipy_signal_on_any_other_name():
    code = """
import sys
from llmfoundry_lite import startup as compat
stand_in = compat._signal_stand_in()
sys.modules["scipy.signal"] = stand_in
assert stand_in.hamming(5).shape == (5,)  # forwarded to scipy.signal.windows.hamming
firwin = stand_in.firwin  # any other name: the real module replaces the stand-in
assert sys.modules["scipy.signal"] is not stand_in and firwin(3, 0.5).shape == (3,)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", "_signal_stand_in: " + out.stderr[-2000:]


def test_exit_fast_runs_what_a_normal_exit_runs(tmp_path):
    """exit_fast: non-daemon threads joined, atexit handlers run, unclosed buffered files flushed, exit code kept."""
    probe = textwrap.dedent(
        f"""
        import atexit, threading, time
        from concurrent.futures import ThreadPoolExecutor
        from llmfoundry_lite import startup as compat
        kept = open({str(tmp_path / "unclosed.txt")!r}, "w")
        kept.write("tail")  # buffered, never closed
        atexit.register(lambda: open({str(tmp_path / "atexit.txt")!r}, "w").write("ran"))
        def slow():
            time.sleep(0.5)
            open({str(tmp_path / "thread.txt")!r}, "w").write("done")
        threading.Thread(target=slow).start()
        ThreadPoolExecutor(1).submit(lambda: None)  # an idle worker thread must not hang the exit
        compat.exit_fast(3)
        """
    )
    assert hasattr(threading, "_shutdown") and hasattr(atexit, "_run_exitfuncs"), (
        "CPython's exit internals moved"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert out.stderr == ""
    for name, text in (("unclosed.txt", "tail"), ("atexit.txt", "ran"), ("thread.txt", "done")):
        assert (tmp_path / name).read_text() == text, name


def test_importing_the_shims_installs_no_import_hook():
    """The lean-import hook is installed by the CLI's main, explicitly; importing a module changes nothing."""
    code = """
import sys
import llmfoundry_lite.compat, llmfoundry_lite.startup, llmfoundry_lite.cli
assert not any(type(f).__name__ == "_LeanImports" for f in sys.meta_path), sys.meta_path
llmfoundry_lite.startup.install_lean_imports()
assert type(sys.meta_path[0]).__name__ == "_LeanImports"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_tested_versions_are_the_pinned_ones():
    """The table says what tests/test_compat.py ran against: the stack pyproject.toml pins (update both together).

    Compared with the pins, not the installed versions, so the GPU-image rehearsal (a newer torch) runs it too.
    """
    from packaging.requirements import Requirement

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    deps = text.split("\ndependencies = [", 1)[1].split("\n]", 1)[0]  # tomllib is 3.11+
    pins = {r.name: r for r in map(Requirement, re.findall(r'^\s*"([^"]+)",', deps, re.M))}
    for t in compat.TESTED_VERSIONS:
        version = t.version if t.version.count(".") >= 2 else t.version + ".0"
        assert pins[t.distribution].specifier.contains(version), (
            f"pyproject.toml pins {pins[t.distribution]}, compat.TESTED_VERSIONS says {t.version}: check the "
            f"shims {', '.join(t.shims)} with this file, then update the table"
        )
    assert compat.untested("transformers", "4.53.9") == ()  # a prefix: any 4.53.x
    assert compat.untested("mosaicml", "0.33.0") == (
        "use_cpu_model_lookup",
        "restore_checkpoint_rng",
        "save_checkpoint_now",
        "release_closed_engine",
    )


def test_an_untested_version_warns_once_naming_the_shims(monkeypatch):
    monkeypatch.setattr(compat, "_checked", set())
    monkeypatch.setattr(compat, "installed_version", lambda d: "0.99.0" if d == "mosaicml" else "x")
    with pytest.warns(compat.UntestedVersionWarning) as record:
        compat.check_version("mosaicml")
        compat.check_version("mosaicml")  # once per process
    assert len(record) == 1
    text = str(record[0].message)
    assert "mosaicml 0.99.0" in text and "restore_checkpoint_rng" in text and "0.32.1" in text


def test_restore_checkpoint_rng_refuses_when_composer_moved_the_field(tmp_path):
    trainer = _tiny_trainer(tmp_path)
    assert compat.restore_checkpoint_rng(trainer) is False  # a fresh run: nothing pending
    del trainer._rng_state  # what a Composer that keeps it elsewhere looks like
    with pytest.raises(compat.CompatError, match=r"restore_checkpoint_rng: Trainer\._rng_state"):
        compat.restore_checkpoint_rng(trainer)


def test_save_checkpoint_now_refuses_without_composers_private_save():
    with pytest.raises(compat.CompatError, match="save_checkpoint_now"):
        compat.save_checkpoint_now(object(), None, None)


def test_hub_offline_refuses_when_transformers_no_longer_reads_its_flag(monkeypatch):
    import huggingface_hub.constants as hc
    import transformers.utils.hub as th

    before = hc.HF_HUB_OFFLINE, th._is_offline_mode
    monkeypatch.setattr(th, "is_offline_mode", lambda: False)  # reads something else now
    with pytest.raises(compat.CompatError, match="hub_offline"):
        with compat.hub_offline():
            pass
    assert (hc.HF_HUB_OFFLINE, th._is_offline_mode) == before  # restored
    monkeypatch.delattr(th, "_is_offline_mode")
    with pytest.raises(compat.CompatError, match="_is_offline_mode is gone"):
        with compat.hub_offline():
            pass
