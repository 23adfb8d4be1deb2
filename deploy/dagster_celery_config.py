"""Celery settings of the run workers (`celery -A dagster_celery.app worker`).

`dagster_celery.app` reads a module of this name when it is importable, so the workers' PYTHONPATH
holds deploy/. The broker comes from the environment, as in deploy/dagster.yaml, so a password in
it is never written to a file (`dagster-celery worker start -y` would write it under DAGSTER_HOME).
"""

import os

broker_url = os.environ["DAGSTER_CELERY_BROKER_URL"]
# The daemon's run monitoring asks the task's state: a result store every process can read.
result_backend = broker_url
# One run at a time per worker process, taken only when the worker is free.
worker_prefetch_multiplier = 1
