"""Registries: built-in names, signature checks, and third-party entries through entry points."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml"


@pytest.mark.parametrize(
    "reg, name",
    [
        ("optimizers", "decoupled_adamw"),
        ("optimizers", "decoupled_sgdw"),
        ("optimizers", "adamw"),
        ("schedulers", "cosine_with_warmup"),
        ("schedulers", "linear_decay_with_warmup"),
        ("schedulers", "constant_with_warmup"),
        ("algorithms", "gradient_clipping"),
        ("algorithms", "alibi"),
        ("algorithms", "gated_linear_units"),
        ("algorithms", "low_precision_layernorm"),
        ("algorithms", "ema"),
        ("algorithms", "seq_length_warmup"),
        ("callbacks", "speed_monitor"),
        ("callbacks", "lr_monitor"),
        ("callbacks", "memory_monitor"),
        ("callbacks", "runtime_estimator"),
        ("callbacks", "optimizer_monitor"),
        ("callbacks", "nan_monitor"),
        ("loggers", "wandb"),
        ("loggers", "tensorboard"),
        ("loggers", "file"),
        ("loggers", "inmemory"),
        ("tokenizers", "hf"),
        ("models", "mosaic_bert"),
        ("dataloaders", "text"),
        ("collators", "mlm"),
        ("metrics", "masked_accuracy"),
    ],
)
def test_builtin_entries(reg, name):
    assert name in registry.names(reg)


def test_unknown_name_lists_close_names():
    with pytest.raises(RecipeError) as ei:
        registry.lookup("optimizers", "decoupled_adam", key="optimizer.name")
    assert "did you mean 'decoupled_adamw'" in str(ei.value)
    assert ei.value.key == "optimizer.name"


def test_build_checks_signature_and_injects():
    import torch

    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = registry.build("optimizers", {"name": "adamw", "lr": 0.01}, "optimizer", params=params)
    assert opt.param_groups[0]["lr"] == 0.01
    with pytest.raises(RecipeError) as ei:
        registry.build("optimizers", {"name": "adamw", "params": 1}, "optimizer", params=params)
    assert "supplied by the framework" in str(ei.value)


def test_entry_point_plugin(tmp_path, bert_tokenizer_dir, mlm_mds_dir):
    """A third-party package adds a callback through the `llmfoundry_lite_callbacks` entry-point group."""
    pkg = tmp_path / "lfl_plugin_demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            '''
            from composer.core import Callback

            class CountBatches(Callback):
                """Counts batches (a plugin callback)."""

                def __init__(self, every: int = 1):
                    self.every = every
                    self.seen = 0

                def batch_end(self, state, logger):
                    self.seen += 1
            '''
        )
    )
    dist_info = tmp_path / "lfl_plugin_demo-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: lfl-plugin-demo\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[llmfoundry_lite_callbacks]\ncount_batches = lfl_plugin_demo:CountBatches\n"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"base: {QUICKSTART}\nvariables: {{tokenizer_path: {bert_tokenizer_dir}, data_local: {mlm_mds_dir}}}\n"
        "callbacks:\n  count_batches:\n    every: 2\n"
    )
    # Prepend, not replace: packages installed with --target live on PYTHONPATH.
    path = os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PYTHONPATH": path}
    cli = [sys.executable, "-m", "llmfoundry_lite.cli"]
    out = subprocess.run([*cli, "list", "callbacks"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "count_batches" in out.stdout and "Counts batches" in out.stdout
    ok = subprocess.run([*cli, "validate", str(recipe)], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [*cli, "validate", str(recipe), "callbacks.count_batches.evry=3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "did you mean 'every'" in bad.stderr
