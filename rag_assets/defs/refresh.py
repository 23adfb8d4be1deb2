"""`make run`: the job the schedule runs, in this process, ending with a summary a user can read.

The job, not an ad-hoc asset selection, so the same limits hold however the graph is started.
Dagster's DEBUG events stay out of the console; the last lines say what was published where, or
why nothing was and what is still served.
"""

from __future__ import annotations

import os
import sys

import dagster as dg

from rag_assets import settings
from rag_assets.common.errors import RagError
from rag_assets.definitions import load_definitions
from rag_assets.defs.automation import JOB_NAME

CONSOLE_AT_INFO = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def summary(result: dg.ExecuteInJobResult) -> list[str]:
    """What the run did, then what is served now."""
    if result.success:
        [published] = result.asset_materializations_for_node("es_index")
        meta = {key: value.value for key, value in published.metadata.items()}
        lines = [
            f"published {meta['entries']} entries ({meta['chunks']} chunks) to {meta['location']}: "
            f"{meta['upserted']} written, {meta['deleted']} deleted, {meta['unchanged']} unchanged"
        ]
    else:
        lines = [f"run {result.run_id} did not publish:"]
        lines += [
            f"  blocked by {evaluation.check_name}: {evaluation.description}"
            for evaluation in result.get_asset_check_evaluations()
            if not evaluation.passed and evaluation.blocking
        ]
        lines += [
            f"  {event.step_key} failed: {_failure_message(event)}"
            for event in result.get_step_failure_events()
            # a failed blocking check stops its step too; the check's own line says why
            if event.step_failure_data.error.cls_name != "DagsterAssetCheckFailedError"
        ]
    return [*lines, served_line(published_now=result.success)]


def _failure_message(event: dg.DagsterEvent) -> str:
    error = event.step_failure_data.error
    while error is not None and error.cause is not None and "Failure" not in error.cls_name:
        error = error.cause
    return (
        (error.message if error else "unknown error")
        .strip()
        .removeprefix("dagster._core.definitions.events.Failure: ")
    )


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


def main() -> int:
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    job = load_definitions().resolve_job_def(JOB_NAME)
    result = job.execute_in_process(instance=instance, run_config=CONSOLE_AT_INFO, raise_on_error=False)
    for line in summary(result):
        print(f"refresh: {line}")
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
