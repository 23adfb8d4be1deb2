"""How the graph runs itself: a refresh is one run of the source, one run per course, one publish.

1. `faq_index_refresh` reads the source (`faq_source` and its guards). The daily schedule and the
   first-build sensor start it.
2. When it succeeds, `course_runs_after_source` syncs the course partitions with the courses the
   source names (new ones added, gone ones deleted) and asks for one `course_refresh` run per
   course. The run queue runs them side by side (`max_concurrent_runs`), each in its own process.
3. When no course run is left queued or running, `publish_after_courses` asks for one
   `index_publish` run with the values of the course runs that succeeded: every course is
   published at once, a failed course stays as served, a gone course is removed.

The seed's trigger settings map to Dagster like this: its run timeout is the `dagster/max_runtime`
tag on every run (enforced by run monitoring, enabled in the shipped instance configuration);
"skip if a run is already in progress" is a schedule that returns a SkipReason while any run of
a refresh is queued or running; "create an initial run if the start date is before the current
execution period" is the `initial_index_build` sensor, which asks for a refresh as soon as the
daemon sees no index.
"""

from collections.abc import Iterable
from datetime import UTC, datetime

import dagster as dg
from dagster._core.execution.backfill import BulkActionStatus  # not exported by `dagster` (1.13)

from rag_assets import settings
from rag_assets.defs.assets import COURSES, chunks, embeddings, es_index, faq_source, lemmas, raw_documents
from rag_assets.defs.resources import PARTITION_TAG

JOB_NAME = "faq_index_refresh"
COURSE_JOB_NAME = "course_refresh"
PUBLISH_JOB_NAME = "index_publish"
REFRESH_TAG = "rag/refresh"  # the source run a course run belongs to
COURSE_STEPS = ("chunks", "lemmas", "embeddings")  # the values a publish takes of a course
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
RUN_TAGS = {"dagster/max_runtime": str(settings.max_runtime_s())}

refresh_job = dg.define_asset_job(
    JOB_NAME,
    selection=dg.AssetSelection.assets(faq_source),
    description="Read the FAQ source and its courses; the course runs and the publish follow.",
    tags=RUN_TAGS,
)
course_job = dg.define_asset_job(
    COURSE_JOB_NAME,
    selection=dg.AssetSelection.assets(raw_documents, chunks, lemmas, embeddings),
    description="Rebuild what changed in one course, up to its embeddings; nothing is served yet.",
    tags=RUN_TAGS,
)
publish_job = dg.define_asset_job(
    PUBLISH_JOB_NAME,
    selection=dg.AssetSelection.assets(es_index),
    description="Publish every course at once: the new values of successful course runs, the rest as served.",
    tags=RUN_TAGS,
)


def run_in_flight(instance: dg.DagsterInstance) -> dg.DagsterRun | None:
    """Any run of this code location that has not finished: a refresh's runs, but also a
    materialization started from the UI or the CLI, or a backfill's (`__ASSET_JOB`)."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT), limit=1)
    return runs[0] if runs else None


def course_runs_finished(instance: dg.DagsterInstance, since: float) -> list[dg.RunRecord]:
    """Runs of one course (of `course_refresh`, a backfill's, the UI's) finished after `since`."""
    filters = dg.RunsFilter(statuses=FINISHED, updated_after=datetime.fromtimestamp(since, UTC))
    return [
        record
        for record in instance.get_run_records(filters=filters)
        if PARTITION_TAG in record.dagster_run.tags and record.update_timestamp.timestamp() > since
    ]


def refresh_unfinished(instance: dg.DagsterInstance) -> str | None:
    """Why a refresh is still under way, or None: a run or a backfill is under way, or a source
    run succeeded or a course run finished since the last publish was started (the sensors chain
    the next runs within a minute; after `dagster/max_runtime` a stalled chain no longer counts)."""
    busy = run_in_flight(instance)
    if busy is not None:
        return f"run {busy.run_id} of {busy.job_name} is still {busy.status.value.lower()}"
    for backfill in instance.get_backfills(status=BulkActionStatus.REQUESTED, limit=1):
        return f"backfill {backfill.backfill_id} is still running"
    publishes = instance.get_run_records(filters=dg.RunsFilter(job_name=PUBLISH_JOB_NAME), limit=1)
    since = max(
        publishes[0].create_timestamp.timestamp() if publishes else 0.0,
        datetime.now(UTC).timestamp() - settings.max_runtime_s(),
    )
    filters = dg.RunsFilter(
        job_name=JOB_NAME,
        statuses=[dg.DagsterRunStatus.SUCCESS],
        updated_after=datetime.fromtimestamp(since, UTC),
    )
    finished = [*instance.get_run_records(filters=filters, limit=1), *course_runs_finished(instance, since)]
    for record in finished:
        run = record.dagster_run
        return f"run {run.run_id} of {run.job_name} finished; its refresh is not published yet"
    return None


def source_courses(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The courses the source named in this run of `faq_index_refresh`."""
    for record in instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records:
        materialization = record.asset_materialization
        if materialization is not None and materialization.asset_key == faq_source.key:
            return sorted(materialization.metadata["courses"].value)
    return []


def partition_requests(
    instance: dg.DagsterInstance, courses: list[str]
) -> list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest]:
    """Make the course partitions exactly the source's courses."""
    known = set(instance.get_dynamic_partitions(COURSES.name))
    return [
        COURSES.build_add_request(sorted(set(courses) - known)),
        COURSES.build_delete_request(sorted(known - set(courses))),
    ]


def sync_courses(instance: dg.DagsterInstance, courses: list[str]) -> None:
    """`partition_requests`, applied at once (runs in this process, without the daemon)."""
    add, delete = partition_requests(instance, courses)
    instance.add_dynamic_partitions(COURSES.name, add.partition_keys)
    for course in delete.partition_keys:
        instance.delete_dynamic_partition(COURSES.name, course)


def course_run_digests(instance: dg.DagsterInstance, run_ids: Iterable[str]) -> dict[str, list[str]]:
    """Per course, the digests of the values these (successful) course runs made; of two runs of
    one course, the later one's."""
    found: dict[str, dict[str, str]] = {}
    for run_id in run_ids:
        records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        for record in records.records:
            materialization = record.asset_materialization
            step = materialization.asset_key.to_user_string() if materialization else ""
            if materialization is not None and step in COURSE_STEPS and materialization.partition:
                digests = found.setdefault(materialization.partition, {})
                digests[step] = str(materialization.metadata["value_digest"].value)
    return {
        course: [digests[step] for step in COURSE_STEPS]
        for course, digests in found.items()
        if set(digests) == set(COURSE_STEPS)
    }


def publish_run_config(values: dict[str, list[str]]) -> dg.RunConfig:
    return dg.RunConfig(ops={"es_index": {"config": {"courses": values}}})


@dg.schedule(
    name="daily_document_refresh",
    job=refresh_job,
    cron_schedule=settings.schedule_cron(),
    execution_timezone=settings.schedule_timezone(),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Refreshes the index every day; skips a tick while an earlier refresh is unfinished.",
)
def daily_document_refresh(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    unfinished = refresh_unfinished(context.instance)
    if unfinished is not None:
        return dg.SkipReason(f"{unfinished}; skipping this tick")
    return dg.RunRequest(tags={"rag/trigger": "schedule"})


@dg.sensor(
    name="initial_index_build",
    job=refresh_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Builds the index right away when it was never published, instead of waiting for midnight.",
)
def initial_index_build(context: dg.SensorEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    if context.instance.get_latest_materialization_event(es_index.key) is not None:
        return dg.SkipReason("the index has been published; the daily schedule keeps it fresh")
    busy = run_in_flight(context.instance)
    if busy is not None:
        return dg.SkipReason(f"run {busy.run_id} of {busy.job_name} is already building the index")
    # One run key: the daemon never requests the initial build twice.
    return dg.RunRequest(run_key="initial-index-build", tags={"rag/trigger": "initial-build"})


@dg.run_status_sensor(
    name="course_runs_after_source",
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[refresh_job],
    request_job=course_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After the source was read: the course partitions follow its courses, one run per course.",
)
def course_runs_after_source(context: dg.RunStatusSensorContext) -> dg.SensorResult:
    source_run = context.dagster_run.run_id
    courses = source_courses(context.instance, source_run)
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                partition_key=course, run_key=f"{source_run}:{course}", tags={REFRESH_TAG: source_run}
            )
            for course in courses
        ],
        dynamic_partitions_requests=partition_requests(context.instance, courses),
    )


@dg.sensor(
    name="publish_after_courses",
    job=publish_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Once no run is left queued or running, publishes what the finished course runs made.",
)
def publish_after_courses(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    busy = run_in_flight(context.instance)  # a source run's courses would follow it: wait for them too
    if busy is not None:
        return dg.SkipReason(f"waiting for run {busy.run_id} of {busy.job_name}")
    finished = course_runs_finished(context.instance, float(context.cursor or 0))
    if not finished:
        return dg.SkipReason("no course run finished since the last publish")
    succeeded = sorted(
        (r for r in finished if r.dagster_run.status == dg.DagsterRunStatus.SUCCESS),
        key=lambda r: r.update_timestamp,
    )
    newest = max(record.update_timestamp.timestamp() for record in finished)
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"publish-{newest}",
                run_config=publish_run_config(
                    course_run_digests(context.instance, (r.dagster_run.run_id for r in succeeded))
                ),
                tags={
                    "rag/course_runs": str(len(finished)),
                    "rag/failed_course_runs": str(len(finished) - len(succeeded)),
                },
            )
        ],
        cursor=str(newest),
    )
