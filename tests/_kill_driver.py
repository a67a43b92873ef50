"""Test-only training entry point (run as a script): ``llmfoundry-lite train`` plus two callbacks.

- ``kill_once: {batch, marker}``: SIGKILLs its own process once after ``batch`` (the marker file remembers), so a
  rerun of the exact same command resumes and runs to the end;
- ``record_rows: {path}``: appends every trained batch's rows to a JSON-lines file, so a resumed run's samples
  can be compared with an uninterrupted run's.

    python tests/_kill_driver.py RECIPE [key=value ...]
"""

import json
import os
import signal
import sys
from pathlib import Path

from composer.core import Callback

from llmfoundry_lite import registry
from llmfoundry_lite.train.launch import entrypoint


class KillOnce(Callback):
    """SIGKILL this process once, at the end of batch ``batch``."""

    def __init__(self, batch: int, marker: str):
        self.batch, self.marker = batch, Path(marker)

    def batch_end(self, state, logger):
        if int(state.timestamp.batch) == self.batch and not self.marker.exists():
            self.marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)


class RecordRows(Callback):
    """Append each batch's number and input rows to ``path`` (JSON lines)."""

    def __init__(self, path: str):
        self.path = path

    def after_dataloader(self, state, logger):
        with open(self.path, "a") as f:
            rows = state.batch["input_ids"].tolist()
            f.write(json.dumps({"batch": int(state.timestamp.batch) + 1, "rows": rows}) + "\n")


if __name__ == "__main__":
    registry.callbacks.register("kill_once", func=KillOnce)
    registry.callbacks.register("record_rows", func=RecordRows)
    sys.exit(entrypoint(sys.argv[1:]))
