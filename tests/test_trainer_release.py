"""A closed Trainer is freed in a long-lived process (a notebook, an in-process sweep, this test run).

Composer's Engine registers an ``atexit`` close that ``close()`` never removes (compat.release_closed_engine);
streaming keeps threads and shared memory until told (compat.stop_streaming_threads, release_streaming_memory).
"""

from __future__ import annotations

import gc
import os
import threading
import weakref
from pathlib import Path

import pytest

from llmfoundry_lite import load_recipe
from llmfoundry_lite.train import train

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fit_and_close(tiny_bert, i: int) -> list[weakref.ref]:
    """Build, fit (2 batches) and close one Trainer; weak references to what it held."""
    cfg = load_recipe(QUICKSTART, tiny_bert(run_name=f"r{i}", max_duration="2ba", eval_interval="2ba"))
    trainer = train(cfg, QUICKSTART)  # builds, fits and closes
    assert int(trainer.state.timestamp.batch) == 2
    state = trainer.state
    held = [state.model, state.optimizers[0], state.train_dataloader, state.train_dataloader.dataset]
    held += [e.dataloader.dataloader.dataset for e in state.evaluators]
    refs = [weakref.ref(x) for x in held]
    del trainer, state, held
    gc.collect()
    return refs


@pytest.mark.timeout(900)  # ten tiny runs: ~3 s each idle, several times that on a loaded 2-core box
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_ten_trainers_fitted_and_closed_in_one_process_are_freed(tiny_bert):
    refs = _fit_and_close(tiny_bert, 0)
    assert [r() for r in refs] == [None] * len(refs), "the first closed Trainer is still alive"
    files, rss, threads = _open_files(), _rss_bytes(), threading.active_count()
    for i in range(1, 10):
        refs = _fit_and_close(tiny_bert, i)
        alive = [type(r()).__name__ for r in refs if r() is not None]
        assert not alive, f"closed Trainer {i + 1} still holds {alive}"
    assert _open_files() <= files, (files, _open_files())
    assert threading.active_count() <= threads, [t.name for t in threading.enumerate()]
    assert _rss_bytes() <= 1.10 * rss, (rss, _rss_bytes())


RELEASE_CHECK = """
import gc, inspect, json, sys, weakref

import composer
from composer import Trainer
from composer.core.engine import Engine

from llmfoundry_lite import compat, load_recipe
from llmfoundry_lite.train import build_trainer

recipe, overrides = sys.argv[1], json.loads(sys.argv[2])
assert composer.__version__.startswith(compat.ENGINE_EXIT_HOOK_VERSIONS), (
    f"Composer {composer.__version__}: check that Engine still registers atexit(Engine._close, state, logger)"
    " and that close() keeps it, then add the version to compat.ENGINE_EXIT_HOOK_VERSIONS"
)
assert isinstance(inspect.getattr_static(Engine, "_close"), staticmethod)
first, second = (
    build_trainer(load_recipe(recipe, [*overrides, f"run_name={name}"]), recipe) for name in ("first", "second")
)
assert not compat.release_closed_engine(first)  # still open: its hook must stay
Trainer.close(first)  # Composer's own close
assert first.engine._is_closed
kept = weakref.ref(first.state)
compat.clear_state_dict_name_cache()
del first
gc.collect()
assert kept() is not None, "Composer's close() no longer keeps the State alive (its exit hook): is the shim needed?"
Trainer.close(second)
freed = weakref.ref(second.state)
assert compat.release_closed_engine(second)
compat.clear_state_dict_name_cache()
del second
gc.collect()
assert freed() is None, "release_closed_engine no longer frees a closed Trainer's State"
print("ok")
"""


@pytest.mark.timeout(300)
def test_composer_keeps_a_closed_engines_exit_hook_and_release_removes_only_that_one(tiny_bert):
    """What compat.release_closed_engine relies on is still so: Composer's own close() leaves its atexit hook.

    In a fresh interpreter: the count of exit hooks is the process's, and a long test session holds others.
    """
    import json
    import subprocess
    import sys

    overrides = [o for o in tiny_bert(max_duration="1ba") if not o.startswith("run_name=")]
    out = subprocess.run(
        [sys.executable, "-c", RELEASE_CHECK, QUICKSTART, json.dumps(overrides)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
