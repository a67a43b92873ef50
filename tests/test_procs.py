"""The process runner (llmfoundry_lite/procs.py): logs and environments, reporting ended children, and no
orphans: an error in the block, SIGTERM or SIGINT to the parent, or the parent being killed stops every child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmfoundry_lite.procs import Processes

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

# A child that records the signal that stops it (in OUT.sig), says when it is ready (OUT.ready holds its pid),
# and optionally starts a grandchild in its own process group (pid in OUT.grandchild).
CHILD = r"""
import os, signal, subprocess, sys, time
out = sys.argv[1]
def on_signal(sig, frame):
    open(out + ".sig", "w").write(str(sig))
    sys.exit(0)
if "--ignore-term" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
if "--grandchild" in sys.argv:
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open(out + ".grandchild", "w").write(str(g.pid))
open(out + ".ready", "w").write(str(os.getpid()))
time.sleep(60)
"""

# A parent that runs CHILD under Processes and waits for it.
PARENT = r"""
import sys
from llmfoundry_lite.procs import Processes
child, out = sys.argv[1], sys.argv[2]
with Processes(grace_s=10) as procs:
    procs.start([sys.executable, "-c", child, out], out + ".log")
    procs.wait_any()
"""


def _wait_for(path: Path, timeout: float = 30.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "zombie" in status.read_text())


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_start_reports_ended_children_with_their_logs_and_env(tmp_path):
    with Processes(poll_s=0.05) as procs:
        fail = procs.start(
            [sys.executable, "-c", "import os, sys; print(os.environ['JOB']); sys.exit(3)"],
            tmp_path / "a" / "log.txt",
            env={**ENV, "JOB": "first"},
            tag="a",
        )
        ok = procs.start(
            [sys.executable, "-c", "import time; time.sleep(0.5); print('done')"], tmp_path / "b.txt"
        )
        ended = []
        while procs.running:
            ended += procs.wait_any()
    assert [c.tag for c in ended] == ["a", None]  # in the order they ended
    assert fail.returncode == 3 and fail.log_tail().strip() == "first"
    assert ok.returncode == 0 and ok.log_tail().strip() == "done" and ok.wall_s >= 0.5
    assert procs.wait_any() == []  # nothing left to wait for


def test_error_in_the_block_stops_children_and_grandchildren(tmp_path):
    out = tmp_path / "c"
    with pytest.raises(RuntimeError, match="a job failed"), Processes(grace_s=10) as procs:
        child = procs.start([sys.executable, "-c", CHILD, str(out), "--grandchild"], tmp_path / "log")
        _wait_for(Path(f"{out}.ready"))
        raise RuntimeError("a job failed")
    grandchild = int(_wait_for(Path(f"{out}.grandchild")))
    assert Path(f"{out}.sig").read_text() == str(int(signal.SIGTERM))  # asked to stop, and it did
    assert child.returncode == 0 and not _alive(child.pid)
    assert _gone(grandchild)  # its whole process group was stopped
    assert procs.running == []


def test_children_that_ignore_sigterm_are_killed_after_the_grace_period(tmp_path):
    out = tmp_path / "c"
    procs = Processes(grace_s=1)
    child = procs.start([sys.executable, "-c", CHILD, str(out), "--ignore-term"], tmp_path / "log")
    _wait_for(Path(f"{out}.ready"))
    t0 = time.time()
    procs.stop()
    assert child.returncode == -signal.SIGKILL and time.time() - t0 >= 1  # killed, after the grace period


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signals_to_the_parent_are_forwarded_to_children(tmp_path, sig):
    out = tmp_path / "c"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, str(out)], env=ENV, stderr=subprocess.PIPE
    )
    child = int(_wait_for(Path(f"{out}.ready")))
    parent.send_signal(sig)
    _, err = parent.communicate(timeout=30)
    assert Path(f"{out}.sig").read_text() == str(int(sig))  # the child got the same signal
    assert _gone(child)
    if sig == signal.SIGTERM:
        assert parent.returncode == 128 + signal.SIGTERM, err.decode()
    else:  # an uncaught KeyboardInterrupt, as Ctrl-C without children
        assert parent.returncode in (-signal.SIGINT, 128 + signal.SIGINT, 1), err.decode()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_children_stop_when_the_parent_is_killed(tmp_path):
    out = tmp_path / "c"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(out)], env=ENV)
    child = int(_wait_for(Path(f"{out}.ready")))
    parent.kill()  # SIGKILL: no handler runs in the parent
    parent.wait(timeout=30)
    assert _wait_for(Path(f"{out}.sig")) == str(int(signal.SIGTERM))
    assert _gone(child)
