"""One run per output folder: the main process holds an fcntl lock on ``output_dir/.embedtune.lock``
from before anything is written there until the process ends.

The kernel drops the lock when its holder dies, however it dies, so a lock file without a lock
is what a dead run leaves: the next run takes it over and says whose it was. The file names its
holder (host, PID, start time) for the message a second run gets.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import IO, Any

from embedtune.config import ConfigError

LOCK_FILE = ".embedtune.lock"


class OutputInUse(ConfigError):
    """Another live run holds the output folder."""


def _holder(f: IO[str]) -> dict[str, Any]:
    f.seek(0)
    try:
        found = json.loads(f.read() or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _who(holder: dict[str, Any]) -> str:
    if not holder:
        return "a run that left no details"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"PID {holder.get('pid')} on {holder.get('host')}, since {since}"


class OutputLock:
    """The lock on one output folder; ``acquire`` takes it or raises OutputInUse."""

    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.file: IO[str] | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns who held it last when that run ended without releasing it."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the run's lifetime
        try:
            # flock locks the open file, not the process, so a second run in the same process is
            # refused too; on NFS, Linux carries it to the server as a POSIX lock.
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(f)
            f.close()
            raise OutputInUse(f"{os.path.dirname(self.path)} is in use by another run ({_who(holder)}): wait for it "
                              "to end, or give this run another output_dir") from None
        earlier = _holder(f)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        f.flush()
        self.file = f
        return _who(earlier) if earlier else None

    def release(self) -> None:
        if self.file is not None:
            f, self.file = self.file, None
            f.seek(0)
            f.truncate()  # an empty file: the folder's last run ended cleanly
            f.close()  # closing drops the lock
