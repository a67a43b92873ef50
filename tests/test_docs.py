"""Every command in the README and docs/ names a real verb with real options, and every docs link resolves.

The quickstart commands run for real in test_readme.py; each feature's own tests run its documented commands. This
test keeps the pages from drifting from the CLI: a renamed verb or option fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VERBS_WITH_SUBCOMMANDS = {"data"}


def documented_commands(page: Path) -> list[str]:
    """`llmfoundry-lite ...` lines of a page's ```bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("llmfoundry-lite "):
                out.append(line)
    return out


@cache
def help_text(*verb: str) -> str:
    """The CLI's help for a verb (wide, so options are never wrapped)."""
    env = {**os.environ, "COLUMNS": "250", "TERM": "dumb"}
    argv = [sys.executable, "-m", "llmfoundry_lite.cli", *verb, "--help"]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, f"{' '.join(verb)} --help failed: {out.stderr[-500:]}"
    return out.stdout


def test_pages_have_commands():
    """The pages document commands at all (a broken extraction would pass everything below)."""
    assert len([c for p in PAGES for c in documented_commands(p)]) >= 20


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_commands_match_the_cli(page):
    for cmd in documented_commands(page):
        argv = shlex.split(cmd.replace("|", " "), posix=True)[1:]
        verb = tuple(argv[:2]) if argv[0] in VERBS_WITH_SUBCOMMANDS else (argv[0],)
        text = help_text(*verb)
        for arg in argv:
            if arg.startswith("--") and arg != "--help":
                flag = arg.split("=", 1)[0]
                assert flag in text, f"{page.name}: `{cmd}`: {flag} is not an option of {' '.join(verb)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    for target in re.findall(r"\]\(((?:docs/|\.\./|\./)?[\w./-]+\.md)(?:#[\w-]+)?\)", page.read_text()):
        assert (page.parent / target).resolve().exists(), f"{page.name} links to missing {target}"
