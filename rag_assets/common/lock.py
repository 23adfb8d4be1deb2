"""One refresh per data directory at a time, whoever starts it and wherever its steps run.

An exclusive `flock` on a file in the directory, taken without waiting, and a claim written in
it: the run that holds the directory, its processes and host. A process of another run fails at
once, naming the holder. A process of the same run (a step on another worker) shares the
directory: while a sibling holds the flock, or, between steps, through the claim the run left.

A claim ends with its run: the kernel drops the flock when the holding process ends, however it
ends, and a claim left between steps counts only while one of its processes lives (same host)
or the Dagster instance says its run is still under way (steps on other hosts).
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from rag_assets.common.errors import RagError

LOCK_FILENAME = "refresh.lock"


class DirectoryBusyError(RagError):
    """Another refresh holds the data directory."""


class DirectoryLock:
    def __init__(self, directory: Path | str, name: str = LOCK_FILENAME) -> None:
        self.path = Path(directory).resolve() / name
        self._handle: IO[str] | None = None

    def acquire(
        self, holder: str, run_under_way: Callable[[str], bool | None] = lambda run: None
    ) -> str | None:
        """Take the directory for run `holder`, or raise DirectoryBusyError naming the run that
        has it. `run_under_way(run)` says whether the instance knows that run as under way (True),
        finished (False), or not at all (None). Returns the run whose ended claim this took over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            claim = _holders_claim(handle)
            handle.close()
            if claim.get("holder") == holder:
                return None  # a sibling step of this run holds it
            raise DirectoryBusyError(self._busy(claim)) from None
        claim = _read(handle)
        if claim.get("holder") not in (None, holder) and _alive(claim, run_under_way):
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            raise DirectoryBusyError(self._busy(claim))
        handle.seek(0)
        handle.truncate()
        parent = multiprocessing.parent_process()  # a step process's run worker
        mine = {
            "holder": holder,
            "pids": [os.getpid(), *([parent.pid] if parent is not None else [])],
            "host": socket.gethostname(),
            "since": claim.get("since") if claim.get("holder") == holder else _now(),
        }
        handle.write(json.dumps(mine))
        handle.flush()
        self._handle = handle
        return claim.get("holder") if claim.get("holder") not in (None, holder) else None

    def ended_holder(self, run_under_way: Callable[[str], bool | None] = lambda run: None) -> str | None:
        """The run whose claim is still written here though its processes ended (it was killed),
        or None."""
        try:
            handle = open(self.path, encoding="utf-8")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return None
        with handle:
            claim = _read(handle)
            if not claim.get("holder"):
                return None
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # its process holds the flock
            fcntl.flock(handle, fcntl.LOCK_UN)
            return None if _alive(claim, run_under_way) else str(claim["holder"])

    def release(self, keep_claim: bool = False) -> None:
        """Let the directory go; `keep_claim` leaves the run's claim for its next steps."""
        if self._handle is not None:
            if not keep_claim:
                self._handle.truncate(0)
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def _busy(self, claim: dict[str, Any]) -> str:
        return (
            f"{self.path.parent} is being refreshed by run {claim.get('holder', '(unknown)')} "
            f"(pid {', '.join(map(str, claim.get('pids', []))) or '?'} on {claim.get('host', '?')}, "
            f"since {claim.get('since', '?')}); this run stopped before reading or writing anything there"
        )


def _alive(claim: dict[str, Any], run_under_way: Callable[[str], bool | None]) -> bool:
    """Whether another run's claim, left between its steps, still holds."""
    under_way = run_under_way(str(claim["holder"]))
    if under_way is False:
        return False
    if claim.get("host") != socket.gethostname():
        return bool(under_way)
    return any(_process_lives(int(pid)) for pid in claim.get("pids", []))


def _holders_claim(handle: IO[str], wait_s: float = 2.0) -> dict[str, Any]:
    """The claim of the process holding the flock, which writes it just after taking the flock:
    a sibling step started at the same moment may look before it is written."""
    deadline = time.monotonic() + wait_s
    claim = _read(handle)
    while not claim.get("holder") and time.monotonic() < deadline:
        time.sleep(0.05)
        claim = _read(handle)
    return claim


def _process_lives(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(handle: IO[str]) -> dict[str, Any]:
    handle.seek(0)
    try:
        value = json.loads(handle.read())
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
