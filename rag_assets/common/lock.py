"""One refresh per course and data directory at a time, whoever starts it; one publish at a time.

An exclusive `flock` on a file in the directory. A refresh lock is taken without waiting: a
second refresh of the same course fails at once and names the holder. The publish lock is
waited for: a publish run that starts while another publishes (a backfill's and a refresh's)
writes after it. The kernel drops a lock
when the holding process ends, however it ends, so a killed run never leaves anything locked.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from rag_assets.common.errors import RagError

LOCK_FILENAME = "refresh.lock"
_POLL_S = 0.2


class DirectoryBusyError(RagError):
    """Another refresh holds the data directory."""


class DirectoryLock:
    def __init__(self, directory: Path | str, name: str = LOCK_FILENAME, purpose: str = "refreshed") -> None:
        self.path = Path(directory).resolve() / name
        self.purpose = purpose  # what the holder does, for the busy message
        self._handle: IO[str] | None = None

    def acquire(self, holder: str, wait_s: float = 0.0) -> None:
        """Take the lock for `holder` (a run id), waiting up to `wait_s` seconds for it, or raise
        DirectoryBusyError naming the one who has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(_POLL_S)
                    continue
            handle.seek(0)
            owner = _parse(handle.read())
            handle.close()
            waited = f" (waited {wait_s:.0f} s)" if wait_s else ""
            raise DirectoryBusyError(
                f"{self.path.parent} is being {self.purpose} by run {owner.get('holder', '(unknown)')} "
                f"(pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since "
                f"{owner.get('since', '?')}){waited}; this run stopped before reading or writing "
                "anything there"
            )
        handle.seek(0)
        handle.truncate()
        owner = {"holder": holder, "pid": os.getpid(), "host": socket.gethostname()}
        handle.write(json.dumps(owner | {"since": datetime.now(UTC).isoformat(timespec="seconds")}))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.truncate(0)
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _parse(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
