"""How the graph runs itself: a refresh is one run of every asset, `faq_index_refresh`.

The seed's trigger settings map to Dagster like this: its run timeout is the `dagster/max_runtime`
tag on the refresh's run (enforced by run monitoring, enabled in the shipped instance
configuration); "skip if a run is already in progress" is a schedule that returns a SkipReason
while any run is queued or running; "create an initial run if the start date is before the
current execution period" is the `initial_index_build` sensor, which asks for a refresh as soon as
the daemon sees no index.
"""

import dagster as dg

from rag_assets import settings
from rag_assets.common.lock import DirectoryLock
from rag_assets.defs.assets import es_index
from rag_assets.defs.resources import runs_under_way

JOB_NAME = "faq_index_refresh"
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
RUN_TAGS = {"dagster/max_runtime": str(settings.max_runtime_s())}

refresh_job = dg.define_asset_job(
    JOB_NAME,
    selection=dg.AssetSelection.all(),
    description="Read the FAQ source, rebuild what changed in each course, publish every course at once.",
    tags=RUN_TAGS,
)


def run_in_flight(instance: dg.DagsterInstance) -> dg.DagsterRun | None:
    """Any run of this code location that has not finished: a refresh, but also a
    materialization started from the UI or the CLI; not a run whose process was killed while it
    held the data directory (the instance still says STARTED, the directory's lock knows better)."""
    killed = DirectoryLock(settings.data_dir()).ended_holder(runs_under_way(instance))
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT), limit=2)
    return next((run for run in runs if run.run_id != killed), None)


@dg.schedule(
    name="daily_document_refresh",
    job=refresh_job,
    cron_schedule=settings.schedule_cron(),
    execution_timezone=settings.schedule_timezone(),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Refreshes the index every day; skips a tick while a run is in progress.",
)
def daily_document_refresh(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    busy = run_in_flight(context.instance)
    if busy is not None:
        return dg.SkipReason(
            f"run {busy.run_id} of {busy.job_name} is still {busy.status.value.lower()}; skipping this tick"
        )
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
