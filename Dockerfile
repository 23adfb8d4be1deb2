# One image for the Dagster webserver, the daemon (and the runs it starts), the Celery workers (the
# runs' steps) and the search service.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DAGSTER_HOME=/opt/dagster/home \
    RAG_DATA_DIR=/opt/dagster/data

WORKDIR /opt/dagster/app
# Exact versions from the lock file (`make lock` refreshes it), hashes checked.
COPY requirements/pip.lock requirements/deploy.lock requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/pip.lock \
    && pip install --no-cache-dir --require-hashes -r requirements/deploy.lock
COPY pyproject.toml README.md ./
COPY rag_assets ./rag_assets
# Editable: the defs loader reads [tool.dg] from pyproject.toml beside the package.
RUN pip install --no-cache-dir --no-deps -e .
COPY workspace.yaml ./
COPY deploy/dagster.yaml ${DAGSTER_HOME}/dagster.yaml
COPY deploy/dagster_celery_config.py ./deploy/

EXPOSE 3000 8000
