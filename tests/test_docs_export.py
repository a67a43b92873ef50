"""docs/export-and-generate.md: its commands and its Python snippet run as written (training shortened)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "export-and-generate.md").read_text()
# Appended to the commands that train: a few batches instead of minutes.
SHORTER = {
    "train": ["max_duration=2ba", "eval_interval=2ba", "save_interval=2ba", "eval_subset_num_batches=1",
              "global_train_batch_size=8", "device_train_microbatch_size=8"],
    "glue": ["glue.max_train_samples=32", "glue.max_eval_samples=16", "glue.tasks.mnli.epochs=1"],
}  # fmt: skip


def doc_blocks() -> tuple[list[str], str]:
    """The bash commands and the Python snippet of the doc's Commands section."""
    section = DOC.split("## Commands", 1)[1].split("\n## ", 1)[0]
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return [ln.strip() for ln in bash.splitlines() if ln.strip() and not ln.startswith("#")], python


@pytest.mark.slow
@pytest.mark.timeout(1200)  # nine CLI runs (two trainings, a GLUE job), each paying the CLI's start-up
def test_doc_commands_run_as_written(
    tmp_path, bert_tokenizer_dir, mlm_mds_dir, llama_tokenizer_dir, causal_mds_dir
):
    commands, snippet = doc_blocks()
    assert [c.split()[1] for c in commands] == [
        "train", "export", "generate", "glue", "export", "train", "export", "generate", "generate"
    ]  # fmt: skip
    # What the quickstart's data commands leave in data/quickstart (the session's fixtures: the same corpus).
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    data = tmp_path / "data" / "quickstart"
    data.mkdir(parents=True)
    for name, src in (("tokenizer", bert_tokenizer_dir), ("mds", mlm_mds_dir),
                      ("bpe-tokenizer", llama_tokenizer_dir), ("llama-mds", causal_mds_dir)):  # fmt: skip
        (data / name).symlink_to(src)
    env = {**os.environ, "WANDB_MODE": "offline"}
    outputs = []
    for cmd in commands:
        argv = shlex.split(cmd)
        argv = [sys.executable, "-m", "llmfoundry_lite.cli", *argv[1:], *SHORTER.get(argv[1], [])]
        t0 = time.time()
        out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        print(f"{time.time() - t0:6.1f} s  {cmd}")
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        outputs.append(out.stdout)
    assert "mask 1:" in outputs[2]
    assert outputs[7].startswith("The module") and outputs[8].startswith("The module")
    card = (tmp_path / "hf/mosaicbert-demo/README.md").read_text()
    assert (
        "| Batches | 2 |" in card
        and "Tokens seen | unknown" not in card
        and "Final training loss | unknown" not in card
    )
    assert "## GLUE" in (tmp_path / "hf/mosaicbert-demo-mnli/README.md").read_text()
    out = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'token_str'" in out.stdout and out.stdout.strip().endswith("3")
