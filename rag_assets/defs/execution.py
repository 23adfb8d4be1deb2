"""Where a run's steps execute: RAG_EXECUTOR picks one of Dagster's executors.

- `in_process` (default): every step in the run's own process, spaCy loaded once; no process
  start per step, which is what a small refresh costs most.
- `multiprocess`: each step in a process of its own on this machine, two at a time by default
  (RAG_MAX_CONCURRENT_STEPS); the course shards of an asset run side by side.
- `celery`: each step is a Celery task on the broker (DAGSTER_CELERY_BROKER_URL), run by
  whichever `celery -A dagster_celery.app worker` takes it, on this machine or another; a worker
  process loads spaCy once for all the steps it runs.

`make run` and `execute_in_process` always run in process; the executor applies to runs that
Dagster launches (the daemon, `dagster job execute`, `dagster asset materialize`, the UI).
"""

import os

import dagster as dg

from rag_assets import settings


def executor_for(env: dict[str, str]) -> dg.ExecutorDefinition:
    name = settings.executor(env)
    if name == settings.MULTIPROCESS:
        concurrent = settings.number(env, "RAG_MAX_CONCURRENT_STEPS", 2)
        return dg.multiprocess_executor.configured({"max_concurrent": concurrent})
    if name == settings.CELERY:
        from dagster_celery import celery_executor  # the deploy extra only

        settings.celery_broker(env)  # named when missing; the URL itself stays in the environment
        broker = {"env": "DAGSTER_CELERY_BROKER_URL"}
        return celery_executor.configured({"broker": broker, "backend": broker})
    return dg.in_process_executor


@dg.definitions
def execution() -> dg.Definitions:
    return dg.Definitions(executor=executor_for(dict(os.environ)))
