"""`make run`: a whole refresh in this process (or with course workers), as the daemon runs it:
the source run, one run per course, then one publish; it ends with a summary a user can read.

The jobs, not an ad-hoc asset selection, so the same limits hold however the graph is started.
Dagster's DEBUG events stay out of the console; the last lines say what was published where, or
why nothing was and what is still served. With `RAG_COURSE_WORKERS` above 1 (and a persistent
instance, DAGSTER_HOME), that many processes run the course runs side by side, each loading
spaCy once for all the courses it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import dagster as dg

from rag_assets import settings
from rag_assets.common.errors import RagError
from rag_assets.definitions import load_definitions
from rag_assets.defs.automation import (
    COURSE_JOB_NAME,
    JOB_NAME,
    PUBLISH_JOB_NAME,
    REFRESH_TAG,
    course_run_digests,
    publish_run_config,
    source_courses,
    sync_courses,
)
from rag_assets.defs.resources import environment_resources

CONSOLE_AT_INFO = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


@dataclass(frozen=True)
class RunOutcome:
    """One run of a refresh, as its summary tells it."""

    name: str  # the job, or the course of a course run
    run_id: str
    success: bool
    problems: tuple[str, ...] = ()  # the failed blocking checks and steps, in the user's words


@dataclass
class Refresh:
    """The runs of one refresh: the source's, the courses', the publish's (None: not reached)."""

    source: RunOutcome
    courses: list[RunOutcome] = field(default_factory=list)
    publish: RunOutcome | None = None

    @property
    def success(self) -> bool:
        """Everything refreshed and published: no course run failed, the publish succeeded."""
        return self.publish is not None and self.publish.success and all(c.success for c in self.courses)

    @property
    def runs(self) -> list[RunOutcome]:
        return [self.source, *self.courses, *([self.publish] if self.publish else [])]


def outcome(name: str, result: dg.ExecuteInProcessResult) -> RunOutcome:
    problems = [
        f"blocked by {evaluation.check_name}: {evaluation.description}"
        for evaluation in result.get_asset_check_evaluations()
        if not evaluation.passed and evaluation.blocking
    ]
    problems += [
        f"{event.step_key} failed: {_failure_message(event)}"
        for event in result.get_step_failure_events()
        # a failed blocking check stops its step too; the check's own line says why
        if event.step_failure_data.error.cls_name != "DagsterAssetCheckFailedError"
    ]
    return RunOutcome(name, result.run_id, result.success, tuple(problems))


def _failure_message(event: dg.DagsterEvent) -> str:
    error = event.step_failure_data.error
    while error is not None and error.cause is not None and "Failure" not in error.cls_name:
        error = error.cause
    return (
        (error.message if error else "unknown error")
        .strip()
        .removeprefix("dagster._core.definitions.events.Failure: ")
    )


def run_course(
    course: str,
    source_run: str,
    instance: dg.DagsterInstance | None = None,
    definitions: dg.Definitions | None = None,
) -> RunOutcome:
    """One course run in this process, on the instance given (a worker: that of DAGSTER_HOME)."""
    job = (definitions or load_definitions()).resolve_job_def(COURSE_JOB_NAME)
    result = job.execute_in_process(
        instance=instance or dg.DagsterInstance.get(),
        partition_key=course,
        run_config=CONSOLE_AT_INFO,
        tags={REFRESH_TAG: source_run},
        raise_on_error=False,
    )
    return outcome(course, result)


def refresh(instance: dg.DagsterInstance, definitions: dg.Definitions, workers: int = 1) -> Refresh:
    """The source run, its courses' runs (`workers` at a time), the publish."""
    if workers > 1 and instance.is_ephemeral:
        raise RagError("course workers need a persistent Dagster instance: set DAGSTER_HOME")
    with contextlib.ExitStack() as stack:
        pool = None
        if workers > 1:  # started first: the workers import and load spaCy while the source is read
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(
                ProcessPoolExecutor(workers, mp_context=context, initializer=_load_model)
            )
        source = definitions.resolve_job_def(JOB_NAME).execute_in_process(
            instance=instance, run_config=CONSOLE_AT_INFO, raise_on_error=False
        )
        done = Refresh(outcome(JOB_NAME, source))
        if not source.success:
            return done
        courses = source_courses(instance, source.run_id)
        sync_courses(instance, courses)
        if pool is not None:
            done.courses = list(pool.map(run_course, courses, itertools.repeat(source.run_id)))
        else:
            done.courses = [run_course(course, source.run_id, instance, definitions) for course in courses]
    approved = course_run_digests(instance, [run.run_id for run in done.courses if run.success])
    publish = definitions.resolve_job_def(PUBLISH_JOB_NAME).execute_in_process(
        instance=instance,
        run_config={**publish_run_config(approved).to_config_dict(), **CONSOLE_AT_INFO},
        raise_on_error=False,
    )
    done.publish = outcome(PUBLISH_JOB_NAME, publish)
    return done


def _load_model() -> None:
    """A course worker loads the model once, before its first course run needs it."""
    environment_resources()["nlp"].pipeline()


def summary(done: Refresh, instance: dg.DagsterInstance) -> list[str]:
    """What the refresh did, then what is served now."""
    lines = []
    for run in done.runs:
        if not run.success:
            lines += [f"run {run.run_id} ({run.name}) did not succeed:", *(f"  {p}" for p in run.problems)]
    published = done.publish is not None and done.publish.success
    if published:
        [event] = instance.get_records_for_run(
            done.publish.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
        ).records
        meta = {key: value.value for key, value in event.asset_materialization.metadata.items()}
        lines.append(
            f"published {meta['entries']} entries ({meta['chunks']} chunks) of {len(meta['courses'])} "
            f"courses to {meta['location']}: {meta['upserted']} written, {meta['deleted']} deleted, "
            f"{meta['unchanged']} unchanged"
        )
        if meta["courses_as_served"]:
            lines.append(f"kept as served (their runs failed): {', '.join(meta['courses_as_served'])}")
    return [*lines, served_line(published_now=published)]


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
    parser.add_argument(
        "--workers",
        type=int,
        default=settings.number(os.environ, "RAG_COURSE_WORKERS", 1),
        help="course runs side by side, each in its own process (RAG_COURSE_WORKERS; default 1)",
    )
    args = parser.parse_args(argv)
    try:
        definitions = load_definitions()
    except Exception as exc:  # Dagster wraps a bad setting in its own errors: name the setting
        problem = configuration_error(exc)
        if problem is None:
            raise
        print(f"refresh: error: {problem}; nothing was run, the served index is unchanged", file=sys.stderr)
        return 2
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    done = refresh(instance, definitions, args.workers)
    for line in summary(done, instance):
        print(f"refresh: {line}")
    return 0 if done.success else 1


if __name__ == "__main__":
    sys.exit(main())
