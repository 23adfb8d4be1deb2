"""Celery settings of the step workers (`celery -A dagster_celery.app worker`).

`dagster_celery.app` reads a module of this name when it is importable, so the workers' PYTHONPATH
holds deploy/. The broker comes from the environment, as the celery executor's does
(rag_assets/defs/execution.py), so a password in it is never written to a file.
"""

import os

broker_url = os.environ["DAGSTER_CELERY_BROKER_URL"]
# The run waits for each step's result here: the executor reads it from the same URL.
result_backend = broker_url
# One step at a time per worker process, and none reserved while it is busy: a ready step goes to
# a free worker instead of waiting behind another step on a busy one (Redis brokers only).
worker_prefetch_multiplier = 1
worker_disable_prefetch = True
