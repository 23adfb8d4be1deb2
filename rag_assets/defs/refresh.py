"""`make run`: a whole refresh in this process, the run the daemon starts, ending with a summary a
user can read.

The job, not an ad-hoc asset selection, so the same limits hold however the graph is started.
Dagster's DEBUG events stay out of the console; the last lines say what was published where, or
why nothing was and what is still served.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg

from rag_assets import settings
from rag_assets.common.errors import RagError
from rag_assets.definitions import load_definitions
from rag_assets.defs.automation import JOB_NAME

CONSOLE_AT_INFO = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


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
    problems += [  # a failure before any step: the data directory is busy, a resource is wrong
        f"the run failed: {_failure_message(event.event_specific_data.error)}"
        for event in result.all_events
        if event.event_type == dg.DagsterEventType.RUN_FAILURE
        and not _said_by_a_check(event.event_specific_data.error)
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
    return [*lines, served_line(published_now=meta is not None)]


def served_line(published_now: bool) -> str:
    try:
        stats = settings.open_backend().stats()
    except RagError as exc:
        return f"served: nothing ({exc})"
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
    try:
        definitions = load_definitions()
    except Exception as exc:  # Dagster wraps a bad setting in its own errors: name the setting
        problem = configuration_error(exc)
        if problem is None:
            raise
        print(f"refresh: error: {problem}; nothing was run, the served index is unchanged", file=sys.stderr)
        return 2
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    done = refresh(instance, definitions)
    for line in summary(done, instance):
        print(f"refresh: {line}")
    return 0 if done.success else 1


if __name__ == "__main__":
    sys.exit(main())
