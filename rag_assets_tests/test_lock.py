"""The data directory's lock across processes: a run's steps share it, other runs are refused,
and a claim ends with its run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from rag_assets.common.lock import LOCK_FILENAME, DirectoryBusyError, DirectoryLock


def holding(directory: Path, run: str, keep_claim: bool = False) -> subprocess.Popen[str]:
    """A process of `run` that takes the lock (and, with `keep_claim`, lets the flock go at once,
    as a step on a worker does) and stays alive until killed."""
    code = (
        "import sys, time; from rag_assets.common.lock import DirectoryLock; "
        f"lock = DirectoryLock({str(directory)!r}); lock.acquire({run!r}); "
        f"{'lock.release(keep_claim=True); ' if keep_claim else ''}print('held', flush=True); time.sleep(120)"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def test_a_step_of_the_same_run_shares_the_lock_and_another_run_is_refused(tmp_path: Path) -> None:
    first_step = holding(tmp_path, "run-a")
    try:
        sibling = DirectoryLock(tmp_path)
        assert sibling.acquire("run-a") is None  # a step beside it, of the same run
        with pytest.raises(DirectoryBusyError, match=f"{tmp_path} is being refreshed by run run-a"):
            DirectoryLock(tmp_path).acquire("run-b")
    finally:
        first_step.kill()
        first_step.wait()


def test_a_claim_left_between_steps_holds_while_the_run_is_under_way(tmp_path: Path) -> None:
    worker = holding(tmp_path, "run-a", keep_claim=True)  # its step is done, the run is not
    try:
        with pytest.raises(DirectoryBusyError, match="run run-a"):
            DirectoryLock(tmp_path).acquire("run-b", lambda run: True)
        assert DirectoryLock(tmp_path).ended_holder(lambda run: True) is None
        next_step = DirectoryLock(tmp_path)
        next_step.acquire("run-a")  # the run's next step takes it as its own
        next_step.release(keep_claim=True)
        taken = DirectoryLock(tmp_path)  # once the instance says run-a finished, it is free
        assert taken.acquire("run-b", lambda run: False if run == "run-a" else None) == "run-a"
        taken.release()
        assert (tmp_path / LOCK_FILENAME).read_text() == ""
    finally:
        worker.kill()
        worker.wait()


def test_a_killed_runs_claim_ends_with_its_process(tmp_path: Path) -> None:
    killed = holding(tmp_path, "run-a", keep_claim=True)
    killed.kill()
    killed.wait()
    deadline = time.monotonic() + 10
    while DirectoryLock(tmp_path).ended_holder() != "run-a":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert DirectoryLock(tmp_path).acquire("run-b", lambda run: True) == "run-a"  # taken over
