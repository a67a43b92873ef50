"""docs/sweeps.md's commands run as written: each is planned and validated through the CLI (``--dry-run`` where
it would train; the training itself is tests/test_sweep*.py's), from a folder that holds the recipes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "sweeps.md").read_text()


def doc_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", DOC, re.S).group(1)
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def test_sweeps_doc_commands_plan_and_validate(tmp_path, monkeypatch, capsys):
    from llmfoundry_lite.cli import main

    commands = doc_commands()
    assert len(commands) == 4 and all(c.startswith("llmfoundry-lite sweep recipes/") for c in commands)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    *planned, collect = [
        [a.replace("/shared/", f"{tmp_path}/shared/") for a in shlex.split(c)[1:]] for c in commands
    ]
    for argv in planned:
        argv = argv if "--dry-run" in argv else [*argv, "--dry-run"]
        assert main(argv) == 0, f"{argv}\n{capsys.readouterr().err}"
        out = capsys.readouterr().out
        assert out.startswith("llmfoundry-lite sweep recipes/") and out.rstrip().endswith("--worker"), out
    assert len(list((tmp_path / "sweeps").glob("*/sweep.sbatch"))) == 3

    # --summary-only after the Slurm workers: one has finished its trial (told as a worker tells it).
    from llmfoundry_lite.sweep.plan import plan_sweep

    assert collect[0] == "sweep" and collect[-1] == "--summary-only"
    params = [a for a in collect[2:] if "=" in a and not a.startswith("--")]
    plan = plan_sweep(collect[1], params, storage=collect[collect.index("--storage") + 1])
    study = plan.open_study()
    study.tell(study.ask(plan.distributions()), 5.0)
    assert main(collect) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "COMPLETE" in out and "plots: " in out and "drawn in the background" not in out
    assert (plan.out / "summary.csv").exists() and (plan.out / "summary.png").exists()
