"""One run folder, one writer: an advisory lock that a second run in the same folder is refused by.

Two runs writing one folder interleave ``train.log``/``metrics.jsonl`` and delete each other's checkpoints at
rotation. The lock is ``flock`` on an open file (``run.lock``, holding the owner's pid, host and start time): the
kernel releases it when the process ends, however it ends (a SIGKILL or a crash leaves nothing to clean up), so
the file's presence means nothing; only a held lock refuses. Standard library only.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from typing import IO, Optional

from llmfoundry_lite.errors import RecipeError

LOCK_FILENAME = "run.lock"


class RunLock:
    """The lock of one run folder, held from :meth:`acquire` until :meth:`release` or the process ends."""

    def __init__(self, folder: str | os.PathLike, key: str = "save_folder") -> None:
        self.path = Path(folder) / LOCK_FILENAME
        self.key = key
        self._file: Optional[IO[str]] = None

    def acquire(self) -> RunLock:
        """Take the lock; RecipeError naming the other run's pid and host when it holds it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 (held open for the run: the open file is the lock)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise RecipeError(
                f"run folder {str(self.path.parent)!r} is in use by another run ({owner}); wait for it to finish "
                "or stop it, or give this run another run_name",
                key=self.key,
            ) from None
        os.set_inheritable(f.fileno(), False)
        f.seek(0)
        f.truncate()
        started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Give the lock up (closing the file releases it); the file stays, unlocked."""
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._file is not None
