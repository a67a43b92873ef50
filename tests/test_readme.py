"""The README's quickstart commands run as written (training shortened with overrides)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def quickstart_commands() -> list[str]:
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.mark.timeout(
    1800
)  # three CLI runs (tokenizer training, conversion, a short training), each up to 600 s
def test_readme_quickstart_commands(tmp_path):
    commands = quickstart_commands()
    assert [c.split()[:3] for c in commands] == [
        ["llmfoundry-lite", "data", "tokenizer"],
        ["llmfoundry-lite", "data", "convert"],
        ["llmfoundry-lite", "train", "recipes/quickstart/mosaicbert-tiny.yaml"],
    ]
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    env = {**os.environ, "WANDB_MODE": "offline"}
    for cmd in commands:
        argv = shlex.split(cmd)
        if argv[1] == "train":
            argv += ["max_duration=3ba", "eval_interval=3ba", "save_folder=null", "console_log_interval=1ba"]
        argv = [sys.executable, "-m", "llmfoundry_lite.cli", *argv[1:]]
        out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert "[batch 3/3]" in out.stdout
    assert (tmp_path / "data" / "quickstart" / "mds" / "train" / "index.json").exists()


def test_makefile_runs_the_readme_commands():
    """`make quickstart` runs the same data commands as the README, and CI runs `make test`."""
    makefile = (ROOT / "Makefile").read_text()
    for cmd in quickstart_commands()[:2]:
        assert cmd.replace("data/quickstart", "$(DATA)") in makefile, cmd
    assert "llmfoundry-lite train $(QUICKSTART)" in makefile
    assert "QUICKSTART ?= " + quickstart_commands()[2].split()[2] in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
