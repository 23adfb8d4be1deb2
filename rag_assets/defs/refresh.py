"""`make run`: a whole refresh in this process, the run the daemon starts, ending with a summary a
user can read.

The job, not an ad-hoc asset selection, so the same limits hold however the graph is started.
Dagster's DEBUG events stay out of the console; the last lines say what was published where, or
why nothing was and what is still served.
"""

from __future__ import annotations

import argparse
import errno
import os
import pwd
import shutil
import sqlite3
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from rag_assets import settings
from rag_assets.common.errors import RagError
from rag_assets.common.lock import DirectoryBusyError, DirectoryLock
from rag_assets.definitions import load_definitions
from rag_assets.defs.automation import JOB_NAME
from rag_assets.defs.resources import runs_under_way
from rag_assets.index.backend import IndexNotFoundError
from rag_assets.index.elasticsearch import CLIENT_ERRORS, describe_error

CONSOLE_AT_INFO = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
NOTHING_RUN = "nothing was run, the served index is unchanged"
MARKS = "marks it failed, so that the schedule does not wait for it"
DAGSTER_STORAGE = str(Path(dg.__file__).parent / "_core" / "storage")  # its run, event and log storage
# Below this, SQLite's "database or disk is full" or "disk I/O error" (it could not grow its
# shared-memory file) is a full disk, not a quota or a file size limit.
LOW_SPACE = 1 << 20
UNFINISHED = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


@dataclass(frozen=True)
class RunOutcome:
    """A refresh's run, as its summary tells it."""

    run_id: str
    success: bool
    problems: tuple[str, ...] = ()  # the failed checks and steps, in the user's words


def outcome(result: dg.ExecuteInProcessResult) -> RunOutcome:
    problems = [
        f"{'blocked by ' if evaluation.severity == dg.AssetCheckSeverity.ERROR else ''}"
        f"{evaluation.check_name}: {evaluation.description}"
        for evaluation in result.get_asset_check_evaluations()
        if not evaluation.passed
    ]
    problems += [
        f"{event.step_key} failed: {_failure_message(event.step_failure_data.error)}"
        for event in result.get_step_failure_events()
        if not _said_by_a_check(event.step_failure_data.error)
    ]
    said = " ".join(problems)
    problems += [  # a failure before any step: the data directory is busy, a resource is wrong
        f"the run failed: {message}"
        for event in result.all_events
        if event.event_type == dg.DagsterEventType.RUN_FAILURE
        and not _said_by_a_check(event.event_specific_data.error)
        and (message := _failure_message(event.event_specific_data.error)) not in said
    ]
    return RunOutcome(result.run_id, result.success and not problems, tuple(problems))


def _said_by_a_check(error: dg.SerializableErrorInfo | None) -> bool:
    """No error, or a blocking check's stop, whose own line already says why."""
    return error is None or error.cls_name == "DagsterAssetCheckFailedError"


def _failure_message(error: dg.SerializableErrorInfo | None) -> str:
    """The project's own words behind Dagster's wrapping errors (a Failure's description)."""
    while error is not None and error.cause is not None and "Failure" not in error.cls_name:
        error = error.cause
    return (
        (error.message if error else "unknown error")
        .strip()
        .removeprefix("dagster._core.definitions.events.Failure: ")
    )


def refresh(instance: dg.DagsterInstance, definitions: dg.Definitions) -> RunOutcome:
    """The refresh job, one run, in this process."""
    result = definitions.resolve_job_def(JOB_NAME).execute_in_process(
        instance=instance, run_config=CONSOLE_AT_INFO, raise_on_error=False
    )
    return outcome(result)


def summary(done: RunOutcome, instance: dg.DagsterInstance) -> list[str]:
    """What the refresh did, then what is served now."""
    lines = []
    if done.problems:
        lines += [f"run {done.run_id} did not do everything:", *(f"  {p}" for p in done.problems)]
    published = instance.get_records_for_run(done.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
    meta = next(
        (
            {key: value.value for key, value in record.asset_materialization.metadata.items()}
            for record in published.records
            if record.asset_materialization
            and record.asset_materialization.asset_key.to_user_string() == "es_index"
        ),
        None,
    )
    if meta is not None:
        lines.append(
            f"published {meta['entries']} entries ({meta['chunks']} chunks) of {len(meta['courses'])} "
            f"courses to {meta['location']}: {meta['upserted']} written, {meta['deleted']} deleted, "
            f"{meta['unchanged']} unchanged"
        )
        if meta["courses_as_served"]:
            lines.append(f"kept as served (refused by a check): {', '.join(meta['courses_as_served'])}")
        if meta.get("mode_switch"):
            lines.append(f"warning: {meta['mode_switch']}")
    return [*lines, served_line(published_now=meta is not None)]


def served_line(published_now: bool) -> str:
    try:
        backend = settings.open_backend()
        stats = backend.stats()
    except IndexNotFoundError:
        return f"served: nothing yet, no refresh has published to {backend.location}"
    except (RagError, *CLIENT_ERRORS) as exc:
        return f"served: nothing ({describe_error(exc)})"
    state = "now served" if published_now else "the served index is unchanged"
    return (
        f"{state}: {stats.entries} entries at {stats.location}, content from {stats.published_at}, "
        f"confirmed {stats.confirmed_at}"
    )


def configuration_error(exc: BaseException | None) -> RagError | None:
    """The project's own error (a bad setting, naming it) behind Dagster's definition-loading
    errors, if there is one."""
    while exc is not None and not isinstance(exc, RagError):
        exc = exc.__cause__ or exc.__context__
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    started = datetime.now(UTC)
    try:
        definitions = load_definitions()
    except Exception as exc:  # Dagster wraps a bad setting in its own errors: name the setting
        problem = configuration_error(exc)
        if problem is None:
            raise
        print(f"refresh: error: {problem}; nothing was run, the served index is unchanged", file=sys.stderr)
        return 2
    if not os.environ.get("DAGSTER_HOME"):  # an instance in memory, no storage of its own to fail
        instance = dg.DagsterInstance.ephemeral()
        done = refresh(instance, definitions)
        return finish(done, summary(done, instance))
    return refresh_in(Path(os.environ["DAGSTER_HOME"]).absolute(), definitions, started)


def refresh_in(home: Path, definitions: dg.Definitions, started: datetime) -> int:
    """The refresh with the instance in DAGSTER_HOME, this process having started at `started`;
    when Dagster's own storage fails (a full disk, no permission, a lock), one line says why, and no
    run stays unfinished for the schedule to wait on."""
    try:
        instance = dg.DagsterInstance.get()
        for line in settle_runs_left_unfinished(instance, started):
            print(f"refresh: {line}")
    except Exception as exc:
        error = storage_error(exc)
        if error is None:
            raise
        print(f"refresh: error: {storage_problem(error, home)}; {NOTHING_RUN}", file=sys.stderr)
        return 2
    served_before = served_version()
    try:
        done = refresh(instance, definitions)
        lines = summary(done, instance)
    except Exception as exc:
        error = storage_error(exc)
        if error is None:
            raise
        problem = storage_problem(error, home)
        stopped = stopped_run(instance, started, problem)
        served = served_line(published_now=served_version() != served_before)
        end = NOTHING_RUN if stopped is None else f"{stopped}; {served}"
        # a line of its own: Dagster's last console line, cut short by the same fault, may lack its end
        print(f"\nrefresh: error: {problem}; {end}", file=sys.stderr)
        return 2 if stopped is None else 1
    return finish(done, lines)


def finish(done: RunOutcome, lines: list[str]) -> int:
    for line in lines:
        print(f"refresh: {line}")
    return 0 if done.success else 1


def storage_error(exc: BaseException | None) -> OSError | sqlite3.Error | None:
    """The OS or SQLite error behind `exc` if Dagster's own storage raised it (its directories and
    SQLite files), else None: the project's own errors end inside a step, in the summary."""
    chain: list[BaseException] = []
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    in_storage = any(
        frame.filename.startswith(DAGSTER_STORAGE)
        for error in chain
        for frame in traceback.extract_tb(error.__traceback__)
    )
    errors = [error for error in chain if isinstance(error, OSError | sqlite3.Error)]
    return errors[-1] if in_storage and errors else None


def storage_problem(error: OSError | sqlite3.Error, home: Path) -> str:
    """Why Dagster's storage in `home` failed, in a user's words and SQLite's (or the system's),
    and what to change."""
    said = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    found = storage_cause(error, said, home)
    if found is None:
        return (
            f"Dagster's storage in DAGSTER_HOME={home} failed ({said}); set DAGSTER_HOME to another directory"
        )
    cause, way_out = found
    return (
        f"Dagster's storage in DAGSTER_HOME={home} cannot be written: {cause} ({said}); {way_out}, "
        "or set DAGSTER_HOME to another directory"
    )


def storage_cause(error: OSError | sqlite3.Error, said: str, home: Path) -> tuple[str, str] | None:
    """The cause behind SQLite's few words, and its remedy: a lock another process holds, a
    read-only file system, a path this user may not write, a full disk; None if none is found."""
    if "locked" in said:
        return "another process holds a lock on its SQLite files", "stop that process or wait for it"
    if os.statvfs(home).f_flag & os.ST_RDONLY:
        return "its file system is read-only", "make it writable"
    unwritable = unwritable_path(home)
    if unwritable is not None:
        return f"{unwritable} is not writable by user {user_name()}", "make it writable"
    free = shutil.disk_usage(home).free
    if getattr(error, "errno", None) == errno.ENOSPC or free < LOW_SPACE:
        return f"its disk is full, {free // 1024} kB free", "free space on that disk"
    return None


def unwritable_path(home: Path) -> Path | None:
    """The first of DAGSTER_HOME, its folders and its SQLite files this user may not write."""
    paths = (home, *(path for path in sorted(home.rglob("*")) if path.is_dir() or path.suffix == ".db"))
    return next((path for path in paths if not os.access(path, os.W_OK)), None)


def user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without an account, as containers run
        return f"uid {os.geteuid()}"


def settle_runs_left_unfinished(instance: dg.DagsterInstance, started: datetime) -> list[str]:
    """Marks failed the refresh runs an earlier `make run` left unfinished: killed, or stopped by
    Dagster's storage before it could record their end. The schedule skips its ticks while any
    run is unfinished, so it would wait for them forever.

    Only runs executed in a process of their own (`make run`, the CLI), not launched by the daemon
    or the UI, created before this process started (a refresh holds the data directory within a
    second of creating its run), and only while no refresh holds the data directory: every run of
    this code location holds it until it ends.
    """
    lock = DirectoryLock(settings.data_dir())
    try:
        ended = lock.acquire(f"make run (pid {os.getpid()})", runs_under_way(instance))
    except DirectoryBusyError:
        return []  # a refresh is under way: its run is not left behind
    try:
        filters = dg.RunsFilter(job_name=JOB_NAME, statuses=UNFINISHED, created_before=started)
        left = [run for run in instance.get_runs(filters=filters) if run.remote_job_origin is None]
        killed = instance.get_run_by_id(ended) if ended is not None else None
        if killed is not None and not killed.is_finished and killed.run_id not in {r.run_id for r in left}:
            left.append(killed)  # its claim on the data directory, which says so, ends with this lock
        for run in left:
            instance.report_run_failed(
                run,
                f"left {run.status.value} by its process (it ended, or Dagster's storage could not "
                "record its end); marked failed by a later `make run`",
            )
    finally:
        lock.release()
    return [
        f"marked run {run.run_id} failed: an earlier refresh left it {run.status.value} (its process "
        "ended, or Dagster's storage could not record its end)"
        for run in left
    ]


def stopped_run(instance: dg.DagsterInstance, started: datetime, problem: str) -> str | None:
    """What became of the run Dagster's storage stopped: marked failed, so that nothing waits for
    it, or, when the storage cannot take even that, left for the next `make run` to mark. None when
    Dagster never recorded a run: nothing ran."""
    known: list[dg.DagsterRun] = []
    try:
        filters = dg.RunsFilter(job_name=JOB_NAME, created_after=started)
        known = [run for run in instance.get_runs(filters=filters) if run.remote_job_origin is None]
        for run in known:
            if not run.is_finished:
                instance.report_run_failed(run, f"the refresh stopped: {problem}")
    except Exception as exc:
        if storage_error(exc) is None:
            raise
        if not known:
            return f"the refresh stopped; if Dagster recorded its run, the next `make run` {MARKS}"
        runs = ", ".join(run.run_id for run in known)
        return f"the refresh stopped; run {runs} cannot be marked failed now: the next `make run` {MARKS}"
    if not known:
        return None
    return "; ".join(
        f"run {run.run_id} {'ended ' + run.status.value if run.is_finished else 'stopped, marked failed'}"
        for run in known
    )


def served_version() -> str | None:
    """When the served content last changed (None: nothing readable is served), to tell whether
    a run the storage stopped had published."""
    try:
        return settings.open_backend().stats().published_at
    except (RagError, *CLIENT_ERRORS):
        return None


if __name__ == "__main__":
    sys.exit(main())
