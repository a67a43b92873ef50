"""A third model family from a package outside this one: one folder, one registration line, nothing else.

The package is installed the way users install plugins, as a distribution whose entry point names its builder
in the ``llmfoundry_lite_models`` group (README "Plugins"); here a ``.dist-info`` folder on ``PYTHONPATH``
stands in for ``pip install``. The real CLI then shows, validates and trains a recipe that names it, and the
data checks read the family's objective from its spec.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

FAMILY = '''
"""A tiny pre-norm decoder family: the shared attention and LM head, its own block."""

from dataclasses import dataclass

import torch
from composer.models import ComposerModel
from torch import nn

from llmfoundry_lite.batch import IGNORE_INDEX
from llmfoundry_lite.models.attention import causal_attention
from llmfoundry_lite.models.head import LMHead
from llmfoundry_lite.models.lm_loss import StatsCrossEntropy
from llmfoundry_lite.models.schema import config_builder, vocab_size_from
from llmfoundry_lite.models.spec import FamilySpec, register_family


@dataclass
class TinyConfig:
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2


class TinyBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.n_heads
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv, self.out = nn.Linear(cfg.d_model, 3 * cfg.d_model), nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model))

    def forward(self, x):
        B, S, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.heads, d // self.heads).unbind(2)
        x = x + self.out(causal_attention(q, k, v, "auto").reshape(B, S, d))
        return x + self.mlp(self.norm2(x))


class TinyLM(ComposerModel):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(TinyBlock(cfg) for _ in range(cfg.n_layers))
        self.head = LMHead(cfg.d_model, vocab_size)
        self.metrics = {"LanguageCrossEntropy": StatsCrossEntropy()}

    def forward(self, batch):
        x = self.embed(batch["input_ids"])
        for block in self.blocks:
            x = block(x)
        targets = torch.cat((batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], IGNORE_INDEX)), 1)
        keep = targets != IGNORE_INDEX
        return self.head(x[keep], targets[keep])

    def loss(self, outputs, batch):
        return outputs[0]

    def get_metrics(self, is_train=False):
        return {} if is_train else self.metrics

    def update_metric(self, batch, outputs, metric):
        metric.update(outputs[1])


def _build(tokenizer=None, *, config, vocab_size=None):
    return TinyLM(config, vocab_size_from(tokenizer, vocab_size))


build_tiny_lm = config_builder(TinyConfig, _build, name="build_tiny_lm", doc="A tiny plugin decoder.")

TINY = register_family(
    FamilySpec(name="tiny", objective="causal_lm", builders={"tiny_lm": build_tiny_lm}, blocks=(TinyBlock,))
)
'''

RECIPE = """
run_name: plugin-tiny
max_seq_len: 128
tokenizer: {{name: hf, path: {tok}}}
model: {{name: tiny_lm, d_model: 32, n_layers: 2, n_heads: 2}}
train_loader:
  name: text
  local: {data}
  split: train
  max_seq_len: ${{max_seq_len}}
  collator: {{name: {collator}}}
optimizer: {{name: decoupled_adamw, lr: 1.0e-3}}
scheduler: {{name: constant}}
max_duration: 2ba
global_train_batch_size: 4
device_train_microbatch_size: 4
precision: fp32
save_folder: {runs}/{{run_name}}
save_interval: 2ba
"""


@pytest.fixture
def plugin_env(tmp_path):
    """An environment in which the ``tinyfam`` distribution is installed (its entry point visible)."""
    site = tmp_path / "site"
    (site / "tinyfam").mkdir(parents=True)
    (site / "tinyfam" / "__init__.py").write_text(textwrap.dedent(FAMILY))
    dist = site / "tinyfam-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyfam\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[llmfoundry_lite_models]\ntiny_lm = tinyfam:build_tiny_lm\n")
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline"}


def _cli(env, *args, cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "llmfoundry_lite.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_a_plugin_family_shows_validates_and_trains(
    plugin_env, tmp_path, llama_tokenizer_dir, causal_mds_dir
):
    fmt = dict(tok=llama_tokenizer_dir, data=causal_mds_dir, runs=tmp_path / "runs")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE.format(collator="causal_lm", **fmt))

    listed = _cli(plugin_env, "list", "models", cwd=tmp_path)
    assert listed.returncode == 0 and "tiny_lm" in listed.stdout, listed.stderr
    shown = _cli(plugin_env, "show", str(recipe), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "# parameters:" in shown.stdout and "name: tiny_lm" in shown.stdout
    assert "unknown" not in shown.stdout.splitlines()[0]  # counted from the plugin's model on the meta device
    valid = _cli(plugin_env, "validate", str(recipe), cwd=tmp_path)
    assert valid.returncode == 0, valid.stderr

    # The data checks know the plugin trains a causal LM: its spec says so.
    mlm = tmp_path / "tiny-mlm.yaml"
    mlm.write_text(RECIPE.format(collator="mlm", **fmt))
    wrong = _cli(plugin_env, "validate", str(mlm), cwd=tmp_path)
    assert wrong.returncode == 2, wrong.stderr
    assert "does not fit model 'tiny_lm'" in wrong.stderr and "causal_lm" in wrong.stderr
    assert "Traceback" not in wrong.stderr

    trained = _cli(plugin_env, "train", str(recipe), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "runs" / "plugin-tiny" / "ep0-ba2-rank0.pt").is_file() or any(
        (tmp_path / "runs" / "plugin-tiny").glob("*ba2*")
    ), sorted(p.name for p in (tmp_path / "runs").rglob("*"))
