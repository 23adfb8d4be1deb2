"""One refresh per data directory at a time, whoever starts it.

An exclusive `flock` on a file in the directory, taken without waiting: a second refresh fails at
once and names the holder. The kernel drops the lock when the holding process ends, however it
ends, so a killed run never leaves the directory locked.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from rag_assets.common.errors import RagError

LOCK_FILENAME = "refresh.lock"


class DirectoryBusyError(RagError):
    """Another refresh holds the data directory."""


class DirectoryLock:
    def __init__(self, directory: Path | str) -> None:
        self.path = Path(directory).resolve() / LOCK_FILENAME
        self._handle: IO[str] | None = None

    def acquire(self, holder: str) -> None:
        """Take the lock for `holder` (a run id) or raise DirectoryBusyError naming the one who has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = _parse(handle.read())
            handle.close()
            raise DirectoryBusyError(
                f"{self.path.parent} is being refreshed by run {owner.get('holder', '(unknown)')} "
                f"(pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since "
                f"{owner.get('since', '?')}); this run stopped before reading or writing anything there"
            ) from None
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
